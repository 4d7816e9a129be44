"""Compiled memory and compile time of the stack's layer options (models.Stack).

Two tables, each printed as markdown and, with --out, written as .md and .csv:

1. `stack_options_reversible`: the compiled temporaries of value_and_grad of a
   loss over the stack (sum of squares of its output) at `--reversible_layers`
   depths, plain vs reversible=True. The plain stack saves every layer's
   activations for the backward pass; the reversible one reconstructs them, so
   its temporaries should not grow with depth.
2. `stack_options_scan`: wall time of `.lower().compile()` and the compiled
   temporaries of the same function at `--scan_layers` depths, unrolled vs
   scan_layers=True, and scan with `--remat_policy`.

Compile only: parameters and inputs are abstract (shapes), nothing runs. The
memory figures are XLA's `memory_analysis()`, deterministic for a backend and
JAX version; compile times are one measurement each, on the named device.

    python -m efficient_transformers.benchmarks.stack_options --out=benchmarks_out
    python -m efficient_transformers.benchmarks.stack_options --batch=2 --length=256 --out=...
"""

import argparse
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_transformers import attention
from efficient_transformers.benchmarks import report
from efficient_transformers.errors import ConfigError
from efficient_transformers.models.stack import REMAT_POLICIES, Stack

_MIB = 2**20

REVERSIBLE_COLUMNS = (
  ("layers", "layers", "d"),
  ("plain_temp_mib", "plain temp MiB", ".1f"),
  ("reversible_temp_mib", "reversible temp MiB", ".1f"),
  ("ratio", "reversible / plain", ".2f"),
)
SCAN_COLUMNS = (
  ("layers", "layers", "d"),
  ("unrolled_compile_s", "unrolled compile s", ".2f"),
  ("scan_compile_s", "scan compile s", ".2f"),
  ("remat_compile_s", "scan+remat compile s", ".2f"),
  ("unrolled_temp_mib", "unrolled temp MiB", ".1f"),
  ("scan_temp_mib", "scan temp MiB", ".1f"),
  ("remat_temp_mib", "scan+remat temp MiB", ".1f"),
)

REVERSIBLE_CSV_KEYS = ("layers", "plain_temp_mib", "reversible_temp_mib", "ratio")
SCAN_CSV_KEYS = (
  "layers", "remat_policy", "unrolled_compile_s", "scan_compile_s", "remat_compile_s",
  "unrolled_temp_mib", "scan_temp_mib", "remat_temp_mib",
)  # fmt: skip


def abstract_stack(num_layers: int, sizes: dict, **options) -> Stack:
  """A causal Stack of shapes only (no parameter is materialized), no dropout."""
  return nnx.eval_shape(
    lambda: Stack(num_layers=num_layers, causal=True, rngs=nnx.Rngs(0), **sizes, **options)
  )


def compile_grad(stack: Stack, batch: int, length: int) -> tuple[float, float]:
  """(compile seconds, temporaries MiB) of value_and_grad of a loss over `stack`."""
  graphdef, params, rest = nnx.split(stack, nnx.Param, ...)
  features = jax.tree.leaves(nnx.state(stack.final_norm, nnx.Param))[0].shape[-1]
  x = jax.ShapeDtypeStruct((batch, length, features), jnp.float32)

  def loss(params, rest, x):
    model = nnx.merge(graphdef, params, jax.tree.map(lambda a: a, rest))
    return jnp.sum(model(x) ** 2)

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 2)))
  start = time.perf_counter()
  compiled = fn.lower(params, rest, x).compile()
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  return seconds, (mem.temp_size_in_bytes / _MIB if mem is not None else None)


def reversible_rows(depths: Sequence[int], *, sizes: dict, batch: int, length: int) -> list:
  rows = []
  for layers in depths:
    _, plain = compile_grad(abstract_stack(layers, sizes), batch, length)
    _, rev = compile_grad(abstract_stack(layers, sizes, reversible=True), batch, length)
    rows.append(
      {
        "layers": layers,
        "plain_temp_mib": plain,
        "reversible_temp_mib": rev,
        "ratio": rev / plain if plain and rev is not None else None,
      }
    )
    print(rows[-1], file=sys.stderr, flush=True)
  return rows


def scan_rows(
  depths: Sequence[int], *, sizes: dict, batch: int, length: int, remat_policy: str
) -> list:
  rows = []
  for layers in depths:
    settings = {
      "unrolled": {},
      "scan": {"scan_layers": True},
      "remat": {"scan_layers": True, "remat_policy": remat_policy},
    }
    row = {"layers": layers, "remat_policy": remat_policy}
    for name, options in settings.items():
      seconds, temp = compile_grad(abstract_stack(layers, sizes, **options), batch, length)
      row[f"{name}_compile_s"], row[f"{name}_temp_mib"] = seconds, temp
    rows.append(row)
    print(row, file=sys.stderr, flush=True)
  return rows


def _check_flags(args: argparse.Namespace) -> tuple[list[int], list[int], dict]:
  """Raises ConfigError naming the first bad flag; returns (depths, depths, sizes)."""
  reversible = report.positive_ints(args.reversible_layers, "--reversible_layers")
  scan = report.positive_ints(args.scan_layers, "--scan_layers")
  report.check_positive(args, ("batch", "length", "features", "num_heads", "mlp_dim"))
  report.check_divisible(args, "features", "num_heads")
  if args.remat_policy not in REMAT_POLICIES or args.remat_policy == "none":
    valid = ", ".join(p for p in REMAT_POLICIES if p != "none")
    raise ConfigError(f"--remat_policy={args.remat_policy!r} is unknown; valid: {valid}.")
  attention.get_class(args.attention)  # A ConfigError listing the valid names.
  sizes = dict(
    features=args.features,
    num_heads=args.num_heads,
    head_dim=args.features // args.num_heads,
    mlp_dim=args.mlp_dim,
    attention_name=args.attention,
  )
  return reversible, scan, sizes


@report.one_line_errors
def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reversible_layers", default="2,4,8,16")
  parser.add_argument("--scan_layers", default="4,12,24")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=1024)
  parser.add_argument("--features", type=int, default=128)
  parser.add_argument("--num_heads", type=int, default=4)
  parser.add_argument("--mlp_dim", type=int, default=512)
  parser.add_argument("--attention", default="softmax", help="a registered attention name")
  parser.add_argument("--remat_policy", default="full", help="the scan+remat column's policy")
  report.add_out_flag(parser, "stack_options_reversible.md/.csv and stack_options_scan.md/.csv")
  parser.add_argument(
    "--dry_run",
    action="store_true",
    help="check the flags, --out and that every stack builds; compile nothing",
  )
  args = parser.parse_args(argv)
  out = report.prepare_out(args.out)  # Checked now, not after the compiles.
  reversible_depths, scan_depths, sizes = _check_flags(args)
  if args.dry_run:
    for layers in reversible_depths:
      abstract_stack(layers, sizes, reversible=True)
    for layers in scan_depths:
      abstract_stack(layers, sizes, scan_layers=True, remat_policy=args.remat_policy)
    print(report.dry_run_line("every stack builds", out))
    return 0
  shape = dict(sizes=sizes, batch=args.batch, length=args.length)
  reversible = reversible_rows(reversible_depths, **shape)
  scan = scan_rows(scan_depths, remat_policy=args.remat_policy, **shape)
  setting = (
    f"Causal Stack, {args.attention} attention, {args.features} wide, {args.num_heads} heads, "
    f"MLP {args.mlp_dim}; batch {args.batch}, length {args.length}, float32; "
    "value_and_grad of sum(stack(x)**2) w.r.t. params and x, compiled only. "
    f"{report.device_line(cpu=True)}"
  )
  reversible_table = report.markdown_table(
    reversible,
    REVERSIBLE_COLUMNS,
    "Reversible layers: compiled temporaries, plain vs reversible=True. " + setting,
    ("temp MiB = memory_analysis().temp_size_in_bytes (parameters and inputs excluded).",),
  )
  scan_table = report.markdown_table(
    scan,
    SCAN_COLUMNS,
    f"scan_layers: compile time and temporaries, unrolled vs scan vs scan + "
    f"remat_policy={args.remat_policy!r}. " + setting,
    ("compile s = one wall-time measurement of .lower().compile().",),
  )
  print(reversible_table + "\n\n" + scan_table)
  if out:
    report.write_tables(
      out, "stack_options_reversible", reversible_table, reversible, REVERSIBLE_CSV_KEYS
    )
    report.write_tables(out, "stack_options_scan", scan_table, scan, SCAN_CSV_KEYS)
  return 0


if __name__ == "__main__":
  sys.exit(main())
