"""Compiled-HLO profile of every attention's forward+backward: work beyond the algorithm.

For each row of `ROWS` (an attention pure function with its settings) and each
length L, compiles the forward and backward pass, `jit(value_and_grad(lambda q, k, v:
sum(f(q, k, v) * dO)))` w.r.t. q, k, v with the cotangent dO an input (as in a training
step: the output is used, and dO is no constant for XLA to fold), from abstract inputs
[batch, L, heads, head_dim] (`jax.ShapeDtypeStruct`; nothing executes) and reports

- XLA's `cost_analysis()` FLOPs and bytes accessed (a loop body counted ONCE,
  whatever its trip count), and the dot FLOPs read off the optimized HLO with
  every loop body weighted by its known trip count (`dot_flops`);
- the ALGORITHMIC FLOPs of the paper's algorithm, forward+backward (`FLOP_FORMULAS`),
  and the ratios of both compiled counts to it;
- `memory_analysis()` temp and argument MiB;
- a census of the optimized HLO (`op_census`: static instruction counts, fused
  computations included), the bytes materialized per step only to change layout
  (transpose/copy) or to concatenate (`moved_bytes`), the largest array, and the
  first array with two axes >= L (`square_arrays`: only exact softmax may have one).

    python -m efficient_transformers.benchmarks.hlo_profile --out=/tmp/hlo_profile_out \\
        --hlo_lengths=4096        # also OUT/hlo/ROW.txt, the optimized HLO at L=4096
    python -m efficient_transformers.benchmarks.hlo_profile --rows=softmax,local --lengths=256

Writes hlo_profile.md (both tables, printed too), hlo_profile.csv and hlo_profile.json.
"""

import argparse
import dataclasses
import inspect
import json
import math
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from efficient_transformers import attention, paths
from efficient_transformers.benchmarks import report
from efficient_transformers.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Operand:
  """An array argument a row's function takes besides q, k, v (float32, not differentiated).

  `shape` holds ints and the names "heads" and "head_dim", resolved per run.
  """

  shape: tuple[int | str, ...]

  def struct(self, heads: int, head_dim: int) -> jax.ShapeDtypeStruct:
    dims = {"heads": heads, "head_dim": head_dim}
    return jax.ShapeDtypeStruct(tuple(dims.get(s, s) for s in self.shape), jnp.float32)


# ---------------------------------------------------------------- The rows.

# row -> (function, kwargs): the one place the settings live. The function is a name in
# `efficient_transformers.attention` ("module.name" for one it does not export); a
# function without a `k` parameter (shared-QK Reformer) is called as f(q, v), and k's
# gradient is zero. Settings follow the outside peer benchmark: blocks and windows of 64
# (local: 1 neighbor block each side, causal 1 before), Nystromformer 64 landmarks and 6
# pseudo-inverse iterations, linear attention with elu + 1, Performer 256 random
# features (FAVOR+ softmax kernel), Reformer 1 hash round; sparse, Longformer and
# BigBird keep their other defaults (sparse: the fixed pattern, 1 summary position per
# block; Longformer: one global token, position 0; BigBird: 3 window, 2 global and 3
# random blocks). Reformer's chunk is 64 tokens (each query sees 2 chunks, 128 keys),
# with 64 buckets: a mean bucket of 64 tokens at L=4096 (16 at 1K, 128 at 8K); the
# bucket count changes the work only through the [L, 32] hash projection.
ROWS: dict[str, tuple[str, dict]] = {
  "softmax": ("softmax_attention", {}),
  "memory_efficient": (
    "memory_efficient_attention",
    dict(query_chunk_size=512, key_chunk_size=512),
  ),
  "local": ("local_attention", dict(block_size=64, num_neighbors=1)),
  "local_causal": ("local_attention", dict(block_size=64, num_neighbors=1, causal=True)),
  "sparse": ("sparse_attention", dict(pattern="fixed", block_size=64, num_summary=1)),
  "longformer": ("longformer_attention", dict(window=64, global_positions=(0,))),
  "bigbird": (
    "bigbird_attention",
    dict(block_size=64, num_window_blocks=3, num_global_blocks=2, num_random_blocks=3),
  ),
  "nystromformer": ("nystromformer_attention", dict(num_landmarks=64, pinv_iterations=6)),
  "linear": ("linear_attention", {}),
  "linear_causal": ("linear_attention", dict(causal=True, chunk_size=64)),
  "performer": ("performer_attention", dict(features=Operand((256, "head_dim")))),
  "performer_causal": (
    "performer_attention",
    dict(features=Operand((256, "head_dim")), causal=True, chunk_size=64),
  ),
  "reformer": (
    "reformer.reformer_attention_from_rotations",
    # [heads, hash rounds, head_dim, buckets / 2]: 1 round, 64 buckets.
    dict(rotations=Operand(("heads", 1, "head_dim", 32)), chunk_size=64),
  ),
}
# The exact attentions that are allowed an [L, L] array: they are quadratic by definition.
QUADRATIC = ("softmax_attention", "dot_product_attention")


def attention_fn(name: str) -> Callable[..., jax.Array]:
  """The function `name` ("fn" or "module.fn") of `efficient_transformers.attention`."""
  fn = attention
  for part in name.split("."):
    fn = getattr(fn, part)
  return fn


# ---------------------------------------------------------------- Algorithmic FLOPs.
# Per (batch, head), (forward, backward) FLOPs of the paper's algorithm; a multiply-add
# is 2 FLOPs, so an [a, b] x [b, c] matmul is 2abc. A forward matmul of two
# differentiated operands costs two such matmuls backward (one per operand's
# gradient); softmax, exp and other elementwise work (and O(L d) sums) is not counted.
# `kw` holds the row's kwargs with every Operand resolved to its ShapeDtypeStruct.


def _mm(*dims: int) -> float:
  return 2.0 * math.prod(dims)


def _attend(pairs: float, d: int) -> tuple[float, float]:
  """Attention over `pairs` (query, key) pairs: forward q.k and p.v (2 * 2 pairs d FLOPs),
  backward dP = dO V^T, dV, dQ, dK (4 * 2 pairs d)."""
  return 2 * _mm(pairs, d), 4 * _mm(pairs, d)


def exact_flops(L: int, d: int, kw: Mapping) -> tuple[float, float]:
  """Exact attention (softmax, memory_efficient): L^2 pairs (causal: L (L + 1) / 2), so
  forward 2 matmuls of L x L x d and backward 4. FlashAttention's recomputation of the
  logits in the backward pass is implementation, not algorithm."""
  return _attend(L * (L + 1) / 2 if kw.get("causal") else L * L, d)


def local_flops(L: int, d: int, kw: Mapping) -> tuple[float, float]:
  """Blocked local attention, block b, n neighbor blocks: every query block against a
  full window of (2n + 1) b keys (causal: (n + 1) b), edge blocks included (the blocked
  algorithm pads them): forward 2 matmuls of L x window x d, backward 4."""
  b = kw.get("block_size", 64)
  n = min(kw.get("num_neighbors", 1), -(-L // b) - 1)
  return _attend(L * ((n + 1) if kw.get("causal") else (2 * n + 1)) * b, d)


def sparse_flops(L: int, d: int, kw: Mapping) -> tuple[float, float]:
  """Sparse Transformer, fixed pattern (block l, c summaries): a query sees its block's l
  keys and the c summary keys of each other block, l + (L / l - 1) c pairs (causal: half
  the summaries). Strided (stride l): a window of 2l - 1 keys and L / l - 1 of its residue
  class (causal: about half of both)."""
  size = kw.get("stride") or kw.get("block_size", 50)
  others = -(-L // size) - 1
  if kw.get("pattern", "fixed") == "fixed":
    keys = kw.get("block_size", 50) + others * kw.get("num_summary", 1) / (
      2 if kw.get("causal") else 1
    )
  else:
    keys = (2 * size - 1 + others) / (2 if kw.get("causal") else 1)
  return _attend(L * keys, d)


def longformer_flops(L: int, d: int, kw: Mapping) -> tuple[float, float]:
  """Longformer, one-sided window w and g global tokens: each query sees 2w + 1 window keys
  (causal: w + 1) and the g global keys; the g global rows see all L keys."""
  w, g = kw.get("window", 64), len(set(kw.get("global_positions", (0,))))
  return _attend(L * ((w + 1) if kw.get("causal") else (2 * w + 1)) + L * g + g * L, d)


def bigbird_flops(L: int, d: int, kw: Mapping) -> tuple[float, float]:
  """BigBird ITC, block b, w window, g global, r random blocks: the g global query blocks
  see all L keys; every other query sees (w + g + r) b keys."""
  b = kw.get("block_size", 64)
  w = kw.get("num_window_blocks", 3)
  g = kw.get("num_global_blocks", 2)
  r = kw.get("num_random_blocks", 3)
  return _attend(g * b * L + (L - g * b) * (w + g + r) * b, d)


def nystromformer_flops(L: int, d: int, kw: Mapping) -> tuple[float, float]:
  """Nystromformer, m landmarks, t pseudo-inverse iterations: forward F = Q K~^T and
  B = Q~ K^T (2 L m d each), A = Q~ K~^T (2 m^2 d), B V (2 m L d), A+ (B V) (2 m^2 d),
  F (A+ B V) (2 L m d), and t iterations of 4 m x m x m matmuls; backward twice each.
  The landmarks' segment means are O(L d) sums, not counted."""
  m, t = kw.get("num_landmarks", 64), kw.get("pinv_iterations", 6)
  forward = 4 * _mm(L, m, d) + 2 * _mm(m, m, d) + t * 4 * _mm(m, m, m)
  return forward, 2 * forward


def _kernelized(L: int, d: int, m: int) -> tuple[float, float]:
  """Linear attention over m features: phi(K)^T V (2 L m d), phi(Q) (K^T V) (2 L m d) and
  the normalizer phi(Q) . sum phi(K) (2 L m); causal the same as running sums (Katharopoulos
  et al.'s RNN form: an outer product and a product with the state per position)."""
  forward = 2 * _mm(L, m, d) + _mm(L, m)
  return forward, 2 * forward


def linear_flops(L: int, d: int, kw: Mapping) -> tuple[float, float]:
  """Linear attention with elu + 1: d features (`_kernelized`), causal or not."""
  return _kernelized(L, d, d)


def performer_flops(L: int, d: int, kw: Mapping) -> tuple[float, float]:
  """Performer FAVOR+, m features: the projections of Q and K on the features
  (2 L d m each; backward one matmul each, the features are constants) plus linear
  attention over m features (`_kernelized`)."""
  m = kw["features"].shape[0]
  forward, backward = _kernelized(L, d, m)
  return forward + 2 * _mm(L, d, m), backward + 2 * _mm(L, d, m)


def reformer_flops(L: int, d: int, kw: Mapping) -> tuple[float, float]:
  """Reformer LSH, n rounds, chunk c, k buckets: per round the hash projection (2 L d k / 2,
  no gradient) and each query against its chunk and the previous one (2c pairs). The
  sorts are O(n L log L) comparisons, not counted."""
  _, n, _, half_buckets = kw["rotations"].shape
  forward, backward = _attend(n * L * 2 * kw.get("chunk_size", 64), d)
  return forward + n * _mm(L, d, half_buckets), backward


FLOP_FORMULAS: dict[str, Callable[[int, int, Mapping], tuple[float, float]]] = {
  "softmax_attention": exact_flops,
  "dot_product_attention": exact_flops,
  "memory_efficient_attention": exact_flops,
  "local_attention": local_flops,
  "sparse_attention": sparse_flops,
  "longformer_attention": longformer_flops,
  "bigbird_attention": bigbird_flops,
  "nystromformer_attention": nystromformer_flops,
  "linear_attention": linear_flops,
  "performer_attention": performer_flops,
  "reformer.reformer_attention_from_rotations": reformer_flops,
}


def algorithmic_flops(row: str, *, batch: int, length: int, heads: int, head_dim: int) -> tuple:
  """(forward, backward) FLOPs of `row`'s algorithm for the whole batch and all heads."""
  name, kwargs = ROWS[row]
  kw = {k: v.struct(heads, head_dim) if isinstance(v, Operand) else v for k, v in kwargs.items()}
  forward, backward = FLOP_FORMULAS[name](length, head_dim, kw)
  return forward * batch * heads, backward * batch * heads


# ---------------------------------------------------------------- Reading HLO text.

CENSUS_OPS = (
  "dot", "transpose", "copy", "concatenate", "gather", "scatter", "pad", "dynamic-slice",
  "dynamic-update-slice", "convert", "while", "custom-call", "sort", "fusion",
)  # fmt: skip
# A fusion made of these only (and one of LAYOUT_OPS) moves data only to change its layout;
# with a concatenate (and pads or slices) it moves data only to concatenate.
LAYOUT_OPS = ("transpose", "copy")
_PASSENGERS = {"parameter", "constant", "bitcast", "reshape", "convert", "slice"}
_ARRAY = re.compile(r"\b(pred|bf16|[suf]\d+|c64|c128|f8\w*)\[([^\]]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*->.*)?\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition|branch_computations|true_computation|"
                     r"false_computation|called_computations)=(\{[^}]*\}|%?[\w.\-]+)")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  shape: str  # the result type, e.g. "f32[1,4,64]{2,1,0}" or a tuple "(f32[2], s32[])"
  opcode: str
  operands: str  # inside the parentheses
  attributes: str  # after them


def _closing(text: str, start: int) -> int:
  """The index just past the parenthesis that closes the one at `start`."""
  depth = 0
  for i in range(start, len(text)):
    depth += {"(": 1, ")": -1}.get(text[i], 0)
    if depth == 0:
      return i + 1
  return len(text)


def parse_hlo(text: str) -> tuple[dict[str, list[Instruction]], str | None]:
  """HLO module text as ({computation: instructions} in text order, the entry's name)."""
  computations: dict[str, list[Instruction]] = {}
  entry, current = None, None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header and "=" not in line.split("(", 1)[0]:
      current = computations.setdefault(header.group(2), [])
      entry = header.group(2) if header.group(1) else entry
      continue
    match = _INSTRUCTION.match(line) if current is not None else None
    if match is None:
      continue
    rest = match.group(3)
    end = _closing(rest, 0) if rest.startswith("(") else rest.find(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    opcode = re.match(r"[\w\-]+", rest)
    if opcode is None or rest[opcode.end() : opcode.end() + 1] != "(":
      continue
    close = _closing(rest, opcode.end())
    current.append(
      Instruction(match.group(2), shape, opcode.group(), rest[opcode.end() + 1 : close - 1],
                  rest[close:])
    )  # fmt: skip
  return computations, entry


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  """The (element type, dims) of every array in a result type (a tuple's elements in order)."""
  found = []
  for dtype, dims in _ARRAY.findall(shape):
    found.append((dtype, tuple(int(x.lstrip("<=")) for x in dims.split(",") if x.strip())))
  return found


def array_bytes(dtype: str, dims: Sequence[int]) -> int:
  """Bytes of an array of `dims` elements of HLO type `dtype` (f32, bf16, pred, s4, c64...)."""
  bits = {"pred": 8, "bf16": 16, "c64": 64, "c128": 128}.get(dtype)
  if bits is None:
    bits = 8 if dtype.startswith("f8") else int(dtype[1:])
  return -(-math.prod(dims) * bits // 8)


def shape_bytes(shape: str) -> int:
  """Bytes of a result type: the sum over a tuple's arrays."""
  return sum(array_bytes(t, d) for t, d in arrays(shape))


def op_census(text: str) -> dict[str, int]:
  """Static count of each CENSUS_OPS opcode over every computation (fused ones included)."""
  computations, _ = parse_hlo(text)
  counts = Counter(i.opcode for body in computations.values() for i in body)
  return {op: counts.get(op, 0) for op in CENSUS_OPS}


def _trip_count(instruction: Instruction) -> int | None:
  found = re.search(r'"known_trip_count":\{"n":"(\d+)"', instruction.attributes)
  return int(found.group(1)) if found else None


def executions(text: str) -> tuple[dict[str, int], set[str], int]:
  """How often each computation runs per call of the entry, the fused computations, and
  the number of while loops without a known trip count (counted as running once)."""
  computations, entry = parse_hlo(text)
  runs = dict.fromkeys(computations, 0)
  runs[entry or next(reversed(computations), None)] = 1
  fused, unknown = set(), 0
  # Callees are printed before their callers: reversed text order visits callers first.
  for name in reversed(computations):
    for instruction in computations[name]:
      trips = _trip_count(instruction) if instruction.opcode == "while" else 1
      if trips is None:
        trips, unknown = 1, unknown + 1
      for kind, callees in _CALLEE.findall(instruction.attributes):
        for callee in re.findall(r"[\w.\-]+", callees):
          if callee in runs:
            runs[callee] += runs[name] * (trips if kind in ("body", "condition") else 1)
            if instruction.opcode == "fusion":
              fused.add(callee)
  return runs, fused, unknown


def _is_gemm(instruction: Instruction) -> bool:
  target = re.search(r'custom_call_target="([^"]*)"', instruction.attributes)
  return bool(target and re.search(r"gemm|matmul", target.group(1), re.I))


def dot_flops(text: str) -> float:
  """FLOPs of the dots (and cuBLAS gemm custom-calls) of HLO text, each weighted by how often
  its computation runs (`executions`): 2 x output elements x contracted elements."""
  computations, _ = parse_hlo(text)
  runs, _, _ = executions(text)
  shapes = {i.name: i.shape for body in computations.values() for i in body}
  total = 0.0
  for name, body in computations.items():
    for i in body:
      if i.opcode == "dot":
        dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", i.attributes)
      elif i.opcode == "custom-call" and _is_gemm(i):
        dims = re.search(r'"lhs_contracting_dimensions":\[([\d",]*)\]', i.attributes)
      else:
        continue
      # The lhs: its type where operand types are printed, else its name's result type.
      lhs = arrays(i.operands) or arrays(
        shapes.get(re.match(r"\s*%?([\w.\-]*)", i.operands)[1], "")
      )
      if dims and lhs and arrays(i.shape):
        contracted = math.prod(lhs[0][1][int(x)] for x in re.findall(r"\d+", dims.group(1)))
        total += 2.0 * math.prod(arrays(i.shape)[0][1]) * contracted * runs[name]
  return total


def moved_bytes(text: str) -> dict[str, int]:
  """Bytes materialized per call only to change layout ("layout") or to concatenate
  ("concatenate"), each weighted by how often its computation runs.

  Counted: a transpose or copy (a concatenate) outside fusions, and a fusion whose
  computation holds only such ops and passengers (parameter, bitcast, reshape, convert,
  slice; pad with a concatenate): its output bytes. A transpose fused into a dot or an
  elementwise fusion moves nothing of its own and is not counted.
  """
  computations, _ = parse_hlo(text)
  runs, fused, _ = executions(text)
  moved = {"layout": 0, "concatenate": 0}
  for name, body in computations.items():
    if name in fused:
      continue
    for i in body:
      ops = {i.opcode}
      if i.opcode == "fusion":
        callee = re.search(r"calls=%?([\w.\-]+)", i.attributes)
        ops = {x.opcode for x in computations.get(callee.group(1) if callee else "", [])}
      if "concatenate" in ops and ops <= _PASSENGERS | {"concatenate", "pad", *LAYOUT_OPS}:
        moved["concatenate"] += shape_bytes(i.shape) * runs[name]
      elif ops & set(LAYOUT_OPS) and ops <= _PASSENGERS | set(LAYOUT_OPS):
        moved["layout"] += shape_bytes(i.shape) * runs[name]
  return moved


def _all_arrays(text: str):
  for body in parse_hlo(text)[0].values():
    for i in body:
      for dtype, dims in arrays(i.shape):
        yield f"{dtype}[{','.join(map(str, dims))}]", dtype, dims


def largest_array(text: str) -> tuple[int, str]:
  """(bytes, "f32[...]") of the largest array any instruction produces, fused ones included."""
  return max(((array_bytes(t, d), s) for s, t, d in _all_arrays(text)), default=(0, ""))


def square_arrays(text: str, length: int) -> list[str]:
  """The distinct arrays ("f32[...]") with two or more axes >= `length`: an [L, L] array."""
  found = [s for s, _, d in _all_arrays(text) if sum(x >= length for x in d) >= 2]
  return list(dict.fromkeys(found))


# ---------------------------------------------------------------- Compiling a row.


def _loss_and_operands(row: str, heads: int, head_dim: int):
  """(loss(q, k, v, operands), operands as ShapeDtypeStructs) of `row`."""
  name, kwargs = ROWS[row]
  fn = attention_fn(name)
  operands = {k: v.struct(heads, head_dim) for k, v in kwargs.items() if isinstance(v, Operand)}
  static = {k: v for k, v in kwargs.items() if not isinstance(v, Operand)}
  shared_qk = "k" not in inspect.signature(fn).parameters

  def loss(q, k, v, operands, cotangent):
    out = fn(q, v, **static, **operands) if shared_qk else fn(q, k, v, **static, **operands)
    # An input cotangent, not sum(out): with dO = 1 XLA folds products with dO away
    # (dV = P^T 1 becomes a column sum), which a training step cannot do.
    return (out.astype(jnp.float32) * cotangent).sum()

  return loss, operands


def trace(row: str, *, batch: int, length: int, heads: int, head_dim: int, dtype) -> None:
  """Traces `row`'s forward+backward abstractly (no compile): a bad setting fails here."""
  loss, operands = _loss_and_operands(row, heads, head_dim)
  qkv = jax.ShapeDtypeStruct((batch, length, heads, head_dim), dtype)
  dout = jax.ShapeDtypeStruct(qkv.shape, jnp.float32)
  jax.eval_shape(jax.value_and_grad(loss, argnums=(0, 1, 2)), qkv, qkv, qkv, operands, dout)


def compile_row(row: str, *, batch: int, length: int, heads: int, head_dim: int, dtype):
  """(compiled, compile seconds) of `row`'s forward and backward: jit(value_and_grad) of
  sum(f(q, k, v) * dO) w.r.t. q, k, v, dO an input (a training step's cotangent)."""
  loss, operands = _loss_and_operands(row, heads, head_dim)
  qkv = jax.ShapeDtypeStruct((batch, length, heads, head_dim), dtype)
  dout = jax.ShapeDtypeStruct(qkv.shape, jnp.float32)
  start = time.perf_counter()
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  compiled = step.lower(qkv, qkv, qkv, operands, dout).compile()
  return compiled, time.perf_counter() - start


def _cost(compiled) -> dict:
  costs = compiled.cost_analysis()
  if isinstance(costs, list | tuple):  # One dict per computation on some jax versions.
    costs = costs[0] if costs else None
  costs = costs or {}
  return {"xla_flops": costs.get("flops"), "xla_bytes": costs.get("bytes accessed")}


def profile(row: str, compiled, *, batch: int, length: int, heads: int, head_dim: int) -> dict:
  """The figures of one compiled row at one length (see the module docstring)."""
  text = compiled.as_text()
  memory = compiled.memory_analysis()
  forward, backward = algorithmic_flops(
    row, batch=batch, length=length, heads=heads, head_dim=head_dim
  )
  alg = forward + backward
  r = {"row": row, "length": length, "alg_fwd_flops": forward, "alg_bwd_flops": backward}
  r |= {"alg_flops": alg, **_cost(compiled), "dot_flops": dot_flops(text)}
  r["xla_vs_alg"] = r["xla_flops"] / alg if r["xla_flops"] else None
  r["dot_vs_alg"] = r["dot_flops"] / alg
  r["temp_bytes"] = getattr(memory, "temp_size_in_bytes", None)
  r["argument_bytes"] = getattr(memory, "argument_size_in_bytes", None)
  r |= op_census(text)
  moved = moved_bytes(text)
  r["layout_bytes"], r["concatenate_bytes"] = moved["layout"], moved["concatenate"]
  r["loops_unknown_trips"] = executions(text)[2]
  r["largest_bytes"], r["largest_array"] = largest_array(text)
  square = square_arrays(text, length)
  r["square_array"] = square[0] if square else None
  r["square_unexpected"] = bool(square) and ROWS[row][0] not in QUADRATIC
  return r


# ---------------------------------------------------------------- Tables.

_G, _M = 1e9, 2**20
WORK_COLUMNS = (
  ("row", "row", "s"), ("length", "L", "d"), ("alg_gflop", "alg GFLOP", ".2f"),
  ("xla_gflop", "XLA GFLOP", ".2f"), ("xla_vs_alg", "XLA/alg", ".2f"),
  ("dot_gflop", "dot GFLOP", ".2f"), ("dot_vs_alg", "dot/alg", ".2f"),
  ("xla_gb", "XLA GB", ".2f"), ("temp_mib", "temp MiB", ".1f"),
  ("argument_mib", "args MiB", ".1f"), ("largest", "largest array", "s"),
  ("square", "L x L array", "s"), ("compile_s", "compile s", ".1f"),
)  # fmt: skip
CENSUS_COLUMNS = (
  ("row", "row", "s"), ("length", "L", "d"),
  *((op, op, "d") for op in CENSUS_OPS),
  ("layout_mb", "transpose+copy MB", ".1f"), ("concatenate_mb", "concat MB", ".1f"),
)  # fmt: skip
CSV_KEYS = (
  "row", "length", "alg_fwd_flops", "alg_bwd_flops", "alg_flops", "xla_flops", "xla_vs_alg",
  "dot_flops", "dot_vs_alg", "xla_bytes", "temp_bytes", "argument_bytes", *CENSUS_OPS,
  "layout_bytes", "concatenate_bytes", "loops_unknown_trips", "largest_bytes", "largest_array",
  "square_array", "square_unexpected", "compile_s",
)  # fmt: skip
NOTES = (
  "alg: the paper's algorithm, forward+backward, matmul FLOPs only (a multiply-add is 2; "
  "softmax and elementwise work not counted): the formulas of `hlo_profile.FLOP_FORMULAS`.",
  "XLA GFLOP / GB: `cost_analysis()`, which counts a while loop's body ONCE whatever its trip "
  "count, so it undercounts looped rows (memory_efficient, sparse, linear/performer causal); "
  "dot GFLOP: the optimized HLO's dots with each loop body weighted by its trip count.",
  "Census: static instruction counts in the optimized HLO, fused computations included "
  "(`fusion` counts the fusion instructions). transpose+copy MB and concat MB: bytes written "
  "per step by transposes, copies and concatenates that are not fused into other work "
  "(alone, or in a fusion that only moves data), loop bodies weighted by their trip counts.",
  "L x L array: the first array with two axes >= L; only exact softmax is allowed one "
  "(UNEXPECTED otherwise).",
  "The step is a training step's: value_and_grad of sum(out * dO), dO an input, so the "
  "forward output is live and no product with dO can be folded away.",
)


def _display(r: Mapping) -> dict:
  square = (
    r["square_array"] and ("UNEXPECTED " if r["square_unexpected"] else "") + r["square_array"]
  )
  mib = lambda k: None if r.get(k) is None else r[k] / _M
  return {
    **r,
    "alg_gflop": r["alg_flops"] / _G,
    "xla_gflop": None if r["xla_flops"] is None else r["xla_flops"] / _G,
    "dot_gflop": r["dot_flops"] / _G,
    "xla_gb": None if r["xla_bytes"] is None else r["xla_bytes"] / _G,
    "temp_mib": mib("temp_bytes"),
    "argument_mib": mib("argument_bytes"),
    "largest": f"{r['largest_bytes'] / _M:.1f} MiB {r['largest_array']}",
    "square": square or "-",
    "layout_mb": r["layout_bytes"] / 1e6,
    "concatenate_mb": r["concatenate_bytes"] / 1e6,
  }


def markdown(rows: Sequence[Mapping], header: str) -> str:
  """Both tables (work and memory; op census) under `header`, with the notes."""
  shown = [_display(r) for r in rows]
  work = report.markdown_table(shown, WORK_COLUMNS, header)
  census = report.markdown_table(shown, CENSUS_COLUMNS, "Op census of the optimized HLO.", NOTES)
  return f"{work}\n\n{census}"


# ---------------------------------------------------------------- Command line.


def _parse_dtype(name: str) -> jnp.dtype:
  if name not in ("float32", "bfloat16", "float16"):
    raise ConfigError(f"--dtype={name!r}: use float32, bfloat16 or float16.")
  return jnp.dtype(name)


def _parse_rows(text: str) -> list[str]:
  wanted = [r.strip() for r in text.split(",") if r.strip()]
  unknown = [r for r in wanted if r not in ROWS]
  if unknown or not wanted:
    raise ConfigError(f"--rows: unknown {', '.join(unknown) or '(none given)'}; "
                      f"valid: {', '.join(ROWS)}.")  # fmt: skip
  return list(dict.fromkeys(wanted))


@report.one_line_errors
def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", default=",".join(ROWS), help="which rows of ROWS, comma-separated")
  parser.add_argument("--lengths", default="1024,2048,4096,8192", help="comma-separated L")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
  parser.add_argument(
    "--hlo_lengths", default="", help="lengths whose optimized HLO is saved as OUT/hlo/ROW.txt"
  )
  report.add_out_flag(parser, "hlo_profile.md, .csv and .json")
  parser.add_argument(
    "--dry_run",
    action="store_true",
    help="check the flags, --out and that every row traces at every length; compile nothing",
  )
  args = parser.parse_args(argv)
  out = report.prepare_out(args.out)  # Checked now, not after the compiles.
  rows = _parse_rows(args.rows)
  lengths = report.positive_ints(args.lengths, "--lengths")
  hlo_lengths = set()
  if args.hlo_lengths.strip():
    hlo_lengths = set(report.positive_ints(args.hlo_lengths, "--hlo_lengths"))
  if hlo_lengths and not out:
    raise ConfigError("--hlo_lengths needs --out: the HLO files go to OUT/hlo/.")
  dtype = _parse_dtype(args.dtype)
  report.check_positive(args, ("batch", "heads", "head_dim"))
  shape = dict(batch=args.batch, heads=args.heads, head_dim=args.head_dim)
  # Every row traces at every length before anything compiles: a setting that does not
  # fit a length (a block longer than L) is one line now, with nothing written.
  for row in rows:
    for length in lengths:
      trace(row, length=length, dtype=dtype, **shape)
  if args.dry_run:
    print(report.dry_run_line(f"{len(rows)} row(s) x {len(lengths)} length(s) trace", out))
    return 0
  results, hlo = [], {}
  for row in rows:
    for length in lengths:
      compiled, seconds = compile_row(row, length=length, dtype=dtype, **shape)
      results.append({**profile(row, compiled, length=length, **shape), "compile_s": seconds})
      if length in hlo_lengths:
        hlo[f"{row}_{length}" if len(hlo_lengths) > 1 else row] = compiled.as_text()
      print(f"compiled {row} at L={length} in {seconds:.1f} s", file=sys.stderr, flush=True)
  header = (
    f"Attention forward+backward, compiled (jit(value_and_grad(sum(f(q, k, v) * dO))), "
    f"nothing executed). "
    f"{report.device_line(cpu=True)} Shape: batch {args.batch}, heads {args.heads}, "
    f"head_dim {args.head_dim}, {dtype.name}."
  )
  table = markdown(results, header)
  print(table)
  if out:
    md, csv = report.write_tables(out, "hlo_profile", table, results, CSV_KEYS)
    with paths.writing(f"--out={out}"):
      paths.write_text(out / "hlo_profile.json", json.dumps(results, indent=2))
      if hlo:
        (out / "hlo").mkdir(parents=True, exist_ok=True)
        for name, text in hlo.items():
          paths.write_text(out / "hlo" / f"{name}.txt", text)
    print(f"\nwrote {md}, {csv} and hlo_profile.json" + (f", hlo/ ({len(hlo)})" if hlo else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
