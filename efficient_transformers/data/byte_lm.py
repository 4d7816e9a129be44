"""Byte-level language-modelling data: enwik8 / text8 readers, the stdlib corpus, stream batches.

Corpora (tokens are byte + 1 in 1..256, id 0 is padding, vocabulary 257):

- `enwik8` / `text8`: Matt Mahoney's files, 100,000,000 bytes each, placed by
  the user in the data dir as `{data_dir}/enwik8` (or `enwik8.zip`, as
  downloaded), likewise `text8`. The standard split (Al-Rfou et al.,
  Transformer-XL): first 90M bytes train, next 5M validation, last 5M test.
  Each split is one document: `doc_start` is True at position 0 only.
- `stdlib`: built offline from the Python standard library's sources
  (`byte_corpus`), one document per file.

Batches come from `StreamIterator` (training) and `StreamEvalBatches`
(evaluation), Transformer-XL's ordered layout: the split is cut into
`global_batch_size` contiguous streams, and consecutive steps give each row
consecutive segments of its stream, so a recurrent memory carried from one
step to the next sees the text that precedes each segment. A batch is
{"inputs": int32 [b, segment], "targets": int32 [b, segment] (the next token
of each input), "reset": bool [b]}: reset=True tells the model to clear a row's
memory before the segment, because the row's stream starts over there. File
boundaries inside a stream (stdlib) are NOT resets: as in Transformer-XL on
enwik8, the memory runs across documents, and the separator byte tells the
model a new file began.

  python -m efficient_transformers.data.byte_lm --data_dir=data/lm/stdlib  # build, describe
  python -m efficient_transformers.data.byte_lm --data_dir=data/lm --corpus=enwik8  # check
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import zipfile
from collections.abc import Iterator

import ml_collections
import numpy as np

from efficient_transformers import paths
from efficient_transformers.data import base, byte_corpus
from efficient_transformers.data.byte_corpus import (
  PAD_ID,
  SPLITS,
  VOCAB_SIZE,
  split_fingerprint,
  unigram_entropy_bits,
)
from efficient_transformers.errors import ConfigError, DataError, UserError

__all__ = [
  "ENWIK8",
  "PAD_ID",
  "SPLITS",
  "TEXT8",
  "VOCAB_SIZE",
  "FileCorpus",
  "StreamEvalBatches",
  "StreamIterator",
  "bits_per_byte",
  "corpus_info",
  "load_task",
  "read_file_split",
  "split_fingerprint",
  "unigram_entropy_bits",
]


@dataclasses.dataclass(frozen=True)
class FileCorpus:
  """A corpus read from one file: its name (also the file's and the zip member's), where to
  download it, and the byte sizes of its (train, validation, test) splits, in file order."""

  name: str
  url: str
  split_bytes: tuple[int, int, int]

  @property
  def total_bytes(self) -> int:
    return sum(self.split_bytes)


_STANDARD_SPLIT = (90_000_000, 5_000_000, 5_000_000)
ENWIK8 = FileCorpus("enwik8", "http://mattmahoney.net/dc/enwik8.zip", _STANDARD_SPLIT)
TEXT8 = FileCorpus("text8", "http://mattmahoney.net/dc/text8.zip", _STANDARD_SPLIT)
FILE_CORPORA = {c.name: c for c in (ENWIK8, TEXT8)}
CORPORA = ("stdlib", *FILE_CORPORA)


def bits_per_byte(mean_nll_nats: float | np.ndarray) -> float | np.ndarray:
  """Mean negative log-likelihood per token in nats -> bits per byte (one token is one byte).

  Args:
    mean_nll_nats: a float or an array of them.
  """
  return mean_nll_nats / math.log(2)


# ---------------------------------------------------------------- enwik8 / text8.


def _where_to_get(data_dir: str, corpus: FileCorpus) -> str:
  path = os.path.join(data_dir, corpus.name)
  return (
    f"Download {corpus.url} and put it at {path}.zip (or the unzipped {corpus.name}, "
    f"{corpus.total_bytes:,} bytes, at {path})."
  )


def _locate(data_dir: str, corpus: FileCorpus) -> tuple[str, bool]:
  """(path, is_zip) of the corpus file, checked for size; the raw file wins over the zip."""
  raw = os.path.join(data_dir, corpus.name)
  zipped = raw + ".zip"
  if os.path.isfile(raw):
    size = os.path.getsize(raw)
    if size != corpus.total_bytes:
      raise DataError(
        f"{raw} has {size:,} bytes; {corpus.name} has {corpus.total_bytes:,}. The file is "
        f"truncated or another file. {_where_to_get(data_dir, corpus)}"
      )
    return raw, False
  if not os.path.isfile(zipped):
    raise DataError(
      f"{corpus.name} not found: neither {raw} nor {zipped} exists. "
      f"{_where_to_get(data_dir, corpus)}"
    )
  try:
    with zipfile.ZipFile(zipped) as zf:
      names = zf.namelist()
      if corpus.name not in names:
        raise DataError(
          f"{zipped} has no member {corpus.name!r} (it has {names[:5]}). "
          f"{_where_to_get(data_dir, corpus)}"
        )
      size = zf.getinfo(corpus.name).file_size
  except zipfile.BadZipFile as e:
    raise DataError(
      f"{zipped} is not a readable zip file ({e}). {_where_to_get(data_dir, corpus)}"
    ) from e
  if size != corpus.total_bytes:
    raise DataError(
      f"{zipped} member {corpus.name!r} has {size:,} bytes; expected {corpus.total_bytes:,}. "
      f"{_where_to_get(data_dir, corpus)}"
    )
  return zipped, True


def read_file_split(data_dir: str, corpus: FileCorpus, split: str) -> dict[str, np.ndarray]:
  """One split of enwik8 / text8 (or another `FileCorpus`), reading only its bytes.

  Args:
    data_dir: the folder holding `{corpus.name}` or `{corpus.name}.zip`.
    corpus: which file and its split sizes (ENWIK8, TEXT8; tests use tiny ones).
    split: 'train', 'validation' or 'test'.

  Returns:
    {"tokens": int16 [n], "doc_start": bool [n] (True at position 0 only)}.
  """
  if split not in SPLITS:
    raise ConfigError(f"Unknown split {split!r}; splits are {SPLITS}.")
  index = SPLITS.index(split)
  offset, count = sum(corpus.split_bytes[:index]), corpus.split_bytes[index]
  path, is_zip = _locate(data_dir, corpus)
  if is_zip:
    try:
      with zipfile.ZipFile(path) as zf, zf.open(corpus.name) as f:
        f.seek(offset)  # Decompresses and discards the bytes before the split.
        raw = np.frombuffer(f.read(count), np.uint8)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
      raise DataError(f"{path} is damaged ({e}). {_where_to_get(data_dir, corpus)}") from e
  else:
    raw = np.fromfile(path, np.uint8, count=count, offset=offset)
  if raw.size != count:
    raise DataError(
      f"Read {raw.size:,} of the {count:,} bytes of the {split} split from {path}. "
      f"{_where_to_get(data_dir, corpus)}"
    )
  doc_start = np.zeros(count, bool)
  doc_start[:1] = True
  return {"tokens": byte_corpus.bytes_to_tokens(raw), "doc_start": doc_start}


# ---------------------------------------------------------------- Stream batches.


def _rows_of_process(global_batch_size: int, process_index: int, process_count: int) -> slice:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ConfigError(
      f"Need 0 <= process_index ({process_index}) < process_count ({process_count})."
    )
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ConfigError(
      f"The global batch size ({global_batch_size}) must be a positive multiple of the number "
      f"of processes ({process_count}); change config.batch_size."
    )
  per = global_batch_size // process_count
  return slice(process_index * per, (process_index + 1) * per)


def _check_tokens(tokens: np.ndarray, segment_length: int) -> np.ndarray:
  tokens = np.asarray(tokens)
  if tokens.ndim != 1:
    raise DataError(f"Stream batches need a 1-D token array; got shape {tokens.shape}.")
  if segment_length < 1:
    raise ConfigError(f"The segment length must be >= 1; got {segment_length}.")
  return tokens


class StreamIterator(Iterator[dict[str, np.ndarray]]):
  """An endless, ordered iterator of training segments (Transformer-XL's layout).

  With N tokens and B = global_batch_size, row r's stream is tokens
  [r * n, (r + 1) * n), n = N // B (the last N % B tokens are never used).
  Step t of an epoch gives row r inputs stream[t * s : (t + 1) * s] and targets
  stream[t * s + 1 : (t + 1) * s + 1], s = segment_length, for
  t < steps_per_epoch = (n - 1) // s; the rest of each stream (fewer than s
  targets) is dropped, then every row wraps to its start together and the epoch
  counter grows. `reset` is True for every row on an epoch's first step (the
  first segment of a pass, which is also where a stream wraps), else False.

  Process p of P yields rows [p * B / P, (p + 1) * B / P) of the global batch, so
  the batches do not depend on P. `get_state()` is a small JSON-able dict;
  `set_state(state)` resumes at the same next batch (any process count, same
  tokens, batch size and segment length). No randomness.
  """

  def __init__(
    self,
    tokens: np.ndarray,
    *,
    global_batch_size: int,
    segment_length: int,
    process_index: int = 0,
    process_count: int = 1,
  ):
    """Cuts `tokens` into streams; the first batch is the start of epoch 0.

    Args:
      tokens: the split's ids [N].
      global_batch_size: rows summed over processes.
      segment_length: tokens per row and step.
      process_index: this process, in [0, process_count).
      process_count: the number of data-loading processes.
    """
    tokens = _check_tokens(tokens, segment_length)
    rows = _rows_of_process(global_batch_size, process_index, process_count)
    stream_length = tokens.size // global_batch_size
    self.steps_per_epoch = max(stream_length - 1, 0) // segment_length
    if self.steps_per_epoch < 1:
      raise DataError(
        f"{tokens.size:,} tokens in {global_batch_size} streams cannot fill one segment of "
        f"{segment_length} inputs plus a target; need at least "
        f"{global_batch_size * (segment_length + 1):,} tokens."
      )
    self._rows = tokens[: global_batch_size * stream_length].reshape(global_batch_size, -1)[rows]
    self._config = {
      "num_tokens": int(tokens.size),
      "global_batch_size": global_batch_size,
      "segment_length": segment_length,
    }
    self._segment = segment_length
    self._step = 0  # Within the epoch.
    self._epoch = 0

  @property
  def epoch(self) -> int:
    return self._epoch

  def __next__(self) -> dict[str, np.ndarray]:
    start = self._step * self._segment
    window = self._rows[:, start : start + self._segment + 1].astype(np.int32)
    batch = {
      "inputs": np.ascontiguousarray(window[:, :-1]),
      "targets": np.ascontiguousarray(window[:, 1:]),
      "reset": np.full(self._rows.shape[0], self._step == 0),
    }
    self._step += 1
    if self._step == self.steps_per_epoch:
      self._step, self._epoch = 0, self._epoch + 1
    return batch

  def get_state(self) -> dict[str, int]:
    """The position of the next batch and the layout it belongs to (JSON-able ints)."""
    return {"step": self._step, "epoch": self._epoch, **self._config}

  def set_state(self, state: dict) -> None:
    """Resumes at `state` from `get_state()` of an iterator over the same layout."""
    mismatch = {k: (state.get(k), v) for k, v in self._config.items() if state.get(k) != v}
    if mismatch:
      raise DataError(
        "The data-iterator state is from another stream layout; (saved, now): "
        + ", ".join(f"{k}={saved!r} vs {now!r}" for k, (saved, now) in mismatch.items())
        + ". Resume with the same data, batch size and segment length."
      )
    step, epoch = int(state["step"]), int(state["epoch"])
    if not 0 <= step < self.steps_per_epoch or epoch < 0:
      raise DataError(f"Invalid data-iterator position step={step}, epoch={epoch}.")
    self._step, self._epoch = step, epoch


class StreamEvalBatches:
  """One ordered pass over a split for evaluation: every token but the first is a target
  exactly once.

  With N tokens and B = global_batch_size, row r predicts tokens
  [1 + r * m, 1 + (r + 1) * m), m = ceil((N - 1) / B), from the inputs one
  position earlier, in ceil(m / s) segments of s = segment_length. The last
  row and the last segment are padded: padded inputs and targets are PAD_ID
  (0), and a loss or bits-per-byte count must ignore targets == 0 (real
  targets are >= 1). `reset` is True on the first step only: each row starts
  with an empty memory (its first input has no context but itself). Every
  process has the same number of steps, its rows of the global batch.
  Re-iterable: each `iter()` is a fresh pass.
  """

  def __init__(
    self,
    tokens: np.ndarray,
    *,
    global_batch_size: int,
    segment_length: int,
    process_index: int = 0,
    process_count: int = 1,
  ):
    """Lays out the pass; arguments as for `StreamIterator`."""
    self._tokens = _check_tokens(tokens, segment_length)
    if self._tokens.size < 2:
      raise DataError(f"An evaluation split needs >= 2 tokens; got {self._tokens.size}.")
    rows = _rows_of_process(global_batch_size, process_index, process_count)
    self._row_length = -(-(self._tokens.size - 1) // global_batch_size)
    self._segment = segment_length
    self._row_starts = np.arange(rows.start, rows.stop, dtype=np.int64) * self._row_length
    self.num_steps = -(-self._row_length // segment_length)

  def __len__(self) -> int:
    return self.num_steps

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    n = self._tokens.size
    for step in range(self.num_steps):
      offset = step * self._segment + np.arange(self._segment)  # Within each row.
      index = self._row_starts[:, None] + offset  # Input positions [b, s].
      valid = (offset < self._row_length) & (index + 1 < n)
      inputs = np.where(valid, self._tokens[np.minimum(index, n - 1)], PAD_ID)
      targets = np.where(valid, self._tokens[np.minimum(index + 1, n - 1)], PAD_ID)
      yield {
        "inputs": inputs.astype(np.int32),
        "targets": targets.astype(np.int32),
        "reset": np.full(index.shape[0], step == 0),
      }


# ---------------------------------------------------------------- Task.


def _corpus_args(config: ml_collections.ConfigDict) -> tuple[str, dict]:
  corpus = config.data.corpus
  if corpus not in CORPORA:
    raise ConfigError(f"config.data.corpus={corpus!r} is unknown; valid: {', '.join(CORPORA)}.")
  if corpus != "stdlib":
    return corpus, {}
  if config.data.max_bytes < 1:
    raise ConfigError(f"config.data.max_bytes must be >= 1; got {config.data.max_bytes}.")
  if config.data.split_seed < 0:
    raise ConfigError(f"config.data.split_seed must be >= 0; got {config.data.split_seed}.")
  return corpus, {"max_bytes": config.data.max_bytes, "seed": config.data.split_seed}


def load_task(config: ml_collections.ConfigDict, *, generate: bool) -> base.TaskData:
  """The byte-level LM task: splits of {"tokens": int16 [n], "doc_start": bool [n]}.

  Args:
    config: the run's config; reads data_dir, data.corpus ('stdlib', 'enwik8',
      'text8') and, for 'stdlib', data.max_bytes and data.split_seed.
    generate: whether a missing stdlib corpus cache may be built (enwik8 and
      text8 must be downloaded).

  Returns:
    TaskData (vocab_size = num_classes = 257) whose splits are read on first access.
  """
  corpus, args = _corpus_args(config)
  if corpus == "stdlib":
    splits, _ = byte_corpus.load_stdlib_corpus(config.data_dir, generate=generate, **args)
    read = splits.__getitem__
  else:
    _locate(config.data_dir, FILE_CORPORA[corpus])  # Fail now, not at the first eval.

    def read(split: str) -> dict[str, np.ndarray]:
      return read_file_split(config.data_dir, FILE_CORPORA[corpus], split)

  return base.TaskData(
    name=f"byte_lm/{corpus}",
    vocab_size=VOCAB_SIZE,
    num_classes=VOCAB_SIZE,
    splits=base.LazySplits(read),
    stream=True,
    best_metric="loss",
    best_mode="min",
  )


def corpus_info(config: ml_collections.ConfigDict, *, generate: bool = False) -> dict:
  """What names the data of a result: corpus, Python version (stdlib), bytes and sha256 per
  split, and the train split's unigram entropy in bits per byte (the bound an LM must beat).
  For enwik8 / text8 this reads all 100 MB (seconds)."""
  corpus, args = _corpus_args(config)
  if corpus == "stdlib":
    _, meta = byte_corpus.load_stdlib_corpus(config.data_dir, generate=generate, **args)
    return {k: v for k, v in meta.items() if k != "files"}
  info: dict = {"corpus": corpus, "num_bytes": {}, "fingerprints": {}}
  for split in SPLITS:
    tokens = read_file_split(config.data_dir, FILE_CORPORA[corpus], split)["tokens"]
    info["num_bytes"][split] = int(tokens.size)
    info["fingerprints"][split] = split_fingerprint(tokens)
    if split == "train":
      info["train_unigram_entropy_bits"] = unigram_entropy_bits(tokens)
  return info


def main(argv: list[str] | None = None) -> int:
  """Builds (stdlib) or checks (enwik8, text8) a corpus and prints what names it; returns the
  exit status (2 for a user error, printed as one line)."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--corpus", default="stdlib", choices=CORPORA)
  parser.add_argument("--max_bytes", type=int, default=byte_corpus.DEFAULT_MAX_BYTES)
  parser.add_argument("--seed", type=int, default=0, help="The stdlib file-split key.")
  args = parser.parse_args(argv)
  try:
    data_dir = paths.local_dir(args.data_dir, what="--data_dir")
    config = ml_collections.ConfigDict(
      {
        "data_dir": data_dir,
        "data": {"corpus": args.corpus, "max_bytes": args.max_bytes, "split_seed": args.seed},
      }
    )
    print(json.dumps(corpus_info(config, generate=True), indent=2))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
