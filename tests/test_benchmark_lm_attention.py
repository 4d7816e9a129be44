"""The decoder-LM attention benchmark: its table, its memory figures and its flag errors."""

import csv

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from configs.lm import byte_lm as byte_lm_config
from efficient_transformers.benchmarks import lm_attention as bench
from efficient_transformers.training import config_lib, state

SIZES = dict(num_layers=1, emb_dim=16, num_heads=2, mlp_dim=32)
TINY_FLAGS = [f"--{k}={v}" for k, v in SIZES.items()] + ["--steps=1"]


def _byte_lm_config(name: str, length: int):
  """configs/lm/byte_lm.py for `name` with memory=none, at the tiny sizes and segment `length`."""
  config = byte_lm_config.get_config(f"attention={name},memory=none")
  with config.unlocked():
    config.model.update(SIZES, qkv_dim=SIZES["emb_dim"], segment_length=length, dropout_rate=0.0)
    config.model.attention_kwargs = config_lib.attention_defaults(
      name, smoke=False, sequence_length=length
    )
  return config


def _independent_memory(name: str, length: int):
  """memory_analysis() of a training step written here, on the model train.py would build."""
  config = _byte_lm_config(name, length)
  model = nnx.eval_shape(
    lambda: state.build_model(config.model, vocab_size=257, num_classes=0, rngs=nnx.Rngs(0))
  )
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def step(params, rest, inputs, targets):
    def loss_fn(p):
      model = nnx.merge(graphdef, p, jax.tree.map(lambda x: x, rest))
      logits, _, _ = model(inputs, {})
      return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    return jax.value_and_grad(loss_fn)(params)

  ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
  return jax.jit(step).lower(params, rest, ids, ids).compile().memory_analysis()


def test_main_writes_tables_whose_memory_matches_an_independent_compile(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  # L=64 is timed; L=128 only compiled (with the compile-only options).
  flags = ["--attentions=local,softmax", "--lengths=64,128", "--time_max_length=64"]
  assert bench.main([*TINY_FLAGS, *flags, "--out=out/lm"]) == 0
  out = tmp_path / "out" / "lm"
  text = (out / "lm_attention.md").read_text()
  assert "1 layers, 16 wide, 2 heads, MLP 32; batch 1, float32" in text
  assert f"jax {jax.__version__}" in text and "Device: CPU " in text
  with open(out / "lm_attention.csv") as f:
    reader = csv.DictReader(f)
    assert tuple(reader.fieldnames) == bench.CSV_KEYS
    rows = {(r["attention"], int(r["length"])): r for r in reader}
  assert list(rows) == [("softmax", 64), ("local", 64), ("softmax", 128), ("local", 128)]
  for (name, length), r in rows.items():
    assert float(r["total_mib"]) > float(r["temp_mib"]) > 0
    if name == "softmax":  # The reference: its own ratios are exactly 1.
      assert float(r["memory_vs_softmax"]) == 1.0 and float(r["temp_vs_softmax"]) == 1.0
    if length == 64:
      assert float(r["tokens_per_s"]) == pytest.approx(64 / float(r["step_s"]))
      if name == "softmax":
        assert float(r["speed_vs_softmax"]) == 1.0
    else:
      assert r["step_s"] == r["tokens_per_s"] == r["speed_vs_softmax"] == ""
  assert "| local | 128 | - | - |" in text
  assert "block_size=64" in rows[("local", 128)]["attention_kwargs"]

  # The compile-only cell equals a default compile of the same step, written independently.
  mem = _independent_memory("local", 128)
  local = rows[("local", 128)]
  assert float(local["temp_mib"]) == mem.temp_size_in_bytes / 2**20
  total = mem.temp_size_in_bytes + mem.argument_size_in_bytes
  assert float(local["total_mib"]) == total / 2**20


def test_dry_run_checks_flags_and_out_and_writes_nothing(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  flags = ["--attentions=performer", "--lengths=64", "--dry_run", "--out=dry"]
  assert bench.main([*TINY_FLAGS, *flags]) == 0
  assert "Dry run: 2 attention(s) x 1 length(s) build" in capsys.readouterr().out
  assert (tmp_path / "dry").is_dir() and not list((tmp_path / "dry").iterdir())


@pytest.mark.parametrize(
  "flags, needle",
  [
    (["--attentions=nope"], "'nope' is an unknown attention"),
    (["--attentions=linformer"], "'linformer' is not a causal attention"),
    (["--lengths=64,x"], "--lengths"),
    (["--emb_dim=10", "--num_heads=4"], "--emb_dim"),
  ],
)
def test_bad_flags_exit_2_with_one_line(flags, needle, capsys):
  assert bench.main([*flags, "--dry_run"]) == 2
  captured = capsys.readouterr()
  err = captured.err.strip()
  assert err.startswith("error: ") and "\n" not in err and needle in err
  assert captured.out == ""
