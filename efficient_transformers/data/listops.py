r"""ListOps: a seeded LRA generator, the original TSV format, and a reader.

The generator follows the LRA algorithm (LRA_REFERENCE.md, "The ListOps
generator"): a node at depth d < max_depth is a leaf (uniform digit) when
r ~ U[0, 1) exceeds 0.25, and at max_depth always; otherwise it takes
k ~ U{2..max_args} children and a uniform operator of MIN, MAX, MED
(int(np.median)) and SM (sum mod 10). A tree's length counts operators, digits
and `]`. Trees with min_length < length < max_length are kept in draw order,
duplicates dropped, and the first num_train / num_val / num_test go to train /
val / test (the original split a Python set's order; draws being i.i.d.,
draw order is as random).

Unlike the original (unseeded, one Python tree at a time), draws come in
fixed-size chunks whose numpy Generator depends only on (seed, chunk index),
and each chunk grows all its trees level by level with array operations. The
per-node choices are independent, so drawing them breadth-first instead of
depth-first leaves the distribution of trees unchanged; a tree whose length is
already known to reach max_length is abandoned early, which only skips work
on a tree that would be rejected anyway. Chunks are consumed in order, so the
files are byte-identical for any number of worker processes. The LRA set
(1.2M draws, 8.2% accepted, mean length 1,034; 660 MB of text) takes about
50 CPU-seconds: 40 s on 2 busy cores.

A generation killed at any point (even with SIGKILL) takes its worker
processes with it and leaves only temporary files, which the next run in the
same directory removes; that run writes the same bytes.

  python -m efficient_transformers.data.listops --data_dir=data/lra/listops
  python -m efficient_transformers.data.listops --data_dir=data/lra/listops_smoke --smoke
"""

import argparse
import bisect
import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import itertools
import logging
import os
import re
import sys
import time
from collections.abc import Iterator

import numpy as np

from efficient_transformers import interruptions, paths
from efficient_transformers.errors import ConfigError, DataError, UserError

_log = logging.getLogger(__name__)

# The token vocabulary, fixed (the original built it from a Python set, so ids
# changed between processes and reloaded checkpoints read garbage). Append
# only: a token's id is its index.
VOCAB: tuple[str, ...] = (
  ("<pad>", "[MIN", "[MAX", "[MED", "[SM", "]") + tuple(str(d) for d in range(10)) + ("<cls>",)
)
PAD_ID = 0
CLS_ID = VOCAB.index("<cls>")  # Reserved for models that prepend a CLS token.
VOCAB_SIZE = len(VOCAB)
NUM_CLASSES = 10
SPLITS = ("train", "val", "test")
HEADER = "Source\tTarget"


def split_path(data_dir: str, split: str) -> str:
  """The original release's file name for `split`, e.g. `DIR/basic_train.tsv`."""
  if split not in SPLITS:
    raise ConfigError(f"Unknown ListOps split {split!r}; valid splits: {', '.join(SPLITS)}.")
  return os.path.join(data_dir, f"basic_{split}.tsv")


@dataclasses.dataclass(frozen=True)
class GeneratorParams:
  """Generator parameters; the defaults are LRA's."""

  num_train: int = 96_000
  num_val: int = 2_000
  num_test: int = 2_000
  min_length: int = 500
  max_length: int = 2_000
  max_depth: int = 10
  max_args: int = 10


# The same small set as the `smoke` variant of configs/lra/listops.py.
SMOKE_PARAMS = dict(
  num_train=4_000, num_val=500, num_test=500, min_length=10, max_length=64, max_depth=4, max_args=4
)


@dataclasses.dataclass(frozen=True)
class GenerationStats:
  """What a generation did: draws made, trees kept, time taken."""

  num_draws: int
  num_accepted: int  # In-bounds trees, duplicates included.
  num_duplicates: int
  mean_accepted_length: float
  seconds: float


_VALUE_P = 0.25  # A node is a leaf when r > _VALUE_P (the original's rule).
_CHUNK_DRAWS = 1024  # Part of the seed's meaning: changing it changes the data.
_STALL_CHUNKS = 200  # Chunks without a new tree before the parameters are blamed.

# Codes of the written form: digits 0-9, operators 10-13, then `]`, `(`, `)`
# and ten end-of-line codes carrying the label ("\t7\n").
_OPS = ("[MIN", "[MAX", "[MED", "[SM")
_OP0, _CLOSE, _LPAR, _RPAR, _END0 = 10, 14, 15, 16, 17
_WRITTEN = [str(d) for d in range(10)] + list(_OPS) + ["]", "(", ")"]
_WRITTEN += [f"\t{d}\n" for d in range(10)]
_CODE_WORDS = np.zeros((2, len(_WRITTEN), 8), np.uint8)
for _i, _s in enumerate(_WRITTEN):
  _CODE_WORDS[0, _i, : len(_s) + 1] = np.frombuffer(_s.encode() + b" ", np.uint8)
  _CODE_WORDS[1, _i, : len(_s)] = np.frombuffer(_s.encode(), np.uint8)
_CODE_WORDS[0, _END0:] = _CODE_WORDS[1, _END0:]  # No space after a line.
_CODE_WORDS = _CODE_WORDS.reshape(-1, 8).view(np.uint64).ravel()


def _check_params(p: GeneratorParams) -> None:
  if (
    min(p.num_train, p.num_val, p.num_test) < 0
    or not 0 <= p.min_length <= p.max_length - 2  # Lengths lie strictly between the two.
    or p.max_depth < 1
    or p.max_args < 2
  ):
    raise ConfigError(
      f"Invalid ListOps generator parameters {p}: need split sizes >= 0, "
      "0 <= min_length <= max_length - 2 (lengths lie strictly between), max_depth >= 1, "
      "max_args >= 2."
    )


def _draw_chunk(
  seed: int, chunk_index: int, p: GeneratorParams
) -> tuple[bytes, np.ndarray, np.ndarray]:
  """Draws one chunk of trees; returns (text of kept lines, line end offsets, lengths)."""
  rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(chunk_index,)))
  n_draws = _CHUNK_DRAWS
  alive = np.ones(n_draws, bool)
  length = np.zeros(n_draws, np.int64)  # Tokens fixed so far: 2 per operator, 1 per digit.
  levels = []  # Per depth: (tree, parent index in the level above, code, child count).
  tree, parent = np.arange(n_draws), np.full(n_draws, -1)
  for depth in range(1, p.max_depth + 1):
    n = tree.size
    if n == 0:
      break
    internal = rng.random(n) <= _VALUE_P if depth < p.max_depth else np.zeros(n, bool)
    n_int = int(internal.sum())
    code = np.empty(n, np.int64)
    code[~internal] = rng.integers(0, 10, n - n_int)
    k = rng.integers(2, p.max_args + 1, n_int)
    code[internal] = _OP0 + rng.integers(0, len(_OPS), n_int)
    nchild = np.zeros(n, np.int64)
    nchild[internal] = k
    levels.append((tree, parent, code, nchild))
    length += np.bincount(tree, minlength=n_draws) + np.bincount(tree[internal], minlength=n_draws)
    child_tree = np.repeat(tree[internal], k)
    child_parent = np.repeat(np.flatnonzero(internal), k)
    # Every pending child adds at least one token: a tree whose lower bound
    # reaches max_length is rejected whatever its remaining draws would be.
    alive &= length + np.bincount(child_tree, minlength=n_draws) < p.max_length
    keep = alive[child_tree]
    tree, parent = child_tree[keep], child_parent[keep]
  accepted = alive & (length > p.min_length) & (length < p.max_length)
  return _write_lines(levels, accepted) + (length[accepted],)


def _write_lines(levels: list, accepted: np.ndarray) -> tuple[bytes, np.ndarray]:
  """Writes the accepted trees (in draw order) as `Source\\tTarget\\n` lines."""
  kept, remap = [], None
  for tree, parent, code, nchild in levels:
    m = accepted[tree]
    kept.append([parent[m] if remap is None else remap[parent[m]], code[m], nchild[m]])
    remap = np.cumsum(m) - 1
  # Bottom-up: written length and value of every node. A level's children
  # are contiguous and ordered by parent, so per-node reductions are
  # reduceat over group starts.
  below = None
  for lvl in reversed(kept):
    _, code, nchild = lvl
    wlen, value = np.ones(code.size, np.int64), code.copy()
    internal = nchild > 0
    if below is not None and internal.any():
      c_parent, c_wlen, c_value = below
      k = nchild[internal]
      starts = np.cumsum(k) - k
      wlen[internal] = 2 * k + 4 + np.add.reduceat(c_wlen, starts)
      ordered = np.sort(c_parent * 16 + c_value) & 15  # Sorted within each group.
      median = (ordered[starts + (k - 1) // 2] + ordered[starts + k // 2]) // 2  # int(np.median)
      candidates = [
        np.minimum.reduceat(c_value, starts),
        np.maximum.reduceat(c_value, starts),
        median,
        np.add.reduceat(c_value, starts) % 10,
      ]
      value[internal] = np.choose(code[internal] - _OP0, candidates)
    lvl += [wlen, value]
    below = (lvl[0], wlen, value)
  # Top-down: where each node's written tokens start. An operator node with
  # children c1..ck is written `(`*(k+1) op c1 `)` c2 `)` ... ck `)` `]` `)`.
  root_wlen, root_value = kept[0][3], kept[0][4]
  start = np.cumsum(root_wlen + 1) - root_wlen - 1  # +1: each line's end code.
  codes = np.empty(int((root_wlen + 1).sum()), np.int64)
  codes[start + root_wlen] = _END0 + root_value
  for depth, (_, code, nchild, wlen, _) in enumerate(kept):
    internal = nchild > 0
    codes[start[~internal]] = code[~internal]
    if not internal.any():
      break
    s, k, w = start[internal], nchild[internal], wlen[internal]
    runs = np.repeat(s - np.cumsum(k + 1) + k + 1, k + 1) + np.arange(int((k + 1).sum()))
    codes[runs] = _LPAR
    codes[s + k + 1] = code[internal]
    codes[s + w - 2] = _CLOSE
    codes[s + w - 1] = _RPAR
    c_wlen = kept[depth + 1][3]
    step = np.cumsum(c_wlen + 1) - c_wlen - 1  # Offsets of children, reset per group below.
    group_first = np.cumsum(k) - k
    start = np.repeat(s + k + 2 - step[group_first], k) + step
    codes[start + c_wlen] = _RPAR
  # Codes to bytes: each code's text and a space, zero-padded to 8 bytes (one
  # uint64 gather), minus the space before each end code; zeros are dropped.
  before_end = np.flatnonzero(codes >= _END0) - 1
  codes[before_end] += len(_WRITTEN)  # The no-space twin of the code.
  flat = np.take(_CODE_WORDS, codes).view(np.uint8)
  out = flat[flat != 0]
  return out.tobytes(), np.flatnonzero(out == ord("\n")) + 1


def _chunks(seed: int, p: GeneratorParams, num_workers: int) -> Iterator[tuple]:
  """Yields chunk results in chunk order, computed by `num_workers` processes."""
  next_chunk = 0
  if num_workers > 1:
    try:
      with interruptions.worker_pool(num_workers) as pool:
        ahead = 2 * num_workers  # Bounded read-ahead; results still come back in order.
        pending = collections.deque(pool.submit(_draw_chunk, seed, i, p) for i in range(ahead))
        try:
          while True:
            result = pending.popleft().result()
            pending.append(pool.submit(_draw_chunk, seed, next_chunk + ahead, p))
            next_chunk += 1
            yield result
        finally:
          pool.shutdown(cancel_futures=True)
    except concurrent.futures.process.BrokenProcessPool as e:
      # E.g. a __main__ that spawn cannot re-import (code piped to stdin).
      # Chunks depend on their index only, so carrying on here is exact.
      _log.warning("ListOps worker processes failed (%s); drawing in this process.", e)
  for i in itertools.count(next_chunk):
    yield _draw_chunk(seed, i, p)


def generate(
  data_dir: str, *, seed: int = 0, num_workers: int | None = None, **params
) -> GenerationStats:
  """Generates and writes the three split files, replacing any already there.

  Each file is written under a temporary name and renamed when complete, so an
  interrupted run leaves no partial `basic_*.tsv`, and temporary files of
  earlier runs that were killed are removed first. Worker processes are
  spawned: as Python requires, call this from under `if __name__ ==
  "__main__":` in a script (where spawn cannot start, it draws in-process).

  Args:
    data_dir: directory for `basic_{train,val,test}.tsv`; created if missing.
      It may be relative, start with `~` or pass through symlinks.
    seed: non-negative integer; the files are a function of (seed, params).
    num_workers: processes drawing chunks (default: the CPUs this process may
      use, at most 16); does not change the output.
    **params: fields of `GeneratorParams` overriding LRA's defaults.

  Returns:
    Statistics of the run.
  """
  try:
    p = GeneratorParams(**params)
  except TypeError as e:
    fields = [f.name for f in dataclasses.fields(GeneratorParams)]
    raise ConfigError(f"{e}; valid ListOps generator parameters: {fields}.") from e
  _check_params(p)
  if not isinstance(seed, int | np.integer) or seed < 0:
    raise ConfigError(f"ListOps generator seed must be a non-negative integer, got {seed!r}.")
  # Capped: each worker is a fresh interpreter with numpy (~50 MB).
  num_workers = num_workers or min(len(os.sched_getaffinity(0)), 16)
  data_dir = paths.local_dir(data_dir, what="data_dir")
  t0 = time.perf_counter()
  paths.make_dir(data_dir)
  _remove_interrupted(data_dir)
  finals = [split_path(data_dir, s) for s in SPLITS]
  temps = [interruptions.temp_path(path) for path in finals]
  # Three files cannot be renamed at once. This marker exists while they are,
  # so a run killed between two renames is known to have left a mix of old
  # and new files (which the next run removes), not a complete set.
  renaming = interruptions.temp_path(os.path.join(data_dir, _RENAMING))
  try:
    with contextlib.ExitStack() as stack:
      files = [stack.enter_context(open(temp, "wb")) for temp in temps]
      chunks = stack.enter_context(contextlib.closing(_chunks(seed, p, num_workers)))
      counts = _write_unique(files, (p.num_train, p.num_val, p.num_test), chunks, p)
    open(renaming, "wb").close()
    for temp, path in zip(temps, finals, strict=True):
      os.replace(temp, path)
    os.remove(renaming)
  finally:
    for temp in temps:
      if os.path.exists(temp):
        os.remove(temp)
  stats = GenerationStats(*counts, time.perf_counter() - t0)
  _log.info("Generated ListOps in %s (seed %d, %d workers): %s", data_dir, seed, num_workers, stats)
  return stats


def _write_unique(
  files: list, sizes: tuple[int, ...], chunks: Iterator[tuple], p: GeneratorParams
) -> tuple[int, int, int, float]:
  """Writes the first sizes[0] new lines to files[0], the next sizes[1] to files[1], ..."""
  for f in files:
    f.write(HEADER.encode() + b"\n")
  bounds, total = list(itertools.accumulate(sizes)), sum(sizes)
  seen: set[bytes] = set()  # 128-bit digests of lines; a collision is ~1e-28 likely.
  written = draws = accepted = duplicates = length = stall = 0
  for text, ends, lengths in chunks if total else ():
    draws, accepted, length = draws + _CHUNK_DRAWS, accepted + ends.size, length + lengths.sum()
    view, begin, before = memoryview(text), 0, written
    for end in ends.tolist():
      line, begin = view[begin:end], end
      digest = hashlib.blake2b(line, digest_size=16).digest()
      if digest in seen:
        duplicates += 1
        continue
      seen.add(digest)
      files[bisect.bisect_right(bounds, written)].write(line)
      written += 1
      if written == total:
        break
    if written == total:
      break
    stall = 0 if written > before else stall + 1
    if stall == _STALL_CHUNKS:
      raise ConfigError(
        f"ListOps parameters {p} admit too few distinct trees: none new in "
        f"{_STALL_CHUNKS * _CHUNK_DRAWS} draws; widen the lengths or raise max_depth/args."
      )
  return draws, accepted, duplicates, int(length) / max(accepted, 1)


def ensure_data(data_dir: str, *, seed: int = 0, num_workers: int | None = None, **params) -> None:
  """Makes sure `data_dir` holds the three split files; generates them if none is there.

  Existing files (ours or the original release's) are never regenerated or
  checked here; `load_split` validates them. What a killed generation left is
  removed first, so a rerun completes it. Arguments are those of `generate`.
  """
  data_dir = paths.local_dir(data_dir, what="data_dir")
  if os.path.isdir(data_dir):
    _remove_interrupted(data_dir)
  files = [split_path(data_dir, s) for s in SPLITS]
  present = [os.path.exists(path) for path in files]
  if all(present):
    _log.info("ListOps data found in %s; not regenerating.", data_dir)
    return
  if any(present):
    missing = [path for path, ok in zip(files, present, strict=True) if not ok]
    raise DataError(
      f"ListOps data in {data_dir} is incomplete: missing {', '.join(missing)}. Restore them, or "
      f"delete the directory's basic_*.tsv files and run: {_command(data_dir)}"
    )
  _log.info("No ListOps data in %s; generating it (seed %d).", data_dir, seed)
  generate(data_dir, seed=seed, num_workers=num_workers, **params)


def _command(data_dir: str) -> str:
  return f"python -m efficient_transformers.data.listops --data_dir={data_dir}"


# Fast path of the reader: every vocabulary token is made one byte, 0x80 + id,
# so a valid line is such bytes and whitespace; a slow per-line parser runs
# only to name the first bad line.
_SINGLE_BYTE = bytes.maketrans(b"]0123456789", bytes(0x80 + VOCAB.index(t) for t in "]0123456789"))
_OP_BODIES = [(op[1:].encode(), 0x80 + VOCAB.index(op)) for op in _OPS]
_IS_SPACE = np.zeros(256, bool)
_IS_SPACE[list(b" \t\n\r\x0b\x0c")] = True  # Python's bytes.split() whitespace.
_BLOCK_BYTES = 1 << 24  # Tokenize ~16 MB of text at a time to bound memory.


def load_split(data_dir: str, split: str, *, max_length: int) -> dict[str, np.ndarray]:
  """Reads one split in the original release's format and tokenizes it.

  A line is `Source<TAB>Target` (LF or CRLF); Target is one digit. Tokenization
  is the original pipeline's: `(` and `)` are deleted, `]` is a token, tokens
  are split on whitespace. Sequences longer than `max_length` keep their first
  `max_length` tokens (at LRA's settings none is: lengths are below 2000); the
  number truncated is logged.

  Args:
    data_dir: directory with `basic_{split}.tsv`.
    split: one of `SPLITS`.
    max_length: the padded length of `inputs`.

  Returns:
    {"inputs": int32 [N, max_length] token ids right-padded with PAD_ID,
     "targets": int32 [N] answers 0-9}.
  """
  path = split_path(data_dir, split)
  if not os.path.isdir(data_dir):
    raise DataError(f"ListOps data directory {data_dir} does not exist; run: {_command(data_dir)}")
  if not os.path.isfile(path):
    raise DataError(f"ListOps file {path} is missing; generate the data with: {_command(data_dir)}")
  with open(path, "rb") as f:
    data = f.read()
  newline = data.find(b"\n")
  if (data[:newline] if newline >= 0 else data).rstrip(b"\r") != HEADER.encode():
    raise DataError(f"{path}, line 1: expected the header line {HEADER!r}.")
  if not data.endswith(b"\n"):
    data += b"\n"
  num = data.count(b"\n") - 1
  if num == 0:
    raise DataError(f"{path} holds no examples below its header.")
  inputs = np.zeros((num, max_length), np.int32)
  targets = np.zeros(num, np.int32)
  row, begin, truncated = 0, newline + 1, 0
  while begin < len(data):
    end = data.find(b"\n", begin + _BLOCK_BYTES) + 1 or len(data)
    lengths = _tokenize_block(data[begin:end], row, inputs, targets, path)
    row, begin, truncated = row + lengths.size, end, truncated + (lengths > max_length).sum()
  if truncated:
    _log.info("%s: truncated %d sequences to %d tokens.", path, truncated, max_length)
  return {"inputs": inputs, "targets": targets}


def _tokenize_block(
  block: bytes, first: int, inputs: np.ndarray, targets: np.ndarray, path: str
) -> np.ndarray:
  """Reads whole lines `block` into rows first, first + 1, ...; returns their lengths."""
  raw = np.frombuffer(block, np.uint8)
  ends, tabs = np.flatnonzero(raw == ord("\n")), np.flatnonzero(raw == ord("\t"))
  n = ends.size
  # One tab per line, then one digit, an optional CR, the newline.
  ok = block.isascii() and tabs.size == n and (tabs < ends).all() and (tabs[1:] > ends[:-1]).all()
  if ok:
    digit, gap = raw[tabs + 1], ends - tabs
    ok = ((digit >= ord("0")) & (digit <= ord("9")) & ((gap == 2) | (gap == 3))).all()
    ok = ok and (raw[ends[gap == 3] - 1] == ord("\r")).all()
  if ok:
    targets[first : first + n] = digit - ord("0")
    text = bytearray(block)
    work = np.frombuffer(text, np.uint8)
    work[tabs], work[tabs + 1], work[ends - 1] = 32, 32, 32  # Blank the Target column.
    buffer = text.translate(_SINGLE_BYTE, b"()")
    text = np.frombuffer(buffer, np.uint8)
    # Operators: `[`, the rest of the name, whitespace.
    bracket = np.flatnonzero(text == ord("["))
    after = [text[np.minimum(bracket + j, text.size - 1)] for j in range(1, 5)]
    code = np.zeros(bracket.size, np.uint8)
    for body, byte in _OP_BODIES:
      m = _IS_SPACE[after[len(body)]]
      for j, char in enumerate(body):
        m &= after[j] == char
      code[m] = byte
      for j in range(len(body)):
        text[bracket[m] + 1 + j] = 32
    text[bracket] = code
    is_token = text >= 0x80
    ok = code.all() and not (is_token[1:] & is_token[:-1]).any()
    kept = np.frombuffer(buffer.translate(None, b" \t\r\x0b\x0c"), np.uint8)
    newline = kept == ord("\n")
    ids = kept[~newline] - 0x80  # Wraps bytes below 0x80 to large values.
    ok = ok and (ids.size == 0 or (ids.min() > 0 and ids.max() < VOCAB_SIZE - 1))
  if not ok:
    _explain(block, first, path)
  counts = np.diff(np.flatnonzero(newline), prepend=-1) - 1
  if (counts == 0).any():
    line = first + int(np.flatnonzero(counts == 0)[0]) + 2
    raise DataError(f"{path}, line {line}: empty Source.")
  width = inputs.shape[1]
  if counts.max() > width:
    ids = ids[np.arange(ids.size) - np.repeat(np.cumsum(counts) - counts, counts) < width]
  inputs[first : first + n][np.arange(width) < np.minimum(counts, width)[:, None]] = ids
  return counts


def _explain(block: bytes, first: int, path: str) -> None:
  """Raises a DataError naming the first malformed line of `block`."""
  for i, line in enumerate(block.decode(errors="replace").split("\n")[:-1]):
    columns = line.removesuffix("\r").split("\t")
    tokens = columns[0].replace("(", "").replace(")", "").split()
    unknown = [t for t in tokens if t not in VOCAB[1:-1]]
    if len(columns) != 2:
      problem = f"expected 2 tab-separated columns (Source, Target), got {len(columns)}"
    elif len(columns[1]) != 1 or not columns[1].isdigit():
      problem = f"Target must be one digit 0-9, got {columns[1]!r}"
    elif unknown:
      problem = f"unknown token {unknown[0]!r}; known tokens: {' '.join(VOCAB[1:-1])}"
    else:
      continue
    raise DataError(f"{path}, line {first + i + 2}: {problem}.")
  last = first + 1 + block.count(b"\n")
  raise DataError(f"{path}: lines {first + 2}-{last} hold characters other than ASCII tokens.")


# ----------------------------------------------------------------------------- Interruptions.

_RENAMING = ".listops-renaming"  # The marker of `generate`'s renames.
_OWN_TEMPS = r"basic_(train|val|test)\.tsv|" + re.escape(_RENAMING)


def _remove_interrupted(data_dir: str) -> None:
  """Removes what killed generations left in `data_dir`.

  That is their temporary files and, where one was killed while renaming
  its files into place, the split files (a mix of its and older ones).
  """
  removed = interruptions.remove_stale_temps(data_dir, _OWN_TEMPS)
  if any(name.startswith(_RENAMING + ".") for name in removed):
    for split in SPLITS:
      with contextlib.suppress(FileNotFoundError):
        os.remove(split_path(data_dir, split))


# ----------------------------------------------------------------------------- Command line.


def main(argv: list[str] | None = None) -> int:
  """The command line: generates the ListOps files unless they are there; returns the exit
  status (2 for a user error, printed as one line)."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir", required=True, help="Where basic_{train,val,test}.tsv go.")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--smoke", action="store_true", help="The smoke config's small set.")
  parser.add_argument("--num_workers", type=int, default=None, help="Default: all CPUs.")
  for field in dataclasses.fields(GeneratorParams):
    help = f"Default: LRA's {field.default}, or the smoke set's with --smoke."
    parser.add_argument(f"--{field.name}", type=int, default=None, help=help)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  params = dict(SMOKE_PARAMS) if args.smoke else {}
  for field in dataclasses.fields(GeneratorParams):
    if getattr(args, field.name) is not None:
      params[field.name] = getattr(args, field.name)
  try:
    data_dir = paths.local_dir(args.data_dir, what="--data_dir")
    ensure_data(data_dir, seed=args.seed, num_workers=args.num_workers, **params)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  # Run the importable module's main so spawned workers unpickle one copy of it.
  from efficient_transformers.data import listops

  sys.exit(listops.main())
