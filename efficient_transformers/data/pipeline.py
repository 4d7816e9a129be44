"""Grain input pipelines over in-memory arrays: shuffled training, one-pass evaluation.

Two batchings, one kind of iterator (Grain's, checkpointable with
`get_state()` / `set_state()`):

- `Examples` (the LRA classifiers): a dict of numpy arrays sharing their first
  dimension (e.g. `{"inputs": int32 [N, L], "targets": int32 [N]}`), batched
  by `train_iterator` and `eval_batches`. They operate on example *indices*:
  Grain shuffles, batches and checkpoints integers, and each batch is then
  gathered with one numpy fancy-index per array, so per-batch work is
  vectorized and independent of sequence length.
- `Streams` (language modelling): one token stream per split, cut by
  `stream_train_iterator` and `stream_eval_batches` into Transformer-XL's
  ordered layout. Grain indexes the step; each batch is sliced from the
  stream.

A task names its batching (`TaskData.batching`); training calls its
`train_iterator` / `eval_batches` and never asks which one it has.

Multi-process semantics (the stronger of the two possible contracts): every
process computes the same global order and global batch of indices and keeps
the slice `[process_index * b, (process_index + 1) * b)` of it, with
b = global_batch_size // process_count. So the per-process batches of one step
are disjoint, and together they are exactly the batch a single process would
read with process_count=1: the global data order does not depend on how many
processes there are. Each process gathers only its own examples.
"""

import dataclasses
from collections.abc import Sequence

import grain
import numpy as np

from efficient_transformers.errors import ConfigError, DataError

PAD_ID = 0  # Stream padding: never a real token, and never a real target.

# Small read-ahead: batches are cheap to gather, and Grain's default (500
# prefetched batches on 16 threads) would hold hundreds of MB of long sequences.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


def _num_examples(arrays: dict[str, np.ndarray]) -> int:
  if not arrays:
    raise DataError("The pipeline got no arrays; pass e.g. {'inputs': ..., 'targets': ...}.")
  sizes = {name: np.shape(a)[0] if np.ndim(a) else None for name, a in arrays.items()}
  if None in sizes.values() or len(set(sizes.values())) != 1:
    raise DataError(f"Arrays must share their first (example) dimension; got sizes {sizes}.")
  return next(iter(sizes.values()))


def _per_process_batch(global_batch_size: int, process_index: int, process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ConfigError(
      f"Need 0 <= process_index ({process_index}) < process_count ({process_count})."
    )
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ConfigError(
      f"The global batch size ({global_batch_size}) must be a positive multiple of the number "
      f"of processes ({process_count}); change config.batch_size."
    )
  return global_batch_size // process_count


def train_iterator(
  arrays: dict[str, np.ndarray],
  *,
  global_batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
  """An endless iterator of shuffled per-process training batches.

  Every epoch is a new permutation, determined by (seed, epoch); each epoch is
  batched on its own and its last `N % global_batch_size` examples (different
  ones each epoch) are dropped. `get_state()` returns a small JSON-able dict and
  `set_state(state)` on an iterator built with the same arguments resumes
  exactly: it yields the batches the uninterrupted iterator would have.

  Args:
    arrays: name -> array with N examples on axis 0.
    global_batch_size: examples per step summed over processes.
    seed: integer seed of the order.
    process_index: this process, in [0, process_count).
    process_count: the number of data-loading processes.
    read_options: Grain's threads and prefetch for the gathers.

  Returns:
    A Grain iterator of {name: array [global_batch_size // process_count, ...]}.
  """
  num = _num_examples(arrays)
  per_process = _per_process_batch(global_batch_size, process_index, process_count)
  if num < global_batch_size:
    raise DataError(f"{num} examples cannot fill one global batch of {global_batch_size}.")
  lo = process_index * per_process

  def gather(indices: Sequence[int]) -> dict[str, np.ndarray]:
    mine = np.asarray(indices[lo : lo + per_process], np.int64)
    return {name: a[mine] for name, a in arrays.items()}

  dataset = (
    grain.MapDataset.range(num)
    # Grain reshuffles epoch e with seed + e; hashing the user's seed first
    # keeps runs with seeds s and s + 1 from sharing all but one epoch order.
    .shuffle(seed=int(np.random.SeedSequence(seed).generate_state(1)[0]))
    .batch(global_batch_size, drop_remainder=True, batch_fn=gather)
    .repeat()
  )
  return iter(dataset.to_iter_dataset(read_options or _READ_OPTIONS))


def eval_batches(
  arrays: dict[str, np.ndarray],
  *,
  global_batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
  """One in-order pass over all examples, as full-size per-process batches.

  The examples are cut into ceil(N / global_batch_size) global batches, the
  same number on every process (SPMD collectives need that). Each batch has an
  extra "weight" field, float32 [b]: 1.0 for a real example, 0.0 for padding.
  Padding rows, filling up the last batch, repeat the dataset's last example
  rather than zeros, so a model never sees an all-padding sequence (whose
  masked mean would be 0/0); weight them out of every metric. Across
  processes, every example has weight 1 exactly once.

  Args:
    arrays: name -> array with N examples on axis 0; no "weight" key.
    global_batch_size: examples per step summed over processes.
    process_index: this process, in [0, process_count).
    process_count: the number of data-loading processes.
    read_options: Grain's threads and prefetch for the gathers.

  Returns:
    A re-iterable Grain dataset; each `iter()` is a fresh pass of
    {name: array [global_batch_size // process_count, ...], "weight": ...}.
  """
  num = _num_examples(arrays)
  per_process = _per_process_batch(global_batch_size, process_index, process_count)
  if "weight" in arrays:
    raise DataError("Arrays already have a 'weight' field; eval_batches adds its own.")
  if num == 0:
    raise DataError("The evaluation split is empty.")
  offsets = process_index * per_process + np.arange(per_process)

  def make_batch(step: int) -> dict[str, np.ndarray]:
    index = step * global_batch_size + offsets
    batch = {name: a[np.minimum(index, num - 1)] for name, a in arrays.items()}
    batch["weight"] = (index < num).astype(np.float32)
    return batch

  num_batches = -(-num // global_batch_size)
  dataset = grain.MapDataset.range(num_batches).map(make_batch)
  return dataset.to_iter_dataset(read_options or _READ_OPTIONS)


def _check_tokens(tokens: np.ndarray, segment_length: int) -> np.ndarray:
  tokens = np.asarray(tokens)
  if tokens.ndim != 1:
    raise DataError(f"Stream batches need a 1-D token array; got shape {tokens.shape}.")
  if segment_length < 1:
    raise ConfigError(f"The segment length must be >= 1; got {segment_length}.")
  return tokens


def stream_train_iterator(
  tokens: np.ndarray,
  *,
  global_batch_size: int,
  segment_length: int,
  process_index: int = 0,
  process_count: int = 1,
  read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
  """An endless, ordered iterator of training segments (Transformer-XL's layout).

  With N tokens and B = global_batch_size, row r's stream is tokens
  [r * n, (r + 1) * n), n = N // B (the last N % B tokens are never used).
  Step t of an epoch gives row r inputs stream[t * s : (t + 1) * s] and targets
  stream[t * s + 1 : (t + 1) * s + 1], s = segment_length, for
  t < (n - 1) // s steps per epoch; the rest of each stream (fewer than s
  targets) is dropped, then every row wraps to its start together. `reset` is
  True for every row on an epoch's first step (the first segment of a pass,
  which is also where a stream wraps), else False: it tells a model with a
  memory to clear it. No randomness.

  Process p of P yields rows [p * B / P, (p + 1) * B / P) of the global batch, so
  the batches do not depend on P, and a state saved with one process count
  resumes with another.

  Args:
    tokens: the split's ids [N].
    global_batch_size: rows summed over processes.
    segment_length: tokens per row and step.
    process_index: this process, in [0, process_count).
    process_count: the number of data-loading processes.
    read_options: Grain's threads and prefetch.

  Returns:
    A Grain iterator of {"inputs", "targets": int32 [b, segment_length],
    "reset": bool [b]}, b = global_batch_size // process_count.
  """
  tokens = _check_tokens(tokens, segment_length)
  per_process = _per_process_batch(global_batch_size, process_index, process_count)
  stream_length = tokens.size // global_batch_size
  steps_per_epoch = max(stream_length - 1, 0) // segment_length
  if steps_per_epoch < 1:
    raise DataError(
      f"{tokens.size:,} tokens in {global_batch_size} streams cannot fill one segment of "
      f"{segment_length} inputs plus a target; need at least "
      f"{global_batch_size * (segment_length + 1):,} tokens."
    )
  lo = process_index * per_process
  rows = tokens[: global_batch_size * stream_length].reshape(global_batch_size, -1)
  rows = rows[lo : lo + per_process]

  def segment(step: int) -> dict[str, np.ndarray]:
    start = step * segment_length
    window = rows[:, start : start + segment_length + 1].astype(np.int32)
    return {
      "inputs": np.ascontiguousarray(window[:, :-1]),
      "targets": np.ascontiguousarray(window[:, 1:]),
      "reset": np.full(per_process, step == 0),
    }

  dataset = grain.MapDataset.range(steps_per_epoch).map(segment).repeat()
  return iter(dataset.to_iter_dataset(read_options or _READ_OPTIONS))


def stream_eval_batches(
  tokens: np.ndarray,
  *,
  global_batch_size: int,
  segment_length: int,
  process_index: int = 0,
  process_count: int = 1,
  read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
  """One ordered pass over a split: every token but the first is a target exactly once.

  With N tokens and B = global_batch_size, row r predicts tokens
  [1 + r * m, 1 + (r + 1) * m), m = ceil((N - 1) / B), from the inputs one
  position earlier, in ceil(m / s) segments of s = segment_length. The last
  row and the last segment are padded: padded inputs and targets are PAD_ID
  (0), and a loss must ignore targets == 0 (real targets are >= 1). `reset`
  is True on the first step only: each row starts with an empty memory. Every
  process has the same number of steps, its rows of the global batch.

  Args: as for `stream_train_iterator`.

  Returns:
    A re-iterable Grain dataset; each `iter()` is a fresh pass.
  """
  tokens = _check_tokens(tokens, segment_length)
  if tokens.size < 2:
    raise DataError(f"An evaluation split needs >= 2 tokens; got {tokens.size}.")
  per_process = _per_process_batch(global_batch_size, process_index, process_count)
  n = tokens.size
  row_length = -(-(n - 1) // global_batch_size)
  first_row = process_index * per_process
  row_starts = np.arange(first_row, first_row + per_process, dtype=np.int64) * row_length

  def make_batch(step: int) -> dict[str, np.ndarray]:
    offset = step * segment_length + np.arange(segment_length)  # Within each row.
    index = row_starts[:, None] + offset  # Input positions [b, s].
    valid = (offset < row_length) & (index + 1 < n)
    inputs = np.where(valid, tokens[np.minimum(index, n - 1)], PAD_ID)
    targets = np.where(valid, tokens[np.minimum(index + 1, n - 1)], PAD_ID)
    return {
      "inputs": inputs.astype(np.int32),
      "targets": targets.astype(np.int32),
      "reset": np.full(per_process, step == 0),
    }

  num_steps = -(-row_length // segment_length)
  dataset = grain.MapDataset.range(num_steps).map(make_batch)
  return dataset.to_iter_dataset(read_options or _READ_OPTIONS)


# ---------------------------------------------------------------- What a task hands to training.


class Examples:
  """The batching of example tasks: a split is {field: array [N, ...]}, examples shuffled."""

  def train_iterator(
    self, split: dict[str, np.ndarray], *, global_batch_size: int, seed: int, **processes
  ) -> grain.DatasetIterator:
    """`train_iterator` over the split; `processes` are process_index and process_count."""
    return train_iterator(split, global_batch_size=global_batch_size, seed=seed, **processes)

  def eval_batches(
    self, split: dict[str, np.ndarray], *, global_batch_size: int, **processes
  ) -> grain.IterDataset:
    """`eval_batches` over the split: padded rows carry weight 0."""
    return eval_batches(split, global_batch_size=global_batch_size, **processes)

  def order(self, split: dict[str, np.ndarray]) -> dict:
    """What fixes the training batches beyond the seed, batch size and data config: nothing."""
    del split
    return {}


@dataclasses.dataclass(frozen=True)
class Streams:
  """The batching of stream tasks: a split is {"tokens": [N], ...}, cut in order.

  Attributes:
    train_length: tokens per row and training step.
    eval_length: tokens per row and evaluation step.
  """

  train_length: int
  eval_length: int

  def train_iterator(
    self, split: dict[str, np.ndarray], *, global_batch_size: int, seed: int, **processes
  ) -> grain.DatasetIterator:
    """`stream_train_iterator` at `train_length`; the order has no randomness (seed unused)."""
    del seed
    return stream_train_iterator(
      split["tokens"],
      global_batch_size=global_batch_size,
      segment_length=self.train_length,
      **processes,
    )

  def eval_batches(
    self, split: dict[str, np.ndarray], *, global_batch_size: int, **processes
  ) -> grain.IterDataset:
    """`stream_eval_batches` at `eval_length`."""
    return stream_eval_batches(
      split["tokens"],
      global_batch_size=global_batch_size,
      segment_length=self.eval_length,
      **processes,
    )

  def order(self, split: dict[str, np.ndarray]) -> dict:
    """The stream layout: a resume with another segment length or corpus size would feed
    other batches from the same iterator position."""
    return {"segment_length": self.train_length, "num_tokens": int(np.size(split["tokens"]))}


EXAMPLES = Examples()


def task_train_iterator(
  task, *, global_batch_size: int, seed: int, process_index: int = 0, process_count: int = 1
) -> grain.DatasetIterator:
  """The training iterator of a `base.TaskData`, as its batching makes it.

  Args:
    task: a `base.TaskData`.
    global_batch_size: rows per step summed over processes.
    seed: the example order's seed.
    process_index: this process, in [0, process_count).
    process_count: the number of data-loading processes.

  Returns:
    An endless Grain iterator of per-process batches with get_state() / set_state().
  """
  return task.batching.train_iterator(
    task.splits["train"],
    global_batch_size=global_batch_size,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
  )


def task_eval_batches(
  task, split: str, *, global_batch_size: int, process_index: int = 0, process_count: int = 1
) -> grain.IterDataset:
  """One pass over `split` as a task's batching makes it (arguments as `task_train_iterator`)."""
  return task.batching.eval_batches(
    task.splits[split],
    global_batch_size=global_batch_size,
    process_index=process_index,
    process_count=process_count,
  )
