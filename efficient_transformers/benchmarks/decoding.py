"""Token-by-token decoding with O(1) state against recomputing the context.

For each causal mixer or attention with a recurrent form (`DecoderLM.decode_step`:
lstm, gru, s4d, lru, s5, and linear and performer attention in their RNN form)
and each context length C, one byte-level DecoderLM (memory='none', positions
'none', the smoke size of configs/lm/byte_lm.py by default) predicts the next
token two ways:

- recompute: one forward over the last C tokens, the next token's logits taken
  from the last position (only those are returned, so XLA may drop work they do
  not need);
- step: one `decode_step` from the state after the C tokens (built by `decode`,
  a `lax.scan` of the same step, whose throughput is the `score` column).

Tokens/s are 1 / the median time of `--steps` calls after a warm-up (the step
gets `--steps` x 10 calls, it is short); the speed-up is step tokens/s over
recompute tokens/s, measured in the same run. Memory is the compiled
temporaries + arguments of each function (`memory_analysis()`), and the state's
own bytes, which do not depend on C.

    python -m efficient_transformers.benchmarks.decoding --out=benchmarks_out
    python -m efficient_transformers.benchmarks.decoding --mixers=lru,linear \\
        --contexts=1024,4096 --steps=3 --out=...
"""

import argparse
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from efficient_transformers.benchmarks import report
from efficient_transformers.benchmarks.memory import (
  SMOKE_SIZES,
  build_model,
  compiled_mib,
  median_seconds,
  random_ids,
  recompute_forward,
  tree_bytes,
)
from efficient_transformers.errors import ConfigError
from efficient_transformers.models import mixing

MIXERS = ("lstm", "gru", "s4d", "lru", "s5", "linear", "performer")

COLUMNS = (
  ("mixer", "mixer", "s"),
  ("context", "context C", "d"),
  ("recompute_tps", "recompute tokens/s", ",.1f"),
  ("step_tps", "step tokens/s", ",.0f"),
  ("speedup", "speed-up", ",.1f"),
  ("score_tps", "score tokens/s", ",.0f"),
  ("recompute_mib", "recompute MiB", ".2f"),
  ("step_mib", "step MiB", ".2f"),
  ("state_kib", "state KiB", ".1f"),
)
CSV_KEYS = (
  "mixer", "context", "batch", "recompute_s", "step_s", "score_s", "recompute_tps", "step_tps",
  "score_tps", "speedup", "recompute_mib", "step_mib", "state_kib", "error",
)  # fmt: skip
NOTES = (
  "recompute: one forward over the last C tokens per predicted token.",
  "step: one decode_step with the state after C tokens; score: decode over the C tokens "
  "(a lax.scan of decode_step), C / its time.",
  "MiB = compiled temporaries + arguments; state = the decoding state's bytes, the same at "
  "every C.",
)


def _decode_functions(graphdef: nnx.GraphDef):
  """jits of (state, ids [batch, C], decode state) -> decode state, and of
  (state, ids_t [batch], decode state) -> (logits [batch, vocab], decode state)."""

  def prefill(state, ids, decode_state):
    return nnx.merge(graphdef, state).decode(ids, decode_state)[1]

  def step(state, ids_t, decode_state):
    return nnx.merge(graphdef, state).decode_step(ids_t, decode_state)

  return jax.jit(prefill), jax.jit(step)


def rows_for(
  name: str, contexts: Sequence[int], *, sizes: dict, batch: int, steps: int
) -> list[dict]:
  """One row per context length for mixer `name` (an error row if it cannot decode)."""
  model = build_model(
    "none", sizes, segment_length=max(contexts), attention_name=name, positional="none"
  )
  try:
    empty = model.init_decode_state(batch)
  except ConfigError as e:
    return [{"mixer": name, "context": c, "batch": batch, "error": str(e)} for c in contexts]
  graphdef, state = nnx.split(model)
  recompute_fn = recompute_forward(graphdef)
  prefill_fn, step_fn = _decode_functions(graphdef)
  rng = np.random.default_rng(0)
  rows = []
  for context in contexts:
    window = random_ids(rng, batch, context)
    recompute = recompute_fn.lower(state, window).compile()
    _, recompute_mib = compiled_mib(recompute)
    recompute_s = median_seconds(recompute, (state, window), steps)

    prefill = prefill_fn.lower(state, window, empty).compile()
    t0 = time.perf_counter()
    decode_state = jax.block_until_ready(prefill(state, window, empty))
    score_s = time.perf_counter() - t0
    next_ids = window[:, -1]
    step = step_fn.lower(state, next_ids, decode_state).compile()
    _, step_mib = compiled_mib(step)
    step_s = median_seconds(step, (state, next_ids, decode_state), 10 * steps)
    rows.append(
      {
        "mixer": name,
        "context": context,
        "batch": batch,
        "recompute_s": recompute_s,
        "step_s": step_s,
        "score_s": score_s,
        "recompute_tps": batch / recompute_s,
        "step_tps": batch / step_s,
        "score_tps": batch * context / score_s,
        "speedup": recompute_s / step_s,
        "recompute_mib": recompute_mib,
        "step_mib": step_mib,
        "state_kib": tree_bytes(decode_state) / 1024,
      }
    )
    print(rows[-1], file=sys.stderr, flush=True)
  return rows


@report.one_line_errors
def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--mixers", default=",".join(MIXERS))
  parser.add_argument("--contexts", default="1024,2048,4096,8192,16384")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--steps", type=int, default=3, help="timed recompute runs per cell")
  parser.add_argument("--num_layers", type=int, default=SMOKE_SIZES["num_layers"])
  parser.add_argument("--emb_dim", type=int, default=SMOKE_SIZES["emb_dim"])
  parser.add_argument("--num_heads", type=int, default=SMOKE_SIZES["num_heads"])
  parser.add_argument("--mlp_dim", type=int, default=SMOKE_SIZES["mlp_dim"])
  report.add_out_flag(parser, "decoding.md and decoding.csv")
  parser.add_argument(
    "--dry_run",
    action="store_true",
    help="check the flags, --out and that every mixer builds and decodes; measure nothing",
  )
  args = parser.parse_args(argv)
  out = report.prepare_out(args.out)  # Checked now, not after the measurements.
  contexts = report.positive_ints(args.contexts, "--contexts")
  report.check_positive(args, ("batch", "steps", "num_layers", "emb_dim", "num_heads", "mlp_dim"))
  report.check_divisible(args, "emb_dim", "num_heads")
  names = [n.strip() for n in args.mixers.split(",") if n.strip()]
  for name in names:
    mixing.get_class(name)  # An unknown name, with the valid ones, before any work.
  sizes = {k: getattr(args, k) for k in SMOKE_SIZES}
  if args.dry_run:
    for name in names:
      nnx.eval_shape(
        lambda name=name: build_model(
          "none", sizes, segment_length=max(contexts), attention_name=name, positional="none"
        )
      ).init_decode_state(args.batch)
    print(report.dry_run_line(f"{len(names)} mixer(s) build and decode", out))
    return 0
  rows = []
  for name in names:
    rows += rows_for(name, contexts, sizes=sizes, batch=args.batch, steps=args.steps)
  header = (
    f"Decoding one token: O(1)-state step vs recomputing the context. DecoderLM "
    f"{args.num_layers} layers, {args.emb_dim} wide, {args.num_heads} heads, MLP "
    f"{args.mlp_dim}, memory='none', positions 'none'; batch {args.batch}, float32. "
    f"{report.device_line(cpu=True)}"
  )
  table = report.markdown_table(rows, COLUMNS, header, NOTES, error_column=2)
  print(table)
  if out:
    report.write_tables(out, "decoding", table, rows, CSV_KEYS)
  return 0


if __name__ == "__main__":
  sys.exit(main())
