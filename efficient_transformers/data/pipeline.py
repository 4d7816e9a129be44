"""Grain input pipelines over in-memory arrays: shuffled training, one-pass evaluation.

Both work on a dict of numpy arrays sharing their first dimension (e.g.
`{"inputs": int32 [N, L], "targets": int32 [N]}`) and operate on example
*indices*: Grain shuffles, batches and checkpoints integers, and each batch is
then gathered with one numpy fancy-index per array, so per-batch work is
vectorized and independent of sequence length.

Multi-process semantics (the stronger of the two possible contracts): every
process computes the same global order and global batch of indices and keeps
the slice `[process_index * b, (process_index + 1) * b)` of it, with
b = global_batch_size // process_count. So the per-process batches of one step
are disjoint, and together they are exactly the batch a single process would
read with process_count=1: the global data order does not depend on how many
processes there are. Each process gathers only its own examples.
"""

from collections.abc import Sequence

import grain
import numpy as np

from efficient_transformers.errors import ConfigError, DataError

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


def task_train_iterator(
  task,
  *,
  global_batch_size: int,
  seed: int,
  sequence_length: int,
  process_index: int = 0,
  process_count: int = 1,
):
  """The training iterator a task needs: shuffled examples, or ordered stream segments.

  Args:
    task: a `tasks.TaskData`.
    global_batch_size: rows per step summed over processes.
    seed: the example order's seed (stream tasks are ordered: unused).
    sequence_length: tokens per row and step of a stream task (unused otherwise).
    process_index: this process, in [0, process_count).
    process_count: the number of data-loading processes.

  Returns:
    An endless iterator of per-process batches with get_state() / set_state().
  """
  if task.stream:
    from efficient_transformers.data.byte_lm import StreamIterator

    return StreamIterator(
      task.splits["train"]["tokens"],
      global_batch_size=global_batch_size,
      segment_length=sequence_length,
      process_index=process_index,
      process_count=process_count,
    )
  return train_iterator(
    task.splits["train"],
    global_batch_size=global_batch_size,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
  )


def task_eval_batches(
  task,
  split: str,
  *,
  global_batch_size: int,
  sequence_length: int,
  process_index: int = 0,
  process_count: int = 1,
):
  """One pass over `split` as a task needs it (see `task_train_iterator` for the arguments)."""
  if task.stream:
    from efficient_transformers.data.byte_lm import StreamEvalBatches

    return StreamEvalBatches(
      task.splits[split]["tokens"],
      global_batch_size=global_batch_size,
      segment_length=sequence_length,
      process_index=process_index,
      process_count=process_count,
    )
  return eval_batches(
    task.splits[split],
    global_batch_size=global_batch_size,
    process_index=process_index,
    process_count=process_count,
  )
