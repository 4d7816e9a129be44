"""The attention pictures: `python -m efficient_transformers.visualize` on trained workdirs
of ListOps and Pathfinder (relative and absolute paths), rollout against a hand-computed
case, the pattern gallery, and its bad inputs."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs.lra import pathfinder as pathfinder_config
from efficient_transformers import visualize
from efficient_transformers.errors import CheckpointError, ConfigError
from efficient_transformers.training.train_lib import train_and_evaluate
from tests.helpers import REPO, cli_env, shrink, tiny_config

LISTOPS = os.path.join(REPO, "configs/lra/listops.py")
PATHFINDER = os.path.join(REPO, "configs/lra/pathfinder.py")


def _pathfinder_config(data_dir):
  c = shrink(pathfinder_config.get_config("smoke"))
  c.data_dir = str(data_dir)
  c.data.num_images = 80
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """Trained (2-step) ListOps and Pathfinder workdirs under one root, with their configs'
  command-line overrides."""
  root = tmp_path_factory.mktemp("visualize")
  listops = tiny_config(root / "data_listops", steps=2)
  train_and_evaluate(listops, str(root / "runs" / "listops"))
  pathfinder = _pathfinder_config(root / "data_pathfinder")
  train_and_evaluate(pathfinder, str(root / "runs" / "pathfinder"))
  overrides = {
    "listops": [
      f"--config={LISTOPS}:smoke",
      f"--config.data_dir={root / 'data_listops'}",
      *(f"--config.{k}={v}" for k, v in _flat(listops)),
    ],
    "pathfinder": [
      f"--config={PATHFINDER}:smoke",
      f"--config.data_dir={root / 'data_pathfinder'}",
      *(f"--config.{k}={v}" for k, v in _flat(pathfinder)),
    ],
  }
  return root, overrides


def _flat(c) -> list[tuple[str, object]]:
  """The keys the tests' configs change from the smoke config, as overrides."""
  keys = [
    "data.num_train", "data.num_val", "data.num_test", "data.min_length", "data.max_length",
    "data.num_images", "model.max_length", "model.num_layers", "model.emb_dim",
    "model.qkv_dim", "model.classifier_dim", "model.num_heads", "model.mlp_dim",
    "model.dropout_rate", "batch_size",
  ]  # fmt: skip
  out = []
  for key in keys:
    node = c
    try:
      for part in key.split("."):
        node = node[part]
    except KeyError:
      continue
    out.append((key, node))
  return out


def _run(cwd, *args):
  return subprocess.run(
    [sys.executable, "-m", "efficient_transformers.visualize", *args],
    cwd=cwd,
    env={**cli_env(1), "PYTHONPATH": REPO},
    capture_output=True,
    text=True,
    timeout=300,
  )


def _image(path) -> np.ndarray:
  return np.asarray(Image.open(path).convert("L"), np.float32)


@pytest.mark.parametrize("task", ["listops", "pathfinder"])
def test_pictures_of_a_trained_workdir_with_relative_paths(trained, task):
  root, overrides = trained
  done = _run(root, *overrides[task], f"--workdir=runs/{task}", "--index=1", f"--out=pics/{task}")
  assert done.returncode == 0, done.stderr[-3000:]
  out = root / "pics" / task
  expected = {"layer0.png", "rollout.png", "maps.npz", "summary.json"}
  expected |= {"input.png"} if task == "pathfinder" else {"tokens.png"}
  assert expected <= {p.name for p in out.iterdir()}
  for name in (n for n in expected if n.endswith(".png")):
    pixels = _image(out / name)
    assert pixels.size > 10_000 and pixels.std() > 1.0, name  # Non-empty and not constant.
  saved = np.load(out / "maps.npz")
  weights = saved["layer0"]
  assert weights.ndim == 3 and np.all(weights >= -1e-6)
  real = int((saved["ids"] != 0).sum()) + (task == "listops")  # ListOps smoke: CLS pooling.
  np.testing.assert_allclose(weights[:, :real, :real].sum(-1), 1.0, atol=1e-5)


def test_an_absolute_out_and_the_pattern_gallery(trained, tmp_path):
  root, overrides = trained
  done = _run(
    REPO, *overrides["listops"], f"--workdir={root / 'runs' / 'listops'}", f"--out={tmp_path}"
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert (tmp_path / "tokens.png").stat().st_size > 0
  gallery = _run(REPO, "--patterns", "--pattern_length=32", f"--out={tmp_path / 'gallery'}")
  assert gallery.returncode == 0, gallery.stderr[-3000:]
  assert _image(tmp_path / "gallery" / "patterns.png").std() > 1.0


def test_rollout_against_a_hand_computed_case():
  # One layer, one head, L = 2: A = [[1, 0], [0.5, 0.5]]. 0.5 A + 0.5 I = [[1, 0], [.25, .75]].
  a = np.array([[[1.0, 0.0], [0.5, 0.5]]])
  np.testing.assert_allclose(visualize.rollout([a]), [[1.0, 0.0], [0.25, 0.75]])
  # Two such layers multiply: [[1, 0], [.25, .75]] @ [[1, 0], [.25, .75]].
  np.testing.assert_allclose(visualize.rollout([a, a]), [[1.0, 0.0], [0.4375, 0.5625]])


def test_bad_input_on_the_command_line_is_one_line_and_writes_nothing(trained, tmp_path):
  root, overrides = trained
  out = tmp_path / "pics"
  done = _run(root, *overrides["listops"], "--workdir=runs/listops", f"--out={out}", "--index=99")
  assert done.returncode == 2, done.stderr[-3000:]
  assert "--index=99 is outside the test split (0 .. 19)" in done.stderr
  assert "Traceback" not in done.stderr and not out.exists()


@pytest.mark.parametrize(
  "change, error, message",
  [
    ({"model.scan_layers": True}, ConfigError, "scan_layers=True"),
    ({"model.kind": "segmented"}, ConfigError, "model.kind classifier or dual_encoder"),
    ({"workdir": "empty"}, CheckpointError, "No checkpoint in"),
  ],
)
def test_bad_input_is_named_and_writes_nothing(trained, tmp_path, change, error, message):
  root, _ = trained
  config = tiny_config(root / "data_listops", steps=2)
  workdir = root / "runs" / "listops"
  for key, value in change.items():
    if key == "workdir":
      workdir = tmp_path / value
      workdir.mkdir()
    else:
      section, name = key.split(".")
      config[section][name] = value
  out = tmp_path / "pics"
  with pytest.raises(error, match=message):
    visualize.visualize_example(
      config, str(workdir), str(out), split="test", index=0, which="best", max_length=4096
    )
  assert not out.exists()


def test_head_statistics_by_hand():
  # Head 0 attends to itself (distance 0, entropy 0); head 1 uniformly over 2 keys.
  weights = np.array([[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.5], [0.5, 0.5]]])
  stats = visualize.head_statistics([weights])
  assert stats["mean_attention_distance"] == [[0.0, 0.5]]
  np.testing.assert_allclose(stats["mean_entropy_nats"], [[0.0, np.log(2)]], atol=1e-4)


def test_approximation_error_on_a_trained_runs_queries_and_keys(trained):
  """The approximation benchmark's `trained` source: the first layer's q, k, v of the run."""
  from efficient_transformers.benchmarks import approximation

  root, _ = trained
  config = tiny_config(root / "data_listops", steps=2)
  q, k, v, mask = approximation.trained_qkv(config, str(root / "runs" / "listops"), num_examples=4)
  # tiny_config: 32 tokens + CLS = 33 positions, cut to 32; 2 heads of 8.
  assert q.shape == k.shape == v.shape == (4, 32, 2, 8) and mask.shape == (4, 32)
  rows = approximation.rows_for("local", "trained", q, k, v, mask, seeds=1)
  errors = [r["map_error"] for r in rows]
  assert errors[-1] < 1e-5 < errors[0]  # The widest window is exact, the narrowest is not.
