r"""Our attention functions against what a user would pick instead, timed side by side.

    pip install torch --index-url https://download.pytorch.org/whl/cpu
    pip install -e '.[peers]'
    python -m efficient_transformers.benchmarks.peers --out=benchmarks_out/peers
    python -m efficient_transformers.benchmarks.peers --rows=local,memory_efficient \
        --lengths=1024,2048 --repeats=3 --dtype=bfloat16 --out=...

Each workload (a row of ROWS) is one forward + backward, the gradient of the output's sum
w.r.t. q, k and v, at batch 1, 4 heads, head_dim 64, on inputs drawn once from --seed with
numpy: the same values on both sides. Each side is warmed up once (JAX compiles), then
--repeats rounds alternate them, the order reversed every other round (ours, peer, peer,
ours, ...: ABBA), so a drifting load slows both alike, each call after a short pause
(PAUSE_S) in which the other side's worker threads go idle. The table gives each side's
median and ratio = median(ours) / median(peer): above 1, ours is slower. torch runs with one
thread per CPU this process may use (its affinity: `taskset -c 0` gives both sides one), as
many as JAX's CPU client uses; both run on the CPU. Run it on an
otherwise idle machine: under contention torch's OpenMP threads stall at their barriers far
more than XLA's pool does (seen on a shared 2-core machine: 10x swings of the torch side
only), which biases the ratios in our favour.

Memory, two measures, each named in the table: JAX sides (ours, jax.nn, tokamax) report
XLA's `memory_analysis()` of the compiled step, its temporaries (arguments and outputs
excluded); torch sides the growth of the peak RSS over one warm forward + backward in a
fresh process (gradients, output and allocator overhead included).

Before a pair is timed, the forward outputs are compared: "exact" peers compute the same
math (max abs difference against a tolerance; a mismatch is marked, never fatal);
"approx." peers differ in a stated detail (the difference is shown for information);
randomized ones say "n/a". A peer that is not installed, or fails on a shape, becomes a
row with the reason; the command exits 0 if at least one pair ran. Writes peers.md (the
table), peers.csv and peers.json.
"""

import argparse
import dataclasses
import functools
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from efficient_transformers import paths
from efficient_transformers.attention import linear, local, memory_efficient, nystromformer
from efficient_transformers.attention import performer as performer_lib
from efficient_transformers.attention import reformer as reformer_lib
from efficient_transformers.benchmarks import report
from efficient_transformers.errors import ConfigError

BATCH, HEADS, HEAD_DIM = 1, 4, 64
WINDOW = 64  # local block, Nystrom landmarks, linear chunk and Reformer bucket/chunk size
NUM_FEATURES = 256
PAUSE_S = 0.02  # before each timed call (`time_pair`)
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}  # max abs difference of an exact match
_MIB = 2**20
# Import name -> distribution: what `pip install` takes, and whose version the header gives.
DISTRIBUTIONS = {
  "torch": "torch",
  "local_attention": "local-attention",
  "nystrom_attention": "nystrom-attention",
  "performer_pytorch": "performer-pytorch",
  "reformer_pytorch": "reformer-pytorch",
  "tokamax": "tokamax",
  "jax": "jax",
}
TORCH_CPU = "pip install torch --index-url https://download.pytorch.org/whl/cpu"

Shape = tuple[int, int, int, int]  # [batch, length, heads, head_dim]


def make_inputs(shape: Shape, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """q, k, v [batch, length, heads, head_dim] float32, standard normal from `seed`."""
  rng = np.random.default_rng(seed)
  return tuple(rng.standard_normal(shape, dtype=np.float32) for _ in range(3))


def _one_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  message = f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
  return message if len(message) <= 240 else message[:237] + "..."


# ---------------------------------------------------------------- Adapters.


class Peer:
  """One side of a pair: an attention that runs one forward + backward on given inputs.

  Attributes:
    name: as the table names it.
    packages: import names it needs (`DISTRIBUTIONS` says what to install).
    settings: what it is called with, for the table's notes.
    compare: "exact" (the same math as ours), "approx.: WHY" or "n/a (randomized: WHY)".
    memory_method: how `memory_mib` measures.
  """

  name = ""
  packages: tuple[str, ...] = ()
  settings = ""
  compare = "exact"
  memory_method = ""

  def available(self) -> str | None:
    """None if every package imports, else one line: why not and how to install it."""
    for module in self.packages:
      try:
        importlib.import_module(module)
      except ImportError:
        hint = (
          TORCH_CPU if module == "torch" else f"pip install {DISTRIBUTIONS.get(module, module)}"
        )
        return f"{module} is not installed: {hint}"
      except Exception as e:  # noqa: BLE001 - a broken install is a reason, not a crash.
        return f"{module} does not import: {_one_line(e)}"
    return None

  def prepare(self, shape: Shape, dtype: str, seed: int) -> Callable[[], None]:
    """A zero-argument function running one forward + backward to completion."""
    raise NotImplementedError

  def forward(self, shape: Shape, dtype: str, seed: int) -> np.ndarray:
    """The output [batch, length, heads, head_dim] as float32 numpy."""
    raise NotImplementedError

  def memory_mib(self, shape: Shape, dtype: str, seed: int) -> float | None:
    """The step's memory in MiB by `memory_method`; None where it cannot tell."""
    return None


class JaxPeer(Peer):
  """A JAX attention `build(shape, seed) -> fn(q, k, v)` on [batch, length, heads, head_dim]."""

  memory_method = "XLA temp"

  def __init__(self, name, build, *, settings="", compare="exact", packages=("jax",)):
    self.name, self.build, self.settings = name, build, settings
    self.compare, self.packages = compare, packages
    self._compiled = {}

  def _args(self, shape, dtype, seed):
    # On the CPU, beside torch's, even where JAX's default device is an accelerator.
    cpu = jax.devices("cpu")[0]
    return [jax.device_put(jnp.asarray(x, jnp.dtype(dtype)), cpu) for x in make_inputs(shape, seed)]

  def _step(self, shape, dtype, seed):
    if (shape, dtype, seed) not in self._compiled:
      fn = self.build(shape, seed)
      loss = lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum()
      step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
      args = self._args(shape, dtype, seed)
      self._compiled[(shape, dtype, seed)] = step.lower(*args).compile(), args
    return self._compiled[(shape, dtype, seed)]

  def prepare(self, shape, dtype, seed):
    compiled, args = self._step(shape, dtype, seed)
    return lambda: jax.block_until_ready(compiled(*args))

  def forward(self, shape, dtype, seed):
    out = jax.jit(self.build(shape, seed))(*self._args(shape, dtype, seed))
    return np.asarray(out.astype(jnp.float32))

  def memory_mib(self, shape, dtype, seed):
    analysis = self._step(shape, dtype, seed)[0].memory_analysis()
    return None if analysis is None else analysis.temp_size_in_bytes / _MIB


class TorchPeer(Peer):
  """A torch attention `attend(module, *leaves) -> out`, `module(shape, seed)` built once.

  `layout` says what the leaves (the tensors that get gradients) and the output are:
  "bhld", q, k, v as [batch, heads, length, head_dim] and the output alike; "qkv", one
  [batch, length, 3 * heads * head_dim] with q, k, v side by side, the output [batch,
  length, heads * head_dim]; "shared_qk", q and v as [batch * heads, length, head_dim]
  (k is not an input), the output alike.
  """

  memory_method = "RSS growth"

  def __init__(
    self, row, name, attend, settings, module=None, packages=("torch",), layout="bhld",
    compare="exact",
  ):  # fmt: skip
    self.row, self.name, self.attend, self.settings = row, name, attend, settings
    self.module, self.packages, self.layout, self.compare = module, packages, layout, compare

  def _tensors(self, shape, dtype, seed, grad):
    import torch

    torch.manual_seed(seed)  # Peers drawing at every call (LSH rotations) repeat their draws.
    b, n, h, d = shape
    q, k, v = (x.transpose(0, 2, 1, 3) for x in make_inputs(shape, seed))
    leaves = {
      "bhld": (q, k, v),
      "qkv": [
        np.concatenate([x.transpose(0, 2, 1, 3).reshape(b, n, h * d) for x in (q, k, v)], -1)
      ],
      "shared_qk": (q.reshape(b * h, n, d), v.reshape(b * h, n, d)),
    }[self.layout]
    cast = getattr(torch, dtype)
    return [torch.from_numpy(np.ascontiguousarray(x)).to(cast).requires_grad_(grad) for x in leaves]

  def _module(self, shape, seed):
    return None if self.module is None else self.module(shape, seed)

  def prepare(self, shape, dtype, seed):
    module, leaves = self._module(shape, seed), self._tensors(shape, dtype, seed, grad=True)

    def step():
      for x in leaves:
        x.grad = None  # Fresh gradients each call, as JAX's: no accumulation.
      self.attend(module, *leaves).float().sum().backward()

    return step

  def forward(self, shape, dtype, seed):
    import torch

    module = self._module(shape, seed)
    with torch.no_grad():
      out = self.attend(module, *self._tensors(shape, dtype, seed, grad=False)).float().numpy()
    b, n, h, d = shape
    return out.reshape(shape) if self.layout == "qkv" else out.reshape(b, h, n, d).swapaxes(1, 2)

  def memory_mib(self, shape, dtype, seed):
    return rss_growth_mib(self.row, self.name, shape, dtype, seed)


# ---------------------------------------------------------------- The peers' code.


def _call(module, *leaves):
  return module(*leaves)


def _sdpa(module, q, k, v):
  import torch.nn.functional as F

  return F.scaled_dot_product_attention(q, k, v)


def _elu1(x):
  import torch.nn.functional as F

  return F.elu(x) + 1


def _torch_linear(module, q, k, v):
  phi_q, phi_k = _elu1(q), _elu1(k)
  return phi_q @ (phi_k.transpose(-1, -2) @ v) / (phi_q @ phi_k.sum(-2).unsqueeze(-1))


def _torch_causal_linear(module, q, k, v):
  """Chunks of WINDOW: a masked [chunk, chunk] product within, the prefix state across."""
  import torch
  import torch.nn.functional as F

  b, h, n, d = q.shape
  c = min(WINDOW, n)
  pad = (0, 0, 0, -n % c)  # Zero features on padded keys add nothing; padded queries are cut.
  qc, kc, vc = (F.pad(x, pad).reshape(b, h, -1, c, d) for x in (_elu1(q), _elu1(k), v))
  kv, k_sum = kc.transpose(-1, -2) @ vc, kc.sum(-2)  # per chunk: [.., d, d], [.., d]
  state, norm = kv.cumsum(2) - kv, k_sum.cumsum(2) - k_sum  # over the chunks before
  below = torch.tril(torch.ones(c, c, dtype=torch.bool))
  scores = (qc @ kc.transpose(-1, -2)).masked_fill(~below, 0.0)
  num = scores @ vc + qc @ state
  den = scores.sum(-1) + (qc @ norm.unsqueeze(-1)).squeeze(-1)
  return (num / den.unsqueeze(-1)).reshape(b, h, -1, d)[:, :, :n]


def _local_module(causal):
  def build(shape, seed):
    from local_attention import LocalAttention

    return LocalAttention(
      window_size=WINDOW, causal=causal, look_backward=1, look_forward=0 if causal else 1
    )

  return build


def _nystrom_module(shape, seed):
  from nystrom_attention import NystromAttention
  from torch import nn

  _, _, heads, head_dim = shape
  module = NystromAttention(
    dim=heads * head_dim,
    dim_head=head_dim,
    heads=heads,
    num_landmarks=WINDOW,
    pinv_iterations=6,
    residual=False,
  )
  module.to_qkv, module.to_out = nn.Identity(), nn.Identity()  # Its core: no projections.
  return module


def _performer_features(shape: Shape, seed: int) -> jax.Array:
  """Both sides' FAVOR+ projection [NUM_FEATURES, head_dim], drawn by ours from `seed`."""
  return performer_lib.draw_random_features(jax.random.key(seed), NUM_FEATURES, shape[3])


def _performer_module(shape, seed):
  import torch
  from performer_pytorch import FastAttention

  module = FastAttention(dim_heads=shape[3], nb_features=NUM_FEATURES, causal=False)
  module.projection_matrix.copy_(torch.from_numpy(np.array(_performer_features(shape, seed))))
  return module


def _lsh_module(shape, seed):
  from reformer_pytorch import LSHAttention

  return LSHAttention(bucket_size=WINDOW, n_hashes=1, causal=False)


def _lsh(module, qk, v):
  return module(qk, v)[0]


# ---------------------------------------------------------------- Rows.


@dataclasses.dataclass(frozen=True)
class Row:
  """A workload: our function and the peers it is timed against."""

  name: str
  ours: Peer
  peers: tuple[Peer, ...]


def _ours(fn, note="", **kwargs) -> JaxPeer:
  call = f"{fn.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}){note}"
  build = lambda shape, seed: functools.partial(fn, **kwargs)
  return JaxPeer(f"ours {fn.__name__}", build, settings=call)


def _ours_performer(shape, seed):
  features = _performer_features(shape, seed)
  return lambda q, k, v: performer_lib.performer_attention(q, k, v, features, kernel="softmax")


def _ours_reformer(shape, seed):
  buckets = max(2, shape[1] // WINDOW)  # As the peer: length / bucket_size buckets.
  return lambda q, k, v: reformer_lib.reformer_attention(
    q, v, key=jax.random.key(seed), num_hashes=1, num_buckets=buckets, chunk_size=WINDOW
  )


def _jax_dpa(shape, seed):
  return jax.nn.dot_product_attention


def _tokamax(implementation):
  def build(shape, seed):
    import tokamax
    from absl import flags

    if not flags.FLAGS.is_parsed():  # tokamax reads absl flags, which would parse our argv.
      flags.FLAGS.mark_as_parsed()

    return lambda q, k, v: tokamax.dot_product_attention(q, k, v, implementation=implementation)

  call = f"tokamax.dot_product_attention(q, k, v, implementation={implementation!r})"
  return JaxPeer(f"tokamax {implementation}", build, settings=call, packages=("jax", "tokamax"))


def _local_peer(row, causal):
  call = (
    f"LocalAttention(window_size={WINDOW}, causal={causal}, look_backward=1, look_forward="
    f"{0 if causal else 1}); no rotary embedding (no dim given)"
  )
  packages = ("torch", "local_attention")
  return TorchPeer(
    row, "local-attention LocalAttention", _call, call, _local_module(causal), packages
  )


NYSTROM = (
  f"NystromAttention(dim_head={HEAD_DIM}, heads={HEADS}, num_landmarks={WINDOW}, "
  "pinv_iterations=6, residual=False) with to_qkv and to_out replaced by nn.Identity: its own "
  "forward on [q | k | v] side by side, no projection timed"
)
NYSTROM_COMPARE = (
  "approx.: the peer's pinv starts from A^T over maxima across all heads, ours per head"
)
PERFORMER = (
  f"FastAttention(dim_heads={HEAD_DIM}, nb_features={NUM_FEATURES}, causal=False): FAVOR+ "
  "softmax kernel (its default), its projection_matrix set to ours"
)
# Checked: with the peer's eps patched to 0 the outputs agree to 3e-6 (L=1024, float32).
PERFORMER_COMPARE = "approx.: the same random features on both sides; the peer adds 1e-4 to each"
REFORMER = (
  f"LSHAttention(bucket_size={WINDOW}, n_hashes=1, causal=False), heads folded into the batch: "
  f"length // {WINDOW} buckets, chunks of {WINDOW} looking one chunk back"
)
REFORMER_COMPARE = (
  "n/a (randomized: other rotations, shared across heads in the peer, whose first chunk also "
  "looks back at the last)"
)
OURS_PERFORMER = f"performer_attention(kernel='softmax'), {NUM_FEATURES} orthogonal random features"
OURS_REFORMER = (
  f"reformer_attention(num_hashes=1, num_buckets=length // {WINDOW}, chunk_size={WINDOW}): "
  "shared QK, rotations per head, the first chunk looks back at nothing"
)
LINEAR = "plain torch: phi = elu + 1, out = phi(q) (phi(k)^T v) / (phi(q) sum phi(k))"
CAUSAL_LINEAR = (
  f"plain torch: phi = elu + 1, chunks of {WINDOW}, a masked [chunk, chunk] product within a "
  "chunk plus the prefix state of the chunks before (a cumsum over chunks)"
)
SDPA = "torch.nn.functional.scaled_dot_product_attention(q, k, v), torch's choice of kernel"
JAX_DPA = "jax.nn.dot_product_attention(q, k, v), implementation=None (XLA)"

_LOCAL = dict(block_size=WINDOW, num_neighbors=1)
ROWS = {
  r.name: r
  for r in (
    Row("local", _ours(local.local_attention, **_LOCAL, causal=False),
        (_local_peer("local", False),)),
    Row("local_causal", _ours(local.local_attention, **_LOCAL, causal=True),
        (_local_peer("local_causal", True),)),
    Row("nystromformer",
        _ours(nystromformer.nystromformer_attention, " (no conv)", num_landmarks=WINDOW,
              pinv_iterations=6),
        (TorchPeer("nystromformer", "nystrom-attention NystromAttention (core)", _call, NYSTROM,
                   _nystrom_module, ("torch", "nystrom_attention"), "qkv", NYSTROM_COMPARE),)),
    Row("linear", _ours(linear.linear_attention, causal=False),
        (TorchPeer("linear", "torch linear (elu+1)", _torch_linear, LINEAR),)),
    Row("linear_causal", _ours(linear.linear_attention, causal=True, chunk_size=WINDOW),
        (TorchPeer("linear_causal", "torch chunked causal linear (elu+1)",
                   _torch_causal_linear, CAUSAL_LINEAR),)),
    Row("performer",
        JaxPeer("ours performer_attention", _ours_performer, settings=OURS_PERFORMER),
        (TorchPeer("performer", "performer-pytorch FastAttention", _call, PERFORMER,
                   _performer_module, ("torch", "performer_pytorch"), "bhld",
                   PERFORMER_COMPARE),)),
    Row("reformer",
        JaxPeer("ours reformer_attention", _ours_reformer, settings=OURS_REFORMER),
        (TorchPeer("reformer", "reformer-pytorch LSHAttention", _lsh, REFORMER, _lsh_module,
                   ("torch", "reformer_pytorch"), "shared_qk", REFORMER_COMPARE),)),
    Row("memory_efficient",
        _ours(memory_efficient.memory_efficient_attention, " (exact, 512 x 512 chunks)"),
        (TorchPeer("memory_efficient", "torch SDPA", _sdpa, SDPA),
         JaxPeer("jax.nn.dot_product_attention", _jax_dpa, settings=JAX_DPA),
         _tokamax("xla"),
         _tokamax("xla_chunked"))),
  )
}  # fmt: skip


# ---------------------------------------------------------------- Measuring.


def _pause() -> None:
  time.sleep(PAUSE_S)


def time_pair(
  ours: Callable[[], None],
  peer: Callable[[], None],
  repeats: int,
  clock: Callable[[], float] = time.perf_counter,
  pause: Callable[[], None] = _pause,
) -> tuple[list[float], list[float]]:
  """Seconds of each call of `ours` and `peer`: one warm-up each, then ABBA rounds.

  Each timed call comes after `pause()` (PAUSE_S): the worker threads of the framework
  that ran last spin for a while after a call (OpenMP's, XLA's), and would otherwise
  compete with the next call for the cores.
  """
  ours()
  peer()
  sides, times = (ours, peer), ([], [])
  for i in range(repeats):
    for side in (0, 1) if i % 2 == 0 else (1, 0):
      pause()
      start = clock()
      sides[side]()
      times[side].append(clock() - start)
  return times


def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _rss_child(row: str, peer_name: str, length: str, dtype: str, seed: str) -> None:
  """In a fresh process: prints the peak RSS growth (MiB) of one warm call, as JSON."""
  setup_torch()
  peer = next(p for p in ROWS[row].peers if p.name == peer_name)
  step = peer.prepare((BATCH, int(length), HEADS, HEAD_DIM), dtype, int(seed))
  step()  # One-time allocations (thread pools, the autograd engine) are not the call's.
  gc.collect()
  before = _status_kib("VmRSS")
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # Linux: resets the peak RSS (VmHWM) to the current RSS.
  step()
  print(json.dumps({"mib": max(0, _status_kib("VmHWM") - before) / 1024}))


def rss_growth_mib(row: str, peer_name: str, shape: Shape, dtype: str, seed: int) -> float:
  """The peak RSS growth of one warm call of a torch peer, measured in a fresh process.

  glibc's mmap threshold is fixed at 128 KiB there, so freed buffers go back to the
  system and the second call's buffers show in its RSS instead of being reused unseen.
  """
  code = "import sys; from efficient_transformers.benchmarks import peers; peers._rss_child(*sys.argv[1:])"  # noqa: E501
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "JAX_PLATFORMS": "cpu"}
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
  args = [row, peer_name, str(shape[1]), dtype, str(seed)]
  done = subprocess.run(
    [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=900
  )
  if done.returncode:
    raise RuntimeError((done.stderr.strip().splitlines() or ["no output"])[-1])
  return float(json.loads(done.stdout.strip().splitlines()[-1])["mib"])


def _check(peer: Peer, ours_out: np.ndarray, peer_out: np.ndarray, dtype: str) -> dict:
  if peer.compare.startswith("n/a"):
    return {"check": peer.compare}
  if peer_out.shape != ours_out.shape:
    return {"check": f"MISMATCH: shape {peer_out.shape}, ours {ours_out.shape}"}
  diff = float(np.max(np.abs(ours_out - peer_out)))
  if peer.compare != "exact":
    return {"max_abs_diff": diff, "check": peer.compare}
  ok = diff <= TOLERANCE[dtype]
  return {"max_abs_diff": diff, "check": "ok" if ok else f"MISMATCH (> {TOLERANCE[dtype]:g})"}


def _pair(peer, ours, shape, dtype, seed, timer) -> dict:
  """One pair at one length: check, time, memory. An exception is the caller's to record."""
  result = {}
  result.update(_check(peer, ours["out"], peer.forward(shape, dtype, seed), dtype))
  ours_times, peer_times = timer(ours["step"], peer.prepare(shape, dtype, seed))
  ours_s, peer_s = float(np.median(ours_times)), float(np.median(peer_times))
  result.update(
    ours_ms=1e3 * ours_s,
    peer_ms=1e3 * peer_s,
    ratio=ours_s / peer_s if peer_s > 0 else None,
    ours_times_ms=[1e3 * t for t in ours_times],
    peer_times_ms=[1e3 * t for t in peer_times],
    ours_mib=ours["mib"],
    peer_memory=peer.memory_method,
  )
  try:
    result["peer_mib"] = peer.memory_mib(shape, dtype, seed)
  except Exception as e:  # noqa: BLE001 - the timing stands without the memory.
    result["note"] = f"peer memory not measured: {_one_line(e)}"
  return result


def _prepare_ours(row: Row, shape, dtype, seed) -> dict:
  out = row.ours.forward(shape, dtype, seed)
  step = row.ours.prepare(shape, dtype, seed)
  return {"out": out, "step": step, "mib": row.ours.memory_mib(shape, dtype, seed)}


def run(
  rows: Sequence[Row],
  lengths: Sequence[int],
  *,
  dtype: str = "float32",
  seed: int = 0,
  timer: Callable = time_pair,
) -> list[dict]:
  """A result per (row, peer, length); a peer unavailable is one row with the reason.

  `timer(ours_step, peer_step) -> (ours_seconds, peer_seconds)` times a pair.
  """
  results = []
  for row in rows:
    for peer in row.peers:
      base = {"row": row.name, "ours": row.ours.name, "peer": peer.name}
      reason = row.ours.available() or peer.available()
      if reason:
        results.append({**base, "length": None, "error": reason})
        continue
      for length in lengths:
        shape = (BATCH, length, HEADS, HEAD_DIM)
        result = {**base, "length": length}
        try:
          ours = _prepare_ours(row, shape, dtype, seed)
        except Exception as e:  # noqa: BLE001 - a row, not a crash.
          results.append({**result, "error": f"ours: {_one_line(e)}"})
          continue
        try:
          result.update(_pair(peer, ours, shape, dtype, seed, timer))
        except Exception as e:  # noqa: BLE001
          result["error"] = _one_line(e)
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if "times" not in k}), file=sys.stderr)
  return results


def dry_run(rows: Sequence[Row], length: int, *, dtype: str, seed: int) -> list[str]:
  """Per pair, "ok" or why not: availability, inputs and output shape at `length`."""
  lines = []
  shape = (BATCH, length, HEADS, HEAD_DIM)
  for row in rows:
    for peer in row.peers:
      problem = None
      for side in (row.ours, peer):
        problem = problem or side.available()
        if problem:
          break
        try:
          side.prepare(shape, dtype, seed)
          out_shape = side.forward(shape, dtype, seed).shape
          if out_shape != shape:
            problem = f"{side.name}: output {out_shape}, expected {shape}"
        except Exception as e:  # noqa: BLE001
          problem = f"{side.name}: {_one_line(e)}"
      lines.append(f"{row.name} / {peer.name}: {problem or 'ok'}")
  return lines


# ---------------------------------------------------------------- The command.


def setup_torch() -> str | None:
  """torch's version with one thread per usable CPU; None if it does not import."""
  try:
    import torch
  except Exception:  # noqa: BLE001 - its peers say why.
    return None
  torch.set_num_threads(report.usable_cpus())
  return torch.__version__


def device_line() -> str:
  """The header's `Device: ...` sentence, naming the CPU where both sides run."""
  if jax.default_backend() == "cpu":
    return report.device_line(cpu=True)
  info = {"device_kind": "cpu", "platform": "cpu", "num_devices": len(jax.devices("cpu"))}
  return f"Device: {report.device_name(cpu=True, info=info)}, jax {jax.__version__} (CPU backend)."


def versions(rows: Sequence[Row]) -> dict[str, str]:
  """Installed versions of jax, jaxlib and every distribution the rows' adapters import."""
  names = ["jax", "jaxlib"]
  for row in rows:
    for side in (row.ours, *row.peers):
      names += [DISTRIBUTIONS.get(m, m) for m in side.packages]
  found = {}
  for name in dict.fromkeys(names):
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = "not installed"
  return found


COLUMNS = (
  ("row", "row", "s"),
  ("peer", "peer", "s"),
  ("length", "L", "d"),
  ("ours_ms", "ours ms", ".2f"),
  ("peer_ms", "peer ms", ".2f"),
  ("ratio", "ours/peer", ".2f"),
  ("ours_mib", "ours MiB (XLA temp)", ".1f"),
  ("peer_mib", "peer MiB", ".1f"),
  ("peer_memory", "peer memory", "s"),
  ("max_abs_diff", "max abs diff", ".1e"),
  ("check", "check", "s"),
  ("note", "note", "s"),
)
CSV_KEYS = (*(key for key, _, _ in COLUMNS), "ours", "error")


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", help=f"workloads, comma-separated (default: all, {','.join(ROWS)})")
  parser.add_argument("--lengths", default="1024,2048,4096,8192")
  parser.add_argument("--repeats", type=int, default=5, help="timed calls of each side")
  parser.add_argument("--dtype", default="float32", choices=sorted(TOLERANCE))
  parser.add_argument("--seed", type=int, default=0, help="of the inputs and random features")
  report.add_out_flag(parser, "peers.md, peers.csv and peers.json")
  parser.add_argument(
    "--dry_run",
    action="store_true",
    help="check the flags, --out, and every adapter at the smallest length; time nothing",
  )
  return parser.parse_args(argv)


@report.one_line_errors
def main(argv: Sequence[str] | None = None) -> int:
  return benchmark(argv)


def benchmark(
  argv: Sequence[str] | None,
  *,
  rows: dict[str, Row] | None = None,
  clock: Callable[[], float] = time.perf_counter,
  pause: Callable[[], None] = _pause,
) -> int:
  """The command over `rows` (default ROWS), timed by `time_pair` with `clock` and `pause`."""
  rows = ROWS if rows is None else rows
  args = _parse(argv)
  wanted = (
    list(rows) if args.rows is None else [r.strip() for r in args.rows.split(",") if r.strip()]
  )
  unknown = [r for r in wanted if r not in rows]
  if unknown or not wanted:
    what = f"unknown {', '.join(unknown)}" if unknown else "none given"
    raise ConfigError(f"--rows: {what}; valid: {', '.join(rows)}.")
  lengths = report.positive_ints(args.lengths, "--lengths")
  report.check_positive(args, ("repeats",))
  out = report.prepare_out(args.out)  # After the flags: a bad flag writes nothing.
  selected = [rows[r] for r in wanted]
  torch_version = setup_torch()
  threads = report.usable_cpus()
  if args.dry_run:
    lines = dry_run(selected, min(lengths), dtype=args.dtype, seed=args.seed)
    print("\n".join(lines))
    ok = sum(line.endswith(": ok") for line in lines)
    print(report.dry_run_line(f"{ok} of {len(lines)} pair(s) ready at L={min(lengths)}", out))
    return 0 if ok else 1
  timer = functools.partial(time_pair, repeats=args.repeats, clock=clock, pause=pause)
  results = run(selected, lengths, dtype=args.dtype, seed=args.seed, timer=timer)
  found = versions(selected)
  torch_line = (
    f"torch {torch_version} with {threads} threads (one per usable CPU, as JAX's CPU client)"
    if torch_version
    else "torch not installed"
  )
  packages = ", ".join(f"{k} {v}" for k, v in found.items() if k not in ("jax", "torch"))
  header = (
    f"Ours against peers: forward + backward (gradient of sum(out) w.r.t. q, k, v), batch "
    f"{BATCH}, {HEADS} heads, head_dim {HEAD_DIM}, {args.dtype}, seed {args.seed}; median of "
    f"{args.repeats} alternating (ABBA) calls a side after one warm-up, each after a "
    f"{1e3 * PAUSE_S:g} ms pause; ours/peer above 1 = ours slower. {device_line()}"
    f" {torch_line}; {packages}; python {platform.python_version()}. "
    "Memory: ours (and JAX peers) = XLA temp_size of the "
    "compiled step (arguments and outputs excluded); torch peers = peak RSS growth over "
    "one warm call in a fresh process (gradients, output, allocator overhead included)."
  )
  notes = [f"{r.name}: ours {r.ours.settings}." for r in selected]
  notes += [f"{r.name}: {p.name}: {p.settings}." for r in selected for p in r.peers]
  notes.append(
    f"check: exact peers pass at max abs diff <= {TOLERANCE[args.dtype]:g} of the forward "
    "output; approx. rows show the difference for information; n/a rows draw differently."
  )
  table = report.markdown_table(results, COLUMNS, header, notes, error_column=3)
  print(table)
  if out:
    report.write_tables(out, "peers", table, results, CSV_KEYS)
    document = {
      "header": header,
      "device": {
        "line": device_line(),
        "cpu_model": report.cpu_model(),
        "threads": threads,
        "jax_default": report.device_info(),
      },
      "versions": {"torch": torch_version, **found, "python": platform.python_version()},
      "settings": {
        "batch": BATCH,
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "dtype": args.dtype,
        "lengths": lengths,
        "repeats": args.repeats,
        "seed": args.seed,
        "tolerance": TOLERANCE[args.dtype],
        "rows": wanted,
      },
      "notes": notes,
      "rows": results,
    }
    with paths.writing(f"--out={out}"):
      paths.write_text(out / "peers.json", json.dumps(document, indent=2))
  if not any(r.get("ratio") is not None for r in results):
    print("no pair ran: see the table for each row's reason.", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
