"""Test setup: a fake 8-device CPU platform, set before JAX is imported."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests are small; keep TF-datasets and absl quiet and off the network.
os.environ.setdefault("TFDS_DATA_DIR", "/nonexistent-tfds")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
