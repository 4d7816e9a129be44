"""Parts 1 and 2 of the GPU check: cuDNN against softmax in bf16, and exact-attention TFLOP/s."""

import functools
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from efficient_transformers import attention
from efficient_transformers.attention import dot_product as dot_product_lib
from efficient_transformers.benchmarks.gpu_check.common import (
  _MIB,
  BF16_RTOL,
  FWD_BWD_FACTOR,
  MASK_CASES,
  Budget,
  Sizes,
  _cudnn_skip_reason,
  _log,
  _memory_limit_bytes,
  _short_error,
)

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
