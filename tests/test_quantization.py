"""int8 quantization with qwix (training/quantization.py): post-training quantization of a
trained ListOps model (in process and through `eval.py --quantize` with a relative
workdir), its int8 kernels and their bytes, one Linear against a numpy reference, and
quantization-aware training started from the float checkpoint; bad modes are refused in
one line, touching nothing."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_transformers.data import tasks
from efficient_transformers.errors import ConfigError
from efficient_transformers.models import mixing
from efficient_transformers.training import eval_lib, quantization, state
from efficient_transformers.training.train_lib import train_and_evaluate
from tests.helpers import REPO, run_cli, tiny_config

# config keys the tests change from the smoke config, passed to eval.py as overrides.
_OVERRIDDEN = (
  "data.num_train", "data.num_val", "data.num_test", "data.min_length", "data.max_length",
  "data.max_depth", "model.max_length", "model.num_layers", "model.emb_dim", "model.qkv_dim",
  "model.classifier_dim", "model.num_heads", "model.mlp_dim", "model.dropout_rate",
  "batch_size",
)  # fmt: skip


def _config(data_dir):
  """A ListOps model that learns in seconds: trees of depth <= 2, width 32, 160 steps."""
  c = tiny_config(data_dir, steps=160)
  c.data.num_train, c.data.num_val, c.data.num_test = 1500, 40, 240
  c.data.max_depth = 2
  c.model.emb_dim = c.model.qkv_dim = c.model.classifier_dim = 32
  c.model.mlp_dim = 64
  c.model.dropout_rate = 0.0
  c.batch_size = 32
  c.optimizer.learning_rate = 5e-3
  c.optimizer.warmup_steps = 10
  c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 160
  return c


def _get(c, dotted):
  for key in dotted.split("."):
    c = c[key]
  return c


def _snapshot(path) -> dict:
  """Every file under `path`: its size and modification time."""
  out = {}
  for dirpath, _, names in os.walk(path):
    for name in names:
      st = os.stat(os.path.join(dirpath, name))
      out[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime_ns)
  return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(config, workdir, the in-process test results per mode) of a trained float model."""
  root = tmp_path_factory.mktemp("quantization")
  config = _config(root / "data")
  workdir = root / "run"
  train_and_evaluate(config, str(workdir))
  results = {
    mode: eval_lib.evaluate_checkpoint(
      config,
      str(workdir),
      which="latest",
      results_path=str(root / f"results_{mode}.json"),
      quantize=mode,
    )
    for mode in quantization.MODES
  }
  return config, workdir, results


def test_post_training_int8_keeps_the_accuracy_within_a_point(trained):
  config, _, results = trained
  targets = tasks.load(config, generate=False).splits["test"]["targets"]
  majority = np.bincount(targets).max() / len(targets)
  float_accuracy = results["none"]["test"]["accuracy"]
  assert results["none"]["num_examples"] == 240
  assert float_accuracy > majority + 0.1, (float_accuracy, majority)  # It learned something.
  for mode in ("int8_weights", "int8"):
    accuracy = results[mode]["test"]["accuracy"]
    assert abs(accuracy - float_accuracy) <= 0.01, (mode, accuracy, float_accuracy)
    assert results[mode]["quantize"] == mode
    # Stored: int8 kernels with float32 scales, and the float embedding, norms and biases.
    assert results[mode]["param_bytes"] < 0.6 * results[mode]["float32_param_bytes"]
  assert results["none"]["param_bytes"] == results["none"]["float32_param_bytes"]
  assert results["int8"]["float32_param_bytes"] == results["none"]["param_bytes"]


def test_eval_command_line_with_a_relative_workdir(trained):
  config, workdir, results = trained
  relative = os.path.relpath(workdir, REPO)
  assert not os.path.isabs(relative)
  overrides = [f"--config.{k}={_get(config, k)}" for k in _OVERRIDDEN]
  done = run_cli(
    "eval.py",
    "--config=configs/lra/listops.py:smoke",
    f"--config.data_dir={config.data_dir}",
    *overrides,
    f"--workdir={relative}",
    "--checkpoint=latest",
    "--quantize=int8",
    num_devices=8,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  written = json.loads((workdir / "results_int8.json").read_text())  # Beside the float one's.
  assert written["quantize"] == "int8"
  assert written["num_examples"] == 240
  assert abs(written["test"]["accuracy"] - results["none"]["test"]["accuracy"]) <= 0.01
  assert written["param_bytes"] == results["int8"]["param_bytes"]


@pytest.fixture(scope="module")
def model(trained):
  """The trained float model and its sample inputs."""
  config, workdir, _ = trained
  model, _, setup = eval_lib.restore_model(config, str(workdir), which="latest")
  spec = tasks.describe(config)
  return model, quantization.sample_inputs(model, spec.fields, setup.objective)


def test_quantized_kernels_are_int8_and_a_quarter_of_float32(model):
  float_model, inputs = model
  quantized = quantization.ptq_model(float_model, "int8_weights", inputs)
  dtypes = quantization.quantized_weight_dtypes(quantized)
  # q, k, v, out, the MLP's up and down, the head's two layers.
  assert len(dtypes) == 8 and set(dtypes.values()) == {jnp.dtype(jnp.int8)}, dtypes
  assert set(quantization.quantized_weight_dtypes(float_model).values()) == {jnp.dtype(jnp.float32)}
  # Per output channel: one float32 scale per output feature of each layer.
  layers = [m for _, m in nnx.iter_modules(float_model) if isinstance(m, nnx.Linear)]
  layers += [m for _, m in nnx.iter_modules(float_model) if isinstance(m, nnx.LinearGeneral)]
  num_scales = sum(int(np.prod(np.atleast_1d(m.out_features))) for m in layers)
  kernel_floats = sum(int(m.kernel[...].size) for m in layers)
  sizes = quantization.quantized_bytes(quantized)
  assert sizes["float32_quantized_bytes"] == 4 * kernel_floats
  assert sizes["quantized_bytes"] == kernel_floats + 4 * num_scales
  assert 0.25 < sizes["quantized_bytes"] / sizes["float32_quantized_bytes"] < 0.3
  assert sizes["float32_param_bytes"] == quantization.quantized_bytes(float_model)["param_bytes"]


class _OneLinear(nnx.Module):
  def __init__(self, kernel: np.ndarray, bias: np.ndarray):
    self.dense = nnx.Linear(*kernel.shape, rngs=nnx.Rngs(0))
    self.dense.kernel[...] = kernel
    self.dense.bias[...] = bias

  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    del deterministic
    return self.dense(x)


def _int8_round_trip(x: np.ndarray, axis: int) -> np.ndarray:
  """Symmetric int8 quantize-dequantize, one scale per slice along `axis`.

  qwix's convention: the scale maps absmax to 127.5, the edge of the int8 bucket of 127
  (qwix numerics.get_symmetric_bound), rounding half to even, clipped to int8's range.
  """
  scale = np.abs(x).max(axis=axis, keepdims=True) / 127.5
  return np.clip(np.round(x / scale), -128, 127) * scale


@pytest.mark.parametrize("mode", ["int8_weights", "int8"])
def test_one_linear_layer_against_numpy(model, mode):
  float_model, _ = model
  kernel = np.asarray(float_model.head.hidden.kernel[...], np.float64)  # Trained, [32, 32].
  bias = np.asarray(float_model.head.hidden.bias[...], np.float64)
  x = np.random.default_rng(0).normal(size=(5, kernel.shape[0]))
  # Each slice's largest-magnitude value maps to the bucket edge +-127.5, a tie: at +127.5
  # both roundings saturate to 127, but -127.5 becomes -127 or -128 depending on the last
  # bit of float32's division. Columns (of the kernel) and rows (of x) whose largest value
  # is negative are negated, so the reference has no tie to guess.
  kernel *= np.sign(np.take_along_axis(kernel, np.abs(kernel).argmax(0)[None], 0))
  x *= np.sign(np.take_along_axis(x, np.abs(x).argmax(1)[:, None], 1))
  layer = _OneLinear(kernel.astype(np.float32), bias.astype(np.float32))
  quantized = quantization.ptq_model(layer, mode, (jnp.zeros((1, kernel.shape[0])),))
  got = np.asarray(quantized(jnp.asarray(x, jnp.float32)))
  w = _int8_round_trip(kernel, axis=0)  # One scale per output column.
  lhs = _int8_round_trip(x, axis=1) if mode == "int8" else x  # One scale per row.
  expected = lhs @ w + bias
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  # The float layer is measurably different: the check above sees the quantization.
  assert np.abs(x @ kernel + bias - expected).max() > 1e-3


def test_quantization_aware_training_from_the_float_checkpoint(trained, tmp_path):
  config, workdir, _ = trained
  qat = _config(config.data_dir)
  qat.model.quantization = "int8"
  qat.init_from = str(workdir)
  qat.num_train_steps = qat.eval_every_steps = qat.checkpoint_every_steps = 4
  qat.optimizer.warmup_steps = 2
  metrics = train_and_evaluate(qat, str(tmp_path / "qat"))
  assert np.isfinite(metrics["loss"])
  spec = tasks.describe(config)
  float_setup, qat_setup = state.make_setup(config, spec), state.make_setup(qat, spec)
  assert jax.tree.structure(qat_setup.abstract_state) == jax.tree.structure(
    float_setup.abstract_state
  )
  shapes = lambda s: jax.tree.map(lambda x: (x.shape, x.dtype), s.abstract_state["params"])
  assert shapes(qat_setup) == shapes(float_setup)
  # The QAT checkpoint restores into the float model too; its forward pass is fake int8.
  qat_model, _, _ = eval_lib.restore_model(qat, str(tmp_path / "qat"), which="latest")
  as_float, _, _ = eval_lib.restore_model(config, str(tmp_path / "qat"), which="latest")
  ids = tasks.load(config, generate=False).splits["test"]["inputs"][:16]
  fake, exact = np.asarray(qat_model(ids)), np.asarray(as_float(ids))
  assert np.abs(fake - exact).max() > 1e-4
  np.testing.assert_allclose(fake, exact, atol=0.1 * np.abs(exact).max())


def test_unknown_mode_for_eval_is_one_line_and_touches_nothing(trained, tmp_path):
  config, workdir, _ = trained
  before = _snapshot(workdir)
  results = tmp_path / "results.json"
  done = run_cli(
    "eval.py",
    "--config=configs/lra/listops.py:smoke",
    f"--config.data_dir={config.data_dir}",
    f"--workdir={os.path.relpath(workdir, REPO)}",
    f"--results={results}",
    "--quantize=int4",
  )
  assert done.returncode != 0
  assert "--quantize='int4' is not one of none, int8_weights, int8." in done.stderr
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  assert not results.exists() and _snapshot(workdir) == before


def test_unknown_mode_for_training_names_the_key_and_touches_nothing(trained):
  config, workdir, _ = trained
  before = _snapshot(workdir)
  bad = _config(config.data_dir)
  bad.model.quantization = "int4"
  with pytest.raises(ConfigError, match=r"config\.model\.quantization='int4' is not one of"):
    train_and_evaluate(bad, str(workdir))
  # The run's lock (an empty file, kept between runs) is taken before the model is built,
  # and released empty: its time changes, nothing else does.
  lock = str(workdir / "train.lock")
  assert _snapshot(workdir)[lock][0] == 0
  assert {k: v for k, v in _snapshot(workdir).items() if k != lock} == {
    k: v for k, v in before.items() if k != lock
  }


def test_models_qwix_cannot_quantize_are_named():
  lstm = tiny_config("unused", attention="lstm")
  with pytest.raises(ConfigError, match=r"--quantize='int8' does not work with config\.model\."):
    quantization.check_supported(lstm.model, "int8", post_training=True, what="--quantize")
  # Quantization-aware training goes through the LSTM cell; reversible layers it cannot see.
  quantization.check_supported(
    lstm.model, "int8", post_training=False, what="config.model.quantization"
  )
  reversible = tiny_config("unused")
  reversible.model.reversible = True
  reversible.model.quantization = "int8_weights"
  message = r"quantization='int8_weights' does not work with config\.model\.reversible"
  with pytest.raises(ConfigError, match=message):
    state.make_setup(reversible, tasks.describe(reversible))


def test_a_failing_qwix_run_is_a_config_error():
  # Past check_supported, qwix's own failure is still one message naming the model.
  c = tiny_config("unused", attention="gru")
  spec = tasks.describe(c)
  objective = state.make_objective(c.model, spec)
  gru = state.build_model(c.model, vocab_size=spec.vocab_size, num_classes=10, rngs=nnx.Rngs(0))
  inputs = quantization.sample_inputs(gru, spec.fields, objective)
  assert "gru" in mixing.available()
  with pytest.raises(ConfigError, match="does not work with attention gru"):
    quantization.ptq_model(gru, "int8_weights", inputs, what="attention gru")
