"""Training memory and speed of the byte-level decoder LM with each causal attention.

For every causal attention (`attention.available(causal=True)`) and context
length L, a `DecoderLM(memory="none")` of the smoke sizes of
configs/lm/byte_lm.py (flags change them) is built with segment_length = L
and the variant's keyword arguments of a full (non-smoke) byte_lm run at that
length: `config_lib.attention_defaults(name, smoke=False, sequence_length=L)`,
i.e. each variant's own defaults, with `max_length = L` for the variants with
length-sized parameters. One training step is `jax.value_and_grad` of the
next-byte cross-entropy over a [batch, L] segment (inputs and their targets,
the stream shifted by one, as in training), with respect to the parameters.

- memory: XLA's `memory_analysis()` of the compiled step: temporaries, and
  temporaries + arguments (parameters, inputs, targets); deterministic for a
  backend and JAX version. Every cell is compiled.
- speed: training tokens/s, batch * L / the median wall time of `--steps`
  runs of the same compiled step after one warm-up; only up to
  `--time_max_length` (softmax at 16K is slow on a CPU), "-" above it.

Both are reported as absolute values and as ratios to softmax at the same
length, measured in the same run, with the device named. The table also gives
each variant's empirical scaling exponent, log(value ratio) / log(length
ratio) between its shortest and longest length (1 = linear in L, 2 =
quadratic). Output: the markdown table (printed, and `lm_attention.md`) and
`lm_attention.csv` in `--out`.

    python -m efficient_transformers.benchmarks.lm_attention --out=benchmarks_out
    python -m efficient_transformers.benchmarks.lm_attention --attentions=softmax,local \\
        --lengths=512,2048 --num_layers=12 --emb_dim=512 --num_heads=8 --mlp_dim=2048 --out=...
"""

import argparse
import functools
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from efficient_transformers import attention
from efficient_transformers.benchmarks import report
from efficient_transformers.errors import ConfigError, UserError
from efficient_transformers.models.decoder import DecoderLM
from efficient_transformers.training import config_lib

VOCAB = 257
# The smoke model of configs/lm/byte_lm.py (qkv_dim = emb_dim there too).
SMOKE_SIZES = dict(num_layers=2, emb_dim=64, num_heads=4, mlp_dim=256)
_MIB = 2**20

# (key, column title, format) of the markdown table; the CSV holds CSV_KEYS.
COLUMNS = (
  ("attention", "attention", "s"),
  ("length", "L", "d"),
  ("tokens_per_s", "train tokens/s", ".0f"),
  ("speed_vs_softmax", "speed vs softmax", ".2f"),
  ("temp_mib", "temp MiB", ".1f"),
  ("total_mib", "temp + args MiB", ".1f"),
  ("memory_vs_softmax", "memory vs softmax", ".3f"),
)
CSV_KEYS = (
  "attention", "length", "batch", "step_s", "tokens_per_s", "speed_vs_softmax", "temp_mib",
  "total_mib", "temp_vs_softmax", "memory_vs_softmax", "attention_kwargs", "error",
)  # fmt: skip


def variant_kwargs(name: str, length: int) -> dict:
  """The attention kwargs byte_lm.py gives variant `name` in a full run at segment `length`."""
  return config_lib.attention_defaults(name, smoke=False, sequence_length=length).to_dict()


def build_model(name: str, length: int, sizes: dict, dtype) -> DecoderLM:
  """The byte_lm model (memory="none", sinusoidal positions) without dropout, for one cell."""
  return DecoderLM(
    vocab_size=VOCAB,
    num_layers=sizes["num_layers"],
    emb_dim=sizes["emb_dim"],
    num_heads=sizes["num_heads"],
    qkv_dim=sizes["emb_dim"],
    mlp_dim=sizes["mlp_dim"],
    segment_length=length,
    dropout_rate=0.0,
    attention_dropout_rate=0.0,
    memory="none",
    attention_name=name,
    attention_kwargs=variant_kwargs(name, length),
    positional="sinusoidal",
    dtype=None if dtype == jnp.float32 else dtype,
    rngs=nnx.Rngs(0),
  )


def train_step(graphdef: nnx.GraphDef) -> Callable:
  """jit of (params, rest, inputs [batch, L], targets [batch, L]) -> (loss, grads)."""

  def step(params, rest, inputs, targets):
    def loss_fn(p):
      # Fresh Variables for this trace (as training/steps.py): variants that draw
      # from an RNG stream (reformer's hashes) update its count inside the grad trace.
      logits, _, _ = nnx.merge(graphdef, p, jax.tree.map(lambda x: x, rest))(inputs, {})
      return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    return jax.value_and_grad(loss_fn)(params)

  return jax.jit(step)


def step_and_arguments(name: str, length: int, *, sizes: dict, batch: int, dtype, concrete: bool):
  """(jitted train step, (params, rest, inputs, targets)) for one cell.

  With `concrete` the arguments are arrays (random ids from a fixed seed),
  ready to run; otherwise jax.ShapeDtypeStructs, enough to compile.
  """
  create = functools.partial(build_model, name, length, sizes, dtype)
  model = create() if concrete else nnx.eval_shape(create)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  shape = (batch, length)
  if concrete:
    ids = np.random.default_rng(0).integers(1, VOCAB, size=(batch, length + 1))
    inputs, targets = jnp.asarray(ids[:, :-1], jnp.int32), jnp.asarray(ids[:, 1:], jnp.int32)
  else:
    inputs = targets = jax.ShapeDtypeStruct(shape, jnp.int32)
  return train_step(graphdef), (params, rest, inputs, targets)


def compile_only_options() -> dict | None:
  """Compiler options for cells that are compiled but not run.

  memory_analysis() comes from XLA's buffer assignment, which precedes LLVM
  code generation: skipping LLVM's optimizations shortens CPU compiles and
  leaves the numbers unchanged (benchmarks/memory.py does the same). Timed
  cells are compiled with the defaults, since they run.
  """
  return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None


def measure(
  name: str, length: int, *, sizes: dict, batch: int, dtype, steps: int, time_it: bool
) -> dict:
  """One attention at one length: compiled memory, and training tokens/s if `time_it`."""
  row = {"attention": name, "length": length, "batch": batch}
  row["attention_kwargs"] = " ".join(f"{k}={v}" for k, v in variant_kwargs(name, length).items())
  try:
    step, args = step_and_arguments(
      name, length, sizes=sizes, batch=batch, dtype=dtype, concrete=time_it
    )
    compiled = step.lower(*args).compile(None if time_it else compile_only_options())
  except UserError as e:
    return {**row, "error": str(e)}
  mem = compiled.memory_analysis()
  if mem is not None:
    row["temp_mib"] = mem.temp_size_in_bytes / _MIB
    row["total_mib"] = (mem.temp_size_in_bytes + mem.argument_size_in_bytes) / _MIB
  if time_it:
    jax.block_until_ready(compiled(*args))  # Warm-up.
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times.append(time.perf_counter() - t0)
    row["step_s"] = statistics.median(times)
    row["tokens_per_s"] = batch * length / row["step_s"]
  return row


def with_ratios(rows: list[dict]) -> list[dict]:
  """Adds speed and memory ratios to softmax at the same length (softmax: exactly 1)."""
  ref = {r["length"]: r for r in rows if r["attention"] == "softmax"}
  for r in rows:
    base = ref.get(r["length"], {})
    for key, out in (
      ("tokens_per_s", "speed_vs_softmax"),
      ("temp_mib", "temp_vs_softmax"),
      ("total_mib", "memory_vs_softmax"),
    ):
      if key in r and key in base:
        r[out] = r[key] / base[key]
  return rows


def scaling_exponent(rows: list[dict], key: str) -> float | None:
  """log(value ratio) / log(length ratio) between the shortest and longest lengths with `key`."""
  points = sorted((r["length"], r[key]) for r in rows if r.get(key))
  if len(points) < 2 or points[0][0] == points[-1][0]:
    return None
  (l0, v0), (l1, v1) = points[0], points[-1]
  return math.log(v1 / v0) / math.log(l1 / l0)


def markdown(rows: list[dict], header: str, notes: Sequence[str] = ()) -> str:
  """The per-cell table, then each variant's scaling exponents, under `header`."""
  lines = [
    report.markdown_table(rows, COLUMNS, header, error_column=2),
    "",
    "Scaling with L (exponent of L between the shortest and the longest length measured; "
    "1 = linear, 2 = quadratic):",
    "",
    "| attention | temp memory | step time |",
    "|---|---:|---:|",
  ]
  for name in dict.fromkeys(r["attention"] for r in rows):
    mine = [r for r in rows if r["attention"] == name and "error" not in r]
    cells = [scaling_exponent(mine, key) for key in ("temp_mib", "step_s")]
    lines.append(
      f"| {name} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |"
    )
  if notes:
    lines += ["", *(f"- {note}" for note in notes)]
  return "\n".join(lines)


def _attention_names(text: str) -> list[str]:
  """The --attentions names, checked causal, with softmax first (every ratio needs it)."""
  causal = attention.available(causal=True)
  names = [n.strip() for n in text.split(",") if n.strip()]
  if not names:
    raise ConfigError(f"--attentions={text!r} names no attention; valid: {', '.join(causal)}.")
  for n in names:
    if n not in causal:
      known = n in attention.available()
      raise ConfigError(
        f"--attentions: {n!r} is {'not a causal attention' if known else 'an unknown attention'}; "
        f"the decoder LM takes: {', '.join(causal)}."
      )
  names = list(dict.fromkeys(names))
  if "softmax" in names:
    names.remove("softmax")
  return ["softmax", *names]


def _check_flags(args: argparse.Namespace) -> tuple[list[str], list[int]]:
  """Raises ConfigError naming the first bad flag; returns (attention names, lengths)."""
  names = _attention_names(args.attentions)
  lengths = report.positive_ints(args.lengths, "--lengths")
  report.check_positive(args, ("batch", "steps", "num_layers", "emb_dim", "num_heads", "mlp_dim"))
  report.check_divisible(args, "emb_dim", "num_heads")
  return names, lengths


@report.one_line_errors
def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--attentions", default=",".join(attention.available(causal=True)), help="causal ones only"
  )
  parser.add_argument("--lengths", default="1024,4096,16384", help="context lengths L")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--steps", type=int, default=3, help="timed steps per cell")
  parser.add_argument(
    "--time_max_length", type=int, default=4096, help="time only up to this length"
  )
  parser.add_argument("--num_layers", type=int, default=SMOKE_SIZES["num_layers"])
  parser.add_argument("--emb_dim", type=int, default=SMOKE_SIZES["emb_dim"])
  parser.add_argument("--num_heads", type=int, default=SMOKE_SIZES["num_heads"])
  parser.add_argument("--mlp_dim", type=int, default=SMOKE_SIZES["mlp_dim"])
  report.add_out_flag(parser, "lm_attention.md and lm_attention.csv")
  parser.add_argument(
    "--dry_run",
    action="store_true",
    help="check the flags, --out and that every model builds (abstractly); run nothing",
  )
  args = parser.parse_args(argv)
  sizes = {k: getattr(args, k) for k in SMOKE_SIZES}
  dtype = jnp.dtype(args.dtype)
  out = report.prepare_out(args.out)  # Checked now, not after the measurements.
  names, lengths = _check_flags(args)
  if args.dry_run:
    for length in lengths:
      for name in names:
        nnx.eval_shape(functools.partial(build_model, name, length, sizes, dtype))
    print(report.dry_run_line(f"{len(names)} attention(s) x {len(lengths)} length(s) build", out))
    return 0
  rows = []
  for length in lengths:
    for name in names:
      row = measure(
        name,
        length,
        sizes=sizes,
        batch=args.batch,
        dtype=dtype,
        steps=args.steps,
        time_it=length <= args.time_max_length,
      )
      print(row, file=sys.stderr, flush=True)
      rows.append(row)
  rows = with_ratios(rows)
  header = (
    f"Training step of the byte-level DecoderLM (memory=none) per causal attention: "
    f"{args.num_layers} layers, {args.emb_dim} wide, {args.num_heads} heads, MLP "
    f"{args.mlp_dim}; batch {args.batch}, {args.dtype}, segment = L. "
    f"{report.device_line(cpu=True)}"
  )
  notes = (
    "Attention kwargs: `config_lib.attention_defaults(name, smoke=False, sequence_length=L)`, "
    "what configs/lm/byte_lm.py gives a full run (each variant's defaults; max_length = L); "
    "per cell in the CSV.",
    "Step: jax.value_and_grad of the next-byte cross-entropy over a [batch, L] segment.",
    "Memory: XLA memory_analysis() of the compiled step; temp = temporaries, "
    "temp + args adds the parameters, inputs and targets; memory vs softmax is of temp + args.",
    f"Speed: batch * L / median of {args.steps} steps after a warm-up, timed up to "
    f"L = {args.time_max_length} ('-' above); speed vs softmax > 1 is faster than softmax.",
  )
  table = markdown(rows, header, notes)
  print(table)
  if out:
    report.write_tables(out, "lm_attention", table, rows, CSV_KEYS)
  return 0


if __name__ == "__main__":
  sys.exit(main())
