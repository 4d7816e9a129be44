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
import functools
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from efficient_transformers import attention
from efficient_transformers.attention import dot_product as dot_product_lib
from efficient_transformers.benchmarks import report
from efficient_transformers.errors import ConfigError

VARIANTS = ("softmax", "dot_product", "memory_efficient")
_MIB = 2**20

# (key, column title, format) of the markdown table; the CSV holds CSV_KEYS (bytes, not MiB).
COLUMNS = (
  ("length", "L", "d"),
  ("attention", "attention", "s"),
  ("temp_mib", "temp MiB", ".2f"),
  ("vs_softmax", "temp vs softmax", ".3f"),
  ("argument_mib", "arguments MiB", ".2f"),
  ("compile_s", "compile s", ".1f"),
)
CSV_KEYS = (
  "length", "attention", "temp_bytes", "argument_bytes", "output_bytes", "compile_s", "vs_softmax",
)  # fmt: skip


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
  """`run`'s rows as a markdown table under `header`, bytes shown in MiB."""
  mib = [
    {**r, "temp_mib": r["temp_bytes"] / _MIB, "argument_mib": r["argument_bytes"] / _MIB}
    for r in rows
  ]
  return report.markdown_table(mib, COLUMNS, header)


@report.one_line_errors
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
  report.add_out_flag(parser, "exact_memory.md and exact_memory.csv")
  args = parser.parse_args(argv)
  out = report.prepare_out(args.out)  # Checked now, not after the compiles.
  lengths = report.positive_ints(args.lengths, "--lengths")
  dtype = _parse_dtype(args.dtype)
  report.check_positive(args, ("batch", "heads", "head_dim"))
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
  header = (
    f"Exact attention, forward+backward compiled temp memory. {report.device_line(cpu=True)} "
    f"Shape: batch {args.batch}, heads {args.heads}, head_dim {args.head_dim}, {dtype.name}, "
    f"causal={args.causal}, memory_efficient chunks {args.query_chunk_size}x{args.key_chunk_size}."
  )
  table = markdown(rows, header)
  print(table)
  if out:
    md, csv = report.write_tables(out, "exact_memory", table, rows, CSV_KEYS)
    print(f"\nwrote {md} and {csv}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
