"""Grain pipelines: shuffled, resumable, sharded training; complete weighted evaluation."""

import itertools
import json

import numpy as np
import pytest

from efficient_transformers.data import pipeline
from efficient_transformers.errors import ConfigError, DataError

N = 64


def make_arrays(num: int = N) -> dict[str, np.ndarray]:
  # Row i of inputs is [i, i, i], so a batch's examples can be identified and checked whole.
  ids = np.arange(num, dtype=np.int32)
  return {"inputs": np.repeat(ids[:, None], 3, axis=1), "targets": ids}


def take(iterator, n: int) -> list[np.ndarray]:
  batches = list(itertools.islice(iterator, n))
  for b in batches:
    np.testing.assert_array_equal(b["inputs"], np.repeat(b["targets"][:, None], 3, axis=1))
  return [b["targets"] for b in batches]


def test_same_seed_same_order_different_seed_different_order():
  a = take(pipeline.train_iterator(make_arrays(), global_batch_size=8, seed=0), 10)
  b = take(pipeline.train_iterator(make_arrays(), global_batch_size=8, seed=0), 10)
  c = take(pipeline.train_iterator(make_arrays(), global_batch_size=8, seed=1), 10)
  np.testing.assert_array_equal(np.stack(a), np.stack(b))
  assert not np.array_equal(np.stack(a), np.stack(c))


def test_each_epoch_covers_every_example_once_in_a_new_order():
  batches = take(pipeline.train_iterator(make_arrays(), global_batch_size=8, seed=0), 24)
  assert all(b.shape == (8,) and b.dtype == np.int32 for b in batches)
  epochs = [np.concatenate(batches[i : i + 8]) for i in (0, 8, 16)]
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(N))
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])


def test_remainder_is_dropped_per_epoch():
  batches = take(pipeline.train_iterator(make_arrays(30), global_batch_size=8, seed=0), 6)
  for epoch in (np.concatenate(batches[:3]), np.concatenate(batches[3:])):
    assert len(np.unique(epoch)) == 24


@pytest.mark.parametrize("k", [0, 3, 8, 13])  # Within, at the end of, and past an epoch.
def test_resume_from_state_yields_the_same_batches(k):
  arrays = make_arrays()
  reference = take(pipeline.train_iterator(arrays, global_batch_size=8, seed=4), k + 6)
  interrupted = pipeline.train_iterator(arrays, global_batch_size=8, seed=4)
  take(interrupted, k)
  state = json.loads(json.dumps(interrupted.get_state()))  # As a checkpoint stores it.
  resumed = pipeline.train_iterator(arrays, global_batch_size=8, seed=4)
  take(resumed, 2)  # A fresh iterator that has moved on must be rewound too.
  resumed.set_state(state)
  np.testing.assert_array_equal(np.stack(take(resumed, 6)), np.stack(reference[k:]))


def test_processes_read_disjoint_shards_that_make_up_the_global_batch():
  arrays = make_arrays()
  single = take(pipeline.train_iterator(arrays, global_batch_size=8, seed=2), 12)
  per_process = [
    take(
      pipeline.train_iterator(
        arrays, global_batch_size=8, seed=2, process_index=p, process_count=2
      ),
      12,
    )
    for p in range(2)
  ]
  for step in range(12):
    first, second = per_process[0][step], per_process[1][step]
    assert first.shape == second.shape == (4,)
    assert not set(first.tolist()) & set(second.tolist())
    np.testing.assert_array_equal(np.concatenate([first, second]), single[step])


def test_batch_size_must_divide_among_processes():
  with pytest.raises(ConfigError, match="multiple of the number of processes"):
    pipeline.train_iterator(make_arrays(), global_batch_size=9, seed=0, process_count=2)
  with pytest.raises(DataError, match="first"):
    pipeline.train_iterator({"a": np.zeros(4), "b": np.zeros(5)}, global_batch_size=2, seed=0)
  with pytest.raises(DataError, match="one global batch"):
    pipeline.train_iterator(make_arrays(4), global_batch_size=8, seed=0)


@pytest.mark.parametrize("num, process_count", [(21, 2), (16, 2), (5, 1), (3, 4)])
def test_eval_covers_every_example_once_with_weights(num, process_count):
  arrays = make_arrays(num)
  per_process = [
    list(
      pipeline.eval_batches(
        arrays, global_batch_size=8, process_index=p, process_count=process_count
      )
    )
    for p in range(process_count)
  ]
  num_batches = -(-num // 8)
  assert all(len(batches) == num_batches for batches in per_process)
  seen = []
  for batches in per_process:
    for b in batches:
      assert b["targets"].shape == (8 // process_count,) and b["weight"].dtype == np.float32
      assert set(np.unique(b["weight"]).tolist()) <= {0.0, 1.0}
      np.testing.assert_array_equal(b["inputs"][:, 0], b["targets"])
      seen += b["targets"][b["weight"] == 1].tolist()
  assert sorted(seen) == list(range(num))
  total_weight = sum(b["weight"].sum() for batches in per_process for b in batches)
  assert total_weight == num
  # In order: the global batch s holds examples 8s, 8s + 1, ... (real ones first).
  last = np.concatenate([batches[-1]["weight"] for batches in per_process])
  np.testing.assert_array_equal(last, np.arange(8) < num - 8 * (num_batches - 1))


def test_eval_is_reiterable_and_rejects_a_weight_field():
  batches = pipeline.eval_batches(make_arrays(10), global_batch_size=4)
  first = [b["targets"] for b in batches]
  second = [b["targets"] for b in batches]
  np.testing.assert_array_equal(np.stack(first), np.stack(second))
  with pytest.raises(DataError, match="weight"):
    pipeline.eval_batches(make_arrays() | {"weight": np.ones(N)}, global_batch_size=4)
