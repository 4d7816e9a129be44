"""Paths as users write them, and the one filesystem layer behind every workdir.

Every path a user passes (`--workdir`, `config.data_dir`, `config.init_from`,
the benchmarks' `--out`, the generators' `--out_dir`) goes through `resolve`
or `resolve_local` once, where it enters the code:

- local paths may be relative (to the current directory), start with `~`, end
  in a slash or pass through symlinks; they become absolute, which Orbax and
  TensorStore require;
- `gs://bucket/dir` stays a URL. Files under a workdir are read and written
  through `etils.epath` (the layer Orbax uses), so a workdir may live in a
  bucket, as it does on Cloud TPU pods. Data directories stay local: the
  readers memory-map and seek in their files.

`write_text` writes a file whole and atomically on either kind of path, and
`user_io_error` turns the OS errors a user can fix (read-only file system,
full disk, permissions, a file where a directory should be) into one line
naming the path and what to do.
"""

import contextlib
import errno
import os
import shutil
from collections.abc import Callable

from etils import epath

from efficient_transformers.errors import ConfigError, DataError, UserError

# URL schemes a workdir may use (through etils.epath and TensorStore).
URL_SCHEMES = ("gs",)


def _no_listing_cache() -> None:
  """gcsfs caches directory listings forever by default, so a process would not see
  a file another process wrote (a lock, a checkpoint, results) once it had listed the
  folder. Workdirs are shared between processes and hosts: always list afresh."""
  try:
    import fsspec.config
  except ImportError:  # No fsspec: no gs:// either.
    return
  for protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


_no_listing_cache()


class WorkdirIOError(UserError):
  """Writing or reading under a user's path failed for a reason the user can fix.

  `errno` is the cause's error number (errno.ENOSPC, errno.EROFS, ...).
  """

  def __init__(self, code: int, message: str):
    super().__init__(message)
    self.errno = code


def is_url(path: "str | os.PathLike") -> bool:
  return "://" in os.fspath(path)


def resolve(path: "str | os.PathLike", *, what: str) -> epath.Path:
  """`path` as an absolute local path or a normalized gs:// URL.

  Args:
    path: what the user wrote.
    what: how to name it in an error, e.g. "--workdir".

  Raises:
    ConfigError: an empty path, or a URL of another scheme than gs://.
  """
  text = os.fspath(path)
  if not text:
    raise ConfigError(f"{what} is empty; give a directory.")
  if is_url(text):
    scheme, _, rest = text.partition("://")
    if scheme not in URL_SCHEMES:
      raise ConfigError(
        f"{what}={text!r}: {scheme}:// is not supported; use a local path or gs://BUCKET/DIR."
      )
    rest = rest.strip("/")
    if not rest:
      raise ConfigError(f"{what}={text!r} names no bucket; write {scheme}://BUCKET/DIR.")
    return epath.Path(f"{scheme}://{rest}")
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def resolve_local(path: "str | os.PathLike", *, what: str) -> str:
  """`path` as an absolute local path; a URL is a ConfigError naming `what`."""
  text = os.fspath(path)
  if is_url(text):
    raise ConfigError(
      f"{what}={text!r}: this path must be on a local or mounted file system (a bucket "
      "can be mounted with gcsfuse); only workdirs may be gs:// URLs."
    )
  return str(resolve(text, what=what))


_FIXES = {
  errno.EROFS: ("is on a read-only file system", "use a writable directory"),
  errno.EACCES: ("is not writable (permission denied)", "fix its permissions or use another"),
  errno.EPERM: ("is not writable (operation not permitted)", "fix its permissions or use another"),
  errno.ENOSPC: ("has no space left on its device", "free some space"),
  errno.EDQUOT: ("is over its disk quota", "free some space"),
  errno.ENOTDIR: ("is inside a file, not a directory", "use a directory path"),
  errno.EEXIST: ("exists as a file, not a directory", "use a directory path"),
}

# How the same causes read when they come back as text from TensorStore or Orbax.
_MESSAGES = {
  "No space left on device": errno.ENOSPC,
  "Disk quota exceeded": errno.EDQUOT,
  "Read-only file system": errno.EROFS,
  "Permission denied": errno.EACCES,
}


class NotEnoughSpaceError(OSError):
  """A write refused before it starts: `detail` says how much it needs and how much is free."""

  def __init__(self, detail: str):
    super().__init__(errno.ENOSPC, "No space left on device")
    self.detail = detail


def free_bytes(path) -> int | None:
  """Free bytes where `path` (or its nearest existing parent) lies; None for a URL."""
  if is_url(path):
    return None
  path = os.fspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  return shutil.disk_usage(path).free


def fixable_errno(error: BaseException) -> int | None:
  """The errno of a cause the user can fix, found anywhere in `error`'s chain, or None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _FIXES:
      return error.errno
    text = str(error)
    for needle, code in _MESSAGES.items():
      if needle in text:
        return code
    error = error.__cause__ or error.__context__
  return None


def _chain(error: BaseException):
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def user_io_error(
  error: BaseException, path, *, then: str = "", otherwise: str = ""
) -> WorkdirIOError | None:
  """A one-line WorkdirIOError for `error` at `path`, or None if the user cannot fix it.

  Args:
    error: what writing or reading raised.
    path: the directory or file to name.
    then: what happens after the fix, e.g. "rerun the same command to resume".
    otherwise: another way out, e.g. "pass --results=PATH".
  """
  code = fixable_errno(error)
  if code is None:
    return None
  problem, fix = _FIXES[code]
  detail = next((getattr(e, "detail", "") for e in _chain(error) if getattr(e, "detail", "")), "")
  problem += f" ({detail})" if detail else ""
  then = f", then {then}" if then else ""
  otherwise = f", or {otherwise}" if otherwise else ""
  return WorkdirIOError(code, f"{path} {problem}: {fix}{then}{otherwise}.")


@contextlib.contextmanager
def writing(path, *, then: "str | Callable[[], str]" = "", otherwise: str = ""):
  """Rewords a fixable OS error raised inside the block as a one-line WorkdirIOError.

  Args:
    path: what to name in the message (the workdir, say).
    then: what to do after the fix, or a function returning it (called only on error).
    otherwise: another way out.
  """
  try:
    yield
  except WorkdirIOError:
    raise
  except Exception as e:  # noqa: BLE001 - only fixable causes are reworded; others re-raise.
    error = user_io_error(e, path, then=then() if callable(then) else then, otherwise=otherwise)
    if error is None:
      raise
    raise error from None


def write_text(path: epath.Path, text: str) -> None:
  """Writes `path` whole: readers see the old file or the new one, never a part."""
  write_bytes(path, text.encode())


def write_bytes(path: epath.Path, data: bytes) -> None:
  """Writes `path` whole: readers see the old file or the new one, never a part.

  Locally through a temporary file and a rename; an object store's writes are
  already whole.
  """
  path = epath.Path(path)
  if is_url(path):
    path.write_bytes(data)
    return
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def read_text(path: epath.Path) -> str | None:
  """The text of `path`, or None if it does not exist."""
  path = epath.Path(path)
  try:
    return path.read_text()
  except FileNotFoundError:
    return None


def local_dir(path: "str | os.PathLike", *, what: str) -> str:
  """`path` as the user wrote it (relative, `~`, a trailing slash, symlinks) made absolute.

  Args:
    path: a directory, which need not exist yet.
    what: how to name it in an error, e.g. "--data_dir".

  Raises:
    ConfigError: a URL (the generators and readers need a local file system).
    DataError: `path` is an existing file, not a directory.
  """
  resolved = resolve_local(path, what=what)
  if os.path.exists(resolved) and not os.path.isdir(resolved):
    raise DataError(f"{what}={resolved} is a file, not a directory; give a directory path.")
  return resolved


def make_dir(path: str) -> None:
  """os.makedirs(path, exist_ok=True); a cause the user can fix is a one-line WorkdirIOError."""
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    error = user_io_error(e, path)
    if error is None:
      raise
    raise error from e
