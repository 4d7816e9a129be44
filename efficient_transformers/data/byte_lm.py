"""Byte-level language-modelling data: enwik8 / text8 readers, the stdlib corpus, stream batches.

Corpora (tokens are byte + 1 in 1..256, id 0 is padding, vocabulary 257):

- `enwik8` / `text8`: Matt Mahoney's files, 100,000,000 bytes each, placed by
  the user in the data dir as `{data_dir}/enwik8` (or `enwik8.zip`, as
  downloaded), likewise `text8`. The standard split (Al-Rfou et al.,
  Transformer-XL): first 90M bytes train, next 5M validation, last 5M test.
  Each split is one document: `doc_start` is True at position 0 only.
- `stdlib`: built offline from the Python standard library's sources
  (`byte_corpus`), one document per file.

Batches come from `pipeline.Streams` (`stream_train_iterator` for training,
`stream_eval_batches` for evaluation), Transformer-XL's ordered layout: the split is cut into
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

import ml_collections
import numpy as np

from efficient_transformers import paths
from efficient_transformers.data import base, byte_corpus, pipeline
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
  "bits_per_byte",
  "corpus_info",
  "load_task",
  "read_file_split",
  "segment_lengths",
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


def segment_lengths(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(train, eval) tokens per row and step: a train step runs config.model.bptt_segments
  segments of config.model.segment_length, an evaluation step one."""
  segment = int(config.model.get("segment_length") or 0)
  bptt = int(config.model.get("bptt_segments") or 1)
  if segment < 1 or bptt < 1:
    raise ConfigError(
      f"config.model.segment_length ({segment}) and config.model.bptt_segments ({bptt}) "
      "must be >= 1 for a language-model task."
    )
  return segment * bptt, segment


def fields(length: int) -> dict[str, tuple[tuple[int, ...], str]]:
  """The fields of one row of a stream batch of `length` tokens, as `base.TaskSpec` lists them."""
  return {"inputs": ((length,), "int32"), "targets": ((length,), "int32"), "reset": ((), "bool")}


def load_task(config: ml_collections.ConfigDict, *, generate: bool) -> base.TaskData:
  """The byte-level LM task: splits of {"tokens": int16 [n], "doc_start": bool [n]}.

  Args:
    config: the run's config; reads data_dir, data.corpus ('stdlib', 'enwik8',
      'text8') and, for 'stdlib', data.max_bytes and data.split_seed; the
      segment lengths from model.segment_length and model.bptt_segments.
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
    batching=pipeline.Streams(*segment_lengths(config)),
    objective="next_token",
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
