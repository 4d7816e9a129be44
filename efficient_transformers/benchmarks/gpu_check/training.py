"""Parts 3 and 4 of the GPU check: ListOps training in bf16, and the attention benchmark."""

import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from efficient_transformers.benchmarks import attention as bench
from efficient_transformers.benchmarks.gpu_check.common import (
  _MIB,
  Budget,
  Sizes,
  _log,
  _memory_limit_bytes,
  _short_error,
)
from efficient_transformers.benchmarks.gpu_check.exact import _xla_flops

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
    task, global_batch_size=config.batch_size, seed=config.seed
  )
  row["data_s"] = time.perf_counter() - t0
  # One device: the MFU below is per chip, like every other number here.
  setup = state.make_setup(config, tasks.describe(config), devices=jax.devices()[:1])
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
