"""Speed and memory of every attention variant and baseline mixer, LRA Table 2 protocol.

The model is LRA's byte-level Text classifier (4 layers, 256 wide, 4 heads,
qkv 256, MLP 1024, 257-token vocabulary), one step being forward + backward
of the classification loss. For each variant and length:

- memory: XLA's `memory_analysis()` of the compiled step (temporaries, and
  temporaries + arguments), deterministic for a backend and JAX version;
- time: the median wall time of `--steps` executed steps after one warm-up,
  measured only up to `--time_max_length` (softmax at 16K is hours on a CPU).

Both are reported as ratios to `softmax` measured in the same run, with the
device named. Output: a markdown table (printed and `attention.md`),
`attention.csv`, and a log-log plot `attention.png` of time and memory
against length.

    python -m efficient_transformers.benchmarks.attention --out=benchmarks_out
    python -m efficient_transformers.benchmarks.attention --attentions=softmax,memory_efficient \\
        --lengths=1024,2048,4096 --batch=8 --dtype=bfloat16 --out=...
"""

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from efficient_transformers import paths
from efficient_transformers.benchmarks import report
from efficient_transformers.errors import UserError
from efficient_transformers.models import EncoderClassifier, mixing

# LRA's byte-level Text model (LRA_REFERENCE.md, Table 2 protocol).
TEXT_MODEL = dict(num_layers=4, emb_dim=256, num_heads=4, qkv_dim=256, mlp_dim=1024)
VOCAB = 257
_MIB = 2**20

# Per-variant settings for the benchmark: the original LRA code's defaults where
# it had them (LRA_REFERENCE.md), else the variant's own defaults.
BENCH_KWARGS = {
  "local": dict(block_size=64),
  "sparse": dict(block_size=50),
  "bigbird": dict(block_size=64, num_random_blocks=3),
  "reformer": dict(chunk_size=10, num_hashes=1, num_buckets=10),
  "sinkhorn": dict(block_size=50),
  "linformer": dict(k=16),
  "performer": dict(kernel="relu", num_features=256),
}

# The attention issue's targets at L=4096 (memory as a fraction of softmax's) and the
# largest memory growth from 4K to 16K; None = no target (exact or O(L^2) by definition).
MEMORY_TARGET_AT_4K = {
  **dict.fromkeys(
    ("local", "longformer", "linformer", "performer", "linear", "sinkhorn", "nystromformer"), 0.2
  ),
  **dict.fromkeys(("bigbird", "sparse", "reformer"), 0.3),
}
GROWTH_TARGET_4K_TO_16K = 4.5


def _variant_kwargs(name: str, length: int) -> dict:
  kwargs = dict(BENCH_KWARGS.get(name, {}))
  declared = mixing.variant_kwargs(name)
  if "max_length" in declared:
    kwargs["max_length"] = length
  return {k: v for k, v in kwargs.items() if k in declared}


def _create(name: str, length: int, dtype, num_layers: int) -> EncoderClassifier:
  return EncoderClassifier(
    num_classes=2,
    pooling="cls",
    classifier_dim=TEXT_MODEL["mlp_dim"],
    vocab_size=VOCAB,
    max_length=length,
    attention_name=name,
    attention_kwargs=_variant_kwargs(name, length + 1),
    dropout_rate=0.0,
    attention_dropout_rate=0.0,
    dtype=None if dtype == jnp.float32 else dtype,
    rngs=nnx.Rngs(0),
    **dict(TEXT_MODEL, num_layers=num_layers),
  )


def build_abstract(name: str, length: int, *, dtype, num_layers: int) -> None:
  """Builds one cell's model abstractly (shapes only): what --dry_run checks."""
  nnx.eval_shape(lambda: _create(name, length, dtype, num_layers))


def build_step(name: str, length: int, batch: int, dtype, num_layers: int):
  """(jitted step, abstract params, abstract batch) for one variant and length."""

  def create():
    return _create(name, length, dtype, num_layers)

  graphdef, abstract_params, rest = nnx.split(nnx.eval_shape(create), nnx.Param, ...)
  rest = jax.jit(lambda: nnx.split(create(), nnx.Param, ...)[2])()

  def step(params, ids, labels):
    def loss_fn(p):
      logits = nnx.merge(graphdef, p, jax.tree.map(lambda x: x, rest))(ids)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return jax.value_and_grad(loss_fn)(params)

  ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  return jax.jit(step), nnx.to_pure_dict(abstract_params), ids, labels, create


def measure(
  name: str,
  length: int,
  *,
  batch: int,
  dtype,
  steps: int,
  time_it: bool,
  num_layers: int = 4,
  memory_limit_mib: float | None = None,
) -> dict:
  """One variant at one length: compiled memory, and the median step time if `time_it`.

  A step whose compiled memory exceeds `memory_limit_mib` (e.g. the device's) is
  not run: its row gets a "note" saying why, instead of an out-of-memory crash.
  """
  row = {"attention": name, "length": length}
  try:
    step, abs_params, ids, labels, create = build_step(name, length, batch, dtype, num_layers)
    compiled = step.lower(abs_params, ids, labels).compile()
  except UserError as e:
    return {**row, "error": str(e)}
  mem = compiled.memory_analysis()
  if mem is not None:
    row["temp_mib"] = mem.temp_size_in_bytes / _MIB
    row["total_mib"] = (mem.temp_size_in_bytes + mem.argument_size_in_bytes) / _MIB
  if time_it and memory_limit_mib and row.get("total_mib", 0) > memory_limit_mib:
    row["note"] = (
      f"not timed: needs {row['total_mib']:.0f} MiB, the limit is {memory_limit_mib:.0f}"
    )
    time_it = False
  if time_it:
    params = nnx.to_pure_dict(nnx.split(create(), nnx.Param, ...)[1])
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(1, VOCAB, size=ids.shape), jnp.int32)
    y = jnp.asarray(rng.integers(0, 2, size=labels.shape), jnp.int32)
    jax.block_until_ready(compiled(params, x, y))  # Warm-up.
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(params, x, y))
      times.append(time.perf_counter() - t0)
    row["step_s"] = statistics.median(times)
  return row


def with_ratios(rows: list[dict]) -> list[dict]:
  """Adds time and memory ratios to softmax at the same length."""
  ref = {r["length"]: r for r in rows if r["attention"] == "softmax"}
  for r in rows:
    base = ref.get(r["length"], {})
    for key, out in (("step_s", "time_vs_softmax"), ("total_mib", "memory_vs_softmax")):
      if key in r and key in base:
        r[out] = r[key] / base[key]
  return rows


# (key, column title, format) of the markdown table; the CSV holds CSV_KEYS.
COLUMNS = (
  ("attention", "attention", "s"),
  ("length", "L", "d"),
  ("step_ms", "step ms", ".1f"),
  ("time_vs_softmax", "time vs softmax", ".2f"),
  ("total_mib", "memory MiB", ".1f"),
  ("memory_vs_softmax", "memory vs softmax", ".3f"),
)
CSV_KEYS = (
  "attention", "length", "step_s", "time_vs_softmax", "temp_mib", "total_mib",
  "memory_vs_softmax", "error",
)  # fmt: skip


def markdown(rows: list[dict], header: str) -> str:
  """The per-cell table under `header`; a failed cell shows its error after its length."""
  rows = [{**r, "step_ms": None if r.get("step_s") is None else r["step_s"] * 1e3} for r in rows]
  return report.markdown_table(rows, COLUMNS, header, error_column=2)


def targets(rows: list[dict]) -> str:
  """A markdown table of each variant against the issue's targets at 4K (and 4K -> 16K)."""
  cell = {(r["attention"], r["length"]): r for r in rows if "error" not in r}
  names = [n for n in dict.fromkeys(r["attention"] for r in rows) if (n, 4096) in cell]
  if not names:
    return ""
  lines = [
    "| attention | memory vs softmax @4K (target) | time vs softmax @4K | memory 16K / 4K |",
    "|---|---:|---:|---:|",
  ]
  for name in names:
    at4 = cell[(name, 4096)]
    mem, target = at4.get("memory_vs_softmax"), MEMORY_TARGET_AT_4K.get(name)
    mem_text = "-" if mem is None else f"{mem:.3f}"
    if mem is not None and target is not None:
      mem_text += f" ({'ok' if mem <= target else 'MISSED'} <= {target})"
    time_ratio = at4.get("time_vs_softmax")
    time_text = "-" if time_ratio is None else f"{time_ratio:.2f}"
    if time_ratio is not None and target is not None:
      time_text += " (ok < 1)" if time_ratio < 1 else " (MISSED < 1)"
    at16 = cell.get((name, 16384), {})
    growth_text = "-"
    if "total_mib" in at16 and "total_mib" in at4:
      growth = at16["total_mib"] / at4["total_mib"]
      growth_text = f"{growth:.2f}"
      if target is not None:
        ok = growth <= GROWTH_TARGET_4K_TO_16K
        growth_text += f" ({'ok' if ok else 'MISSED'} <= {GROWTH_TARGET_4K_TO_16K})"
    lines.append(f"| {name} | {mem_text} | {time_text} | {growth_text} |")
  return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> bool:
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed; skipping the plot.", file=sys.stderr)
    return False
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
  for i, name in enumerate(dict.fromkeys(r["attention"] for r in rows)):
    mine = [r for r in rows if r["attention"] == name]
    # Matplotlib cycles 10 colors: later lines get another line style.
    style = dict(marker="os^"[i // 10 % 3], linestyle=("-", "--", ":")[i // 10 % 3])
    for ax, key in zip(axes, ("step_s", "total_mib"), strict=True):
      pts = [(r["length"], r[key]) for r in mine if key in r]
      if pts:
        ax.plot(*zip(*pts, strict=True), label=name, **style)
  for ax, label in zip(axes, ("step time (s)", "compiled memory (MiB)"), strict=True):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
  axes[1].legend(fontsize=8)
  fig.suptitle(title, fontsize=9)
  report.write_png(fig, path, dpi=120)
  return True


@report.one_line_errors
def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--attentions",
    default=",".join(mixing.available()),
    help="attentions and baseline mixers (lstm, gru, conv, s4d, lru, s5); default: all",
  )
  parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
  parser.add_argument("--batch", type=int, default=32, help="LRA used 32.")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--steps", type=int, default=3, help="timed steps per cell")
  parser.add_argument(
    "--time_max_length", type=int, default=4096, help="time only up to this length"
  )
  parser.add_argument("--num_layers", type=int, default=4, help="LRA: 4 (fewer for quick checks)")
  parser.add_argument(
    "--memory_limit_mib",
    type=float,
    default=None,
    help="do not time a cell whose compiled step needs more (e.g. the machine's RAM)",
  )
  report.add_out_flag(parser, "attention.md, attention.csv and attention.png")
  parser.add_argument(
    "--dry_run",
    action="store_true",
    help="check the flags, --out and that every variant builds at every length; run nothing",
  )
  args = parser.parse_args(argv)
  out = report.prepare_out(args.out)  # Checked now, not after hours of measuring.
  names = [n.strip() for n in args.attentions.split(",") if n.strip()]
  for n in names:
    mixing.get_class(n)
  if "softmax" not in names:
    names.insert(0, "softmax")  # The reference every ratio needs.
  lengths = report.positive_ints(args.lengths, "--lengths")
  dtype = jnp.dtype(args.dtype)
  if args.dry_run:
    for length in lengths:
      for name in names:
        build_abstract(name, length, dtype=dtype, num_layers=args.num_layers)
    print(report.dry_run_line(f"{len(names)} variant(s) x {len(lengths)} length(s) build", out))
    return 0
  rows = []
  for length in lengths:
    for name in names:
      row = measure(
        name,
        length,
        batch=args.batch,
        dtype=dtype,
        steps=args.steps,
        time_it=length <= args.time_max_length,
        num_layers=args.num_layers,
        memory_limit_mib=args.memory_limit_mib,
      )
      print(row, file=sys.stderr, flush=True)
      rows.append(row)
  rows = with_ratios(rows)
  header = (
    f"Attention step (forward + backward), LRA Text model ({args.num_layers} layers), "
    f"batch {args.batch}, {args.dtype}. {report.device_line(cpu=True)} "
    "Memory: compiled temporaries + arguments; "
    f"time: median of {args.steps} steps, measured up to L={args.time_max_length}."
  )
  table = markdown(rows, header)
  summary = targets(rows)
  if summary:
    table += "\n\nAgainst the targets (sub-quadratic variants):\n\n" + summary
  print(table)
  if out:
    report.write_tables(out, "attention", table, rows, CSV_KEYS)
    with paths.writing(f"--out={out}"):
      title = f"{report.device_name(cpu=True)}, batch {args.batch}, {args.dtype}"
      plot(rows, out / "attention.png", title)
  return 0


if __name__ == "__main__":
  sys.exit(main())
