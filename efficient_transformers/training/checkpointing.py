"""Checkpoints of a run: periodic keep-N, the best by a validation metric, resumable data.

Layout under the workdir (one Orbax `CheckpointManager` per folder):

    checkpoints/<step>/{state,data_state,metrics,fingerprint}/   the last `max_to_keep`
    best/<step>/{state,data_state,metrics,fingerprint}/          the best so far, kept alone
    <folder>/<step>/checksums.json                               size and sha256 of every file

`state` is the model + optimizer pytree (OCDBT arrays, restored already sharded);
`data_state` holds one JSON file per process, because each process reads its own
shard of the data and so has its own iterator position; `metrics` and
`fingerprint` (model config, attention name, ...) are JSON that Orbax's primary
process writes.

Integrity: once a step is on disk, process 0 records the size and sha256 of
every file of it in `checksums.json` (the step is then *sealed*), and every
restore checks them first. A step whose files no longer match, or that was
never sealed (the run stopped while saving it), is damaged: resuming falls
back to the newest intact step with a warning naming the file, and reading
one named step (evaluation, `init_from`) refuses it, naming the step and the
file. TensorStore's array files carry no checksum of their own, so without
this a flipped byte would be restored silently.

Every process calls every method; Orbax coordinates who writes what.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from efficient_transformers import paths
from efficient_transformers.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

_FRESH = "use a fresh --workdir, or the config this workdir was trained with"
CHECKSUMS = "checksums.json"
_CHUNK = 1 << 24


class _ProcessJsonHandler(ocp.CheckpointHandler):
  """Writes one JSON file per process: the data-iterator state is per process."""

  def save(self, directory: epath.Path, args: "_ProcessJsonSave"):
    (directory / _process_file()).write_text(json.dumps(args.item))

  def restore(self, directory: epath.Path, args: "_ProcessJsonRestore | None" = None):
    return json.loads((directory / _process_file()).read_text())


@ocp.args.register_with_handler(_ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class _ProcessJsonSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(_ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class _ProcessJsonRestore(ocp.args.CheckpointArgs):
  pass


def _process_file() -> str:
  return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def path_str(path) -> str:
  """'params/w' for a jax key path, whatever the node types."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _damaged(step: int, where: str, error: "Exception | str") -> str:
  """Logs and returns why a checkpoint could not be read."""
  # Tensorstore errors carry a whole JSON spec; the head names the missing/bad file.
  why = error if isinstance(error, str) else f"{type(error).__name__}: {str(error)[:300]}"
  message = f"step {step} ({where}) is damaged: {why}"
  log.warning("Checkpoint %s; trying an older step.", message)
  return message


def _short(value, limit: int = 60) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_diffs(stored, given, prefix="") -> list[str]:
  """Every key at which two JSON values differ, in sorted key order."""
  if isinstance(stored, dict) and isinstance(given, dict):
    diffs = []
    for key in sorted(set(stored) | set(given)):
      if key not in stored:
        diffs.append(f"{prefix}{key} (only in current: {_short(given[key])})")
      elif key not in given:
        diffs.append(f"{prefix}{key} (only in stored: {_short(stored[key])})")
      else:
        diffs += _json_diffs(stored[key], given[key], f"{prefix}{key}.")
    return diffs
  if stored != given:
    return [f"{prefix.rstrip('.') or '<root>'}: stored {stored!r}, current {given!r}"]
  return []


def _files(step_dir: epath.Path) -> list[str]:
  """Every file under `step_dir` (relative, '/'-separated), the manifest excepted."""
  if not paths.is_url(step_dir):
    root = os.fspath(step_dir)
    out = []
    for directory, _, names in os.walk(root):
      rel = os.path.relpath(directory, root)
      out += [name if rel == "." else f"{rel}/{name}" for name in names]
  else:
    out, todo = [], [step_dir]
    while todo:
      for child in todo.pop().iterdir():
        if child.is_dir():
          todo.append(child)
        else:
          out.append(str(child)[len(str(step_dir)) + 1 :])
  return sorted(f.replace(os.sep, "/") for f in out if f != CHECKSUMS)


def _digest(path: epath.Path) -> tuple[int, str]:
  """(size, sha256 hex) of one file, read in chunks (hashlib frees the GIL for them)."""
  h, size = hashlib.sha256(), 0
  with path.open("rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
      size += len(chunk)
  return size, h.hexdigest()


def _digests(step_dir: epath.Path, names: list[str]) -> list[tuple[int, str] | None]:
  """_digest of each name (None where the file is missing), files read in parallel."""

  def one(name):
    try:
      return _digest(step_dir / name)
    except FileNotFoundError:
      return None

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    return list(pool.map(one, names))


def seal(step_dir: epath.Path) -> None:
  """Records the size and sha256 of every file of a finished step in its checksums.json."""
  names = _files(step_dir)
  digests = _digests(step_dir, names)
  files = {n: {"size": d[0], "sha256": d[1]} for n, d in zip(names, digests, strict=True)}
  paths.write_text(step_dir / CHECKSUMS, json.dumps({"algorithm": "sha256", "files": files}))


def verify(step_dir: epath.Path) -> str | None:
  """None if every file of the step matches its checksums.json, else what is wrong."""
  text = paths.read_text(step_dir / CHECKSUMS)
  if text is None:
    return f"it has no {CHECKSUMS}: its save did not finish (the run stopped while saving it)"
  try:
    files = json.loads(text)["files"]
  except (ValueError, KeyError, TypeError):
    return f"its {CHECKSUMS} is unreadable"
  names = sorted(files)
  for name, got in zip(names, _digests(step_dir, names), strict=True):
    want = files[name]
    if got is None:
      return f"its file {name} is missing"
    if got[0] != want["size"]:
      return f"its file {name} has {got[0]} bytes, not the {want['size']} it was saved with"
    if got[1] != want["sha256"]:
      return f"its file {name} does not match the checksum recorded when it was saved"
  return None


def _verify_everywhere(step_dir: epath.Path) -> str | None:
  """`verify` on process 0, its verdict shared: every process must pick the same step."""
  if jax.process_count() == 1:
    return verify(step_dir)
  from jax.experimental import multihost_utils

  problem = verify(step_dir) if jax.process_index() == 0 else None
  damaged = bool(multihost_utils.broadcast_one_to_all(np.asarray(problem is not None)))
  if damaged and problem is None:
    problem = "process 0 found it damaged (its log names the file)"
  return problem if damaged else None


def _metadata(manager: ocp.CheckpointManager, step: int) -> tuple[Any, dict | None]:
  """(the state's array metadata tree, the fingerprint) of `step`; reads no array."""
  try:
    meta = manager.item_metadata(step)["state"].tree
    fingerprint = manager.restore(
      step, args=ocp.args.Composite(fingerprint=ocp.args.JsonRestore())
    ).fingerprint
  except Exception as e:  # noqa: BLE001 - reported as the user's damaged checkpoint.
    raise CheckpointError(f"Checkpoint {manager.directory}/{step} is unreadable: {e}") from None
  return meta, fingerprint


class Checkpointer:
  """Saves and restores {state, data_state} with keep-N, best-by-metric and checks.

  Args:
    workdir: the run's directory (local path or gs://...).
    max_to_keep: periodic checkpoints kept; the best one is kept apart from these.
    best_metric: key of the validation metrics that ranks checkpoints.
    best_mode: "max" or "min": whether a higher or lower `best_metric` is better.
    fingerprint: JSON dict saved with every checkpoint (model config, attention
      name, ...); restore refuses a checkpoint whose fingerprint differs. None
      skips the check.
  """

  def __init__(
    self,
    workdir: str,
    *,
    max_to_keep: int = 3,
    best_metric: str = "accuracy",
    best_mode: str = "max",
    fingerprint: dict | None = None,
  ):
    if best_mode not in ("max", "min"):
      raise ConfigError(f"checkpoint best_mode must be 'max' or 'min', got {best_mode!r}")
    self.workdir = paths.resolve(workdir, what="workdir")
    self._best_metric, self._best_mode = best_metric, best_mode
    # A JSON round trip now, so tuples/int keys compare equal to what comes back from disk.
    self._fingerprint = None if fingerprint is None else json.loads(json.dumps(fingerprint))
    self._max_to_keep = max_to_keep
    # Reading must not write: eval and init_from open the workdirs of runs that may still
    # be saving, whose in-flight tmp folders Orbax's cleanup would delete. So the managers
    # start read-only and are reopened for writing on the first save.
    self._writing = False
    self._periodic = self._manager("checkpoints", None, write=False)
    # Not Orbax's best_fn: on a tie it keeps the newer step (we keep the earlier), and
    # it would need metrics on every save. We decide "improved" and keep one step here.
    self._best = self._manager("best", None, write=False)
    self._best_value = self._stored_best_value()
    self._resumed_from: int | None = None  # The step `restore` last returned.

  def _manager(self, name: str, max_to_keep: int | None, write: bool) -> ocp.CheckpointManager:
    # Two managers save at once in every process; without their own barrier names
    # their multi-process commit barriers collide ("Barrier ... is already ongoing").
    multiprocessing = ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)
    json_handler = lambda: ocp.JsonCheckpointHandler(multiprocessing_options=multiprocessing)
    handlers = {
      "state": ocp.StandardCheckpointHandler(multiprocessing_options=multiprocessing),
      "data_state": _ProcessJsonHandler(),
      "metrics": json_handler(),
      "fingerprint": json_handler(),
    }
    # cleanup_tmp_directories: a save killed mid-write leaves a tmp folder that
    # Orbax never lists as a step; delete it instead of letting it pile up.
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=write,
      cleanup_tmp_directories=write,
      save_root_metadata=write,
      multiprocessing_options=multiprocessing,
    )
    return ocp.CheckpointManager(self.workdir / name, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    """The newest periodic step on disk (possibly damaged; restore checks), or None."""
    return self._periodic.latest_step()

  def best_step(self) -> int | None:
    """The step of the best checkpoint so far (the newest sealed one), or None."""
    steps = sorted(self._best.all_steps(), reverse=True)
    sealed = [s for s in steps if (self._step_dir(self._best, s) / CHECKSUMS).exists()]
    return (sealed or steps or [None])[0]

  def _step_dir(self, manager: ocp.CheckpointManager, step: int) -> epath.Path:
    return epath.Path(manager.directory) / str(step)

  def _seal(self, manager: ocp.CheckpointManager, step: int) -> None:
    step_dir = self._step_dir(manager, step)
    # Process 0 sees every process's files once Orbax has committed the step. A step
    # sealed before (a repeated save at a saved step) is left as it is.
    if jax.process_index() == 0 and not (step_dir / CHECKSUMS).exists():
      seal(step_dir)

  def save(
    self, step: int, state, *, data_state: dict | None = None, metrics: dict | None = None
  ) -> None:
    """Saves `state` at `step`; returns once it is on disk (safe to be killed after).

    Periodic checkpoints newer than `step`, or than the step last restored (e.g. the
    damaged steps restore fell back past), belong to an abandoned timeline and are
    deleted first: Orbax would refuse older steps, keep-N would drop the new ones,
    and "latest" would point at the old run.

    Args:
      step: the training step.
      state: pytree of jax.Arrays (model + optimizer), possibly sharded.
      data_state: this process's JSON-able input-iterator state.
      metrics: validation metrics; if `metrics[best_metric]` beats the best so far
        (ties do not), this step is also kept as the best checkpoint.
    """
    if metrics is not None:
      # device_get: an explicit copy, allowed under jax_transfer_guard="disallow".
      metrics = {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
    # Decided before writing anything, so a bad best_metric fails without a half-done save.
    improved = metrics is not None and self._improves(metrics)
    self._check_space(state, copies=1 + improved, step=step)
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data_state=_ProcessJsonSave(data_state),
      metrics=ocp.args.JsonSave(metrics),
      fingerprint=ocp.args.JsonSave(self._fingerprint),
    )
    if not self._writing:
      self.close()
      self._periodic = self._manager("checkpoints", self._max_to_keep, write=True)
      self._best = self._manager("best", None, write=True)
      self._writing = True
    newest_kept = step if self._resumed_from is None else min(step, self._resumed_from)
    self._resumed_from = None
    for old in self._periodic.all_steps():
      if old > newest_kept:
        log.warning(
          "Deleting checkpoint %s/checkpoints/%d: superseded by step %d.", self.workdir, old, step
        )
        self._periodic.delete(old)
    # A second save at a saved step of this timeline (e.g. on SIGTERM right after a
    # periodic save) is a no-op, not a delete-and-rewrite that a kill could interrupt.
    if step not in self._periodic.all_steps():
      self._periodic.save(step, args=args, force=True)
    if improved:
      old_best = self._best.all_steps()
      if step not in old_best:
        # force: the best may come from an abandoned later timeline, and Orbax skips steps
        # below its latest.
        self._best.save(step, args=args, force=True)
      self._best_value = metrics[self._best_metric]
    self._periodic.wait_until_finished()
    self._best.wait_until_finished()
    self._seal(self._periodic, step)
    if improved:
      self._seal(self._best, step)
      # Only after the new best is sealed, so a kill never leaves zero usable best checkpoints.
      for old in old_best:
        if old != step:
          self._best.delete(old)

  def _check_space(self, state, *, copies: int, step: int) -> None:
    """Refuses a save that cannot fit, before Orbax starts writing it.

    A save that runs out of space half-way fails in Orbax's threads, each
    printing its own stack trace; asking first makes a full disk one message.
    Every process asks about its own disk, and all stop if any would not fit.
    """
    free = paths.free_bytes(self.workdir)
    if free is None:  # A bucket: no space to run out of.
      return
    arrays = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
    # Room for per-process shards, metadata files and file-system blocks on top.
    need = int(copies * (1.25 * arrays / jax.process_count() + 64 * 4096))
    short = free < need
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      short = bool(np.any(multihost_utils.process_allgather(np.asarray(short))))
    if short:
      mib = lambda b: f"{b / 2**20:.1f} MiB"
      raise paths.NotEnoughSpaceError(
        f"checkpoint step {step} needs about {mib(need)}, {mib(free)} are free"
        if free < need
        else f"another process has no room for checkpoint step {step}"
      )

  def _stored_best_value(self) -> float | None:
    """The metric a new best must beat: the one saved with the best step on disk."""
    step = self.best_step()
    if step is None:
      return None
    try:
      stored = self._best.restore(step, args=ocp.args.Composite(metrics=ocp.args.JsonRestore()))
      return stored.metrics[self._best_metric]
    except Exception as e:  # An unreadable best is replaced by the next one, not fatal.
      log.warning("Best checkpoint %s/best/%d is unreadable (%s).", self.workdir, step, e)
      return None

  def _improves(self, metrics: dict) -> bool:
    if self._best_metric not in metrics:
      raise ConfigError(
        f"checkpoint best_metric {self._best_metric!r} is not among the validation "
        f"metrics {sorted(metrics)}; set it to one of them."
      )
    value = metrics[self._best_metric]
    if self._best_value is None:
      return value == value  # False for NaN.
    return value > self._best_value if self._best_mode == "max" else value < self._best_value

  def restore(self, abstract_state, *, which: str | int = "latest") -> tuple[int, Any, Any]:
    """Restores a checkpoint onto `abstract_state`'s shapes, dtypes and shardings.

    Args:
      abstract_state: pytree of jax.ShapeDtypeStruct with `.sharding` (e.g. from
        `jax.eval_shape` under the mesh), matching the saved state exactly.
      which: "latest" (falls back past damaged steps, with a warning), "best", or a step.

    Returns:
      (step, state, data_state), data_state being this process's saved iterator state.

    Raises:
      CheckpointError: no such checkpoint; all candidates damaged; or the stored tree,
        shapes, dtypes or fingerprint differ from `abstract_state` / this run's fingerprint.
    """
    manager, steps = self._candidates(which)
    errors = []
    for step in steps:
      where = f"{manager.directory}/{step}"
      problem = _verify_everywhere(self._step_dir(manager, step))
      if problem is not None:
        errors.append(_damaged(step, where, problem))
        continue
      try:
        meta = manager.item_metadata(step)["state"]
        meta = None if meta is None else meta.tree
        fingerprint = manager.restore(
          step, args=ocp.args.Composite(fingerprint=ocp.args.JsonRestore())
        ).fingerprint
        if meta is None:
          raise ValueError("its array metadata is missing")
      except Exception as e:  # Unreadable metadata: a damaged step.
        errors.append(_damaged(step, where, e))
        continue
      # Outside the try: an incompatible checkpoint is the user's to fix, not a fallback.
      self._check_compatible(where, meta, fingerprint, abstract_state)
      try:
        restored = manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data_state=_ProcessJsonRestore()
          ),
        )
      except Exception as e:  # Truncated or missing array files.
        errors.append(_damaged(step, where, e))
        continue
      self._resumed_from = step
      return step, restored.state, restored.data_state
    raise CheckpointError(
      f"No readable checkpoint for which={which!r} in {self.workdir}: {'; '.join(errors)}. "
      f"Delete {self.workdir} to start from scratch, or use another --workdir."
    )

  def _candidates(self, which: str | int) -> tuple[ocp.CheckpointManager, list[int]]:
    """The manager and the steps to try, newest first, for `which`."""
    if which == "latest":
      manager, steps = self._periodic, sorted(self._periodic.all_steps(), reverse=True)
    elif which == "best":
      manager, steps = self._best, [s for s in [self.best_step()] if s is not None]
    elif isinstance(which, int) and not isinstance(which, bool):
      manager = self._periodic if which in self._periodic.all_steps() else self._best
      steps = [which] if which in manager.all_steps() else []
    else:
      raise ValueError(f"which must be 'latest', 'best' or a step, got {which!r}")
    if not steps:
      raise CheckpointError(
        f"No checkpoint for which={which!r} in {self.workdir} (periodic steps: "
        f"{self._periodic.all_steps()}, best: {self._best.all_steps()})."
      )
    return manager, steps

  def stored(self, which: str | int = "best") -> tuple[int, dict, dict[str, tuple]]:
    """(step, fingerprint, {parameter path: shape}) of checkpoint `which`; reads no array.

    What a caller checks before restoring from another run (a teacher, `init_layers`):
    its task and vocabulary, and how many layers it has. Paths are "/"-joined below
    "params" ("encoder/stack/blocks/0/...").
    """
    manager, steps = self._candidates(which)
    step = steps[0]
    meta, fingerprint = _metadata(manager, step)
    is_meta = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
    shapes = {}
    for path, m in jax.tree_util.tree_leaves_with_path(meta.get("params", {}), is_leaf=is_meta):
      shapes[path_str(path)] = tuple(m.shape)
    return step, fingerprint or {}, shapes

  def restore_params(
    self,
    abstract_params,
    *,
    which: str | int = "best",
    check_fingerprint: bool = True,
    subset: bool = False,
  ) -> tuple[int, Any]:
    """Restores only `state["params"]`: for evaluation and `init_from`.

    Neither needs the optimizer or the data iterator, so this works whatever
    the optimizer was and however many processes saved the checkpoint. Only
    the parameters' shapes (and, if `check_fingerprint`, the fingerprint) must
    match. No fallback past a damaged step: the caller named the step. With
    `subset`, the checkpoint may hold parameters that `abstract_params` does not
    (a deeper model's other layers); those are not read.
    """
    manager, steps = self._candidates(which)
    step = steps[0]
    where = f"{manager.directory}/{step}"
    problem = _verify_everywhere(self._step_dir(manager, step))
    if problem is not None:
      older = [s for s in self._periodic.all_steps() if s < step]
      hint = f" Step {max(older)} is older; try --checkpoint={max(older)}." if older else ""
      raise CheckpointError(f"Checkpoint step {step} ({where}) is damaged: {problem}.{hint}")
    meta, fingerprint = _metadata(manager, step)
    wanted = {"params": abstract_params}
    self._check_compatible(
      where, meta, fingerprint if check_fingerprint else None, wanted, partial=True, subset=subset
    )
    # The standard handler cannot restore a subtree; a PyTree reader of the same files can.
    reader = ocp.CheckpointManager(
      manager.directory,
      options=ocp.CheckpointManagerOptions(create=False, save_root_metadata=False),
      item_handlers={"state": ocp.PyTreeCheckpointHandler()},
    )
    restore_args = jax.tree.map(
      lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype),
      wanted,
    )
    try:
      restored = reader.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(wanted, restore_args=restore_args, partial_restore=True)
        ),
      )
    except Exception as e:  # noqa: BLE001 - truncated or missing array files.
      raise CheckpointError(f"Checkpoint {where} is damaged: {e}") from None
    finally:
      reader.close()
    return step, restored.state["params"]

  def _check_compatible(
    self,
    where: str,
    meta,
    fingerprint,
    abstract_state,
    *,
    partial: bool = False,
    subset: bool = False,
  ) -> None:
    """Raises CheckpointError naming how the checkpoint differs from this run."""
    hint = f"Checkpoint {where} does not match this run"
    if self._fingerprint is not None and fingerprint is not None:
      diffs = _json_diffs(fingerprint, self._fingerprint)
      if diffs:
        # All of them: a model of another kind (e.g. another memory type) differs in
        # several keys, and the one that names the kind may not sort first.
        raise CheckpointError(
          f"{hint}: fingerprint differs at {'; '.join(diffs)}. To fix, {_FRESH}."
        )
    is_meta = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
    stored = {path_str(p): m for p, m in jax.tree_util.tree_leaves_with_path(meta, is_leaf=is_meta)}
    wanted = {path_str(p): a for p, a in jax.tree_util.tree_leaves_with_path(abstract_state)}
    if partial:  # Only the subtree asked for must be there.
      stored = {k: v for k, v in stored.items() if k.split("/")[0] in abstract_state}
    if subset:  # Only the arrays asked for must be there.
      stored = {k: v for k, v in stored.items() if k in wanted}
    # Every difference (up to 5), so one failed resume shows the whole story.
    diffs = [
      f"{k!r} is only in the {'checkpoint' if k in stored else 'model'}"
      for k in sorted(set(stored) ^ set(wanted))
    ] + [
      f"{k!r} is {stored[k].dtype}{list(stored[k].shape)} in the checkpoint but "
      f"{wanted[k].dtype}{list(wanted[k].shape)} in the model"
      for k in sorted(set(stored) & set(wanted))
      if tuple(stored[k].shape) != wanted[k].shape or jnp.dtype(stored[k].dtype) != wanted[k].dtype
    ]
    if diffs:
      more = f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else ""
      raise CheckpointError(f"{hint}: {'; '.join(diffs[:5])}{more}. To fix, {_FRESH}.")
    if partial:
      return
    files = sorted(p.name for p in (epath.Path(where) / "data_state").glob("process_*.json"))
    if _process_file() not in files:
      # The files passed their checksums, so they are what was saved: by other processes.
      counts = sorted({f.rsplit("-of-", 1)[-1].removesuffix(".json") for f in files})
      raise CheckpointError(
        f"{hint}: it was saved by {' or '.join(counts) or 'another number of'} process(es) "
        f"(data-iterator state {files}) and this run has {jax.process_count()}. Resume with "
        "that many processes, or use a fresh --workdir."
      )

  def close(self) -> None:
    """Waits for pending work and releases Orbax's threads."""
    self._periodic.close()
    self._best.close()
