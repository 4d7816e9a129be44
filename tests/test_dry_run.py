"""train.py --dry_run: every config in configs/ builds and compiles for its real shapes.

No data is read or generated and nothing is written: the configs' data_dirs
point at directories that do not exist here, and the dry run must not care.
"""

import importlib.util
import os

import pytest

from efficient_transformers.training import train_lib
from tests.helpers import REPO, run_cli

# Independent tests: the xdist workers share them one by one (tests/conftest.py).
pytestmark = pytest.mark.spread

CONFIG_DIR = os.path.join(REPO, "configs")


def _config_files() -> list[str]:
  found = []
  for directory, _, names in os.walk(CONFIG_DIR):
    found += [
      os.path.relpath(os.path.join(directory, n), REPO)
      for n in names
      if n.endswith(".py") and n != "__init__.py"
    ]
  return sorted(found)


# Each file's own variants beside its default and smoke (the README's among them).
EXTRA_ARGS = {
  "configs/lm/byte_lm.py": [
    "memory=none,smoke",
    "memory=compressive,smoke",
    "memory=rmt,smoke",
  ],  # The README's memory=rmt,corpus=enwik8 runs in tests/test_readme.py.
  "configs/lra/text.py": ["length=4000,segment=512,attention=local"],
}
# Transformer-XL's enwik8 batch of 22 does not split over the tests' 8 devices; on 8
# devices a user lays the mesh out so that it does (the dry run says so otherwise).
MESH = {("configs/lm/byte_lm.py", None): {"data": 2, "tensor": 4}}
CASES = [(f, arg) for f in _config_files() for arg in [None, "smoke", *EXTRA_ARGS.get(f, [])]]


def _load(path: str, arg: str | None):
  spec = importlib.util.spec_from_file_location("_dry_run_config", os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_every_config_file_is_covered():
  assert {f for f, _ in CASES} == set(_config_files()) and len(_config_files()) >= 7


@pytest.mark.parametrize("path,arg", CASES, ids=[f"{f}:{a or ''}" for f, a in CASES])
def test_config_compiles_without_data(path, arg, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # The configs' relative data_dirs do not exist here.
  config = _load(path, arg)
  for axis, size in MESH.get((path, arg), {}).items():
    config.mesh[axis] = size
  report = train_lib.dry_run(config)
  assert report["num_params"] > 0 and report["total_mib"] > 0 and report["flops"] > 0
  assert report["global_batch"] == config.batch_size
  assert list(tmp_path.iterdir()) == []  # Nothing generated, nothing written.


def test_a_batch_that_does_not_split_over_the_devices_is_named():
  config = _load("configs/lm/byte_lm.py", None)
  with pytest.raises(Exception, match="batch of 22 examples.*8 devices"):
    train_lib.dry_run(config)


def test_cli_prints_parameters_memory_and_flops_without_a_workdir():
  proc = run_cli("train.py", "--config=configs/lra/listops.py:smoke", "--dry_run")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "parameters" in proc.stdout and "MiB in all" in proc.stdout
  assert "FLOPs per train step" in proc.stdout and "nothing was read" in proc.stdout
  assert not os.path.exists(os.path.join(REPO, "data", "lra", "listops_smoke", "x"))
  proc = run_cli("train.py", "--config=configs/lra/listops.py:smoke")
  assert proc.returncode == 2 and "--workdir is required" in proc.stderr
