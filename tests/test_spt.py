"""Self-pretraining then fine-tuning in one workdir (`config.spt`, training/spt.py): the two
stages, the fine-tuning's start from the pretrained encoder, resuming in stage 2, eval.py,
and the bad combinations."""

import hashlib
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from configs.lra import listops as listops_config
from efficient_transformers.errors import ConfigError
from efficient_transformers.training import checkpointing, eval_lib, spt, state, train_lib
from efficient_transformers.training.train_lib import train_and_evaluate
from tests.helpers import REPO, TINY_FLAGS, run_cli, start_train, tiny_config, wait_for_step


def _config(data_dir, steps=4):
  c = tiny_config(data_dir, steps=steps)
  c.spt.pretrain_steps, c.spt.mask_rate = 4, 0.3
  return c


def _digest(directory) -> dict[str, str]:
  out = {}
  for base, _, files in os.walk(directory):
    for name in files:
      with open(os.path.join(base, name), "rb") as f:
        out[os.path.relpath(os.path.join(base, name), directory)] = hashlib.sha256(
          f.read()
        ).hexdigest()
  return out


def _records(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny SPT run (4 + 4 steps) and the parameters its fine-tuning started from."""
  root = tmp_path_factory.mktemp("spt")
  c = _config(root / "data")
  started = {}
  original = state.init_state

  def recording(setup, params=None):
    if params is not None:  # Stage 2's start (stage 1 starts from scratch).
      started["params"] = jax.tree.map(np.asarray, params)
    return original(setup, params=params)

  train_lib.state.init_state = recording
  try:
    last = train_and_evaluate(c, str(root / "run"))
  finally:
    train_lib.state.init_state = original
  return root, c, last, started


def test_two_stages_in_one_workdir_with_their_stage_recorded(run):
  root, _, last, _ = run
  workdir = root / "run"
  assert {p.name for p in workdir.iterdir()} >= {"pretrain", "finetune"}
  pretrain = _records(workdir / "pretrain" / "metrics.jsonl")
  finetune = _records(workdir / "finetune" / "metrics.jsonl")
  assert {r["stage"] for r in pretrain} == {"pretrain"}
  assert {r["stage"] for r in finetune} == {"finetune"}
  assert all("num_predicted" in r for r in pretrain if r["split"] == "validation")
  assert [r["step"] for r in finetune if r["split"] == "train"] == [2, 4]
  assert last["num_examples"] == 20  # Stage 2 returns the classifier's validation metrics.
  with open(workdir / "pretrain" / "config.json") as f:
    assert json.load(f)["model"]["kind"] == "token_predictor"
  # eval.py scores the fine-tuned classifier, and says so.
  results = eval_lib.evaluate_checkpoint(run[1], str(workdir))
  assert results["stage"] == "finetune" and results["num_examples"] == 20
  assert json.loads((workdir / "results.json").read_text())["stage"] == "finetune"


def test_fine_tuning_starts_from_the_pretrained_encoder_and_a_fresh_head(run):
  root, c, _, started = run
  stages = spt.stage_configs(c, root / "run")
  pretrained, _, _ = eval_lib.restore_model(stages["pretrain"], root / "run" / "pretrain")
  encoder = nnx.to_pure_dict(nnx.state(pretrained.encoder, nnx.Param))
  start = started["params"]
  table = encoder["embed"]["tokens"]["embedding"]
  # The [MASK] row is dropped; every other encoder array is stage 1's best, exactly.
  np.testing.assert_array_equal(start["encoder"]["embed"]["tokens"]["embedding"], table[:-1])
  flat = lambda t: {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(t)}
  mine, theirs = flat(start["encoder"]), flat(encoder)
  assert mine.keys() == theirs.keys()
  for key, value in mine.items():
    if "embedding" not in key:
      np.testing.assert_array_equal(value, theirs[key], err_msg=key)
  # The head is a fresh classifier's.
  from efficient_transformers.data import tasks

  fresh = state.make_setup(stages["finetune"], tasks.describe(c)).init_params()
  for x, y in zip(jax.tree.leaves(start["head"]), jax.tree.leaves(fresh["head"]), strict=True):
    np.testing.assert_array_equal(x, np.asarray(y))


def test_killed_in_stage_two_it_resumes_in_stage_two_and_leaves_stage_one_alone(tmp_path):
  """kill -9 in the fine-tuning; the same command resumes there from its checkpoint and
  stage 1's workdir (its parameters, checkpoints and metrics) is not touched."""
  flags = [
    "--config=configs/lra/listops.py:smoke,spt",
    f"--config.data_dir={tmp_path / 'data'}",
    *TINY_FLAGS,
    "--config.spt.pretrain_steps=4",
    "--config.num_train_steps=150",
    "--config.eval_every_steps=75",
    "--config.checkpoint_every_steps=20",
    "--config.log_every_steps=2",
    "--config.optimizer.warmup_steps=2",
  ]
  workdir = os.path.relpath(tmp_path / "run", REPO)  # As a user types it.
  proc = start_train(flags, workdir)
  metrics = tmp_path / "run" / "finetune" / "metrics.jsonl"
  wait_for_step(metrics, 30, proc)
  proc.kill()
  _, killed_log = proc.communicate(timeout=60)
  assert "Stage 1 of 2: self-pretraining (masked_tokens) for 4 steps" in killed_log
  assert "Stage 2 of 2: fine-tuning" in killed_log
  stage_one = _digest(tmp_path / "run" / "pretrain")
  ckpt = checkpointing.Checkpointer(str(tmp_path / "run" / "finetune"))
  saved = ckpt.latest_step()
  ckpt.close()
  assert saved is not None and 20 <= saved < 150, saved
  before = {r["step"]: r for r in _records(metrics) if r["split"] == "train"}

  rerun = run_cli("train.py", *flags, f"--workdir={workdir}", fast_compile=False)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "Stage 1 of 2" not in rerun.stderr  # Straight to stage 2.
  assert "Stage 2 of 2: fine-tuning in" in rerun.stderr and "resumed" in rerun.stderr
  assert _digest(tmp_path / "run" / "pretrain") == stage_one
  after = _records(metrics)
  keys = [(r["step"], r["split"]) for r in after]
  assert len(keys) == len(set(keys)) and {r["stage"] for r in after} == {"finetune"}
  train = {r["step"]: r for r in after if r["split"] == "train"}
  assert sorted(train) == list(range(2, 151, 2))
  # Resumed from step `saved`, not retrained from 0: the records up to it are the killed
  # run's own, timings included (a retrained step logs another steps_per_sec).
  for step in range(2, saved + 1, 2):
    assert train[step] == before[step], step


def test_the_spt_config_arg_from_the_command_line(run, tmp_path):
  root, _, _, _ = run
  c = listops_config.get_config("smoke,spt")
  assert c.spt.pretrain_steps == c.num_train_steps and c.spt.mask_rate == 0.1
  assert c.model.positional == "rope"
  done = run_cli(
    "train.py",
    "--config=configs/lra/listops.py:smoke,spt",
    f"--config.data_dir={root / 'data'}",
    *TINY_FLAGS,
    f"--workdir={os.path.relpath(tmp_path / 'cli', REPO)}",
    "--dry_run",
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert "Stage 1, self-pretraining" in done.stdout and "Stage 2, fine-tuning" in done.stdout
  assert not (tmp_path / "cli").exists()


def test_bad_combinations_are_named(tmp_path):
  c = _config(tmp_path / "data")
  c.init_from = str(tmp_path / "elsewhere")
  with pytest.raises(ConfigError, match=r"leave config.init_from empty"):
    train_and_evaluate(c, str(tmp_path / "run"))
  c.init_from = ""
  c.spt.pretrain_steps = -1
  with pytest.raises(ConfigError, match=r"config.spt.pretrain_steps must be >= 0"):
    train_and_evaluate(c, str(tmp_path / "run"))
  with pytest.raises(ConfigError, match=r"spt and segment do not combine"):
    listops_config.get_config("smoke,spt,segment=16")
  assert not (tmp_path / "run").exists()
