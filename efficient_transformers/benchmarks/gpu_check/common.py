"""The GPU check's settings, sizes, budgets and device facts, shared by its parts."""

import dataclasses
import datetime
import sys
import time

import jax

from efficient_transformers.attention import dot_product as dot_product_lib

PARTS = ("correctness", "tflops", "listops", "attention")
BUDGETS_S = {"correctness": 60, "tflops": 120, "listops": 120, "attention": 200}
TIME_LIMIT_S = 570  # The device call's 600 s, less start-up and writing the files.

# Dense (no structured sparsity) bf16 tensor peak per chip, TFLOP/s, from the
# vendors' spec sheets. NVIDIA's sheets print the sparse figure; dense is half.
# The first pattern found in `device_kind` wins, so longer names come first.
PEAK_BF16_TFLOPS = (
  ("H200 NVL", 835.5),  # NVIDIA H200 datasheet: H200 NVL 1,671 TFLOPS bf16 sparse.
  ("H200", 989.4),  # NVIDIA H200 datasheet: H200 SXM 1,979 sparse (also GH200).
  ("H100 NVL", 835.5),  # NVIDIA H100 datasheet: H100 NVL 1,671 sparse.
  ("H100 PCIe", 756.0),  # NVIDIA H100 datasheet: H100 PCIe 1,513 sparse.
  ("H100", 989.4),  # NVIDIA H100 datasheet: H100 SXM 1,979 sparse.
  ("A100", 312.0),  # NVIDIA A100 datasheet: 312 dense (624 sparse).
  ("L40S", 362.05),  # NVIDIA L40S datasheet: 733 sparse.
  ("L40", 181.0),  # NVIDIA L40 datasheet: 362 sparse.
  ("L4", 121.0),  # NVIDIA L4 datasheet: 242 sparse.
  ("V100", 125.0),  # NVIDIA V100 SXM2 datasheet: 125 fp16 (no bf16 tensor cores).
  ("TPU v4", 275.0),  # Cloud TPU docs, system architecture: v4 275 bf16.
  ("TPU v5 lite", 197.0),  # v5e 197 bf16.
  ("TPU v5e", 197.0),
  ("TPU v5p", 459.0),  # v5p 459 bf16.
  ("TPU v5", 459.0),  # JAX names v5p "TPU v5".
  ("TPU v6 lite", 918.0),  # v6e (Trillium) 918 bf16.
  ("TPU v6e", 918.0),
)

# FlashAttention's convention (Dao 2023, benchmarks/benchmark_flash_attention.py):
# the forward is the two matmuls, 4*B*H*L^2*D (halved when causal); the backward
# is 2.5x that (five matmuls, QK^T recomputed), so forward+backward is 3.5x.
FWD_BWD_FACTOR = 3.5
# bf16 tolerance (see `compare`): one bf16 rounding step (2^-8 of the largest
# magnitude) above twice the error that softmax in bf16 itself makes.
BF16_RTOL = 2.0**-8
MASK_CASES = {"none": (False, False), "padding": (True, False), "causal": (False, True)}
MASK_CASES["padding+causal"] = (True, True)
_MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What each part runs: the full H200 sizes or `--reduced` toy ones."""

  correctness_shapes: tuple  # (batch, length, heads, head_dim) each.
  tflops_lengths: tuple
  tflops_tokens: int  # batch * length, fixed: batch = tokens // length.
  tflops_heads: int
  tflops_head_dim: int
  tflops_repeats: int
  attention_lengths: tuple
  attention_batch: int
  attention_layers: int
  attention_steps: int
  attention_names: tuple | None  # None: every registered variant.
  listops_arg: str  # The config arg besides attention=...
  listops_steps: int
  listops_layers: int | None  # None: the config's.


# Correctness at 2001 = ListOps' 2000 tokens + CLS (no multiple of 64) and a round
# length. Throughput: FlashAttention-2's setup, batch x length = 16K tokens and 32
# heads (2048 wide), with this project's head_dim 64.
FULL = Sizes(
  correctness_shapes=((3, 1024, 8, 64), (3, 2001, 8, 64)),
  tflops_lengths=(1024, 2048, 4096, 8192, 16384),
  tflops_tokens=16384,
  tflops_heads=32,
  tflops_head_dim=64,
  tflops_repeats=5,
  attention_lengths=(1024, 2048, 4096, 8192),
  attention_batch=32,
  attention_layers=4,
  attention_steps=3,
  attention_names=None,
  listops_arg="",
  listops_steps=200,
  listops_layers=None,
)
REDUCED = Sizes(
  correctness_shapes=((3, 77, 2, 16),),
  tflops_lengths=(128, 256),
  tflops_tokens=512,
  tflops_heads=2,
  tflops_head_dim=32,
  tflops_repeats=2,
  attention_lengths=(128,),
  attention_batch=2,
  attention_layers=1,
  attention_steps=1,
  attention_names=("softmax", "dot_product"),
  listops_arg="smoke,",
  listops_steps=4,
  listops_layers=1,
)


class Budget:
  """A part's seconds, capped by the whole command's deadline."""

  def __init__(self, seconds: float, deadline: float):
    self.start = time.monotonic()
    self.end = min(self.start + seconds, deadline)
    self.seconds = seconds

  def spent(self) -> bool:
    return time.monotonic() >= self.end

  def elapsed(self) -> float:
    return time.monotonic() - self.start

  def skip_reason(self) -> str:
    return f"skipped: time budget spent ({self.seconds:.0f} s for the part, or the time limit)"


def _log(*parts) -> None:
  print(*parts, file=sys.stderr, flush=True)


def peak_tflops(device_kind: str) -> float | None:
  """The dense bf16 peak of one `device_kind`, TFLOP/s; None if not in the table."""
  for pattern, peak in PEAK_BF16_TFLOPS:
    if pattern.lower() in device_kind.lower():
      return peak
  return None


def device_info() -> dict:
  device = jax.devices()[0]
  return {
    "device_kind": device.device_kind,
    "platform": device.platform,
    "jax_version": jax.__version__,
    "num_devices": jax.device_count(),
    "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
  }


def _memory_limit_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def _cudnn_skip_reason(q: jax.Array) -> str | None:
  """Why cuDNN cannot run here (platform, compute capability, shape), or None."""
  if jax.default_backend() != "gpu":
    return f"skipped: cuDNN needs a CUDA GPU (platform {jax.default_backend()})"
  if dot_product_lib.resolve_implementation(None, q, q) != "cudnn":
    return "skipped: cuDNN flash attention unsupported here (compute capability < 8.0 or shape)"
  return None


def _short_error(e: BaseException) -> str:
  text = " ".join(f"{type(e).__name__}: {e}".split())
  if isinstance(e, ModuleNotFoundError):
    return (
      f"{text}: carry the wheels of efficient_transformers/benchmarks/gpu_wheels.txt "
      "(see the gpu_check module docstring)"
    )
  if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
    return "skipped: out of memory: " + text[:200]
  return text[:300]
