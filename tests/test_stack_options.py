"""The stack's layer options: reversible, share_layers, scan_layers, remat_policy.

Each is pinned to a reference built by hand from the same parameters (the plain
two-stream loop, one block applied num_layers times, the unrolled stack), trains
two steps in the sharded train step (classifier and LM, fake 8-device mesh), and
the benchmark command runs at toy sizes. Shapes are tiny: width 16, 2 layers or 4.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.lm import byte_lm as byte_lm_config
from configs.lra import listops as listops_config
from efficient_transformers.benchmarks import stack_options as bench
from efficient_transformers.data import tasks
from efficient_transformers.errors import ConfigError
from efficient_transformers.layers import layer_norm
from efficient_transformers.models import DecoderLM
from efficient_transformers.models.stack import Block, Stack
from efficient_transformers.training import sharding, state, train_lib

D, HEADS, HEAD_DIM, MLP = 16, 2, 8, 32
SIZES = dict(features=D, num_heads=HEADS, head_dim=HEAD_DIM, mlp_dim=MLP)
# Float32 gradients through 4 reconstructed layers: every entry within 1e-5 of
# the largest gradient (reconstruction error is ~1e-7 relative per layer).
GRAD_TOL = 1e-5


def inputs(batch=2, length=12):
  x = jax.random.normal(jax.random.key(1), (batch, length, D))
  mask = jnp.arange(length)[None] < jnp.array([[length], [length - 5]])
  return x, mask


def split(module):
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  return graphdef, params, rest


def merged(graphdef, params, rest):
  return nnx.merge(graphdef, params, jax.tree.map(lambda a: a, rest))


def assert_trees_close(got, want, tol):
  # The scale is the largest gradient of the whole tree: some leaves are zero in
  # exact arithmetic (softmax ignores a key bias), their float32 values noise.
  scale = max(float(np.abs(w).max()) for w in jax.tree.leaves(want))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, atol=tol * scale, rtol=0)


def block_params(d=D, mlp=MLP, inner=HEADS * HEAD_DIM):
  # Two LayerNorms; q, k, v projections with biases; the output projection; the MLP.
  return 2 * 2 * d + 3 * (d * inner + inner) + (inner * d + d) + (d * mlp + mlp) + (mlp * d + d)


def count(module):
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_defaults_keep_the_parameters_of_the_plain_stack():
  stack = Stack(num_layers=2, **SIZES, rngs=nnx.Rngs(0))
  rngs = nnx.Rngs(0)
  blocks = [Block(**SIZES, rngs=rngs) for _ in range(2)]
  norm = layer_norm(D, rngs=rngs)
  want = {"blocks": {i: nnx.to_pure_dict(nnx.state(b, nnx.Param)) for i, b in enumerate(blocks)}}
  want["final_norm"] = nnx.to_pure_dict(nnx.state(norm, nnx.Param))
  got = nnx.to_pure_dict(nnx.state(stack, nnx.Param))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(g, w)


def test_reversible_equals_the_two_stream_loop_values_and_gradients():
  stack = Stack(num_layers=4, **SIZES, causal=True, reversible=True, rngs=nnx.Rngs(0))
  graphdef, params, rest = split(stack)
  x, mask = inputs()

  def by_hand(params, x):
    s = merged(graphdef, params, rest)
    x1 = x2 = x
    for block in s.blocks:
      x1 = x1 + block.attention_branch(x2, mask=mask)
      x2 = x2 + block.mlp_branch(x1)
    return s.final_norm((x1 + x2) / 2)

  def reversible(params, x):
    return merged(graphdef, params, rest)(x, mask=mask)

  def loss(fn):
    return lambda p, x: jnp.sum(jnp.where(mask[..., None], fn(p, x), 0.0) * jnp.sin(x))

  np.testing.assert_allclose(jax.jit(reversible)(params, x), by_hand(params, x), atol=1e-5)
  got = jax.jit(jax.grad(loss(reversible), argnums=(0, 1)))(params, x)
  want = jax.jit(jax.grad(loss(by_hand), argnums=(0, 1)))(params, x)
  assert_trees_close(got, want, GRAD_TOL)


def test_reversible_dropout_is_the_same_in_the_recomputation():
  stack = Stack(
    num_layers=2,
    **SIZES,
    dropout_rate=0.2,
    attention_dropout_rate=0.2,
    causal=True,
    reversible=True,
    share_layers=2,
    rngs=nnx.Rngs(0),
  )
  graphdef, params, rest = split(stack)
  x, mask = inputs()

  def loss(params, x, reference):
    s = merged(graphdef, params, rest)
    y = s.run_blocks(x, mask=mask, deterministic=False, reversible_reference=reference)
    return jnp.sum(jnp.where(mask[..., None], y, 0.0) ** 2)

  got = jax.jit(jax.grad(lambda p, x: loss(p, x, False), argnums=(0, 1)))(params, x)
  want = jax.jit(jax.grad(lambda p, x: loss(p, x, True), argnums=(0, 1)))(params, x)
  assert_trees_close(got, want, GRAD_TOL)
  # Dropout is on, and a second call draws new masks.
  train = nnx.merge(graphdef, params, rest)
  a, b = (train.run_blocks(x, mask=mask, deterministic=False) for _ in range(2))
  assert float(jnp.abs(a - b).max()) > 1e-2
  assert float(jnp.abs(a - train.run_blocks(x, mask=mask)).max()) > 1e-2


@pytest.mark.parametrize("share,distinct", [("none", 4), ("all", 1), (2, 2), ("2", 2), (4, 1)])
def test_shared_parameter_counts(share, distinct):
  stack = Stack(num_layers=4, **SIZES, share_layers=share, rngs=nnx.Rngs(0))
  assert len(stack.blocks) == distinct
  assert count(stack) == distinct * block_params() + 2 * D
  scanned = nnx.eval_shape(
    lambda: Stack(num_layers=4, **SIZES, share_layers=share, scan_layers=True, rngs=nnx.Rngs(0))
  )
  assert count(scanned) == count(stack)


def test_share_all_is_one_block_applied_num_layers_times():
  stack = Stack(num_layers=3, **SIZES, causal=True, share_layers="all", rngs=nnx.Rngs(0))
  x, mask = inputs()
  h = x
  for _ in range(3):
    h = stack.blocks[0](h, mask=mask)
  np.testing.assert_allclose(stack(x, mask=mask), stack.final_norm(h), atol=1e-6)
  assert float(jnp.abs(stack(x, mask=mask) - stack.final_norm(stack.blocks[0](x))).max()) > 1e-3


def restacked(unrolled: Stack, scanned: Stack):
  """The scanned stack's state, holding the unrolled stack's parameters stacked."""
  graphdef, params, rest = split(scanned)
  blocks = nnx.to_pure_dict(nnx.state(unrolled, nnx.Param))
  per_block = [blocks["blocks"][i] for i in sorted(blocks["blocks"])]
  pure = {
    "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *per_block),
    "final_norm": blocks["final_norm"],
  }
  nnx.replace_by_pure_dict(params, pure)
  return graphdef, params, rest


@pytest.mark.parametrize("share", ["none", 2])
def test_scan_equals_the_unrolled_stack_and_remat_keeps_the_gradients(share):
  kw = dict(num_layers=4, **SIZES, causal=True, share_layers=share)
  unrolled = Stack(**kw, rngs=nnx.Rngs(0))
  scanned = Stack(**kw, scan_layers=True, rngs=nnx.Rngs(7))
  spec = nnx.get_partition_spec(nnx.state(scanned, nnx.Param))
  assert tuple(spec["blocks"]["mlp"]["up"]["kernel"].value) == ("layers", "embed", "mlp")
  x, mask = inputs()
  ug, up, ur = split(unrolled)
  sg, sp, sr = restacked(unrolled, scanned)

  def loss(graphdef, rest, remat_policy="none"):
    def fn(params, x):
      s = merged(graphdef, params, rest)
      s.remat_policy = remat_policy
      return jnp.sum(jnp.where(mask[..., None], s(x, mask=mask), 0.0) * jnp.cos(x))

    return jax.jit(jax.value_and_grad(fn))

  np.testing.assert_allclose(
    merged(sg, sp, sr)(x, mask=mask), merged(ug, up, ur)(x, mask=mask), atol=1e-5
  )
  value, grads = loss(ug, ur)(up, x)
  for policy in ("full", "dots_saveable"):
    v, g = loss(ug, ur, policy)(up, x)
    np.testing.assert_allclose(v, value, rtol=1e-6)
    assert_trees_close(g, grads, 1e-6)
  scan_value, scan_grads = loss(sg, sr)(sp, x)
  remat_value, remat_grads = loss(sg, sr, "nothing_saveable")(sp, x)
  np.testing.assert_allclose(scan_value, value, rtol=1e-5)
  np.testing.assert_allclose(remat_value, scan_value, rtol=1e-6)
  assert_trees_close(remat_grads, scan_grads, 1e-6)
  # The scanned gradients are the unrolled ones, stacked.
  want = nnx.to_pure_dict(grads)
  want["blocks"] = jax.tree.map(
    lambda *xs: jnp.stack(xs), *[want["blocks"][i] for i in sorted(want["blocks"])]
  )
  assert_trees_close(nnx.to_pure_dict(scan_grads), want, 1e-5)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(remat_policy="some"), r"remat_policy='some' is unknown; valid: none, full, dots_sav"),
    (dict(share_layers=3), r"share_layers=3 .* must divide num_layers=4"),
    (dict(share_layers="half"), r"share_layers must be 'none', 'all' or a positive integer"),
    (dict(reversible=True, scan_layers=True), r"reversible=True .* scan_layers=True"),
    (dict(reversible=True, remat_policy="full"), r"reversible=True with remat_policy='full'"),
  ],
)
def test_bad_layer_options_are_config_errors(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    Stack(num_layers=4, **SIZES, rngs=nnx.Rngs(0), **kwargs)


@pytest.mark.parametrize("memory", ["transformer_xl", "rmt"])
def test_memory_stacks_refuse_the_layer_options_by_name(memory):
  with pytest.raises(ConfigError, match=rf"scan_layers=True does not work with memory={memory!r}"):
    DecoderLM(
      num_layers=2,
      emb_dim=16,
      num_heads=2,
      qkv_dim=16,
      mlp_dim=32,
      segment_length=8,
      memory=memory,
      mem_len=8,
      num_memory_tokens=2,
      scan_layers=True,
      rngs=nnx.Rngs(0),
    )


OPTIONS = [
  dict(reversible=True),
  dict(share_layers="all"),
  dict(scan_layers=True, share_layers="1", remat_policy="dots_saveable"),
]


def two_sharded_steps(config, make_batch):
  spec = tasks.describe(config)
  setup = train_lib._build(config, spec)
  step_fn = train_lib._compile_train_step(config, spec, setup)
  train_state = state.init_state(setup)
  assert setup.num_params == sum(x.size for x in jax.tree.leaves(train_state["params"]))
  before = jax.device_get(train_state["params"])
  for i in range(2):
    batch = sharding.global_batch(make_batch(i), setup.batch_sharding)
    train_state, metrics = step_fn(train_state, batch)
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  after = jax.device_get(train_state["params"])
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, b), before, after))
  assert sum(changed) > len(changed) // 2
  return setup


def small(c):
  c.model.num_layers = 2
  c.model.emb_dim = c.model.qkv_dim = 16
  c.model.num_heads = 2
  c.model.mlp_dim = 32
  c.model.dropout_rate = 0.1
  c.batch_size = 8
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o))
def test_classifier_trains_two_sharded_steps(options):
  c = listops_config.get_config("smoke")
  small(c)
  c.model.classifier_dim = 16
  c.model.update(options)
  rng = np.random.default_rng(0)
  length = c.model.max_length

  def batch(i):
    ids = rng.integers(1, 17, size=(c.batch_size, length)).astype(np.int16)
    ids[:, length - 3 * i - 5 :] = 0  # Padding reaches the masks.
    return {"inputs": ids, "targets": rng.integers(0, 10, size=(c.batch_size,)).astype(np.int32)}

  two_sharded_steps(c, batch)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o))
def test_lm_trains_two_sharded_steps(options):
  c = byte_lm_config.get_config("smoke,memory=none")
  small(c)
  c.model.segment_length = 32
  c.model.update(options)
  rng = np.random.default_rng(0)

  def batch(i):
    tokens = rng.integers(1, 257, size=(c.batch_size, c.model.segment_length + 1), dtype=np.int32)
    return {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "reset": np.full((c.batch_size,), i == 0),
    }

  setup = two_sharded_steps(c, batch)
  if options.get("share_layers") == "all":  # One block's parameters, counted once.
    unshared = nnx.eval_shape(
      lambda: state.build_model(
        _unshared(c.model),
        vocab_size=257,
        num_classes=0,
        rngs=nnx.Rngs(0),
      )
    )
    assert count(unshared) - setup.num_params == block_params()


def _unshared(model_cfg):
  cfg = model_cfg.copy_and_resolve_references()
  cfg.share_layers = "none"
  return cfg


def test_benchmark_writes_its_tables_to_a_relative_out(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  flags = [
    "--reversible_layers=1,2",
    "--scan_layers=1,2",
    "--batch=1",
    "--length=16",
    "--features=16",
    "--num_heads=2",
    "--mlp_dim=32",
  ]
  assert bench.main([*flags, "--out=rel/out", "--dry_run"]) == 0
  assert not any((tmp_path / "rel" / "out").glob("*.md"))
  capsys.readouterr()
  assert bench.main([*flags, "--out=rel/out"]) == 0
  printed = capsys.readouterr().out
  tables = {
    "stack_options_reversible": bench.REVERSIBLE_CSV_KEYS,
    "stack_options_scan": bench.SCAN_CSV_KEYS,
  }
  for name, keys in tables.items():
    text = (tmp_path / "rel" / "out" / f"{name}.md").read_text()
    assert "| 2 |" in text and "jax " in text and text.strip() in printed
    csv_lines = (tmp_path / "rel" / "out" / f"{name}.csv").read_text().splitlines()
    assert csv_lines[0] == ",".join(keys) and len(csv_lines) == 3
  assert bench.main([*flags, "--scan_layers=0"]) == 2
  assert capsys.readouterr().err.startswith("error: --scan_layers=")
  (tmp_path / "file").write_text("")
  assert bench.main([*flags, "--out=file/out", "--dry_run"]) == 2
  assert capsys.readouterr().err == (
    f"error: --out={tmp_path / 'file' / 'out'} is inside a file, not a directory: "
    "use a directory path.\n"
  )
