"""Test setup: a fake 8-device CPU platform, set before JAX is imported."""

import os

# The tests' tiny models spend their time compiling, not running: LLVM's optimization
# level 0 cuts CPU compile time by about a quarter. It changes code generation only, not
# XLA's buffer assignment, so the tests' compiled-memory figures are the same.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "")
  + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests are small; keep TF-datasets and absl quiet and off the network.
os.environ.setdefault("TFDS_DATA_DIR", "/nonexistent-tfds")
# Many tests compile the same tiny models (and the CLI tests' subprocesses inherit
# this): JAX's persistent compilation cache, one per test session, compiles each once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile

  # Made by the first process (pytest itself); xdist workers inherit the variable.
  _cache_dir = tempfile.mkdtemp(prefix="et-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  """Each test file is one xdist group (its module fixtures set up once, in one worker),
  except tests marked `spread`: independent, slow ones (the README's dry runs, one
  model per attention) that the two workers share one by one. Runs before xdist's own
  hook, which reads the groups (`--dist loadgroup` in pyproject.toml)."""
  del config
  for item in items:
    if item.get_closest_marker("spread") or item.get_closest_marker("xdist_group"):
      continue
    item.add_marker(pytest.mark.xdist_group(item.module.__name__))
