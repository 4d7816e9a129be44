"""Shared command-line plumbing for train.py and eval.py: flags and user errors.

Mistakes in `--config=FILE:ARGS` or `--config.KEY=VALUE` surface from inside
ml_collections' flag parsing as tracebacks; here they become one line naming
what to fix.
"""

import importlib.util
import logging
import os
import re
import sys
from collections.abc import Callable

from absl import app, flags

from efficient_transformers import paths
from efficient_transformers.errors import ConfigError, UserError


def _user_error_in_chain(exc: BaseException) -> UserError | None:
  seen = set()
  while exc is not None and id(exc) not in seen:
    if isinstance(exc, UserError):
      return exc
    seen.add(id(exc))
    exc = exc.__cause__ or exc.__context__
  return None


def load_config(spec: str):
  """The config of `FILE[:ARGS]`, as --config=FILE[:ARGS] gives it (for commands that take
  a config spec as a plain string)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(
      f"--config={spec}: there is no config file {os.path.abspath(path)}. Give the path of a "
      "file in configs/ (relative to the current directory, e.g. configs/lra/listops.py:smoke)."
    )
  module_spec = importlib.util.spec_from_file_location("_config_for_check", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _unknown_override(argv: list[str]) -> str | None:
  """Names the first `--config.KEY=...` whose KEY the config does not have."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None:
    return None
  try:
    config = load_config(spec)
  except Exception:  # noqa: BLE001 - the caller reports the original error then.
    return None
  for a in argv:
    if not a.startswith("--config."):
      continue
    dotted = a[len("--config.") :].split("=", 1)[0]
    node, walked = config, []
    for key in dotted.split("."):
      if not hasattr(node, "keys") or key not in node.keys():
        where = "config" + "".join(f".{k}" for k in walked)
        valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else ""
        valid = valid or "(none)"
        hint = ""
        if walked[-2:] == ["model", "attention_kwargs"]:
          hint = (
            f" It holds the keyword arguments of attention {config.model.attention!r}; pick "
            "another attention in the config arg (--config=FILE:attention=NAME) to get its own."
          )
        return (
          f"Unknown config key in {a.split('=', 1)[0]}: {where} has no {key!r}. "
          f"Valid: {valid}.{hint}"
        )
      node, walked = node[key], [*walked, key]
  return None


class _QuietLibraries(logging.Filter):
  """Drops the INFO chatter of Orbax and Grain (dozens of lines per save), and the stack
  traces Orbax's threads log for a cause the user fixes (a full or read-only disk): the
  command ends with one line about it."""

  def filter(self, record: logging.LogRecord) -> bool:
    noisy = any(f"/{lib}/" in record.pathname for lib in ("orbax", "grain"))
    if noisy and record.exc_info and paths.fixable_errno(record.exc_info[1]) is not None:
      record.exc_info, record.exc_text = None, None
    return record.levelno >= logging.WARNING or not noisy


def _missing_config_file(argv: list[str]) -> str | None:
  """A one-line message if `--config=FILE[:ARGS]` names no file (ml_collections says less)."""
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      spec = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
    else:
      continue
    path = spec.partition(":")[0]
    if not os.path.isfile(path):
      where = os.path.abspath(path)
      return (
        f"--config={spec}: there is no config file {where}. Give the path of a file in "
        "configs/ (relative to the current directory, e.g. configs/lra/listops.py:smoke)."
      )
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl flags parser for `app.run(main, flags_parser=parse_flags)`."""
  logging.getLogger("absl").addFilter(_QuietLibraries())
  missing = _missing_config_file(argv[1:])
  if missing:
    print(f"error: {missing}", file=sys.stderr)
    sys.exit(2)
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - turned into a one-line message below.
    user = _user_error_in_chain(e)
    if user is not None or isinstance(e, flags.Error):
      # ml_collections folds the config file's traceback into the text (and
      # re-raises it under the original type); its last line is the error itself.
      message = str(user or e).strip().splitlines()[-1]
      message = re.sub(r"^[\w.]*(Error|Exception): ", "", message)
    elif isinstance(e, (AttributeError, KeyError)):
      message = _unknown_override(argv) or f"Bad --config override: {e}"
    else:
      raise
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0, for a multi-host run."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
_HEARTBEAT = flags.DEFINE_integer(
  "heartbeat_timeout_seconds",
  100,
  "Multi-host: a process silent this long is taken for dead and the run stops.",
)


def _close_progress_bars() -> None:
  import tqdm

  for bar in list(getattr(tqdm.tqdm, "_instances", ())):
    bar.close()


def run(main: Callable[[], None]) -> None:
  """Parses flags, joins a multi-host run if asked, runs `main()`; user errors end in one line.

  A process of a multi-process run runs the command as a supervised child
  (see `supervisor`), so that another process's death ends it in one line.
  """
  from efficient_transformers.training import supervisor

  code = supervisor.maybe_supervise(sys.argv)
  if code is not None:
    sys.exit(code)

  def wrapped(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
      from efficient_transformers.training import distributed

      distributed.initialize(
        _COORDINATOR.value,
        _NUM_PROCESSES.value,
        _PROCESS_ID.value,
        heartbeat_timeout_seconds=_HEARTBEAT.value,
      )
      main()
    except UserError as e:
      _close_progress_bars()  # So that the message starts a line of its own.
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    except Exception as e:
      if supervisor.peer_failure(e):  # Said in one line by the supervisor.
        os._exit(1)  # Not sys.exit: JAX's shutdown would wait on the dead process.
      raise

  app.run(wrapped, flags_parser=parse_flags)
