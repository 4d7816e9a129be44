"""Shared test helpers: a tiny ListOps config and a subprocess runner for the CLIs."""

import json
import os
import subprocess
import sys
import time

from configs.lm import byte_lm as byte_lm_config
from configs.lra import listops as listops_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Attention kwargs for short test sequences (>= 12 positions); the rest keep defaults.
SMALL_KWARGS = {
  "memory_efficient": dict(query_chunk_size=8, key_chunk_size=8),
  "local": dict(block_size=8),
  "sparse": dict(block_size=8),
  "linformer": dict(max_length=64, k=8),
  "nystromformer": dict(num_landmarks=4),
  "performer": dict(num_features=16),
  "linear": dict(chunk_size=8),
  "longformer": dict(window=4),
  "bigbird": dict(block_size=4, num_random_blocks=1),
  "sinkhorn": dict(block_size=4, max_length=64),
  "synthesizer": dict(max_length=64),
  # One chunk at the bridge test's length 12, where the output does not depend on the
  # hash draw (Linen and NNX draw from different streams); three chunks at length 33.
  "reformer": dict(chunk_size=12, num_buckets=4),
}


def tiny_config(data_dir, *, attention: str = "softmax", steps: int = 6):
  """The smoke config shrunk to seconds: 1 layer, width 16, length 32, batch 8."""
  c = listops_config.get_config(f"smoke,attention={attention}")
  c.data_dir = str(data_dir)
  c.data.num_train, c.data.num_val, c.data.num_test = 96, 20, 20
  c.data.min_length, c.data.max_length = 5, 32
  c.model.max_length = 32
  c.model.num_layers = 1
  c.model.emb_dim = c.model.qkv_dim = c.model.classifier_dim = 16
  c.model.num_heads = 2
  c.model.mlp_dim = 32
  c.model.dropout_rate = 0.1  # Exercise dropout's determinism across resumes.
  c.batch_size = 8
  c.num_train_steps = steps
  c.log_every_steps = 2
  c.eval_every_steps = 3
  c.checkpoint_every_steps = 2
  c.optimizer.warmup_steps = 2
  return c


def shrink(c, *, steps: int = 2):
  """Any task config cut to seconds: 1 layer, width 16, 2 heads, batch 8, `steps` steps."""
  c.model.num_layers = 1
  c.model.emb_dim = c.model.qkv_dim = c.model.classifier_dim = 16
  c.model.num_heads = 2
  c.model.mlp_dim = 32
  c.batch_size = 8
  c.num_train_steps = steps
  c.eval_every_steps = c.checkpoint_every_steps = steps
  c.log_every_steps = 1
  c.optimizer.warmup_steps = 1
  return c


TINY_FLAGS = [
  "--config.data.num_train=96",
  "--config.data.num_val=20",
  "--config.data.num_test=20",
  "--config.data.min_length=5",
  "--config.data.max_length=32",
  "--config.model.max_length=32",
  "--config.model.num_layers=1",
  "--config.model.emb_dim=16",
  "--config.model.qkv_dim=16",
  "--config.model.classifier_dim=16",
  "--config.model.num_heads=2",
  "--config.model.mlp_dim=32",
  "--config.model.dropout_rate=0.1",
  "--config.batch_size=8",
  "--config.log_every_steps=2",
  "--config.eval_every_steps=3",
  "--config.checkpoint_every_steps=2",
  "--config.optimizer.warmup_steps=2",
]


def cli_env(num_devices: int = 1, *, fast_compile: bool = True) -> dict:
  """The environment of a command-line test: `num_devices` CPU devices.

  fast_compile: LLVM -O0, as in conftest.py. Most command-line tests run a few steps of a
  tiny model and spend their time compiling; those that train hundreds of steps run
  faster without it.
  """
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  if fast_compile:
    env["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  return env


def run_cli(
  script: str,
  *args: str,
  num_devices: int = 1,
  timeout: int = 300,
  fast_compile: bool = True,
  **kw,
):
  """Runs `python script args...` from the repo root; returns the CompletedProcess."""
  return subprocess.run(
    [sys.executable, os.path.join(REPO, script), *args],
    cwd=REPO,
    env=cli_env(num_devices, fast_compile=fast_compile),
    capture_output=True,
    text=True,
    timeout=timeout,
    **kw,
  )


def start_train(flags, workdir, **kw) -> subprocess.Popen:
  """`python train.py flags --workdir=workdir` started from the repo root (1 CPU device,
  full LLVM optimization: these runs train hundreds of steps); stderr piped."""
  return subprocess.Popen(
    [sys.executable, os.path.join(REPO, "train.py"), *flags, f"--workdir={workdir}"],
    cwd=REPO,
    env=cli_env(1, fast_compile=False),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
    **kw,
  )


def wait_for_step(metrics, step, proc, timeout=240) -> None:
  """Until `metrics` (a metrics.jsonl path) logs `step` or later; fails if `proc` ends first."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if metrics.exists() and any(json.loads(line)["step"] >= step for line in metrics.open()):
      return
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(0.05)
  raise AssertionError(f"no step {step} in {metrics} after {timeout} s")


def tiny_lm_config(data_dir, *, memory: str = "transformer_xl", steps: int = 60):
  """The smoke LM cut to seconds: 1 layer, width 32, segments of 16, batch 8.

  A constant learning rate after warmup: a run stopped early and resumed
  follows the same schedule as one that was not.
  """
  c = byte_lm_config.get_config(f"smoke,memory={memory}")
  c.data_dir = str(data_dir)
  c.data.max_bytes = 300_000
  c.model.num_layers = 1
  c.model.emb_dim = c.model.qkv_dim = 32
  c.model.num_heads = 2
  c.model.mlp_dim = 64
  c.model.segment_length = 16
  if memory in ("transformer_xl", "compressive"):
    c.model.mem_len, c.model.eval_mem_len = 16, 48
  if memory == "compressive":
    c.model.cmem_len, c.model.compression_rate = 8, 2
  c.model.dropout_rate = 0.1  # Dropout masks must also replay after a resume.
  c.batch_size = 8
  c.num_train_steps = steps
  c.log_every_steps = 10
  c.eval_every_steps = 30
  c.checkpoint_every_steps = 30
  c.num_eval_batches = 4
  c.optimizer.learning_rate = 3e-3
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_steps = 5
  return c
