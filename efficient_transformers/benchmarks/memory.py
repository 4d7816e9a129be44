"""Speed and memory of the recurrent-memory language models (DecoderLM).

Two tables, each printed as markdown and, with --out, written as .md and .csv:

1. `memory_speed`: evaluation speed with the Transformer-XL cache against
   recomputing the context, the comparison of Table 9 in the Transformer-XL
   paper (Dai et al., 2019). For each context length C:

   - recompute: a vanilla causal decoder (memory="none") predicts the next
     token by running the whole window of the last C tokens, [batch, C]; the
     time of one such forward is the time per predicted token. Only the last
     position's logits are returned, so XLA may drop work the prediction does
     not need: the recompute baseline is as cheap as it can honestly be.
   - cached: Transformer-XL with a full memory of mem_len = C (same layer
     sizes) scores one segment of `--eval_segment` tokens and returns its
     logits and the updated memory (the next call needs it); per predicted
     token = time / eval_segment.

   Times are the median of `--steps` runs after one warm-up; the speed-up is
   the ratio of the two, measured in the same run. The compiled memory
   (temporaries + arguments) of each forward is reported beside them.

2. `memory_footprint`: compiled memory of each memory kind at an equal context
   of C = `--footprint_context` tokens, for one evaluation step (`__call__` on
   one segment with its memory) and one training step (value_and_grad of the
   LM loss over one segment, the memory an input), plus the bytes of the
   memory pytree itself. Compile only; nothing is timed.

Compiled memory is XLA's `memory_analysis()`, deterministic for a backend and
JAX version. The default model is the smoke size of configs/lm/byte_lm.py.

    python -m efficient_transformers.benchmarks.memory --out=benchmarks_out
    python -m efficient_transformers.benchmarks.memory --contexts=512,1024 --eval_segment=16 \\
        --num_layers=12 --emb_dim=512 --num_heads=8 --mlp_dim=2048 --out=...
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

from efficient_transformers.benchmarks import report
from efficient_transformers.errors import ConfigError
from efficient_transformers.models.decoder import DecoderLM

VOCAB = 257
# The smoke model of configs/lm/byte_lm.py.
SMOKE_SIZES = dict(num_layers=2, emb_dim=64, num_heads=4, mlp_dim=256)
# The footprint table's settings for the compressive memory and RMT.
COMPRESSION_RATE = 4
RMT_MEMORY_TOKENS = 16
_MIB = 2**20

# (key, column title, format) of each table; the CSV files hold the keys.
SPEED_COLUMNS = (
  ("context", "context C", "d"),
  ("eval_segment", "eval segment", "d"),
  ("recompute_ms", "recompute ms/token", ".3f"),
  ("cached_ms", "cached ms/token", ".3f"),
  ("speedup", "speed-up", ".1f"),
  ("recompute_mib", "recompute MiB", ".2f"),
  ("cached_mib", "cached MiB", ".2f"),
)
FOOTPRINT_COLUMNS = (
  ("memory", "memory", "s"),
  ("segment", "segment", "d"),
  ("mem_len", "mem_len", "d"),
  ("cmem_len", "cmem_len", "d"),
  ("memory_tokens", "memory tokens", "d"),
  ("eval_mib", "eval step MiB", ".2f"),
  ("train_mib", "train step MiB", ".2f"),
  ("state_mib", "memory state MiB", ".3f"),
)
SPEED_CSV_KEYS = (
  "context", "eval_segment", "batch", "recompute_ms", "cached_ms", "speedup",
  "recompute_temp_mib", "recompute_mib", "cached_temp_mib", "cached_mib",
)  # fmt: skip
FOOTPRINT_CSV_KEYS = (
  "memory", "context", "segment", "mem_len", "cmem_len", "memory_tokens", "batch",
  "eval_temp_mib", "eval_mib", "train_temp_mib", "train_mib", "state_bytes", "state_mib",
)  # fmt: skip
FOOTPRINT_NOTES = (
  "none: the whole context is the segment (segment = C); no memory.",
  "transformer_xl: mem_len = C - segment.",
  f"compressive: compression rate {COMPRESSION_RATE}, mem_len = (C - segment) / 2, "
  f"cmem_len = (C - segment - mem_len) / {COMPRESSION_RATE}.",
  f"rmt: {RMT_MEMORY_TOKENS} memory tokens; context beyond the segment reaches the model only "
  "through them, so it is not the same context in the attention sense.",
  "MiB = compiled temporaries + arguments (parameters, ids, memory); memory state = the bytes "
  "of the memory pytree.",
)


def build_model(memory: str, sizes: dict, *, segment_length: int, **options) -> DecoderLM:
  """A DecoderLM without dropout; `sizes` has num_layers, emb_dim, num_heads, mlp_dim;
  `options` are further DecoderLM kwargs (the memory's sizes, the attention)."""
  return DecoderLM(
    vocab_size=VOCAB,
    num_layers=sizes["num_layers"],
    emb_dim=sizes["emb_dim"],
    num_heads=sizes["num_heads"],
    qkv_dim=sizes["emb_dim"],
    mlp_dim=sizes["mlp_dim"],
    segment_length=segment_length,
    dropout_rate=0.0,
    attention_dropout_rate=0.0,
    memory=memory,
    rngs=nnx.Rngs(0),
    **options,
  )


def recompute_forward(graphdef: nnx.GraphDef) -> Callable:
  """jit of (state, ids [batch, C]) -> the last position's logits [batch, vocab]."""

  def forward(state, ids):
    logits, _, _ = nnx.merge(graphdef, state)(ids, {})
    return logits[:, -1]

  return jax.jit(forward)


def cached_forward(graphdef: nnx.GraphDef) -> Callable:
  """jit of (state, ids [batch, seg], memory) -> (logits [batch, seg, vocab], new memory)."""

  def forward(state, ids, memory):
    logits, new_memory, _ = nnx.merge(graphdef, state)(ids, memory)
    return logits, new_memory

  return jax.jit(forward)


def full_memory(model: DecoderLM, batch: int, mem_len: int, seed: int = 0) -> dict:
  """A Transformer-XL memory with every one of its mem_len slots valid (random contents)."""
  memory = model.init_memory(batch, mem_len=mem_len)
  hidden = np.random.default_rng(seed).standard_normal(memory["hidden"].shape, np.float32)
  return {"hidden": jnp.asarray(hidden), "valid": jnp.ones_like(memory["valid"])}


def compiled_mib(compiled) -> tuple[float | None, float | None]:
  """(temporaries, temporaries + arguments) in MiB of a compiled function, or Nones."""
  mem = compiled.memory_analysis()
  if mem is None:
    return None, None
  temp = mem.temp_size_in_bytes / _MIB
  return temp, temp + mem.argument_size_in_bytes / _MIB


def median_seconds(compiled, args: tuple, steps: int) -> float:
  """Median wall time of `steps` calls after one warm-up call."""
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def random_ids(rng: np.random.Generator, batch: int, length: int) -> jax.Array:
  return jnp.asarray(rng.integers(1, VOCAB, size=(batch, length)), jnp.int32)


def speed_rows(
  contexts: Sequence[int], *, sizes: dict, batch: int, eval_segment: int, steps: int
) -> list[dict]:
  """One row per context length C: recompute vs cached time per token and memory.

  Times are in ms per predicted token; `speedup` = recompute_ms / cached_ms.
  """
  # One model of each kind serves every C: the vanilla one's (sinusoidal) positions
  # cover the longest window, and the XL memory length is set by init_memory.
  vanilla_graph, vanilla_state = nnx.split(build_model("none", sizes, segment_length=max(contexts)))
  recompute_fn = recompute_forward(vanilla_graph)
  xl = build_model("transformer_xl", sizes, segment_length=eval_segment, mem_len=max(contexts))
  xl_graph, xl_state = nnx.split(xl)
  cached = cached_forward(xl_graph)
  rng = np.random.default_rng(0)
  rows = []
  for context in contexts:
    window = random_ids(rng, batch, context)
    recompute = recompute_fn.lower(vanilla_state, window).compile()
    recompute_temp, recompute_mib = compiled_mib(recompute)
    recompute_s = median_seconds(recompute, (vanilla_state, window), steps)

    segment = random_ids(rng, batch, eval_segment)
    memory = full_memory(xl, batch, context)
    step = cached.lower(xl_state, segment, memory).compile()
    cached_temp, cached_mib = compiled_mib(step)
    cached_s = median_seconds(step, (xl_state, segment, memory), steps) / eval_segment
    rows.append(
      {
        "context": context,
        "eval_segment": eval_segment,
        "batch": batch,
        "recompute_ms": recompute_s * 1e3,
        "cached_ms": cached_s * 1e3,
        "speedup": recompute_s / cached_s,
        "recompute_temp_mib": recompute_temp,
        "recompute_mib": recompute_mib,
        "cached_temp_mib": cached_temp,
        "cached_mib": cached_mib,
      }
    )
  return rows


def footprint_settings(context: int, segment: int) -> list[dict]:
  """Per memory kind: its name, segment length and DecoderLM memory arguments at context C."""
  rest = context - segment
  mem_len = rest // 2
  return [
    {"memory": "none", "segment": context, "kwargs": {}},
    {"memory": "transformer_xl", "segment": segment, "kwargs": {"mem_len": rest}},
    {
      "memory": "compressive",
      "segment": segment,
      "kwargs": {
        "mem_len": mem_len,
        "cmem_len": (rest - mem_len) // COMPRESSION_RATE,
        "compression_rate": COMPRESSION_RATE,
      },
    },
    {"memory": "rmt", "segment": segment, "kwargs": {"num_memory_tokens": RMT_MEMORY_TOKENS}},
  ]


def tree_bytes(tree) -> int:
  """Total bytes of the arrays (or jax.ShapeDtypeStructs) in a pytree."""
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _step_functions(graphdef: nnx.GraphDef) -> tuple[Callable, Callable]:
  """(eval step, train step), both of (params, rest, ids, memory)."""

  def apply(params, rest, ids, memory):
    return nnx.merge(graphdef, params, rest)(ids, memory)

  def eval_step(params, rest, ids, memory):
    logits, new_memory, _ = apply(params, rest, ids, memory)
    return logits, new_memory

  def train_step(params, rest, ids, memory):
    # Next-token loss inside the segment (the last position has no target here).
    def loss_fn(p):
      logits, new_memory, aux = apply(p, rest, ids, memory)
      losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
      return losses.mean() + sum(aux.values(), jnp.zeros((), jnp.float32)), new_memory

    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  return jax.jit(eval_step), jax.jit(train_step)


def _compile_only_options() -> dict | None:
  # Nothing compiled for the footprint table runs, and memory_analysis() comes from
  # XLA's buffer assignment, which precedes LLVM code generation: skipping LLVM's
  # optimizations halves the CPU compile time and leaves the numbers unchanged.
  # Other backends keep their defaults.
  return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None


def footprint_rows(context: int, *, sizes: dict, batch: int, segment: int) -> list[dict]:
  """One row per memory kind at context `context`: compiled eval/train memory and state size."""
  options = _compile_only_options()
  rows = []
  for setting in footprint_settings(context, segment):
    kind, seg, kwargs = setting["memory"], setting["segment"], setting["kwargs"]
    # Abstract parameters and memory: compiling needs only shapes, and nothing runs.
    model = nnx.eval_shape(
      functools.partial(build_model, kind, sizes, segment_length=seg, **kwargs)
    )
    memory = jax.eval_shape(functools.partial(model.init_memory, batch))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = jax.ShapeDtypeStruct((batch, seg), jnp.int32)
    eval_step, train_step = _step_functions(graphdef)
    eval_temp, eval_mib = compiled_mib(eval_step.lower(params, rest, ids, memory).compile(options))
    train_temp, train_mib = compiled_mib(
      train_step.lower(params, rest, ids, memory).compile(options)
    )
    state_bytes = tree_bytes(memory)
    rows.append(
      {
        "memory": kind,
        "context": context,
        "segment": seg,
        "mem_len": kwargs.get("mem_len", 0),
        "cmem_len": kwargs.get("cmem_len", 0),
        "memory_tokens": kwargs.get("num_memory_tokens", 0),
        "batch": batch,
        "eval_temp_mib": eval_temp,
        "eval_mib": eval_mib,
        "train_temp_mib": train_temp,
        "train_mib": train_mib,
        "state_bytes": state_bytes,
        "state_mib": state_bytes / _MIB,
      }
    )
  return rows


def _check_flags(args: argparse.Namespace) -> list[int]:
  """Raises ConfigError naming the first bad flag; returns the parsed --contexts."""
  contexts = report.positive_ints(args.contexts, "--contexts")
  report.check_positive(args, (
    "eval_segment", "batch", "steps", "num_layers", "emb_dim", "num_heads", "mlp_dim", "segment",
    "footprint_context",
  ))  # fmt: skip
  report.check_divisible(args, "emb_dim", "num_heads")
  if args.eval_segment > min(contexts):
    raise ConfigError(
      f"--eval_segment={args.eval_segment} must not exceed the smallest --contexts "
      f"value ({min(contexts)})."
    )
  if args.segment >= args.footprint_context:
    # Equal lengths would leave the memory kinds no memory at all.
    raise ConfigError(
      f"--segment={args.segment} must be smaller than --footprint_context={args.footprint_context}."
    )
  if args.segment % COMPRESSION_RATE:
    raise ConfigError(
      f"--segment={args.segment} must be a multiple of {COMPRESSION_RATE}, the compressive "
      "memory's compression rate."
    )
  return contexts


@report.one_line_errors
def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--contexts", default="1024,2048,4096,8192,16384")
  parser.add_argument("--eval_segment", type=int, default=1, help="tokens per cached call")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--steps", type=int, default=5, help="timed runs per cell")
  parser.add_argument("--num_layers", type=int, default=SMOKE_SIZES["num_layers"])
  parser.add_argument("--emb_dim", type=int, default=SMOKE_SIZES["emb_dim"])
  parser.add_argument("--num_heads", type=int, default=SMOKE_SIZES["num_heads"])
  parser.add_argument("--mlp_dim", type=int, default=SMOKE_SIZES["mlp_dim"])
  parser.add_argument("--segment", type=int, default=128, help="footprint: segment length")
  parser.add_argument("--footprint_context", type=int, default=2048)
  report.add_out_flag(parser, "memory_speed.md/.csv and memory_footprint.md/.csv")
  args = parser.parse_args(argv)
  sizes = {k: getattr(args, k) for k in SMOKE_SIZES}
  out = report.prepare_out(args.out)  # Checked now, not after the measurements.
  contexts = _check_flags(args)
  speed = speed_rows(
    contexts, sizes=sizes, batch=args.batch, eval_segment=args.eval_segment, steps=args.steps
  )
  footprint = footprint_rows(
    args.footprint_context, sizes=sizes, batch=args.batch, segment=args.segment
  )
  setting = (
    f"DecoderLM {args.num_layers} layers, {args.emb_dim} wide, {args.num_heads} heads, "
    f"MLP {args.mlp_dim}; batch {args.batch}, float32. {report.device_line(cpu=True)}"
  )
  speed_table = report.markdown_table(
    speed,
    SPEED_COLUMNS,
    "Evaluation speed: Transformer-XL cache (mem_len = C) vs recomputing the last C tokens. "
    + setting
    + f" Time: median of {args.steps} runs after a warm-up.",
    (
      "recompute: one forward of a vanilla decoder over the last C tokens per predicted token.",
      f"cached: one Transformer-XL call on {args.eval_segment} token(s) with a full memory of C, "
      "divided by the tokens it predicts.",
      "MiB = compiled temporaries + arguments of that forward.",
    ),
  )
  footprint_table = report.markdown_table(
    footprint,
    FOOTPRINT_COLUMNS,
    f"Memory footprint at context C = {args.footprint_context}, segment {args.segment}. "
    + setting
    + " Compiled only.",
    FOOTPRINT_NOTES,
  )
  print(speed_table + "\n\n" + footprint_table)
  if out:
    report.write_tables(out, "memory_speed", speed_table, speed, SPEED_CSV_KEYS)
    report.write_tables(out, "memory_footprint", footprint_table, footprint, FOOTPRINT_CSV_KEYS)
  return 0


if __name__ == "__main__":
  sys.exit(main())
