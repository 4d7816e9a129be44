"""The recurrent-memory benchmark: its tables, the work it compares, and its flag errors."""

import csv

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_transformers.benchmarks import memory as bench
from efficient_transformers.benchmarks import report

# Tiny sizes: 1 layer, 16 wide; contexts 32 and 64; footprint at C = 64 with segments of 16.
SIZES = dict(num_layers=1, emb_dim=16, num_heads=2, mlp_dim=32)
CONTEXTS = (32, 64)
FOOTPRINT_CONTEXT, SEGMENT, BATCH = 64, 16, 1
TINY_FLAGS = [
  f"--contexts={','.join(map(str, CONTEXTS))}",
  f"--num_layers={SIZES['num_layers']}",
  f"--emb_dim={SIZES['emb_dim']}",
  f"--num_heads={SIZES['num_heads']}",
  f"--mlp_dim={SIZES['mlp_dim']}",
  f"--segment={SEGMENT}",
  f"--footprint_context={FOOTPRINT_CONTEXT}",
  f"--batch={BATCH}",
  "--steps=1",
]


def _read_csv(path):
  with open(path) as f:
    reader = csv.DictReader(f)
    return reader.fieldnames, list(reader)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """One run of the command on tiny sizes (both tables), shared by the table tests."""
  out = tmp_path_factory.mktemp("memory_bench")
  rc = bench.main([*TINY_FLAGS, f"--out={out}"])
  return rc, out


def test_main_writes_both_tables(tiny_run):
  rc, out = tiny_run
  assert rc == 0
  for name in ("memory_speed", "memory_footprint"):
    assert (out / f"{name}.csv").stat().st_size > 0
    text = (out / f"{name}.md").read_text()
    assert report.device_line(cpu=True) in text and "1 layers, 16 wide, 2 heads, MLP 32" in text
  assert "| 64 | 1 |" in (out / "memory_speed.md").read_text()
  assert "| compressive | 16 | 24 | 6 |" in (out / "memory_footprint.md").read_text()


def test_speed_rows_ratio_and_memory_growth(tiny_run):
  _, out = tiny_run
  keys, rows = _read_csv(out / "memory_speed.csv")
  assert tuple(keys) == bench.SPEED_CSV_KEYS
  assert [int(r["context"]) for r in rows] == list(CONTEXTS)
  rows = [{k: float(v) for k, v in r.items()} for r in rows]
  for r in rows:
    assert r["eval_segment"] == 1 and r["batch"] == BATCH
    assert r["recompute_ms"] > 0 and r["cached_ms"] > 0
    assert r["speedup"] == pytest.approx(r["recompute_ms"] / r["cached_ms"], rel=1e-9)
    assert 0 < r["recompute_temp_mib"] < r["recompute_mib"]
    assert 0 < r["cached_temp_mib"] < r["cached_mib"]
  small, large = rows
  # Recomputing attends over the whole window at every position (O(C^2) scores);
  # the cached call has one query over C keys, so its temporaries grow far less.
  recompute_growth = large["recompute_temp_mib"] - small["recompute_temp_mib"]
  cached_growth = large["cached_temp_mib"] - small["cached_temp_mib"]
  assert recompute_growth > 0
  assert cached_growth < recompute_growth


def test_footprint_rows_per_kind_and_state_bytes(tiny_run):
  _, out = tiny_run
  keys, rows = _read_csv(out / "memory_footprint.csv")
  assert tuple(keys) == bench.FOOTPRINT_CSV_KEYS
  by_kind = {r["memory"]: r for r in rows}
  assert list(by_kind) == ["none", "transformer_xl", "compressive", "rmt"]
  for r in rows:
    assert int(r["context"]) == FOOTPRINT_CONTEXT
    for key in ("eval_temp_mib", "eval_mib", "train_temp_mib", "train_mib"):
      assert float(r[key]) > 0, (r["memory"], key)
    assert float(r["train_mib"]) > float(r["eval_mib"])

  layers, width, rest = SIZES["num_layers"], SIZES["emb_dim"], FOOTPRINT_CONTEXT - SEGMENT
  # Hand computation: float32 hidden states [layers, batch, slots, width] plus one bool per slot.
  xl = by_kind["transformer_xl"]
  assert (int(xl["segment"]), int(xl["mem_len"])) == (SEGMENT, rest)
  assert int(xl["state_bytes"]) == layers * BATCH * rest * width * 4 + BATCH * rest

  comp = by_kind["compressive"]
  mem_len, cmem_len = int(comp["mem_len"]), int(comp["cmem_len"])
  assert mem_len == rest // 2 and mem_len + cmem_len * bench.COMPRESSION_RATE == rest
  slots = mem_len + cmem_len
  assert int(comp["state_bytes"]) == layers * BATCH * slots * width * 4 + BATCH * slots

  rmt = by_kind["rmt"]
  assert int(rmt["memory_tokens"]) == bench.RMT_MEMORY_TOKENS
  assert int(rmt["state_bytes"]) == BATCH * bench.RMT_MEMORY_TOKENS * width * 4 + BATCH

  none = by_kind["none"]
  assert int(none["segment"]) == FOOTPRINT_CONTEXT and int(none["state_bytes"]) == 0


def test_cached_scoring_equals_a_full_pass_over_the_window():
  """The timed cached call does the recompute's work: same last-token logits as a full pass."""
  context, batch = 12, 2
  model = bench.build_model("transformer_xl", SIZES, segment_length=context + 1, mem_len=context)
  ids = jnp.asarray(np.random.default_rng(1).integers(1, 257, size=(batch, context + 1)), jnp.int32)
  graphdef, state = nnx.split(model)
  # The benchmark's timed function; any segment length works, so it also makes the reference.
  forward = bench.cached_forward(graphdef)
  empty = model.init_memory(batch, mem_len=context)

  full_logits, _ = forward(state, ids, empty)  # One pass over the whole window, no memory.
  _, memory = forward(state, ids[:, :context], empty)
  assert bool(memory["valid"].all())  # The window's first C tokens fill the memory.
  cached_logits, new_memory = forward(state, ids[:, context:], memory)

  assert cached_logits.shape == (batch, 1, bench.VOCAB)
  np.testing.assert_allclose(cached_logits[:, -1], full_logits[:, -1], atol=1e-5, rtol=1e-5)
  # The memory matters: without it the last token's logits are different.
  alone, _ = forward(state, ids[:, context:], empty)
  assert np.abs(np.asarray(alone[:, -1] - full_logits[:, -1])).max() > 1e-3
  # The call also returns the next memory: the window shifted by one token.
  np.testing.assert_array_equal(new_memory["hidden"][:, :, :-1], memory["hidden"][:, :, 1:])


@pytest.mark.parametrize(
  "flags, flag",
  [
    (["--contexts=0"], "--contexts"),
    (["--contexts=32,x"], "--contexts"),
    (["--batch=0"], "--batch"),
    (["--segment=256", "--footprint_context=128"], "--segment"),
    (["--segment=6", "--footprint_context=128"], "--segment"),
    (["--eval_segment=64", "--contexts=32"], "--eval_segment"),
    (["--emb_dim=10", "--num_heads=4"], "--emb_dim"),
  ],
)
def test_bad_flags_exit_2_with_one_line(flags, flag, capsys):
  assert bench.main(flags) == 2
  captured = capsys.readouterr()
  err = captured.err.strip()
  assert err.startswith("error: ") and "\n" not in err and flag in err
  assert captured.out == ""
