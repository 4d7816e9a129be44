"""Compiled training memory of the exact attentions: softmax, dot_product, memory_efficient.

For each length L, compiles the forward and backward pass of
`sum(attention(q, k, v, mask=mask))` w.r.t. q, k and v from abstract inputs
(`jax.ShapeDtypeStruct`; nothing executes, so lengths far beyond the device's
memory can be measured) and reports XLA's `memory_analysis()`: the temporary
bytes, their ratio to softmax attention at the same L, and the argument bytes.
Compiled memory is deterministic for a given backend and JAX version.

    python -m efficient_transformers.benchmarks.exact_memory \\
        --lengths=1024,2048,4096,8192 --batch=2 --heads=4 --head_dim=64 --out=/tmp/mem
"""

import argparse
import csv
import functools
import os
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from efficient_transformers import attention
from efficient_transformers.attention import dot_product as dot_product_lib
from efficient_transformers.errors import ConfigError, UserError

VARIANTS = ("softmax", "dot_product", "memory_efficient")
CSV_NAME = "exact_memory.csv"
_MIB = 2**20


def _parse_lengths(text: str) -> list[int]:
  try:
    lengths = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    lengths = []
  if not lengths or min(lengths) <= 0:
    raise ConfigError(f"--lengths={text!r}: give positive integers separated by commas.")
  return lengths


def _parse_dtype(name: str) -> jnp.dtype:
  if name not in ("float32", "bfloat16", "float16"):
    raise ConfigError(f"--dtype={name!r}: use float32, bfloat16 or float16.")
  return jnp.dtype(name)


def attention_fns(
  *, causal: bool, query_chunk_size: int, key_chunk_size: int
) -> dict[str, Callable[..., jax.Array]]:
  """The pure attention functions measured, by variant name, with flags applied."""
  return {
    "softmax": functools.partial(attention.softmax_attention, causal=causal),
    "dot_product": functools.partial(attention.dot_product_attention, causal=causal),
    "memory_efficient": functools.partial(
      attention.memory_efficient_attention,
      causal=causal,
      query_chunk_size=query_chunk_size,
      key_chunk_size=key_chunk_size,
    ),
  }


def compiled_memory(
  fn: Callable[..., jax.Array], *, batch: int, length: int, heads: int, head_dim: int, dtype
) -> dict[str, float]:
  """memory_analysis() of jit(grad(sum(fn(q, k, v, mask)))) w.r.t. q, k, v.

  Returns:
    {"temp_bytes", "argument_bytes", "output_bytes", "compile_s"}.
  """
  qkv = jax.ShapeDtypeStruct((batch, length, heads, head_dim), dtype)
  mask = jax.ShapeDtypeStruct((batch, length), jnp.bool_)

  def loss(q, k, v, mask):
    # Sum in float32 so the loss itself does not lose precision in bf16.
    return fn(q, k, v, mask=mask).astype(jnp.float32).sum()

  start = time.perf_counter()
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(qkv, qkv, qkv, mask).compile()
  seconds = time.perf_counter() - start
  stats = compiled.memory_analysis()
  return {
    "temp_bytes": stats.temp_size_in_bytes,
    "argument_bytes": stats.argument_size_in_bytes,
    "output_bytes": stats.output_size_in_bytes,
    "compile_s": seconds,
  }


def run(
  *,
  lengths: Sequence[int],
  batch: int,
  heads: int,
  head_dim: int,
  dtype,
  causal: bool = False,
  query_chunk_size: int = 512,
  key_chunk_size: int = 512,
) -> list[dict]:
  """One row per (length, variant), with temp memory relative to softmax."""
  fns = attention_fns(
    causal=causal, query_chunk_size=query_chunk_size, key_chunk_size=key_chunk_size
  )
  probe = jax.ShapeDtypeStruct((batch, 1, heads, head_dim), dtype)
  dot_impl = dot_product_lib.resolve_implementation(None, probe, probe)
  rows = []
  for length in lengths:
    baseline = None
    for name in VARIANTS:
      stats = compiled_memory(
        fns[name], batch=batch, length=length, heads=heads, head_dim=head_dim, dtype=dtype
      )
      if name == "softmax":
        baseline = stats["temp_bytes"]
      ratio = stats["temp_bytes"] / baseline if baseline else float("nan")
      rows.append(
        {
          "length": length,
          "attention": f"dot_product ({dot_impl})" if name == "dot_product" else name,
          **stats,
          "vs_softmax": ratio,
        }
      )
  return rows


def markdown(rows: list[dict], header: str) -> str:
  lines = [
    header,
    "",
    "| L | attention | temp MiB | temp vs softmax | arguments MiB | compile s |",
    "|---:|---|---:|---:|---:|---:|",
  ]
  for r in rows:
    lines.append(
      f"| {r['length']} | {r['attention']} | {r['temp_bytes'] / _MIB:.2f} "
      f"| {r['vs_softmax']:.3f} | {r['argument_bytes'] / _MIB:.2f} | {r['compile_s']:.1f} |"
    )
  return "\n".join(lines)


def write_csv(rows: list[dict], directory: str) -> str:
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, CSV_NAME)
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return path


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", default="1024,2048,4096,8192", help="comma-separated L")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
  parser.add_argument("--causal", action="store_true")
  parser.add_argument("--query_chunk_size", type=int, default=512)
  parser.add_argument("--key_chunk_size", type=int, default=512)
  parser.add_argument("--out", default=None, help="directory for exact_memory.csv")
  args = parser.parse_args(argv)
  try:
    lengths = _parse_lengths(args.lengths)
    dtype = _parse_dtype(args.dtype)
    for flag in ("batch", "heads", "head_dim"):
      if getattr(args, flag) <= 0:
        raise ConfigError(f"--{flag}={getattr(args, flag)}: must be positive.")
    rows = run(
      lengths=lengths,
      batch=args.batch,
      heads=args.heads,
      head_dim=args.head_dim,
      dtype=dtype,
      causal=args.causal,
      query_chunk_size=args.query_chunk_size,
      key_chunk_size=args.key_chunk_size,
    )
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  device = jax.devices()[0]
  header = (
    f"Exact attention, forward+backward compiled temp memory. Device: {device.device_kind} "
    f"(platform {device.platform}), jax {jax.__version__}. Shape: batch {args.batch}, "
    f"heads {args.heads}, head_dim {args.head_dim}, {dtype.name}, causal={args.causal}, "
    f"memory_efficient chunks {args.query_chunk_size}x{args.key_chunk_size}."
  )
  print(markdown(rows, header))
  if args.out:
    print(f"\nwrote {write_csv(rows, args.out)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
