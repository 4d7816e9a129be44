"""Head pruning (Michel et al. 2019): per-layer head counts, importance, and pruned models.

A pruned model is pinned to the original with the removed heads' out-projection
rows zeroed (`mask_heads`); the importance to an explicit gate on each head's output;
the table of per-head parameters to every variant's logical-axis metadata. Shapes
are tiny: width 16, 4 heads of 4 dimensions, 2 layers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_transformers import attention
from efficient_transformers.data import pipeline
from efficient_transformers.errors import ConfigError
from efficient_transformers.models.stack import Stack
from efficient_transformers.training import eval_lib, objectives, state, train_and_evaluate
from efficient_transformers.training import head_pruning as hp
from tests.helpers import SMALL_KWARGS, tiny_config

VOCAB, CLASSES, LENGTH = 20, 10, 12


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("listops_tiny")


def small_config(data_dir, *, attention_name="softmax", heads=4, layers=2, **model):
  c = tiny_config(data_dir, attention=attention_name)
  c.model.num_layers, c.model.num_heads = layers, heads
  c.model.dropout_rate = c.model.attention_dropout_rate = 0.0
  c.model.attention_kwargs = dict(SMALL_KWARGS.get(attention_name, {}))
  for key, value in model.items():
    c.model[key] = value
  return c


def build(config, seed=1):
  return state.build_model(
    config.model, vocab_size=VOCAB, num_classes=CLASSES, rngs=nnx.Rngs(params=seed, dropout=2)
  )


def padded_ids(batch=3):
  ids = jax.random.randint(jax.random.key(0), (batch, LENGTH), 1, VOCAB)
  real = jnp.array([LENGTH, 8, 5])[:batch, None]
  return jnp.where(jnp.arange(LENGTH)[None] < real, ids, 0)


def attentions(model):
  return [block.attention for block in model.encoder.stack.blocks]


def jitted_logits(model, ids):
  return nnx.jit(lambda m, x: m(x))(model, ids)


def test_pruned_model_is_smaller_and_equals_the_masked_original(data_dir):
  config = small_config(data_dir)
  model = build(config)
  keep = ((0, 2), (1, 2, 3))
  pruned, pruned_config = hp.pruned_model(config, model, keep)

  assert tuple(pruned_config.model.heads_per_layer) == (2, 3)
  assert tuple(config.model.heads_per_layer) == ()  # The caller's config is untouched.
  for layer, heads in zip(attentions(pruned), (2, 3), strict=True):
    assert layer.num_heads == heads and layer.head_dim == 4
    assert layer.query.kernel.shape == (16, heads, 4)
    assert layer.out.kernel.shape == (heads, 4, 16)
  count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  # Three heads fewer: each had q, k, v kernels [16, 4] and biases [4], out rows [4, 16].
  assert count(pruned) == count(model) - 3 * (3 * (16 * 4 + 4) + 4 * 16)

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = nnx.to_pure_dict(params)
  removed = hp.removed_heads(keep, hp.heads_of(params))
  assert removed == ((1, 3), (0,))
  masked = nnx.merge(graphdef, hp.mask_heads(params, removed), rest)
  ids = padded_ids()
  got, want = jitted_logits(pruned, ids), jitted_logits(masked, ids)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # The removed heads mattered, so the comparison above could fail.
  assert np.abs(np.asarray(got) - np.asarray(jitted_logits(model, ids))).max() > 1e-3


# Every supported variant, with the options that give it per-head parameters (or per-head
# state: the Synthesizer's fixed random logits). Reformer at one chunk (chunk_size =
# length 12), where its output does not depend on the hash draw (which a pruned model
# draws for fewer heads).
MODULE_SETTINGS = [
  *[
    (name, dict(SMALL_KWARGS.get(name, {})))
    for name in attention.available()
    if name not in ("bigbird", "linformer", "nystromformer", "synthesizer")
  ],
  ("bigbird", dict(block_size=4, num_random_blocks=0)),
  ("softmax", dict(position="rope")),
  ("softmax", dict(position="relative", causal=True)),
  ("linformer", dict(max_length=64, k=8, share_heads=False)),
  ("nystromformer", dict(num_landmarks=4, conv_kernel_size=3)),
  ("synthesizer", dict(max_length=64, mix_dot_product=True)),
  ("synthesizer", dict(max_length=64, synthesizer="random", trainable_random=False)),
]


@pytest.mark.spread  # Shared by the xdist workers while the training test runs.
@pytest.mark.parametrize(("name", "kwargs"), MODULE_SETTINGS, ids=lambda v: str(v))
def test_each_variant_pruned_equals_it_masked(name, kwargs):
  def make(heads):
    return attention.make(
      name, in_features=16, num_heads=heads, head_dim=4, rngs=nnx.Rngs(0), **kwargs
    )

  def as_model(tree):  # The module's pure dict where a classifier holds its attention.
    return {"encoder": {"stack": {"blocks": {0: {"attention": tree}}}}}

  def of_model(tree):
    return tree["encoder"]["stack"]["blocks"][0]["attention"]

  module = make(4)
  hp.check_prunable_attention(module)
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
  pruned_params, heads = hp.prune_heads(as_model(params), ((0, 2),))
  assert heads == (2,)
  small_graphdef, small_params, small_rest = nnx.split(make(2), nnx.Param, ...)
  nnx.replace_by_pure_dict(small_params, of_model(pruned_params))
  nnx.replace_by_pure_dict(small_rest, of_model(hp.prune_state(as_model(rest), ((0, 2),))))
  small = nnx.merge(small_graphdef, small_params, small_rest)
  masked = nnx.merge(graphdef, of_model(hp.mask_heads(as_model(params), ((1, 3),))), rest)

  x = jax.random.normal(jax.random.key(0), (2, LENGTH, 16))
  mask = jnp.arange(LENGTH)[None] < jnp.array([[LENGTH], [7]])
  run = nnx.jit(lambda m, x: m(x, mask=mask))
  got, want = np.asarray(run(small, x)), np.asarray(run(masked, x))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  assert np.abs(got - np.asarray(run(module, x))).max() > 1e-3


def _variant_settings():
  """(name, module kwargs) covering every variant and its per-head parameter options."""
  out = [(name, dict(SMALL_KWARGS.get(name, {}))) for name in attention.available()]
  out += [
    ("softmax", dict(position="relative", causal=True)),
    ("linformer", dict(max_length=64, k=8, share_heads=False)),
    ("nystromformer", dict(num_landmarks=4, conv_kernel_size=3)),
    ("synthesizer", dict(max_length=64, mix_dot_product=True)),
    ("synthesizer", dict(max_length=64, synthesizer="factorized_dense")),
    ("synthesizer", dict(max_length=64, synthesizer="factorized_random")),
    ("synthesizer", dict(max_length=64, synthesizer="random", trainable_random=False)),
  ]
  return out


def test_every_heads_axis_is_sliced_as_the_metadata_says():
  # prune_heads knows the per-head parameters (and state) by name; each variant's
  # logical-axis metadata ("heads") is the truth the table must agree with.
  for name, kwargs in _variant_settings():
    module = attention.make(
      name, in_features=16, num_heads=4, head_dim=4, rngs=nnx.Rngs(0), **kwargs
    )
    for path, variable in nnx.to_flat_state(nnx.state(module)):
      axes = variable.get_metadata().get("out_sharding") or ()
      want = axes.index("heads") if "heads" in axes else None
      strict = isinstance(variable, nnx.Param)
      got = hp._heads_axis(path, variable.get_value(), strict=strict)
      assert got == want, (name, kwargs, path)
    pure = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    params = {"encoder": {"stack": {"blocks": {0: {"attention": pure}}}}}
    pruned, heads = hp.prune_heads(params, ((1, 3),))
    assert heads == (2,) and pruned["encoder"]["stack"]["blocks"][0]["attention"]["out"][
      "kernel"
    ].shape == (2, 4, 16)


def test_heads_per_layer_builds_per_layer_shapes(data_dir):
  model = build(small_config(data_dir, heads_per_layer=(3, 1)))
  first, second = attentions(model)
  assert (first.num_heads, second.num_heads) == (3, 1)
  assert first.query.kernel.shape == (16, 3, 4) and second.key.kernel.shape == (16, 1, 4)
  assert second.out.kernel.shape == (1, 4, 16)


@pytest.mark.parametrize(
  "settings",
  [
    dict(heads_per_layer=(4,)),
    dict(heads_per_layer=(2, 0)),
    dict(heads_per_layer=(2, 1), share_layers="all"),
    dict(heads_per_layer=(2, 1), scan_layers=True),
    dict(heads_per_layer=(2, 1), reversible=True),
  ],
  ids=["length", "zero", "share_layers", "scan_layers", "reversible"],
)
def test_bad_heads_per_layer_names_the_config_key(data_dir, settings):
  with pytest.raises(ConfigError, match=r"config\.model\.heads_per_layer") as e:
    build(small_config(data_dir, **settings))
  assert "\n" not in str(e.value)


def test_heads_per_layer_refuses_a_memory():
  with pytest.raises(ConfigError, match="memory") as e:
    Stack(
      num_layers=2,
      features=16,
      num_heads=2,
      head_dim=8,
      mlp_dim=32,
      causal=True,
      memory="transformer_xl",
      heads_per_layer=(2, 1),
      rngs=nnx.Rngs(0),
    )
  assert e.value.argument == "heads_per_layer"


def _gated_importance(model, objective, batches):
  """dL/dxi by jax.grad of an explicit gate xi_h on each head's output (the definition)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = nnx.to_pure_dict(params)
  blocks = params["encoder"]["stack"]["blocks"]

  def loss(gates, batch):
    gated = {
      i: {
        **block,
        "attention": {
          **block["attention"],
          "out": {
            **block["attention"]["out"],
            # y = sum_h xi_h o_h W_out[h] + b.
            "kernel": block["attention"]["out"]["kernel"] * gates[i][:, None, None],
          },
        },
      }
      for i, block in blocks.items()
    }
    p = {**params, "encoder": {**params["encoder"], "stack": {**params["encoder"]["stack"]}}}
    p["encoder"]["stack"]["blocks"] = gated
    sums, _, _ = objective.apply(nnx.merge(graphdef, p, rest), batch, None, deterministic=True)
    return sums["loss_sum"]

  ones = [jnp.ones(b["attention"]["out"]["kernel"].shape[0]) for _, b in sorted(blocks.items())]
  total = [np.zeros(len(g)) for g in ones]
  count = 0.0
  grad = jax.jit(jax.grad(loss))
  for batch in batches:
    grads = grad(ones, batch)
    total = [t + np.abs(g) for t, g in zip(total, grads, strict=True)]
    count += float(batch["weight"].sum())
  return [t / count for t in total]


def test_importance_equals_an_explicit_gate(data_dir):
  model = build(small_config(data_dir, heads_per_layer=(4, 2)))
  objective = objectives.Classification(("inputs",))
  rng = np.random.default_rng(0)
  batches = [
    {
      "inputs": np.asarray(padded_ids()),
      "targets": rng.integers(0, CLASSES, 3),
      "weight": np.array([1.0, 1.0, w], np.float32),  # An eval pipeline's padding row.
    }
    for w in (1.0, 0.0)
  ]
  got = hp.head_importance(model, objective, batches, normalize=False)
  want = _gated_importance(model, objective, batches)
  assert [len(g) for g in got] == [4, 2]
  for g, w in zip(got, want, strict=True):
    assert np.all(w > 0)
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7)
  # Normalized per layer; the model given as (graphdef, params, rest), as a setup holds it.
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  normalized = hp.head_importance((graphdef, nnx.to_pure_dict(params), rest), objective, batches)
  for g, w in zip(normalized, want, strict=True):
    np.testing.assert_allclose(g, w / np.linalg.norm(w), rtol=1e-4)


def test_choose_heads_removes_the_least_important_never_a_last_head():
  importance = np.array([[0.9, 0.8, 0.7], [0.01, 0.02, 0.03]])
  # Layer 1's heads are the least important, but its last one stays: 0.7 goes instead.
  assert hp.choose_heads(importance, prune=3) == ((0, 1), (2,))
  assert hp.choose_heads(importance, prune=0.5) == ((0, 1), (2,))
  assert hp.choose_heads(importance, prune=1) == ((0, 1, 2), (1, 2))
  assert hp.choose_heads(importance, prune=0) == ((0, 1, 2), (0, 1, 2))
  assert hp.choose_heads(importance, prune=4) == ((0,), (2,))
  assert hp.choose_heads([[0.5, 0.1], [0.2]], prune=1) == ((0,), (0,))
  for too_many in (5, 1.0, -1, 1.5, True):
    with pytest.raises(ConfigError, match="prune"):
      hp.choose_heads(importance, prune=too_many)


@pytest.mark.parametrize(
  ("name", "model_kwargs", "match"),
  [
    ("softmax", {"positional": "alibi"}, "alibi"),
    ("bigbird", {"attention_kwargs": dict(block_size=4, num_random_blocks=1)}, "bigbird"),
    ("lstm", {"attention_kwargs": {}}, "lstm"),
    ("softmax", {"share_layers": "all"}, "share_layers"),
  ],
  ids=["alibi", "bigbird", "lstm", "share_layers"],
)
def test_unprunable_models_are_refused(data_dir, name, model_kwargs, match):
  config = small_config(data_dir, attention_name=name, **model_kwargs)
  model = build(config)
  with pytest.raises(ConfigError, match=match):
    hp.pruned_model(config, model, ((0,), (0,)))


def test_bad_keep_is_refused(data_dir):
  model = build(small_config(data_dir))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for keep in (((0,),), ((0, 0), (1,)), ((0,), (4,)), ((0,), ())):
    with pytest.raises(ConfigError, match="keep"):
      hp.prune_heads(params, keep)


def test_heads_per_layer_trains_evaluates_and_prunes_further(tmp_path, data_dir):
  config = small_config(data_dir, heads=2, heads_per_layer=(2, 1))
  config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
  workdir = str(tmp_path / "run")
  final = train_and_evaluate(config, workdir)
  assert np.isfinite(final["loss"])
  results = eval_lib.evaluate_checkpoint(config, workdir, which="best")
  assert results["step"] == 2 and results["num_examples"] == 20

  # The compression report's path: restore, score, choose, prune.
  model, task, setup = eval_lib.restore_model(config, workdir, which="latest")
  assert [a.num_heads for a in attentions(model)] == [2, 1]
  batches = pipeline.task_eval_batches(task, "validation", global_batch_size=8)
  importance = hp.head_importance(model, setup.objective, batches)
  keep = hp.choose_heads(importance, prune=1)
  assert len(keep[0]) == 1 and keep[1] == (0,)  # Layer 1's only head stays.
  pruned, pruned_config = hp.pruned_model(config, model, keep)
  assert tuple(pruned_config.model.heads_per_layer) == (1, 1)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = nnx.to_pure_dict(params)
  masked = nnx.merge(graphdef, hp.mask_heads(params, hp.removed_heads(keep, (2, 1))), rest)
  ids = padded_ids()
  np.testing.assert_allclose(jitted_logits(pruned, ids), jitted_logits(masked, ids), atol=1e-5)
