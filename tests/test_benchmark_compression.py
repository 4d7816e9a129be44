"""The compression report (`python -m efficient_transformers.benchmarks.compression`) on a
tiny trained run: every row, from the repository root with relative paths, its figures
against the models they describe, and its bad inputs."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from efficient_transformers.benchmarks import compression
from efficient_transformers.training.train_lib import train_and_evaluate
from tests.helpers import REPO, cli_env, tiny_config

CONFIG = """
from tests.helpers import tiny_config


def get_config(arg=None):
  c = tiny_config({data!r}, steps=20)
  c.model.num_layers = 2
  c.data.num_test = 40
  return c
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A 2-layer tiny ListOps run and a config file that gives its config."""
  root = tmp_path_factory.mktemp("compression")
  config_file = root / "tiny.py"
  config_file.write_text(CONFIG.format(data=str(root / "data")))
  c = tiny_config(root / "data", steps=20)
  c.model.num_layers = 2
  c.data.num_test = 40
  train_and_evaluate(c, str(root / "base"))
  return root, config_file, c


def _run(*args):
  return subprocess.run(
    [sys.executable, "-m", "efficient_transformers.benchmarks.compression", *args],
    cwd=REPO,
    env={**cli_env(1), "PYTHONPATH": REPO},
    capture_output=True,
    text=True,
    timeout=600,
  )


def _rows(out) -> dict[str, dict]:
  with open(os.path.join(out, "compression.json")) as f:
    return {r["row"]: r for r in json.load(f)}


def test_quantized_pruned_and_head_pruned_rows_from_the_repository_root(base):
  root, config_file, c = base
  out = os.path.relpath(root / "out", REPO)
  done = _run(
    f"--config={os.path.relpath(config_file, REPO)}",
    f"--workdir={os.path.relpath(root / 'base', REPO)}",
    f"--out={out}",
    "--rows=base,ptq_int8_weights,ptq_int8,pruned_80,heads_pruned",
    "--finetune_steps=4",
    "--repeats=2",
  )
  assert done.returncode == 0, done.stderr[-3000:]
  for name in ("compression.md", "compression.csv", "compression.json", "compression.png"):
    assert os.path.getsize(os.path.join(REPO, out, name)) > 100, name
  rows = _rows(os.path.join(REPO, out))
  assert list(rows) == ["base", "ptq_int8_weights", "ptq_int8", "pruned_80", "heads_pruned"]
  b = rows["base"]
  # The base row is the trained model as eval.py scores it.
  from efficient_transformers.training import eval_lib

  results = eval_lib.evaluate_checkpoint(c, str(root / "base"), results_path=root / "r.json")
  assert b["accuracy"] == pytest.approx(results["test"]["accuracy"])
  assert b["bytes"] == 4 * b["params"] and b["time_ratio"] == 1.0
  for name in ("ptq_int8_weights", "ptq_int8"):
    # int8 kernels and float scales; the embeddings, norms and biases stay float32.
    assert 0.25 < rows[name]["bytes_ratio"] < 0.6, rows[name]
  pruned = rows["pruned_80"]
  n = sum(  # The prunable (2-D and up) weights of the model.
    int(np.prod(s)) for s in _shapes(c) if len(s) >= 2
  )
  assert abs(pruned["sparsity"] - 0.8) <= 1 / n
  assert pruned["params"] < 0.5 * b["params"] and pruned["bytes"] == 4 * pruned["params"]
  heads = rows["heads_pruned"]
  assert sum(eval(heads["heads_per_layer"])) == 2  # noqa: S307 - 4 heads, half removed.
  assert heads["params"] < b["params"]
  for r in rows.values():
    assert r["delta_points"] == pytest.approx(100 * (r["accuracy"] - b["accuracy"]))


def _shapes(c):
  from flax import nnx

  from efficient_transformers.data import tasks
  from efficient_transformers.training import state

  spec = tasks.describe(c)
  model = nnx.eval_shape(
    lambda: state.build_model(
      c.model, vocab_size=spec.vocab_size, num_classes=spec.num_classes, rngs=nnx.Rngs(0)
    )
  )
  return [x.shape for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_students_and_quantization_aware_training(base, tmp_path):
  root, config_file, _ = base
  out = tmp_path / "out"
  status = compression.main(
    [
      f"--config={config_file}",
      f"--workdir={root / 'base'}",
      f"--out={out}",
      "--rows=student_scratch,student_distilled,qat_int8",
      "--student_steps=3",
      "--finetune_steps=3",
      "--repeats=2",
    ]
  )
  assert status == 0
  rows = _rows(out)
  assert list(rows) == ["base", "student_scratch", "student_distilled", "qat_int8"]
  assert rows["student_scratch"]["params"] == rows["student_distilled"]["params"]
  assert rows["student_scratch"]["params"] < rows["base"]["params"]
  with open(out / "runs" / "student_distilled" / "metrics.jsonl") as f:
    assert all("kl" in r for r in map(json.loads, f) if r["split"] == "train")
  with open(out / "runs" / "qat_int8" / "config.json") as f:
    assert json.load(f)["model"]["quantization"] == "int8"
  assert 0.25 < rows["qat_int8"]["bytes_ratio"] < 0.6


def test_bad_inputs_are_one_line_and_write_nothing(base, tmp_path, capsys):
  root, config_file, _ = base
  empty = tmp_path / "empty"
  empty.mkdir()
  cases = [
    (["--rows=base,bogus"], "--rows: unknown bogus"),
    (["--prune_heads=1.5"], "--prune_heads must be a fraction in (0, 1)"),
    ([f"--workdir={empty}"], "No checkpoint in"),
  ]
  for extra, message in cases:
    out = tmp_path / "out"
    status = compression.main(
      [f"--config={config_file}", f"--workdir={root / 'base'}", f"--out={out}", *extra]
    )
    err = capsys.readouterr().err
    assert status == 2 and message in err and "Traceback" not in err, err[-2000:]
    assert not (out / "compression.md").exists() and not (out / "runs").exists()
