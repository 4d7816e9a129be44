"""Distillation from a teacher workdir and a shallower student from chosen layers
(`config.distill`, `config.init_layers`): the loss against a hand computation, alpha = 0 as
plain training, a read-only teacher of another attention and size, and their bad inputs."""

import hashlib
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from efficient_transformers.errors import CheckpointError, ConfigError
from efficient_transformers.training import distill, eval_lib
from efficient_transformers.training.train_lib import dry_run, train_and_evaluate
from tests.helpers import REPO, TINY_FLAGS, run_cli, tiny_config

LISTOPS = "configs/lra/listops.py"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """A 2-layer Performer teacher trained 4 steps on tiny ListOps, under one root."""
  root = tmp_path_factory.mktemp("distill")
  teacher = tiny_config(root / "data", attention="performer", steps=4)
  teacher.model.num_layers = 2
  teacher.model.attention_kwargs.num_features = 16
  train_and_evaluate(teacher, str(root / "teacher"))
  return root


def _student(root, *, steps=4, **distill):
  c = tiny_config(root / "data", steps=steps)
  c.distill.teacher_workdir = str(root / "teacher")
  for key, value in distill.items():
    c.distill[key] = value
  return c


def _params(config, workdir):
  model, _, _ = eval_lib.restore_model(config, workdir, which="latest")
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _digest(directory) -> dict[str, str]:
  out = {}
  for base, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(base, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _records(workdir, split="train"):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


def test_loss_equals_a_hand_computation():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(3, 5)) * 2, rng.normal(size=(3, 5)) * 2
  y = np.array([0, 3, 4])
  w = np.array([1.0, 1.0, 0.0])  # The last row is padding.
  temperature, alpha = 3.0, 0.3
  expected = 0.0
  for i in range(3):
    ce = -(s[i, y[i]] - np.log(np.sum(np.exp(s[i]))))
    p = np.exp(t[i] / temperature) / np.sum(np.exp(t[i] / temperature))
    q = np.exp(s[i] / temperature) / np.sum(np.exp(s[i] / temperature))
    kl = sum(p[c] * np.log(p[c] / q[c]) for c in range(5))
    expected += w[i] * ((1 - alpha) * ce + alpha * temperature**2 * kl)
  sums = distill.distillation_sums(
    jax.numpy.asarray(s, "float32"),
    jax.numpy.asarray(t, "float32"),
    jax.numpy.asarray(y),
    jax.numpy.asarray(w, "float32"),
    temperature=temperature,
    alpha=alpha,
  )
  np.testing.assert_allclose(float(sums["loss_sum"]), expected, rtol=1e-5)
  assert float(sums["count"]) == 2.0
  # Equal logits: no soft term, so alpha = 1 leaves nothing to learn.
  same = distill.distillation_sums(
    jax.numpy.asarray(s, "float32"),
    jax.numpy.asarray(s, "float32"),
    jax.numpy.asarray(y),
    None,
    temperature=temperature,
    alpha=1.0,
  )
  assert abs(float(same["loss_sum"])) < 1e-5


def test_alpha_zero_is_plain_training_exactly(root):
  student = _student(root, alpha=0.0)
  train_and_evaluate(student, str(root / "alpha0"))
  plain = tiny_config(root / "data", steps=4)
  train_and_evaluate(plain, str(root / "plain"))
  a, b = _params(plain, str(root / "alpha0")), _params(plain, str(root / "plain"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  losses = lambda w: [r["loss"] for r in _records(w)]
  assert losses(str(root / "alpha0")) == losses(str(root / "plain"))


def test_a_smaller_softmax_student_of_a_performer_teacher_which_stays_read_only(root):
  before = _digest(root / "teacher")
  student = _student(root, alpha=0.7, temperature=2.0)
  train_and_evaluate(student, str(root / "student"))
  assert _digest(root / "teacher") == before  # Its workdir is not written.
  # The logged loss is the distillation loss of its logged parts, and the soft term is on.
  for r in _records(str(root / "student")):
    assert r["kl"] > 0
    np.testing.assert_allclose(r["loss"], 0.3 * r["ce"] + 0.7 * 4.0 * r["kl"], rtol=1e-5)
  # The teacher's arrays pass through the step without being donated or changed.
  from efficient_transformers.data import tasks
  from efficient_transformers.training import sharding, state

  spec = tasks.describe(student)
  setup = state.make_setup(student, spec)
  teacher = distill.load_teacher(student, spec, setup)
  assert teacher.config.model.attention == "performer" and teacher.config.model.num_layers == 2
  copy = jax.tree.map(np.asarray, teacher.params)
  step = setup.compile_train_step(
    setup.abstract_batch(spec.fields, student.batch_size), seed=0, teacher=teacher
  )
  train_state = state.init_state(setup)
  task = tasks.load(student, generate=False)
  from efficient_transformers.data import pipeline

  batches = pipeline.task_train_iterator(
    task, global_batch_size=8, seed=0, process_index=0, process_count=1
  )
  for _ in range(2):
    batch = sharding.global_batch(next(batches), setup.batch_sharding)
    train_state, _ = step(train_state, batch, teacher.params)
  for x, y in zip(jax.tree.leaves(teacher.params), jax.tree.leaves(copy), strict=True):
    np.testing.assert_array_equal(np.asarray(x), y)


def test_matching_pooled_features(root, tmp_path):
  """hidden_weight adds the mean squared distance of the pooled features, logged as
  `hidden`; a student of another width than the teacher's is refused."""
  c = _student(root, steps=2, alpha=0.5, hidden_weight=3.0)
  train_and_evaluate(c, str(tmp_path / "hidden"))
  for r in _records(str(tmp_path / "hidden")):
    assert r["hidden"] > 0
    expected = 0.5 * r["ce"] + 0.5 * 4.0 * r["kl"] + 3.0 * r["hidden"]
    np.testing.assert_allclose(r["loss"], expected, rtol=1e-5)
  c.model.emb_dim = c.model.qkv_dim = 32
  with pytest.raises(ConfigError, match=r"hidden_weight > 0 matches pooled features"):
    train_and_evaluate(c, str(tmp_path / "wide"))


def test_dry_run_counts_the_teacher(root):
  report = dry_run(_student(root))
  assert report["teacher_num_params"] > report["num_params"]


def test_teacher_workdir_errors(root, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  c = _student(root)
  c.distill.teacher_workdir = str(empty)
  with pytest.raises(CheckpointError, match=r"teacher_workdir=.*holds no checkpoint"):
    train_and_evaluate(c, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "config.json").exists()
  # A teacher of another task: a checkpoint whose fingerprint says so (what train.py saves).
  from efficient_transformers.training import checkpointing

  other = checkpointing.Checkpointer(
    str(tmp_path / "pathfinder"), fingerprint={"task": "pathfinder", "vocab_size": 257}
  )
  other.save(1, {"params": {"w": np.zeros(2)}}, data_state={"train_iterator": {}, "order": {}})
  other.close()
  c.distill.teacher_workdir = str(tmp_path / "pathfinder")
  with pytest.raises(ConfigError, match=r"teacher's task is 'pathfinder' and the student's is"):
    train_and_evaluate(c, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "config.json").exists()
  c.distill.teacher_workdir = str(root / "teacher")
  c.distill.alpha = 1.5
  with pytest.raises(ConfigError, match=r"config.distill.alpha must be in \[0, 1\]"):
    train_and_evaluate(c, str(tmp_path / "run"))


def test_command_line_with_a_relative_teacher_and_one_line_errors(root, tmp_path):
  teacher = os.path.relpath(root / "teacher", REPO)
  student = os.path.relpath(tmp_path / "student", REPO)
  flags = [f"--config={LISTOPS}:smoke", f"--config.data_dir={root / 'data'}", *TINY_FLAGS]
  ok = run_cli(
    "train.py",
    *flags,
    f"--workdir={student}",
    "--config.num_train_steps=2",
    f"--config.distill.teacher_workdir={teacher}",
  )
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "kl" in _records(os.path.join(REPO, student))[-1]
  empty = tmp_path / "no_teacher"
  empty.mkdir()
  bad = run_cli(
    "train.py",
    *flags,
    f"--workdir={os.path.relpath(tmp_path / 'other', REPO)}",
    f"--config.distill.teacher_workdir={os.path.relpath(empty, REPO)}",
  )
  assert bad.returncode != 0
  assert "Traceback" not in bad.stderr
  assert "config.distill.teacher_workdir=" in bad.stderr and "holds no checkpoint" in bad.stderr


def test_init_layers_starts_a_shallower_student_from_chosen_layers(root, tmp_path):
  teacher_config = tiny_config(root / "data", attention="performer")
  teacher_config.model.num_layers = 2
  teacher_config.model.attention_kwargs.num_features = 16
  teacher = _params(teacher_config, str(root / "teacher"))
  for layers, source in (("1", 1), ("every_other", 0)):
    c = tiny_config(root / "data", attention="performer", steps=1)
    c.model.attention_kwargs.num_features = 16
    c.init_from, c.init_layers = str(root / "teacher"), layers
    c.optimizer.learning_rate = 0.0  # A frozen run: the saved params are the initial ones.
    c.optimizer.warmup_steps = 0
    train_and_evaluate(c, str(tmp_path / layers))
    student = _params(c, str(tmp_path / layers))
    blocks = student["encoder"]["stack"]["blocks"]
    assert list(blocks) == [0]
    for x, y in zip(
      jax.tree.leaves(blocks[0]),
      jax.tree.leaves(teacher["encoder"]["stack"]["blocks"][source]),
      strict=True,
    ):
      np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(
      student["head"]["logits"]["kernel"], teacher["head"]["logits"]["kernel"]
    )
  c.init_layers = "5"
  with pytest.raises(ConfigError, match=r"config.init_layers='5' asks for source layers \[5\]"):
    train_and_evaluate(c, str(tmp_path / "bad"))
  c.init_layers = "0,1"
  with pytest.raises(ConfigError, match=r"names 2 layers; the model has config.model.num_layers=1"):
    train_and_evaluate(c, str(tmp_path / "bad"))
  c.init_from = ""
  with pytest.raises(ConfigError, match=r"config.init_layers=.* config.init_from, which is empty"):
    train_and_evaluate(c, str(tmp_path / "bad"))
  assert not (tmp_path / "bad" / "config.json").exists()
