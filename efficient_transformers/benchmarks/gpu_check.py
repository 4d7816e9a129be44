r"""The first-GPU-session check: cuDNN correctness, exact-attention TFLOP/s, training speed.

One command, one call of at most 10 minutes on one NVIDIA H200:

    python -m efficient_transformers.benchmarks.gpu_check --out=DIR

Parts, in the order they run, each with a time budget (seconds; `--budgets`):

  correctness  60   `dot_product(implementation="cudnn")`, `"xla"` and
                    `memory_efficient` in bfloat16 against `softmax` (bf16 and
                    f32), values and gradients w.r.t. q, k, v, for each mask the
                    data pipelines make: none, right padding, causal, both.
  tflops       120  forward+backward TFLOP/s of softmax, dot_product[xla],
                    dot_product[cudnn], memory_efficient at L = 1K..16K, causal
                    and not, as a fraction of the device's bf16 peak.
  listops      120  200 steps of full-size ListOps (4 layers, 512 wide, batch 32,
                    length 2000) in bf16 with softmax and dot_product, through
                    the project's own train step: steps/s and MFU.
  attention    200  `benchmarks/attention.py` (LRA Text model, batch 32) in bf16
                    for every variant at L = 1K..8K.

A part stops starting new cells when its budget is spent and says so; nothing
starts after `--time_limit_s` (570 s from the start of `main`). Every cell that
OOMs, that cuDNN does not support or that fails is recorded with why, and the
next one runs. After each part DIR holds `gpu_check.md` (also printed at the
end), one CSV per part (`correctness.csv`, `tflops.csv`, `listops.csv`,
`attention.csv`, plus `attention.md`/`.png`) and `environment.txt`; every CSV
row names the device, platform, jax version, device count and date
(`sections.json` keeps the parts' results). `--parts=tflops,attention` runs a
subset; into a DIR of an earlier run, that run's other parts stay in the
report. `--reduced` runs every part at toy sizes (CPU: ~40 s on 2 cores; the CI
test runs it).

Exit code: 0 all requested parts ran and the correctness check passed (or was
not requested); 1 the correctness check failed (a case out of tolerance, or
cuDNN failing on a GPU that supports it); 3 it passed but another part crashed
or none of its cells ran; 2 a bad flag (one line `error: ...`).

On the GPU machine (Python 3.12, jax with CUDA, flax, optax, orbax, etils,
matplotlib, but no grain, ml-collections or tensorflow-datasets): parts
correctness, tflops and attention import only what that image has; part
listops trains through `training.state`, `data.tasks` and `data.pipeline`,
which import ml_collections and grain, so their wheels travel with the working
tree (without them that part records "No module named ..." and the rest runs).
Here, once, from the repository root (gpu_wheels.txt beside this file lists the
wheels and why; 17 wheels, 10.2 MiB, of which gpu_check needs the first four,
4.3 MiB; the rest serve the TFDS-backed LRA tasks):

    grep -v '^#' efficient_transformers/benchmarks/gpu_wheels.txt | xargs -n1 \
      python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl
    python3 -m pip wheel --no-deps --no-binary=:all: -w .whl promise==2.3  # sdist only
    grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude

then on the GPU machine, in the repository root (the run tool's command, with
carry [".whl"]; no `pip install -e .`: `-m` puts the working directory on the
path, and PYTHONPATH names it too):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. \
      && python3 -m efficient_transformers.benchmarks.gpu_check --out=$OUT/gpu_check

A second call reruns what failed or was cut, e.g. `--parts=attention
--attention_lengths=8192` (the run tool's $OUT starts empty each call, so that
report holds the rerun parts only; a machine that went cold needs the install
again).
"""

import argparse
import csv
import dataclasses
import datetime
import functools
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from efficient_transformers import attention, paths
from efficient_transformers.attention import dot_product as dot_product_lib
from efficient_transformers.benchmarks import attention as bench
from efficient_transformers.errors import ConfigError, UserError

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


# ---------------------------------------------------------------- Part 1: correctness.


def compare(x, ref, baseline) -> dict:
  """Errors of `x` and of `baseline` against `ref`, and whether `x` is within bf16 tolerance.

  Relative errors are max |x - ref| / max |ref| (elementwise relative error is
  meaningless where ref is ~0, as in padded rows). `x` passes if it is finite
  and its relative error is at most 2 x the baseline's + BF16_RTOL: the rule
  FlashAttention's tests use (a fused kernel may be no more than twice as far
  from the f32 truth as the unfused bf16 reference), plus one bf16 rounding step.

  Args:
    x: the implementation's result (any dtype).
    ref: the f32 reference.
    baseline: the bf16 reference (softmax in bf16), same shape.
  """
  x, ref, baseline = (np.asarray(a, np.float64) for a in (x, ref, baseline))
  scale = max(float(np.abs(ref).max()), 1e-30)
  finite = bool(np.isfinite(x).all())
  err = float(np.abs(x - ref).max()) if finite else float("inf")
  base_err = float(np.abs(baseline - ref).max())
  vs_bf16 = float(np.abs(x - baseline).max()) if finite else float("inf")
  tolerance = 2 * base_err / scale + BF16_RTOL
  return {
    "max_abs_vs_f32": err,
    "max_rel_vs_f32": err / scale,
    "max_abs_vs_bf16": vs_bf16,
    "max_rel_vs_bf16": vs_bf16 / scale,
    "softmax_bf16_rel_vs_f32": base_err / scale,
    "tolerance_rel": tolerance,
    "passed": finite and err / scale <= tolerance,
  }


def _fwd_bwd(fn: Callable, q, k, v, do, mask, *, causal: bool):
  """(out, dq, dk, dv) of fn for the cotangent `do`; out is returned so the forward is kept."""
  out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask=mask, causal=causal), q, k, v)
  return (out, *vjp(do))


def _inputs(shape, dtype, seed: int = 0):
  """q, k, v, cotangent ~ N(0, 1), made on the device; right padding of lengths L, 0.6L, 1."""
  keys = jax.random.split(jax.random.key(seed), 4)
  q, k, v, do = (jax.random.normal(key, shape, dtype) for key in keys)
  batch, length = shape[:2]
  lengths = [length, max(1, round(0.6 * length)), 1][:batch] + [length] * max(0, batch - 3)
  mask = jnp.arange(length)[None, :] < jnp.asarray(lengths)[:, None]
  return q, k, v, do, mask


def exact_implementations() -> dict[str, Callable]:
  """The exact attentions checked and timed, by label."""
  dot = attention.dot_product_attention
  return {
    "softmax": attention.softmax_attention,
    "dot_product[xla]": functools.partial(dot, implementation="xla"),
    "dot_product[cudnn]": functools.partial(dot, implementation="cudnn"),
    "memory_efficient": attention.memory_efficient_attention,
  }


def run_correctness(sizes: Sizes, budget: Budget) -> tuple[list[dict], bool, str]:
  """Rows (one per implementation, shape, mask and quantity), whether all passed, notes."""
  impls = {k: v for k, v in exact_implementations().items() if k != "softmax"}
  rows, passed = [], True
  notes = ""
  for shape in sizes.correctness_shapes:
    q, k, v, do, mask = _inputs(shape, jnp.bfloat16)
    f32 = [a.astype(jnp.float32) for a in (q, k, v, do)]
    auto = dot_product_lib.resolve_implementation(None, q, k)
    notes = f"`dot_product` with implementation=None picks {auto!r} here."
    for case, (padded, causal) in MASK_CASES.items():
      m = mask if padded else None
      base = dict(shape="x".join(map(str, shape)), mask=case)
      if budget.spent():
        rows += [{**base, "implementation": n, "error": budget.skip_reason()} for n in impls]
        passed = False  # Unchecked is not passed.
        continue
      step = functools.partial(_fwd_bwd, causal=causal)
      ref = jax.jit(functools.partial(step, attention.softmax_attention))(*f32, m)
      bf16 = jax.jit(functools.partial(step, attention.softmax_attention))(q, k, v, do, m)
      for name, fn in impls.items():
        row = {**base, "implementation": name}
        skip = _cudnn_skip_reason(q) if name.endswith("[cudnn]") else None
        if skip:
          rows.append({**row, "error": skip})
          continue
        try:
          got = jax.jit(functools.partial(step, fn))(q, k, v, do, m)
          jax.block_until_ready(got)
        except Exception as e:  # recorded; the other cases still run.
          rows.append({**row, "error": _short_error(e)})
          passed = False
          continue
        for quantity, x, r, b in zip(("out", "dq", "dk", "dv"), got, ref, bf16, strict=True):
          result = compare(x, r, b)
          passed &= result["passed"]
          rows.append({**row, "quantity": quantity, **result})
      _log(f"correctness {base['shape']} {case}: done ({budget.elapsed():.0f} s)")
  return rows, passed, notes


def correctness_markdown(rows: list[dict], passed: bool, notes: str) -> str:
  lines = [
    "Each cell: max |x - ref| / max |ref| against softmax in f32 (tolerance: 2 x softmax-bf16's "
    f"own error + 2^-8). Inputs q, k, v ~ N(0, 1) in bf16; padding lengths (L, 0.6L, 1). {notes}",
    "",
    "| implementation | B x L x H x D | mask | out | dq | dk | dv | max rel vs bf16 softmax "
    "| result |",
    "|---|---|---|---|---|---|---|---:|---|",
  ]
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault((r["implementation"], r["shape"], r["mask"]), []).append(r)
  for (impl, shape, mask), group in groups.items():
    if "error" in group[0]:
      lines.append(f"| {impl} | {shape} | {mask} | | | | | | {group[0]['error']} |")
      continue
    cells = [f"{r['max_rel_vs_f32']:.2e} (<= {r['tolerance_rel']:.1e})" for r in group]
    vs_bf16 = max(r["max_rel_vs_bf16"] for r in group)
    ok = "pass" if all(r["passed"] for r in group) else "**FAIL**"
    lines.append(f"| {impl} | {shape} | {mask} | {' | '.join(cells)} | {vs_bf16:.2e} | {ok} |")
  lines += ["", f"Correctness: **{'PASSED' if passed else 'FAILED'}**."]
  return "\n".join(lines)


# ---------------------------------------------------------------- Part 2: TFLOP/s.


def attention_flops(batch: int, heads: int, length: int, head_dim: int, causal: bool) -> float:
  """Algorithmic forward+backward FLOPs of exact attention (FWD_BWD_FACTOR x forward)."""
  forward = 4 * batch * heads * length**2 * head_dim / (2 if causal else 1)
  return FWD_BWD_FACTOR * forward


def _median_seconds(fn: Callable, args: tuple, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # Warm-up: first-run allocations and autotuning.
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _xla_flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):  # Older JAX: one dict per computation.
    cost = cost[0] if cost else None
  return (cost or {}).get("flops")


def run_tflops(sizes: Sizes, budget: Budget, peak: float | None) -> list[dict]:
  rows = []
  limit = _memory_limit_bytes()
  heads, dim = sizes.tflops_heads, sizes.tflops_head_dim
  for length in sizes.tflops_lengths:
    batch = max(1, sizes.tflops_tokens // length)
    q, k, v, do, _ = _inputs((batch, length, heads, dim), jnp.bfloat16)
    for causal in (False, True):
      for name, fn in exact_implementations().items():
        row = dict(implementation=name, causal=causal, length=length, batch=batch)
        row.update(heads=heads, head_dim=dim)
        flops = attention_flops(batch, heads, length, dim, causal)
        row["algorithmic_tflop"] = flops / 1e12
        skip = _cudnn_skip_reason(q) if name.endswith("[cudnn]") else None
        if budget.spent() or skip:
          rows.append({**row, "error": skip or budget.skip_reason()})
          continue
        try:
          compiled = jax.jit(functools.partial(_fwd_bwd, fn, causal=causal))
          compiled = compiled.lower(q, k, v, do, None).compile()
          mem = compiled.memory_analysis()
          if mem is not None:
            need = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
            row["memory_mib"] = need / _MIB
            if limit and need > 0.95 * limit:
              raise MemoryError(f"needs {need / 2**30:.1f} GiB, the device has {limit / 2**30:.1f}")
          row["xla_tflop"] = (_xla_flops(compiled) or 0) / 1e12
          seconds = _median_seconds(compiled, (q, k, v, do, None), sizes.tflops_repeats)
        except Exception as e:  # recorded; an OOM or what cuDNN lacks is a skip.
          text = _short_error(e)
          unsupported = isinstance(e, MemoryError | NotImplementedError)
          rows.append({**row, "error": ("skipped: " if unsupported else "") + text})
          _log(f"tflops {name} L={length} causal={causal}: {rows[-1]['error']}")
          continue
        row.update(ms=seconds * 1e3, tflops_per_s=flops / seconds / 1e12)
        row["xla_tflops_per_s"] = row["xla_tflop"] / seconds
        row["fraction_of_peak"] = row["tflops_per_s"] / peak if peak else None
        rows.append(row)
        _log(f"tflops {name} L={length} causal={causal}: {row['tflops_per_s']:.3g} TFLOP/s")
    del q, k, v, do
  return rows


def tflops_markdown(rows: list[dict], sizes: Sizes, peak: float | None) -> str:
  peak_text = f"{peak} TFLOP/s" if peak else "unknown for this device (fraction left empty)"
  lines = [
    f"Forward+backward of exact attention, bf16, heads {sizes.tflops_heads}, head_dim "
    f"{sizes.tflops_head_dim}, batch x L = {sizes.tflops_tokens} tokens, no padding; median of "
    f"{sizes.tflops_repeats} runs after a warm-up. Algorithmic FLOPs: forward 4·B·H·L²·D (halved "
    f"when causal), fwd+bwd = {FWD_BWD_FACTOR}x forward (FlashAttention's convention). XLA's "
    "`cost_analysis()` FLOPs beside them (it does not count cuDNN's custom call, and counts a "
    f"loop body once). Peak (dense bf16): {peak_text}.",
    "",
    "| implementation | causal | L | batch | ms | TFLOP/s | of peak | XLA TFLOP | XLA TFLOP/s "
    "| memory MiB |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]

  def fmt(r, key, spec):
    return "" if r.get(key) is None else format(r[key], spec)

  for r in rows:
    head = f"| {r['implementation']} | {r['causal']} | {r['length']} | {r['batch']} |"
    if "error" in r:
      lines.append(f"{head} {r['error']} | | | | | |")
      continue
    lines.append(
      f"{head} {r['ms']:.2f} | {r['tflops_per_s']:.3g} | {fmt(r, 'fraction_of_peak', '.1%')} | "
      f"{fmt(r, 'xla_tflop', '.3g')} | {fmt(r, 'xla_tflops_per_s', '.3g')} | "
      f"{fmt(r, 'memory_mib', '.0f')} |"
    )
  return "\n".join(lines)


# ---------------------------------------------------------------- Part 3: LRA ListOps training.


def listops_model_flops(model_cfg, batch: int) -> float:
  """Analytic model FLOPs of one train step (PaLM's MFU convention: 3 x forward matmuls).

  Per example and layer, forward: q/k/v/out projections 8·T·d·qkv, attention
  4·T²·qkv (QK^T and PV), MLP 4·T·d·mlp, over T = max_length + 1 (CLS)
  positions; plus the head on the pooled vector. Padded positions count: the
  step computes them (cuDNN may skip padded blocks, so its MFU is conservative).
  No recomputation and no elementwise work, as MFU requires.
  """
  m = model_cfg
  t = m.max_length + (m.pooling == "cls")
  layer = 8 * t * m.emb_dim * m.qkv_dim + 4 * t**2 * m.qkv_dim + 4 * t * m.emb_dim * m.mlp_dim
  head = 2 * m.emb_dim * m.classifier_dim + 2 * m.classifier_dim * 10
  return 3.0 * batch * (m.num_layers * layer + head)


def _listops_config(sizes: Sizes, name: str, data_dir: str, steps: int):
  """configs/lra/listops.py for `name` in bf16, with only the data `steps` steps read."""
  from configs.lra import listops as listops_config

  config = listops_config.get_config(f"{sizes.listops_arg}attention={name}")
  config.model.dtype = "bfloat16"
  config.data_dir = data_dir
  config.num_train_steps = steps  # Sets the schedule's length only.
  # Every training example once; validation and test are not read.
  config.data.num_train = max(steps * config.batch_size, 256)
  config.data.num_val = config.data.num_test = 32
  if sizes.listops_layers:
    config.model.num_layers = sizes.listops_layers
  if config.optimizer.warmup_steps >= steps:  # Cosine needs it; the speed does not change.
    config.optimizer.warmup_steps = steps // 2
  with config.unlocked():
    config.data.num_workers = 1  # A few chunks: spawning workers would cost more.
  return config


def _train_listops(config, steps: int, budget: Budget, row: dict) -> dict:
  """Fills `row` with the timings of up to `steps` train steps of `config`."""
  from efficient_transformers.data import pipeline, tasks
  from efficient_transformers.training import sharding, state

  t0 = time.perf_counter()
  task = tasks.load(config)
  train_iter = pipeline.task_train_iterator(
    task, global_batch_size=config.batch_size, seed=config.seed, sequence_length=0
  )
  row["data_s"] = time.perf_counter() - t0
  # One device: the MFU below is per chip, like every other number here.
  setup = state.make_setup(
    config, vocab_size=task.vocab_size, num_classes=task.num_classes, devices=jax.devices()[:1]
  )
  t0 = time.perf_counter()
  spec = setup.batch_spec(task.splits["train"], config.batch_size)
  step_fn = setup.compile_train_step(
    spec, seed=config.seed, grad_accum_steps=config.optimizer.grad_accum_steps
  )
  row["compile_s"] = time.perf_counter() - t0
  mem = step_fn.memory_analysis()
  if mem is not None:
    row["memory_mib"] = (mem.temp_size_in_bytes + mem.argument_size_in_bytes) / _MIB
  row["xla_flops_per_step"] = _xla_flops(step_fn)
  row["model_flops_per_step"] = listops_model_flops(config.model, config.batch_size)
  train_state = state.init_state(setup)

  def one_step(train_state):
    # As train_lib feeds it: host batch -> global array, then the step under the guard.
    batch = sharding.global_batch(next(train_iter), setup.batch_sharding)
    with jax.transfer_guard("disallow"):
      return step_fn(train_state, batch)

  t0 = time.perf_counter()
  train_state, metrics = one_step(train_state)
  row["first_loss"] = float(metrics["loss"])  # Blocks: the first step ends here.
  row["first_step_s"] = time.perf_counter() - t0
  # Throughput as train.py runs: dispatch ahead, block once at the end.
  t0, done = time.perf_counter(), 0
  while done < steps - 1 and not budget.spent():
    train_state, metrics = one_step(train_state)
    done += 1
  jax.block_until_ready((train_state, metrics))
  elapsed = time.perf_counter() - t0
  row.update(timed_steps=done, last_loss=float(metrics["loss"]))
  if done:
    row["step_ms"] = elapsed / done * 1e3
    row["steps_per_s"] = done / elapsed
    row["examples_per_s"] = done * config.batch_size / elapsed
  return row


def run_listops(
  sizes: Sizes, budget: Budget, peak: float | None, data_dir: str, steps: int
) -> list[dict]:
  """Trains `steps` steps per attention with the project's own config, data and train step.

  Its imports need ml_collections and grain, absent from the GPU image unless
  their wheels were carried (module docstring); the other parts run without.
  """
  rows = []
  for name in ("softmax", "dot_product"):
    row = {"attention": name}
    if budget.spent():
      rows.append({**row, "error": budget.skip_reason()})
      continue
    try:
      config = _listops_config(sizes, name, data_dir, steps)
      m = config.model
      row.update(batch=config.batch_size, length=m.max_length, layers=m.num_layers)
      row["width"] = m.emb_dim
      _train_listops(config, steps, budget, row)
    except Exception as e:  # recorded; the next attention still runs.
      rows.append({**row, "error": _short_error(e)})
      _log(f"listops {name}: {rows[-1]['error']}")
      continue
    for key in ("model", "xla"):
      flops = row.get(f"{key}_flops_per_step")
      if flops and row.get("steps_per_s"):
        row[f"{key}_tflops_per_s"] = flops * row["steps_per_s"] / 1e12
        row[f"mfu_{key}"] = row[f"{key}_tflops_per_s"] / peak if peak else None
    rows.append(row)
    _log(f"listops {name}: {row.get('steps_per_s', 0):.2f} steps/s")
  return rows


def listops_markdown(rows: list[dict], steps: int) -> str:
  lines = [
    f"configs/lra/listops.py with attention=NAME, config.model.dtype=bfloat16, up to {steps} "
    "steps on one device, data through data.tasks/data.pipeline, the compiled "
    "`setup.compile_train_step`. Steps/s over the steps after the first (dispatched ahead, "
    "blocked at the end, as train.py runs). MFU: model FLOPs (analytic, PaLM's convention: "
    "3 x forward matmul FLOPs over the padded length + CLS) / step time / peak; XLA: the "
    "compiled step's `cost_analysis()` FLOPs (no cuDNN custom-call FLOPs) the same way. The "
    "generator writes only the examples the steps read (the full config's 96K would take "
    "minutes); model, lengths and batch are the config's.",
    "",
    "| attention | B x L, layers x width | compile s | first step s | steps timed | steps/s "
    "| ms/step | MFU | XLA-FLOPs MFU | memory MiB | loss first -> last |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
  ]

  def fmt(r, key, spec):
    return "" if r.get(key) is None else format(r[key], spec)

  for r in rows:
    shape = ""
    if "width" in r:
      shape = f"{r['batch']} x {r['length']}, {r['layers']} x {r['width']}"
    if "error" in r:
      lines.append(f"| {r['attention']} | {shape} | {r['error']} | | | | | | | | |")
      continue
    lines.append(
      f"| {r['attention']} | {shape} | {r['compile_s']:.1f} | {r['first_step_s']:.2f} | "
      f"{r['timed_steps']} | {fmt(r, 'steps_per_s', '.2f')} | {fmt(r, 'step_ms', '.1f')} | "
      f"{fmt(r, 'mfu_model', '.1%')} | {fmt(r, 'mfu_xla', '.1%')} | {fmt(r, 'memory_mib', '.0f')}"
      f" | {r['first_loss']:.3f} -> {r['last_loss']:.3f} |"
    )
  return "\n".join(lines)


# ---------------------------------------------------------------- Part 4: the attention benchmark.


def run_attention(sizes: Sizes, budget: Budget, names: Sequence[str], lengths) -> list[dict]:
  """`benchmarks.attention.measure` in bf16 per length and variant, breadth first."""
  limit = _memory_limit_bytes()
  # softmax first at each length (every ratio needs it), then the other exact ones.
  first = [n for n in ("softmax", "dot_product", "memory_efficient") if n in names]
  names = first + [n for n in names if n not in first]
  rows = []
  for length in lengths:
    for name in names:
      if budget.spent():
        rows.append({"attention": name, "length": length, "error": budget.skip_reason()})
        continue
      try:
        row = bench.measure(
          name,
          length,
          batch=sizes.attention_batch,
          dtype=jnp.bfloat16,
          steps=sizes.attention_steps,
          time_it=True,
          num_layers=sizes.attention_layers,
          memory_limit_mib=limit and 0.95 * limit / _MIB,
        )
      except Exception as e:  # e.g. a bf16 kernel the backend lacks.
        row = {"attention": name, "length": length, "error": _short_error(e)}
      rows.append(row)
      result = row.get("step_s") or row.get("error") or row.get("note")
      _log(f"attention {name} L={length}: {result}")
  return bench.with_ratios(rows)


def attention_markdown(rows: list[dict], sizes: Sizes, info: dict) -> str:
  header = (
    f"benchmarks/attention.py: LRA Text model ({sizes.attention_layers} layers), batch "
    f"{sizes.attention_batch}, bfloat16, forward+backward step; time: median of "
    f"{sizes.attention_steps} steps after a warm-up; memory: compiled temporaries + arguments. "
    f"Device: {info['device_kind']} ({info['platform']})."
  )
  text = bench.markdown(rows, header)
  summary = bench.targets(rows)
  if summary:
    text += "\n\nAgainst the targets (sub-quadratic variants):\n\n" + summary
  notes = [f"- {r['attention']} L={r['length']}: {r['note']}" for r in rows if r.get("note")]
  return text + ("\n\n" + "\n".join(notes) if notes else "")


# ---------------------------------------------------------------- Writing the report.


def write_csv(path, rows: list[dict], info: dict) -> None:
  keys = list(info)
  for r in rows:
    keys += [k for k in r if k not in keys and k != "error"]
  keys.append("error")  # Always a column, so readers need not test for it.
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=keys)
  writer.writeheader()
  writer.writerows({**info, **r} for r in rows)
  paths.write_text(path, buffer.getvalue())


def report_markdown(info: dict, peak: float | None, reduced: bool, sections: dict) -> str:
  peak_text = f"{peak} TFLOP/s dense bf16" if peak else "unknown"
  lines = [
    "# GPU check" + (" (reduced sizes)" if reduced else ""),
    "",
    f"Device: **{info['device_kind']}** (platform {info['platform']}, {info['num_devices']} "
    f"device(s), peak {peak_text}); jax {info['jax_version']}, Python "
    f"{platform.python_version()}; {info['date']}.",
    "",
    "| part | status | seconds | budget s | finished (UTC) |",
    "|---|---|---:|---:|---|",
  ]
  for name, s in sections.items():
    lines.append(
      f"| {name} | {s['status']} | {s['seconds']:.0f} | {s['budget']:.0f} | {s['date']} |"
    )
  for name, s in sections.items():
    lines += ["", f"## {name}", "", s["markdown"]]
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- Command line.


def _skipped(row: dict) -> bool:
  return row.get("error", "").startswith("skipped")


def _cell_summary(rows: list[dict]) -> str:
  """ ", 2 skipped, 1 failed" for the part's status line ("" when every cell ran)."""
  skipped = sum(_skipped(r) for r in rows)
  failed = sum("error" in r for r in rows) - skipped
  return (f", {skipped} skipped" if skipped else "") + (f", {failed} failed" if failed else "")


class _Parser(argparse.ArgumentParser):
  """Bad flags are one-line ConfigErrors, like every other user error."""

  def error(self, message):
    raise ConfigError(f"{message} (see --help)")


def _names(text: str, valid: Sequence[str], flag: str) -> list[str]:
  names = [n.strip() for n in text.split(",") if n.strip()]
  unknown = [n for n in names if n not in valid]
  if unknown or not names:
    raise ConfigError(f"{flag}={text!r}: unknown {unknown or 'empty'}; valid: {', '.join(valid)}.")
  return names


def _lengths(text: str, flag: str) -> list[int]:
  try:
    values = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    values = []
  if not values or min(values) <= 0:
    raise ConfigError(f"{flag}={text!r}: give positive integers separated by commas.")
  return values


def _budgets(text: str) -> dict[str, float]:
  out = dict(BUDGETS_S)
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, _, seconds = item.partition("=")
    _names(name, PARTS, "--budgets")
    try:
      out[name] = float(seconds)
    except ValueError:
      raise ConfigError(f"--budgets: {item!r} is not PART=SECONDS.") from None
  return out


def _out_dir(text: str):
  out = paths.resolve(text, what="--out")
  if out.exists() and not out.is_dir():
    raise ConfigError(f"--out={text!r} is a file; give a directory (created if missing).")
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise (paths.user_io_error(e, out) or e) from None
  return out


def main(argv: Sequence[str] | None = None) -> int:
  deadline = time.monotonic()
  parser = _Parser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="directory for the report (local, ~, gs://)")
  parser.add_argument("--parts", default=",".join(PARTS), help=f"a subset of {','.join(PARTS)}")
  parser.add_argument("--reduced", action="store_true", help="toy sizes (CPU, CI)")
  parser.add_argument("--data_dir", default="", help="ListOps data (default: a temporary dir)")
  parser.add_argument("--listops_steps", type=int, default=None, help="default 200 (reduced 4)")
  parser.add_argument("--attentions", default="", help="part attention's variants (default all)")
  parser.add_argument("--attention_lengths", default="", help="part attention's lengths")
  parser.add_argument("--budgets", default="", help="e.g. attention=300,tflops=60 (seconds)")
  parser.add_argument("--time_limit_s", type=float, default=TIME_LIMIT_S)
  try:
    args = parser.parse_args(argv)
    parts = _names(args.parts, PARTS, "--parts")
    budgets = _budgets(args.budgets)
    sizes = REDUCED if args.reduced else FULL
    names = sizes.attention_names or attention.available()
    if args.attentions:
      names = _names(args.attentions, attention.available(), "--attentions")
    lengths = sizes.attention_lengths
    if args.attention_lengths:
      lengths = _lengths(args.attention_lengths, "--attention_lengths")
    steps = args.listops_steps or sizes.listops_steps
    if steps < 2:
      raise ConfigError(f"--listops_steps={steps}: give at least 2 (the first is not timed).")
    out = _out_dir(args.out)
    data_dir = paths.resolve_local(args.data_dir, what="--data_dir") if args.data_dir else ""
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  deadline += args.time_limit_s
  if args.reduced and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    # Toy sizes spend their time compiling; LLVM -O0 (as the tests use) cuts that by about
    # a quarter, and toy timings mean nothing anyway. Read when the backend starts, below.
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()
  options = dict(names=names, lengths=lengths, steps=steps)
  try:
    return _run_parts(parts, args.reduced, sizes, budgets, deadline, out, data_dir, **options)
  except OSError as e:  # Writing the report: a full disk, a read-only --out.
    error = paths.user_io_error(e, out)
    if error is None:
      raise
    print(f"error: {error}", file=sys.stderr)
    return 2


def _run_parts(parts, reduced, sizes, budgets, deadline, out, data_dir, *, names, lengths, steps):
  """Runs `parts` in order, rewriting the report after each; returns the exit code."""
  info = device_info()
  peak = peak_tflops(info["device_kind"])
  paths.write_text(out / "environment.txt", jax.print_environment_info(return_string=True))
  previous = paths.read_text(out / "sections.json")
  sections: dict = {}
  if previous:  # A rerun of some parts keeps the others' sections.
    sections = {k: v for k, v in json.loads(previous).items() if k in PARTS}
  correctness_passed, crashed = True, False
  temp_data = None
  for part in parts:
    budget = Budget(budgets[part], deadline)
    status, markdown = "ok", ""
    _log(f"== {part} (budget {budgets[part]:.0f} s)")
    try:
      if part == "correctness":
        rows, correctness_passed, notes = run_correctness(sizes, budget)
        status = "passed" if correctness_passed else "FAILED"
        markdown = correctness_markdown(rows, correctness_passed, notes)
        write_csv(out / "correctness.csv", rows, info)
      elif part == "tflops":
        rows = run_tflops(sizes, budget, peak)
        markdown = tflops_markdown(rows, sizes, peak)
        write_csv(out / "tflops.csv", rows, info)
      elif part == "listops":
        if not data_dir:
          data_dir = temp_data = tempfile.mkdtemp(prefix="gpu_check_listops_")
        rows = run_listops(sizes, budget, peak, data_dir, steps)
        markdown = listops_markdown(rows, steps)
        write_csv(out / "listops.csv", rows, info)
      else:
        rows = run_attention(sizes, budget, names, lengths)
        markdown = attention_markdown(rows, sizes, info)
        paths.write_text(out / "attention.md", markdown + "\n")
        write_csv(out / "attention.csv", rows, info)
        title = f"{info['device_kind']} ({info['platform']}), batch {sizes.attention_batch}, bf16"
        with (out / "attention.png").open("wb") as f:
          bench.plot(rows, f, title)
      status += _cell_summary(rows)
      if rows and all("error" in r for r in rows) and not all(_skipped(r) for r in rows):
        status = "FAILED" + status[status.index(",") :]  # No cell ran: the part failed.
        crashed = True
    except Exception as e:  # the next part still runs.
      if isinstance(e, UserError | ImportError):
        detail = _short_error(e)
      else:
        detail = traceback.format_exc(limit=-3)
      status = f"error: {_short_error(e)}"
      markdown = f"The part failed:\n\n```\n{detail}\n```"
      _log(f"{part} failed: {detail}")
      if part == "correctness":
        correctness_passed = False
      crashed = True
    sections[part] = dict(
      status=status,
      seconds=budget.elapsed(),
      budget=budgets[part],
      date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
      markdown=markdown,
    )
    paths.write_text(out / "sections.json", json.dumps(sections, indent=1))
    ordered = {p: sections[p] for p in PARTS if p in sections}
    text = report_markdown(info, peak, reduced, ordered)
    paths.write_text(out / "gpu_check.md", text)
  if temp_data:
    shutil.rmtree(temp_data, ignore_errors=True)
  print(text)
  print(f"wrote {out}", file=sys.stderr)
  if not correctness_passed:
    return 1
  return 3 if crashed else 0


if __name__ == "__main__":
  sys.exit(main())
