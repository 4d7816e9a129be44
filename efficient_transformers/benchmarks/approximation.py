r"""How close each approximate attention is to exact softmax attention, as its knob grows.

For each variant and knob value, on the same q, k, v, the relative Frobenius error
against exact softmax attention of

- its map (`attention.maps.attention_weights`), ||A - A_exact||_F / ||A_exact||_F, and
- its output, ||A v - A_exact v||_F / ||A_exact v||_F,

over the real query rows, the mean over `--seeds` draws of the variant's own randomness
(random features, projections, hashes, random blocks). The variants and knobs:

  performer      num_features      FAVOR+ (softmax kernel)
  reformer       num_hashes        against its own full attention (shared query-key,
                                   one chunk: what LSH approximates), not softmax of q k
  nystromformer  num_landmarks     without its convolution branch
  linformer      k                 random (untrained) length projections
  local          block_size        window = 3 blocks (its default neighbours)
  bigbird        num_window_blocks blocks of L / 32, 2 global, 3 random

q, k and v come from two sources: random (`--length`, `--heads`, `--head_dim`, Gaussian,
so the logits have unit variance), and, with `--config` and `--workdir`, the first
attention layer of a trained run (its projections of the layer's inputs for
`--num_examples` test examples; the first power-of-two many positions, the knob grid
scaled to that length).

    python -m efficient_transformers.benchmarks.approximation --out=benchmarks_out
    python -m efficient_transformers.benchmarks.approximation \
        --config=configs/lra/listops.py:smoke --workdir=workdirs/listops_smoke --out=...

Writes approximation.md (the table), approximation.csv and approximation.png (error
against knob, one panel per variant).
"""

import argparse
import math
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_transformers import attention, paths
from efficient_transformers.attention import maps
from efficient_transformers.benchmarks import report
from efficient_transformers.errors import ConfigError

VARIANTS = ("performer", "reformer", "nystromformer", "linformer", "local", "bigbird")


def knob_grid(name: str, length: int) -> tuple[str, list[int], dict]:
  """(knob name, its values, fixed kwargs) of variant `name` at sequence length `length`."""
  if name == "performer":
    return "num_features", [16, 32, 64, 128, 256, 512], {"kernel": "softmax"}
  if name == "reformer":
    chunk = max(1, length // 16)
    return "num_hashes", [1, 2, 4, 8], {"chunk_size": chunk, "num_buckets": 16}
  if name == "nystromformer":
    return "num_landmarks", _fractions(length, (32, 16, 8, 4, 2)), {}
  if name == "linformer":
    return "k", _fractions(length, (16, 8, 4, 2, 1)), {"max_length": length}
  if name == "local":
    return "block_size", _fractions(length, (32, 16, 8, 4, 2)), {}
  if name == "bigbird":
    block = max(1, length // 32)
    blocks = length // block
    windows = sorted({w for w in (1, 3, 7, 15, 2 * blocks - 1) if w <= 2 * blocks - 1})
    return "num_window_blocks", windows, {"block_size": block}
  raise ConfigError(f"no knob for attention {name!r}; variants: {', '.join(VARIANTS)}.")


def _fractions(length: int, divisors: Sequence[int]) -> list[int]:
  return sorted({max(1, length // d) for d in divisors})


def relative_error(approx: np.ndarray, exact: np.ndarray, rows: np.ndarray) -> float:
  """||approx - exact||_F / ||exact||_F over the real query rows (rows [batch, L] bool) of
  maps [batch, heads, L, L] or outputs [batch, L, heads, d]."""
  if approx.shape[1] != rows.shape[1]:  # A map: queries on axis 2.
    approx, exact = approx.transpose(0, 2, 1, 3), exact.transpose(0, 2, 1, 3)
  a, e = approx[rows], exact[rows]
  return float(np.linalg.norm(a - e) / np.linalg.norm(e))


def _map(name: str, queries, keys, mask, *, seed: int, **kwargs) -> np.ndarray:
  """The map of `name` with its own parameters drawn from `seed` (a fresh module); kwargs
  are the variant's (one of them may be Linformer's `k`)."""
  heads, head_dim = queries.shape[2], queries.shape[3]
  module = attention.make(
    name,
    in_features=heads * head_dim,
    num_heads=heads,
    head_dim=head_dim,
    rngs=nnx.Rngs(seed),
    **kwargs,
  )
  if name == "reformer":
    keys = queries  # Shared query-key: the map normalises the keys itself.
  length = queries.shape[1]
  return np.asarray(
    maps.attention_weights(name, queries, keys, mask=mask, max_length=length, **module.map_params())
  )


def exact_map(name: str, q, k, mask, **fixed) -> np.ndarray:
  """The exact attention `name` approximates: softmax, or Reformer's full shared-QK one."""
  if name == "reformer":
    full = dict(fixed, chunk_size=q.shape[1], num_hashes=1)
    return _map("reformer", q, q, mask, seed=0, **full)
  return np.asarray(maps.attention_weights("softmax", q, k, mask=mask, max_length=q.shape[1]))


def rows_for(name: str, source: str, q, k, v, mask, *, seeds: int) -> list[dict]:
  """One row per knob value of variant `name` on q, k, v [batch, L, heads, head_dim]."""
  length = q.shape[1]
  knob, values, fixed = knob_grid(name, length)
  rows_mask = np.ones(q.shape[:2], bool) if mask is None else np.asarray(mask)
  exact = exact_map(name, q, k, mask, **fixed)
  exact_out = np.asarray(maps.apply_weights(exact, v))
  rows = []
  for value in values:
    map_errors, out_errors = [], []
    for seed in range(seeds):
      approx = _map(name, q, k, mask, seed=seed + 1, **fixed, **{knob: value})
      approx_out = np.asarray(maps.apply_weights(approx, v))
      map_errors.append(relative_error(approx, exact, rows_mask))
      out_errors.append(relative_error(approx_out, exact_out, rows_mask))
    rows.append(
      {
        "attention": name,
        "source": source,
        "length": length,
        "knob": knob,
        "value": value,
        "map_error": float(np.mean(map_errors)),
        "output_error": float(np.mean(out_errors)),
      }
    )
    print(rows[-1], file=sys.stderr, flush=True)
  return rows


def random_qkv(batch: int, length: int, heads: int, head_dim: int, seed: int = 0):
  """Gaussian q, k, v (the scaled logits q k / sqrt(head_dim) have unit variance)."""
  keys = jax.random.split(jax.random.key(seed), 3)
  shape = (batch, length, heads, head_dim)
  q, k, v = (jax.random.normal(key, shape) for key in keys)
  return q, k, v, None


def trained_qkv(config, workdir, *, num_examples: int):
  """q, k, v of the first attention layer of a trained run, for test examples 0..n-1,
  cut to the first power-of-two many positions; and their key mask."""
  from efficient_transformers.training import eval_lib

  model, task, setup = eval_lib.restore_model(config, workdir)
  arrays = task.splits["test"]
  inputs = [jnp.asarray(arrays[name][:num_examples]) for name in setup.input_names]
  with maps.capture() as records:
    model(*inputs, deterministic=True)
  first = next((r for r in records if r["weights"] is not None), None)
  if first is None:
    raise ConfigError(f"{workdir}: its model has no self-attention layer to take q and k from.")
  module, x, mask = first["module"], first["inputs"], first["mask"]
  length = 2 ** int(math.log2(x.shape[1]))
  q, k = module.rotate(module.query(x)), module.rotate(module.key(x))
  v = module.value(x)
  cut = lambda a: a[:, :length]
  return cut(q), cut(k), cut(v), None if mask is None else mask[:, :length]


COLUMNS = (
  ("attention", "attention", "s"),
  ("source", "q, k", "s"),
  ("length", "L", "d"),
  ("knob", "knob", "s"),
  ("value", "value", "d"),
  ("map_error", "map error", ".4f"),
  ("output_error", "output error", ".4f"),
)
CSV_KEYS = tuple(key for key, _, _ in COLUMNS)


def plot(rows: list[dict], path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(dict.fromkeys(r["attention"] for r in rows))
  fig, axes = plt.subplots(1, len(names), figsize=(3.3 * len(names), 3.4), squeeze=False)
  for ax, name in zip(axes[0], names, strict=True):
    mine = [r for r in rows if r["attention"] == name]
    for source in dict.fromkeys(r["source"] for r in mine):
      pts = [(r["value"], r["map_error"], r["output_error"]) for r in mine if r["source"] == source]
      values, map_errors, out_errors = zip(*pts, strict=True)
      ax.plot(values, map_errors, marker="o", label=f"map, {source}")
      ax.plot(values, out_errors, marker="s", linestyle="--", label=f"output, {source}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(mine[0]["knob"])
    ax.set_title(name, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
  axes[0][0].set_ylabel("relative Frobenius error")
  axes[0][-1].legend(fontsize=7)
  report.write_png(fig, path)


@report.one_line_errors
def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--attentions", default=",".join(VARIANTS))
  parser.add_argument("--length", type=int, default=512)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--seeds", type=int, default=3, help="draws of each variant's randomness")
  parser.add_argument("--config", default=None, help="a trained run's config (FILE[:ARGS])")
  parser.add_argument("--workdir", default=None, help="the trained run's workdir")
  parser.add_argument("--num_examples", type=int, default=8, help="test examples of the run")
  report.add_out_flag(parser, "approximation.md, approximation.csv and approximation.png")
  parser.add_argument(
    "--dry_run",
    action="store_true",
    help="check the flags, --out and that every variant builds at every knob; measure nothing",
  )
  args = parser.parse_args(argv)
  out = report.prepare_out(args.out)
  report.check_positive(args, ("length", "batch", "heads", "head_dim", "seeds", "num_examples"))
  names = [n.strip() for n in args.attentions.split(",") if n.strip()]
  for name in names:
    knob_grid(name, args.length)  # An unknown variant, before any work.
  if bool(args.config) != bool(args.workdir):
    raise ConfigError("--config and --workdir go together (a trained run's q and k).")
  if args.dry_run:
    for name in names:
      knob, values, fixed = knob_grid(name, args.length)
      for value in values:
        nnx.eval_shape(
          lambda name=name, kwargs={**fixed, knob: value}: attention.make(
            name,
            in_features=args.heads * args.head_dim,
            num_heads=args.heads,
            head_dim=args.head_dim,
            rngs=nnx.Rngs(0),
            **kwargs,
          )
        )
    print(report.dry_run_line(f"{len(names)} variant(s) build at every knob", out))
    return 0
  sources = {"random": random_qkv(args.batch, args.length, args.heads, args.head_dim)}
  if args.config:
    from efficient_transformers.training import cli

    config = cli.load_config(args.config)
    sources["trained"] = trained_qkv(config, args.workdir, num_examples=args.num_examples)
  rows = []
  for name in names:
    for source, (q, k, v, mask) in sources.items():
      rows += rows_for(name, source, q, k, v, mask, seeds=args.seeds)
  header = (
    "Relative Frobenius error against exact attention (Reformer: its full shared-QK "
    f"attention) of each variant's map and output, mean of {args.seeds} draws of its "
    f"randomness. random: Gaussian q, k, v, batch {args.batch}, {args.heads} heads of "
    f"{args.head_dim}."
    + (f" trained: the first layer of {args.workdir} ({args.config})." if args.config else "")
    + f" {report.device_line(cpu=True)}"
  )
  table = report.markdown_table(rows, COLUMNS, header)
  print(table)
  if out:
    report.write_tables(out, "approximation", table, rows, CSV_KEYS)
    with paths.writing(f"--out={out}"):
      plot(rows, out / "approximation.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
