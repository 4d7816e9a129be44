"""An offline byte-level LM corpus: the Python standard library's own sources.

Every machine that runs this project has the stdlib's `.py` files, so a
language-modelling run needs no download. The corpus is built deterministically:

- files: the `.py` files under `sysconfig.get_paths()["stdlib"]`, skipping
  directories named `test`, `tests`, `idle_test`, `site-packages`,
  `dist-packages` and `__pycache__`, and the build-specific `config-*`
  directory and `_sysconfigdata*` module (they embed the build machine's paths,
  so two installs of one Python version would otherwise differ);
- split: each FILE goes to train / validation / test by a keyed hash of its
  relative path (`blake2b(path, key=seed)`), 90/5/5 by default, so a file's
  split depends on (path, seed) only and never moves when the size cap changes;
- order and cap: each split concatenates its files in order of relative path,
  each file's bytes followed by `DOC_SEPARATOR` (a NUL byte, which no stdlib
  source contains), and is cut at its share of `max_bytes` (train gets the
  rest after validation's and test's `int(fraction * max_bytes)`), so a
  smaller cap yields a prefix of a larger cap's split. The last file of a split
  may be cut mid-way. Python 3.11's stdlib has about 12 MB of such sources
  (train 10.9 MB, validation 0.69 MB, test 0.50 MB at seed 0), so the default
  16 MiB cap takes every file; a split then holds all its files, less than its
  share of the cap.

Tokens are byte + 1 (1..256; 0 is padding), int16. Each split also has
`doc_start`, True at the first byte of each file. Results should name the
corpus: `meta` carries the Python version and a sha256 per split. A built
corpus is cached as .npy files under `data_dir` and rebuilt when missing.
Each file is written whole (a temporary file renamed into place) and meta.json
last, so a build killed at any point leaves no cache that a later load trusts;
the next build removes the temporary files that the killed one left.
"""

import hashlib
import json
import logging
import os
import platform
import sysconfig

import numpy as np

from efficient_transformers import interruptions, paths
from efficient_transformers.data import pipeline
from efficient_transformers.errors import ConfigError, DataError

_log = logging.getLogger(__name__)

VOCAB_SIZE = 257  # 256 byte values + padding.
PAD_ID = pipeline.PAD_ID  # The stream batches' padding: byte b is token b + 1.
SPLITS = ("train", "validation", "test")
DOC_SEPARATOR = b"\x00"
DEFAULT_FRACTIONS = (0.9, 0.05, 0.05)
DEFAULT_MAX_BYTES = 16 * 2**20

_CACHE_FILES = r"(train|validation|test)_(tokens|doc_start)\.npy|meta\.json"
_EXCLUDED_DIRS = frozenset(
  {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)


def bytes_to_tokens(data: bytes | np.ndarray) -> np.ndarray:
  """Bytes -> int16 token ids byte + 1, in 1..256.

  Args:
    data: bytes, or a uint8 array [n].

  Returns:
    int16 [n].
  """
  raw = np.frombuffer(data, np.uint8) if isinstance(data, bytes | bytearray) else data
  return raw.astype(np.int16) + 1


def split_fingerprint(tokens: np.ndarray) -> str:
  """sha256 (hex) of the bytes that `tokens` [n] encode, so a result names its data."""
  return hashlib.sha256((np.asarray(tokens) - 1).astype(np.uint8).tobytes()).hexdigest()


def unigram_entropy_bits(tokens: np.ndarray) -> float:
  """Entropy of the tokens' empirical unigram distribution, in bits per token.

  An LM that predicts each byte from its context must get below this; for byte
  tokens, bits per token are bits per byte.

  Args:
    tokens: non-negative integer ids, any shape.
  """
  flat = np.asarray(tokens).ravel()
  if flat.size == 0:
    raise DataError("unigram_entropy_bits got no tokens.")
  counts = np.bincount(flat.astype(np.int64))
  p = counts[counts > 0] / flat.size
  return float(-(p * np.log2(p)).sum())


def _check_fractions(fractions: tuple[float, float, float]) -> None:
  if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-9:
    raise ConfigError(
      f"Split fractions must be three positive numbers (train, validation, test) summing to 1; "
      f"got {fractions}."
    )


def _check_seed(seed: int) -> None:
  if not 0 <= seed < 2**64:
    raise ConfigError(f"The corpus split seed must be in [0, 2**64); got {seed}.")


def stdlib_sources(stdlib_dir: str | None = None) -> list[str]:
  """The corpus's candidate files, as sorted '/'-separated paths relative to the stdlib.

  Args:
    stdlib_dir: the directory to scan; default `sysconfig.get_paths()["stdlib"]`.
  """
  root = stdlib_dir or sysconfig.get_paths()["stdlib"]
  if not os.path.isdir(root):
    raise DataError(f"The Python standard library directory {root!r} does not exist.")
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith("config-")]
    rel_dir = os.path.relpath(dirpath, root)
    for name in filenames:
      if name.endswith(".py") and not name.startswith("_sysconfigdata"):
        rel = name if rel_dir == "." else os.path.join(rel_dir, name)
        found.append(rel.replace(os.sep, "/"))
  return sorted(found)


def file_split(
  rel_path: str, seed: int, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
) -> str:
  """The split ('train', 'validation' or 'test') of the file at `rel_path`, a function of
  (rel_path, seed, fractions) only."""
  _check_seed(seed)
  digest = hashlib.blake2b(rel_path.encode(), digest_size=8, key=seed.to_bytes(8, "little"))
  u = int.from_bytes(digest.digest(), "little") / 2**64
  if u < fractions[0]:
    return "train"
  return "validation" if u < fractions[0] + fractions[1] else "test"


def split_budgets(max_bytes: int, fractions: tuple[float, float, float]) -> dict[str, int]:
  """Bytes per split for a cap of `max_bytes`: validation and test get
  int(fraction * max_bytes), train the rest."""
  val, test = int(fractions[1] * max_bytes), int(fractions[2] * max_bytes)
  return {"train": max_bytes - val - test, "validation": val, "test": test}


def build_stdlib_corpus(
  *,
  max_bytes: int = DEFAULT_MAX_BYTES,
  seed: int = 0,
  fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
  stdlib_dir: str | None = None,
) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
  """Builds the stdlib corpus in memory (see the module docstring for the rules).

  Args:
    max_bytes: the cap on the three splits' total size.
    seed: the key of the file-to-split hash.
    fractions: (train, validation, test) shares of files and of `max_bytes`.
    stdlib_dir: the directory to read; default the running Python's stdlib.

  Returns:
    (splits, meta): splits maps each split to {"tokens": int16 [n], "doc_start":
    bool [n]}; meta is a JSON-able dict (python_version, fingerprints, num_bytes,
    files per split, train_unigram_entropy_bits, the arguments).
  """
  _check_fractions(fractions)
  _check_seed(seed)
  budgets = split_budgets(max_bytes, fractions)
  if min(budgets.values()) < 1:
    raise ConfigError(f"The corpus cap max_bytes={max_bytes} leaves a split empty: {budgets}.")
  root = stdlib_dir or sysconfig.get_paths()["stdlib"]
  by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
  for rel in stdlib_sources(root):
    by_split[file_split(rel, seed, fractions)].append(rel)

  splits, meta_files = {}, {}
  for split in SPLITS:
    chunks, starts, size, used = [], [], 0, []
    for rel in by_split[split]:
      if size >= budgets[split]:
        break  # Only the files that fit are read.
      with open(os.path.join(root, *rel.split("/")), "rb") as f:
        data = f.read() + DOC_SEPARATOR
      starts.append(size)
      chunks.append(data)
      used.append(rel)
      size += len(data)
    if not chunks:
      raise DataError(f"The standard library at {root} has no source file for the {split} split.")
    raw = b"".join(chunks)[: budgets[split]]
    doc_start = np.zeros(len(raw), bool)
    doc_start[starts] = True
    splits[split] = {"tokens": bytes_to_tokens(raw), "doc_start": doc_start}
    meta_files[split] = used
  meta = {
    "corpus": "stdlib",
    "python_version": platform.python_version(),
    "max_bytes": max_bytes,
    "seed": seed,
    "fractions": list(fractions),
    "num_bytes": {s: int(splits[s]["tokens"].size) for s in SPLITS},
    "fingerprints": {s: split_fingerprint(splits[s]["tokens"]) for s in SPLITS},
    "train_unigram_entropy_bits": unigram_entropy_bits(splits["train"]["tokens"]),
    "files": meta_files,
  }
  return splits, meta


def cache_dir(
  data_dir: str, *, max_bytes: int, seed: int, fractions: tuple[float, float, float]
) -> str:
  """Where `load_stdlib_corpus` caches a corpus: one folder per (Python version, arguments)."""
  parts = "-".join(f"{f:g}" for f in fractions)
  name = f"stdlib-py{platform.python_version()}-{max_bytes}b-seed{seed}-split{parts}"
  return os.path.join(data_dir, name)


def _atomic_write(path: str, write) -> None:
  """Writes through a temporary file in the same folder, then renames it over `path`,
  so a reader (or a concurrent writer of the same bytes) never sees a partial file.

  The temporary file is named after this host and process (`interruptions.temp_path`),
  not randomly, so that a later build can tell a killed build's leftovers from
  a live one's and remove them.
  """
  tmp = interruptions.temp_path(path)
  try:
    with open(tmp, "wb") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _read_cache(folder: str) -> tuple[dict[str, dict[str, np.ndarray]], dict] | None:
  """The cached corpus, or None when a file is missing or does not match meta.json."""
  try:
    with open(os.path.join(folder, "meta.json")) as f:
      meta = json.load(f)
    splits = {
      s: {
        "tokens": np.load(os.path.join(folder, f"{s}_tokens.npy")),
        "doc_start": np.load(os.path.join(folder, f"{s}_doc_start.npy")),
      }
      for s in SPLITS
    }
  except (OSError, ValueError, KeyError) as e:
    _log.info("No usable stdlib corpus cache in %s (%s).", folder, e)
    return None
  for s in SPLITS:
    if (
      s not in meta.get("fingerprints", {})
      or splits[s]["tokens"].shape != splits[s]["doc_start"].shape
      or split_fingerprint(splits[s]["tokens"]) != meta["fingerprints"][s]
    ):
      _log.warning("The stdlib corpus cache in %s is damaged (%s split); rebuilding.", folder, s)
      return None
  return splits, meta


def load_stdlib_corpus(
  data_dir: str,
  *,
  max_bytes: int = DEFAULT_MAX_BYTES,
  seed: int = 0,
  fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
  generate: bool = True,
  stdlib_dir: str | None = None,
) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
  """The stdlib corpus from its cache under `data_dir`, built (and cached) if missing.

  Args:
    data_dir: the folder holding the cache folder (see `cache_dir`); it may be
      relative, start with `~` or pass through symlinks.
    max_bytes: the cap on the three splits' total size.
    seed: the key of the file-to-split hash.
    fractions: (train, validation, test) shares.
    generate: whether a missing cache may be built; False raises DataError.
    stdlib_dir: the directory to read; default the running Python's stdlib.

  Returns:
    (splits, meta) as from `build_stdlib_corpus`.
  """
  _check_fractions(fractions)
  data_dir = paths.local_dir(data_dir, what="data_dir")
  folder = cache_dir(data_dir, max_bytes=max_bytes, seed=seed, fractions=fractions)
  cached = _read_cache(folder) if os.path.exists(os.path.join(folder, "meta.json")) else None
  if cached is not None:
    return cached
  if not generate:
    raise DataError(
      f"No stdlib corpus cache in {folder}. Point config.data_dir at the training run's data, or "
      f"build it with: python -m efficient_transformers.data.byte_lm --data_dir={data_dir} "
      f"--max_bytes={max_bytes} --seed={seed}"
    )
  splits, meta = build_stdlib_corpus(
    max_bytes=max_bytes, seed=seed, fractions=fractions, stdlib_dir=stdlib_dir
  )
  paths.make_dir(folder)
  interruptions.remove_stale_temps(folder, _CACHE_FILES)
  for s in SPLITS:
    for field in ("tokens", "doc_start"):
      _atomic_write(
        os.path.join(folder, f"{s}_{field}.npy"),
        lambda f, a=splits[s][field]: np.save(f, a, allow_pickle=False),
      )
  # Written last: its presence marks a complete cache.
  _atomic_write(os.path.join(folder, "meta.json"), lambda f: f.write(json.dumps(meta).encode()))
  _log.info("Built the stdlib corpus in %s: %s bytes.", folder, meta["num_bytes"])
  return splits, meta
