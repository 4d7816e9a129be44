r"""LRA Retrieval (AAN document matching): the release's TSV reader, a loader, smoke data.

The original release (`lra_release.gz`, under `lra_release/tsv_data/`) holds
`new_aan_pairs.{train,eval,test}.tsv`: no header, one pair per line, five
tab-separated columns `label, id1, id2, text1, text2`. The label is 0 or 1,
written as an integer or a float ("1.0": the original parsed it as float32).
Tokens are UTF-8 bytes: byte b is token b + 1, 0 is padding (vocabulary 257,
the original's `ByteTextEncoder`), and each document keeps its first
`max_length` bytes (4000 in LRA). Splits: train = train, validation = eval,
test = test.

Texts are taken literally: quotes are ordinary characters (the original read
the files with `use_quote_delim=False`). The release's texts contain no tab or
newline (we assume so; a row with other than five fields is an error naming
the line). Do not read these files with Python's `csv` module at its default
settings: its field size limit (131,072 characters) rejects the long
documents with `_csv.Error: field larger than field limit`, and its quote
handling would merge rows at a stray `"`. The reader splits on tab and newline
bytes itself, a block of ~16 MB of whole lines at a time, so memory is the
output arrays plus about two blocks.

For smoke runs there is no way to generate AAN; `make_smoke_data` writes a
SYNTHETIC matching set in the release's format instead (seeded): documents of
random words where a label-1 pair shares a topic vocabulary and a label-0 pair
does not. It is for plumbing checks only and says nothing about AAN accuracy.

  python -m efficient_transformers.data.retrieval --data_dir=data/lra/retrieval  # check files
  python -m efficient_transformers.data.retrieval --make_smoke_data \
    --data_dir=data/lra/retrieval_smoke
"""

import argparse
import logging
import os
import sys
import time
from collections.abc import Iterator

import ml_collections
import numpy as np

from efficient_transformers import paths
from efficient_transformers.data import base
from efficient_transformers.errors import ConfigError, DataError, UserError

_log = logging.getLogger(__name__)

VOCAB_SIZE = 257  # 256 byte values + padding.
NUM_CLASSES = 2
PAD_ID = 0
SPLITS = ("train", "validation", "test")
_FILE_SPLIT = {"train": "train", "validation": "eval", "test": "test"}
COLUMNS = ("label", "id1", "id2", "text1", "text2")
RELEASE_URL = "https://storage.googleapis.com/long-range-arena/lra_release.gz"
RELEASE_PAGE = "https://github.com/google-research/long-range-arena"

_BLOCK_BYTES = 1 << 24  # Parse ~16 MB of whole lines at a time.


def split_path(data_dir: str, split: str) -> str:
  """The release's file for `split` ('train', 'validation' or 'test').

  Args:
    data_dir: the directory holding the TSV files.
    split: one of `SPLITS`; 'validation' is the release's `eval` file.

  Returns:
    E.g. `DIR/new_aan_pairs.eval.tsv` for 'validation'.
  """
  if split not in _FILE_SPLIT:
    raise ConfigError(f"Unknown retrieval split {split!r}; valid splits: {', '.join(SPLITS)}.")
  return os.path.join(data_dir, f"new_aan_pairs.{_FILE_SPLIT[split]}.tsv")


# ------------------------------------------------------------------------------------ Reader.


def _line_blocks(path: str) -> Iterator[bytes]:
  """Yields the file as blocks of whole lines, each ending with a newline."""
  with open(path, "rb") as f:
    carry = b""
    while chunk := f.read(_BLOCK_BYTES):
      data = carry + chunk if carry else chunk
      cut = data.rfind(b"\n") + 1
      carry = data[cut:]
      if cut:
        yield data[:cut]
    if carry:
      yield carry + b"\n"  # A last line without a newline.


def _count_lines(path: str) -> int:
  count, last = 0, b"\n"
  with open(path, "rb") as f:
    while chunk := f.read(_BLOCK_BYTES):
      count, last = count + chunk.count(b"\n"), chunk[-1:]
  return count + (last != b"\n")


def _parse_label(text: bytes) -> int | None:
  """0 or 1 from '0', '1', '0.0', '1.0' (any float spelling); None if anything else."""
  try:
    value = float(text)
  except ValueError:
    return None
  return int(value) if value in (0.0, 1.0) else None


def _parse_block(
  block: bytes, first_line: int, path: str, inputs1: np.ndarray, inputs2: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """Parses whole lines into the first rows of inputs1/inputs2; returns (labels, lengths).

  A Python loop over lines is the fast way here: lines are long (AAN
  documents run to several KB), so per-line overhead is small next to the
  copies, which `bytes.split` (memchr) and numpy do in C. Whole-block numpy
  scans for tabs and newlines with a gather measured 3x slower.
  """
  width = inputs1.shape[1]
  lines = block.split(b"\n")[:-1]  # The block ends with a newline.
  labels = np.empty(len(lines), np.int32)
  lengths = np.empty((len(lines), 2), np.int64)
  label_of: dict[bytes, int | None] = {}
  for i, line in enumerate(lines):
    fields = line.removesuffix(b"\r").split(b"\t")
    if len(fields) != len(COLUMNS):
      raise DataError(
        f"{path}, line {first_line + i}: expected {len(COLUMNS)} tab-separated columns "
        f"({', '.join(COLUMNS)}), got {len(fields)}. Restore the file from the LRA release "
        f"(texts never contain tabs or newlines there)."
      )
    if fields[0] not in label_of:
      label_of[fields[0]] = _parse_label(fields[0])
    label = label_of[fields[0]]
    if label is None:
      value = fields[0][:50].decode("utf-8", errors="replace")
      raise DataError(
        f"{path}, line {first_line + i}: label must be 0 or 1 (an integer or a float such as "
        f"1.0), got {value!r}."
      )
    labels[i] = label
    for j, (text, out) in enumerate(((fields[3], inputs1), (fields[4], inputs2))):
      lengths[i, j] = len(text)
      doc = np.frombuffer(text, np.uint8, count=min(len(text), width))
      np.add(doc, 1, out=out[i, : doc.size], dtype=np.int16)  # Byte b -> token b + 1.
  return labels, lengths


def load_split(data_dir: str, split: str, *, max_length: int) -> dict[str, np.ndarray]:
  """Reads one split of the release's AAN pairs as byte tokens.

  Args:
    data_dir: the directory with `new_aan_pairs.{train,eval,test}.tsv`.
    split: 'train', 'validation' (the `eval` file) or 'test'.
    max_length: bytes kept per document; shorter ones are right-padded with 0.

  Returns:
    {"inputs1": int16 [N, max_length], "inputs2": int16 [N, max_length] byte + 1
     tokens of text1 / text2, "targets": int32 [N] labels 0/1}.
  """
  if max_length < 1:
    raise ConfigError(f"Retrieval max_length must be >= 1; got {max_length}.")
  path = split_path(data_dir, split)
  if not os.path.isfile(path):
    raise DataError(f"Retrieval file {path} is missing. {_where_to_get(data_dir)}")
  t0 = time.perf_counter()
  num = _count_lines(path)
  if num == 0:
    raise DataError(f"{path} is empty; expected one pair per line ({', '.join(COLUMNS)}).")
  inputs1 = np.zeros((num, max_length), np.int16)
  inputs2 = np.zeros((num, max_length), np.int16)
  targets = np.zeros(num, np.int32)
  row, truncated, empty = 0, 0, 0
  for block in _line_blocks(path):
    labels, lengths = _parse_block(block, row + 1, path, inputs1[row:], inputs2[row:])
    targets[row : row + labels.size] = labels
    row += labels.size
    truncated += int((lengths > max_length).sum())
    empty += int((lengths == 0).sum())
  if empty:
    _log.warning("%s: %d empty documents (only padding; the CLS token still pools).", path, empty)
  _log.info(
    "Read %d pairs from %s in %.1f s; %d of %d documents cut to %d bytes.",
    num,
    path,
    time.perf_counter() - t0,
    truncated,
    2 * num,
    max_length,
  )
  return {"inputs1": inputs1, "inputs2": inputs2, "targets": targets}


# ------------------------------------------------------------------------------------ Loader.


def _where_to_get(data_dir: str) -> str:
  return (
    f"Download the LRA release lra_release.gz ({RELEASE_URL}, linked from {RELEASE_PAGE}), "
    f"extract it, and copy new_aan_pairs.train.tsv, new_aan_pairs.eval.tsv and "
    f"new_aan_pairs.test.tsv from lra_release/tsv_data/ into {data_dir} (config.data_dir), "
    f"or point config.data_dir at that tsv_data directory."
  )


def _smoke_command(data_dir: str) -> str:
  return f"python -m efficient_transformers.data.retrieval --make_smoke_data --data_dir={data_dir}"


def load_task(config: ml_collections.ConfigDict, *, generate: bool) -> base.TaskData:
  """The retrieval task: AAN pairs (or the synthetic smoke set) under `config.data_dir`.

  Args:
    config: the run's config; reads data_dir, data.max_length, data.synthetic,
      data.generator_seed, data.num_{train,val,test} and model.max_length.
    generate: whether missing synthetic smoke data may be written (only when
      `config.data.synthetic`; the AAN data itself must be downloaded).

  Returns:
    TaskData with lazy splits of {"inputs1", "inputs2", "targets"}.
  """
  data_dir, max_length = config.data_dir, config.data.max_length
  if max_length > config.model.max_length:
    raise ConfigError(
      f"config.data.max_length={max_length} exceeds config.model.max_length="
      f"{config.model.max_length}; the model cannot embed documents that long. Set them equal."
    )
  paths = [split_path(data_dir, s) for s in SPLITS]
  missing = [path for path in paths if not os.path.exists(path)]
  if missing and config.data.synthetic and generate and len(missing) == len(paths):
    _log.info("No retrieval smoke data in %s; writing the SYNTHETIC set.", data_dir)
    make_smoke_data(
      data_dir,
      seed=config.data.generator_seed,
      num_train=config.data.num_train,
      num_val=config.data.num_val,
      num_test=config.data.num_test,
      max_length=max_length,
    )
  elif missing:
    if config.data.synthetic:
      hint = (
        f"Generate the synthetic smoke set (after removing any partial files) with: "
        f"{_smoke_command(data_dir)}"
      )
    else:
      hint = _where_to_get(data_dir)
    raise DataError(
      f"Retrieval data missing in config.data_dir={data_dir!r}: {', '.join(missing)}. {hint}"
    )

  def read(split: str) -> dict[str, np.ndarray]:
    return load_split(data_dir, split, max_length=max_length)

  return base.TaskData(
    name="retrieval",
    vocab_size=VOCAB_SIZE,
    num_classes=NUM_CLASSES,
    splits=base.LazySplits(read),
  )


# ------------------------------------------------------------------- Synthetic smoke data.

_NUM_TOPICS = 4
_TOPIC_LETTERS = 6  # Each topic spells its words with its own 6 capital letters.
_TOPIC_WORDS = 24
_COMMON_WORDS = 300
_TOPIC_FRACTION = 0.3  # Share of a document's words drawn from its topic's vocabulary.
# Common words that exercise the reader: quotes and UTF-8 multibyte characters.
_SPECIAL_WORDS = ('"quoted"', "it's", "naïve", "café", "—", "10%")


def _random_words(rng: np.random.Generator, count: int, alphabet: bytes) -> list[str]:
  lengths = rng.integers(3, 9, count)
  letters = np.frombuffer(alphabet, np.uint8)[rng.integers(0, len(alphabet), int(lengths.sum()))]
  text = letters.tobytes().decode()
  cuts = np.cumsum(lengths)
  return [text[e - n : e] for n, e in zip(lengths.tolist(), cuts.tolist(), strict=True)]


def _vocabularies(seed: int) -> tuple[list[np.ndarray], np.ndarray]:
  """The seed's topic vocabularies (upper-case words, disjoint letters) and common words.

  Topics have letters of their own so that a small model at smoke scale can
  tell them apart within a few hundred steps: it is a plumbing check.
  """
  rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
  capitals = rng.permutation(np.arange(ord("A"), ord("Z") + 1)).astype(np.uint8).tobytes()
  topics = []
  for t in range(_NUM_TOPICS):
    letters = capitals[t * _TOPIC_LETTERS : (t + 1) * _TOPIC_LETTERS]
    topics.append(np.array(_random_words(rng, _TOPIC_WORDS, letters), dtype=object))
  common = _random_words(rng, _COMMON_WORDS, b"abcdefghijklmnopqrstuvwxyz")
  return topics, np.array(common + list(_SPECIAL_WORDS), dtype=object)


def _document(rng: np.random.Generator, topic: np.ndarray, common: np.ndarray, size: int) -> str:
  """Words from `topic` (a _TOPIC_FRACTION of them) and `common`, cut to `size` characters."""
  count = size // 3 + 1  # Words average > 3 characters with their space: enough to cut.
  from_topic = rng.random(count) < _TOPIC_FRACTION
  words = np.where(
    from_topic,
    topic[rng.integers(0, topic.size, count)],
    common[rng.integers(0, common.size, count)],
  )
  return " ".join(words.tolist())[:size].strip()


def _smoke_rows(seed: int, split_index: int, num: int, max_length: int) -> list[str]:
  """The lines of one synthetic split: exactly num // 2 pairs with label 1, in random order."""
  topics, common = _vocabularies(seed)
  rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1 + split_index,)))
  labels = rng.permutation(np.arange(num) < num // 2).astype(int)
  topic1 = rng.integers(0, _NUM_TOPICS, num)
  # A different topic for label 0: a nonzero shift modulo the number of topics.
  topic2 = np.where(labels == 1, topic1, (topic1 + rng.integers(1, _NUM_TOPICS, num)) % _NUM_TOPICS)
  # Lengths around max_length, so some documents are cut and others padded.
  sizes = rng.integers(max(max_length // 2, 1), 2 * max_length + 1, (num, 2))
  lines = []
  for i in range(num):
    text1 = _document(rng, topics[topic1[i]], common, int(sizes[i, 0]))
    text2 = _document(rng, topics[topic2[i]], common, int(sizes[i, 1]))
    lines.append(
      f"{labels[i]}\tsyn-{split_index}-{i}-a\tsyn-{split_index}-{i}-b\t{text1}\t{text2}\n"
    )
  return lines


def make_smoke_data(
  data_dir: str,
  *,
  seed: int = 0,
  num_train: int = 4_000,
  num_val: int = 500,
  num_test: int = 500,
  max_length: int = 256,
) -> None:
  """Writes a SYNTHETIC matching set in the release's format (for plumbing checks only).

  Each document is random lower-case words (plus a few with quotes and
  multibyte UTF-8) and, for 30% of its words, upper-case words of one of four
  topics (each topic spells with its own letters); a pair has label 1 when
  both documents share a topic, and each split holds
  exactly half label-1 pairs. Document lengths are uniform in
  [max_length / 2, 2 max_length] characters, so readers both cut and pad. The
  files depend only on the arguments; each is written under a temporary name
  and renamed when complete.

  Args:
    data_dir: where `new_aan_pairs.{train,eval,test}.tsv` go; created if missing.
    seed: non-negative integer seed.
    num_train: pairs in the train file.
    num_val: pairs in the eval file.
    num_test: pairs in the test file.
    max_length: the document length the smoke config reads.
  """
  if not isinstance(seed, int | np.integer) or seed < 0:
    raise ConfigError(f"Retrieval smoke data seed must be a non-negative integer; got {seed!r}.")
  if min(num_train, num_val, num_test) < 1 or max_length < 1:
    raise ConfigError(
      f"Retrieval smoke data needs num_train, num_val, num_test >= 1 and max_length >= 1; got "
      f"{num_train}, {num_val}, {num_test}, {max_length}."
    )
  os.makedirs(data_dir, exist_ok=True)
  for index, (split, num) in enumerate(zip(SPLITS, (num_train, num_val, num_test), strict=True)):
    path = split_path(data_dir, split)
    temp = f"{path}.tmp-{os.getpid()}"
    try:
      with open(temp, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(_smoke_rows(seed, index, num, max_length))
      os.replace(temp, path)
    finally:
      if os.path.exists(temp):
        os.remove(temp)
  _log.info("Wrote the SYNTHETIC retrieval smoke set (seed %d) to %s.", seed, data_dir)


# ------------------------------------------------------------------------------ Command line.


def main(argv: list[str] | None = None) -> int:
  """Writes the synthetic smoke set, or reads (checks) the three files of `--data_dir`; returns
  the exit status (2 for a user error, printed as one line)."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir", required=True, help="Where new_aan_pairs.*.tsv are/go.")
  parser.add_argument(
    "--make_smoke_data", action="store_true", help="Write the SYNTHETIC smoke set there."
  )
  parser.add_argument("--seed", type=int, default=0, help="Seed of the smoke set.")
  parser.add_argument("--max_length", type=int, default=None, help="Bytes kept per document.")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  try:
    data_dir = paths.local_dir(args.data_dir, what="--data_dir")
    if args.make_smoke_data:
      paths.make_dir(data_dir)  # So that a directory the user cannot create is one line.
      make_smoke_data(data_dir, seed=args.seed, max_length=args.max_length or 256)
      return 0
    for split in SPLITS:
      t0 = time.perf_counter()
      arrays = load_split(data_dir, split, max_length=args.max_length or 4_000)
      labels = arrays["targets"]
      print(
        f"{split_path(data_dir, split)}: {labels.size} pairs, {labels.mean():.1%} label 1, "
        f"read in {time.perf_counter() - t0:.1f} s."
      )
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
