"""Bad input through the command lines: one clear line naming what to fix, no traceback."""

import os

import pytest

from efficient_transformers.data import listops
from tests.helpers import TINY_FLAGS, run_cli

SMOKE = "--config=configs/lra/listops.py:smoke"


def _assert_clean_error(proc, *needles):
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  for needle in needles:
    assert needle in proc.stderr, (needle, proc.stderr[-2000:])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  listops.ensure_data(
    str(d),
    seed=0,
    num_train=96,
    num_val=20,
    num_test=20,
    min_length=5,
    max_length=32,
    max_depth=4,
    max_args=4,
    num_workers=1,
  )
  return d


def test_unknown_attention_lists_valid_names(tmp_path):
  proc = run_cli(
    "train.py", "--config=configs/lra/listops.py:smoke,attention=nope", f"--workdir={tmp_path}"
  )
  _assert_clean_error(
    proc, "Unknown attention or mixer 'nope'", "softmax", "memory_efficient", "lstm", "s4d"
  )


def test_unknown_config_key_and_arg(tmp_path):
  proc = run_cli("train.py", SMOKE, "--config.model.widht=3", f"--workdir={tmp_path}")
  _assert_clean_error(proc, "config.model has no 'widht'", "emb_dim")
  proc = run_cli("train.py", "--config=configs/lra/listops.py:smok", f"--workdir={tmp_path}")
  _assert_clean_error(proc, "Unknown config arg 'smok'", "smoke")


def test_missing_data_dir_names_it_and_the_command(tmp_path):
  missing = tmp_path / "nowhere"
  proc = run_cli(
    "train.py",
    SMOKE,
    f"--config.data_dir={missing}",
    "--config.data.generate=false",
    f"--workdir={tmp_path / 'w'}",
  )
  _assert_clean_error(proc, str(missing), "python -m efficient_transformers.data.listops")
  proc = run_cli("eval.py", SMOKE, f"--config.data_dir={missing}", f"--workdir={tmp_path / 'w'}")
  _assert_clean_error(proc, str(missing))


def test_malformed_tsv_names_file_and_line(tmp_path, data_dir):
  bad = tmp_path / "bad"
  bad.mkdir()
  for split in ("train", "val", "test"):
    (bad / f"basic_{split}.tsv").write_text((data_dir / f"basic_{split}.tsv").read_text())
  lines = (bad / "basic_val.tsv").read_text().splitlines()
  lines[3] = lines[3].split("\t")[0] + "\tseven"
  (bad / "basic_val.tsv").write_text("\n".join(lines) + "\n")
  proc = run_cli(
    "train.py", SMOKE, f"--config.data_dir={bad}", *TINY_FLAGS, f"--workdir={tmp_path / 'w'}"
  )
  _assert_clean_error(proc, "basic_val.tsv", "line 4")


def test_incompatible_checkpoint_is_refused_and_kept(tmp_path, data_dir):
  workdir = tmp_path / "run"
  flags = [SMOKE, f"--config.data_dir={data_dir}", *TINY_FLAGS, "--config.num_train_steps=2"]
  first = run_cli("train.py", *flags, f"--workdir={workdir}")
  assert first.returncode == 0, first.stderr[-2000:]
  before = sorted(os.listdir(workdir / "checkpoints"))
  assert before

  proc = run_cli("train.py", *flags, "--config.model.emb_dim=24", f"--workdir={workdir}")
  _assert_clean_error(proc, str(workdir), "emb_dim")
  assert sorted(os.listdir(workdir / "checkpoints")) == before  # Nothing lost.

  proc = run_cli(
    "eval.py",
    "--config=configs/lra/listops.py:smoke,attention=memory_efficient",
    *flags[1:],
    f"--workdir={workdir}",
  )
  _assert_clean_error(proc, "model.attention", "'softmax'", "'memory_efficient'")

  proc = run_cli("eval.py", *flags, f"--workdir={tmp_path / 'empty'}")
  _assert_clean_error(proc, "No checkpoint in")


def _files(workdir) -> dict[str, bytes]:
  """Every file of a workdir and its bytes, the lock's holder record aside."""
  return {
    p.relative_to(workdir).as_posix(): p.read_bytes()
    for p in workdir.rglob("*")
    if p.is_file() and p.name != "train.lock"
  }


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
  """A workdir holding a finished 2-step run, to check bad input loses nothing of it."""
  workdir = tmp_path_factory.mktemp("trained")
  flags = [SMOKE, f"--config.data_dir={data_dir}", *TINY_FLAGS, "--config.num_train_steps=2"]
  proc = run_cli("train.py", *flags, f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  return workdir, flags


def test_missing_config_file_is_named(tmp_path):
  proc = run_cli("train.py", "--config=configs/lra/listopz.py:smoke", f"--workdir={tmp_path}")
  _assert_clean_error(proc, "no config file", "configs/lra/listopz.py", "configs/lra/listops.py")
  proc = run_cli("eval.py", "--config=nowhere.py", f"--workdir={tmp_path}")
  _assert_clean_error(proc, "no config file", "nowhere.py")
  assert not list(tmp_path.iterdir())


def test_data_dir_that_is_a_file(tmp_path):
  not_a_dir = tmp_path / "data.tsv"
  not_a_dir.write_text("keep")
  for script in ("train.py", "eval.py"):
    proc = run_cli(script, SMOKE, f"--config.data_dir={not_a_dir}", f"--workdir={tmp_path / 'w'}")
    _assert_clean_error(proc, f"config.data_dir={not_a_dir} is a file, not a directory")
  assert not_a_dir.read_text() == "keep"


def test_workdir_that_is_a_file(tmp_path, data_dir):
  not_a_dir = tmp_path / "run"
  not_a_dir.write_text("keep")
  for script in ("train.py", "eval.py"):
    proc = run_cli(script, SMOKE, f"--config.data_dir={data_dir}", f"--workdir={not_a_dir}")
    _assert_clean_error(proc, f"--workdir={not_a_dir} is a file, not a directory")
  assert not_a_dir.read_text() == "keep"


def test_nonsense_value_is_refused_and_the_workdir_kept(trained):
  workdir, flags = trained
  before = _files(workdir)
  proc = run_cli(
    "train.py",
    *flags,
    "--config.num_train_steps=4",
    "--config.optimizer.learning_rate=-1",
    f"--workdir={workdir}",
  )
  _assert_clean_error(proc, "config.optimizer.learning_rate must be >= 0; got -1")
  assert _files(workdir) == before


@pytest.mark.parametrize(
  "key,value,needle",
  [
    ("model.dropout_rate", 1.5, "config.model.dropout_rate must be in [0, 1); got 1.5"),
    ("model.attention_dropout_rate", -0.1, "config.model.attention_dropout_rate must be in"),
    ("optimizer.warmup_steps", 9, "cosine schedule never decays"),
    ("optimizer.b2", 1.0, "config.optimizer.b2 must be in [0, 1)"),
  ],
)
def test_other_nonsense_values_are_config_errors(key, value, needle, data_dir):
  # The same check as above, before anything touches a workdir; in-process, so cheap.
  from efficient_transformers.errors import ConfigError
  from efficient_transformers.training import train_lib
  from tests.helpers import tiny_config

  config = tiny_config(data_dir, steps=4)
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(ConfigError) as error:
    train_lib._check_config(config)
  assert needle in str(error.value)
