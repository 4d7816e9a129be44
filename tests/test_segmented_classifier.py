"""SegmentedClassifier: recurrent memory over segments, checked against Python-loop references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_transformers.errors import ConfigError
from efficient_transformers.layers import sinusoidal_table
from efficient_transformers.models.segmented import SegmentedClassifier

S, M, D = 4, 2, 8  # segment_length, num_memory_tokens, emb_dim
TINY = dict(
  vocab_size=12,
  max_length=64,
  num_layers=1,
  emb_dim=D,
  num_heads=2,
  qkv_dim=D,
  mlp_dim=D,
  num_classes=3,
  classifier_dim=D,  # Few distinct parameter shapes: each costs a threefry compile.
  segment_length=S,
  num_memory_tokens=M,
  dropout_rate=0.0,
  attention_dropout_rate=0.0,
)


def make(**overrides) -> SegmentedClassifier:
  return SegmentedClassifier(**dict(TINY, rngs=nnx.Rngs(params=0, dropout=1), **overrides))


# Jitted once per shape: an eager call would retrace and recompile the scan every time.
apply = nnx.jit(lambda model, ids: model(ids))


@pytest.fixture(scope="module")
def model():
  return make()


@nnx.jit
def reference_memory(model, segment, memory):
  """One segment by hand: [memory; embedded tokens] through the module's own blocks."""
  tokens = model.embed.tokens(segment) + sinusoidal_table(M + S, D)[M:]  # Positions M.. on.
  x = jnp.concatenate([memory, tokens], axis=1)
  mask = jnp.concatenate([jnp.ones((segment.shape[0], M), bool), segment != 0], axis=1)
  for block in model.stack.blocks:
    x = block(x, mask=mask)
  return model.stack.final_norm(x)[:, :M]


def reference_logits(model, ids):
  """A Python loop over segments; a row's all-padding segment keeps its memory."""
  ids = np.asarray(ids)
  ids = np.pad(ids, ((0, 0), (0, -ids.shape[1] % S)))
  memory = jnp.broadcast_to(model.initial_memory[...], (ids.shape[0], M, D))
  for start in range(0, ids.shape[1], S):
    segment = ids[:, start : start + S]
    new = reference_memory(model, jnp.asarray(segment), memory)
    keep = np.array([not row.any() for row in segment])
    memory = np.where(keep[:, None, None], memory, new)
  return model.head(jnp.asarray(memory.mean(axis=1)))


def test_one_segment_equals_an_encoder_pass_over_memory_and_tokens(model):
  ids = jnp.array([[3, 4, 5, 6], [7, 1, 0, 0]])
  memory = jnp.broadcast_to(model.initial_memory[...], (2, M, D))
  # The head on the mean of the memory rows of one encoder pass over [memory; tokens].
  expected = model.head(reference_memory(model, ids, memory).mean(axis=1))
  np.testing.assert_allclose(apply(model, ids), expected, atol=1e-5)


def test_scan_over_segments_equals_a_python_loop(model):
  # Length 14 is padded to 16 (4 segments); row 1 ends after 9 tokens, so its last
  # segment is all padding; row 2 has a padding gap inside its second segment.
  ids = np.random.default_rng(1).integers(1, 12, (3, 14))
  ids[1, 9:] = 0
  ids[2, 5:7] = 0
  logits = apply(model, ids)
  assert logits.shape == (3, 3) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, reference_logits(model, ids), atol=1e-5)


def test_right_padding_never_changes_the_logits(model):
  ids = np.random.default_rng(2).integers(1, 12, (2, 12))
  ids[1, 6:] = 0
  base = apply(model, ids)
  # Whole padding segments appended (and a length that is not a multiple of S).
  np.testing.assert_allclose(apply(model, np.pad(ids, ((0, 0), (0, 2 * S)))), base, atol=1e-6)
  np.testing.assert_allclose(apply(model, np.pad(ids, ((0, 0), (0, 3)))), base, atol=1e-6)
  # Padding's embedding (id 0's row) never reaches the logits, whether padding fills part
  # of a segment (row 1, segment 2) or all of one (row 1, segment 3).
  moved = make()
  table = moved.embed.tokens.embedding
  # (Not a constant shift: every LayerNorm would remove that.)
  shift = np.random.default_rng(3).normal(size=D).astype(np.float32)
  table[...] = table[...].at[0].add(shift)
  np.testing.assert_allclose(apply(moved, ids), base, atol=1e-5)
  # ...while a real token's row does.
  table[...] = table[...].at[int(ids[0, 0])].add(shift)
  assert not np.allclose(apply(moved, ids)[0], base[0], atol=1e-3)


# Row 0: segment 1 holds tokens 1-3, segment 2 tokens 4-6, segment 3 tokens 7-9. Row 1:
# segment 1 holds token 10, segment 2 token 11, segment 3 is padding. The gradient on a
# token's embedding row is then the gradient reaching that row's segment.
SEGMENT_IDS = jnp.array(
  [[1, 2, 3, 1, 4, 5, 6, 4, 7, 8, 9, 7], [10, 10, 10, 10, 11, 11, 11, 0, 0, 0, 0, 0]]
)
ROW0 = (slice(1, 4), slice(4, 7), slice(7, 10))
ROW1 = (10, 11)


def test_memory_carries_information_and_bptt_truncates_the_gradient():
  # One jit for all three settings: each compile of a scan's gradient costs seconds.
  models = {str(k): make(bptt_segments=k) for k in (None, 1, 2)}
  changed = SEGMENT_IDS.at[0, 0].set(11)

  @nnx.jit
  def run(models):
    out = {}
    for k, m in models.items():
      logits, grads = nnx.value_and_grad(lambda m: m(SEGMENT_IDS).sum())(m)
      out[k] = jnp.abs(grads.embed.tokens.embedding[...]).sum(axis=1), logits
    return out, models["None"](SEGMENT_IDS), models["None"](changed)

  out, base, changed_logits = run(models)
  grads = {k: g for k, (g, _) in out.items()}
  # The head reads only the final memory: a change in segment 1 reaches it through memory.
  assert not np.allclose(changed_logits[0], base[0], atol=1e-4)
  np.testing.assert_allclose(changed_logits[1], base[1], atol=1e-5)  # Other row untouched.
  for k, g in grads.items():
    assert np.all(np.isfinite(g)), k
    # Every setting reaches each row's last real segment, padding or not.
    assert np.all(g[ROW0[2]] > 0) and g[ROW1[1]] > 0, k
  # None: every segment. 1: only the last real one (row 1's is its segment 2, not 3).
  # 2: the last two real ones, counted per row.
  assert np.all(grads["None"][ROW0[0]] > 0) and np.all(grads["None"][ROW0[1]] > 0)
  assert grads["None"][ROW1[0]] > 0
  np.testing.assert_array_equal(grads["1"][ROW0[0]], 0.0)
  np.testing.assert_array_equal(grads["1"][ROW0[1]], 0.0)
  assert grads["1"][ROW1[0]] == 0.0
  np.testing.assert_array_equal(grads["2"][ROW0[0]], 0.0)
  assert np.all(grads["2"][ROW0[1]] > 0) and grads["2"][ROW1[0]] > 0


def test_local_and_performer_inside_segments_give_finite_grads():
  # Softmax is covered by the gradient test above.
  models = {
    "local": make(attention_name="local", attention_kwargs=dict(block_size=2)),
    "performer": make(
      attention_name="performer", attention_kwargs=dict(num_features=8, orthogonal=False)
    ),
  }

  @nnx.jit
  def grads_and_loss(models):
    out = {}
    for name, m in models.items():
      loss, grads = nnx.value_and_grad(lambda m: m(SEGMENT_IDS).sum())(m)
      out[name] = (loss, jax.tree.leaves(nnx.state(grads, nnx.Param)))
    return out

  out = grads_and_loss(models)
  for name, (loss, leaves) in out.items():
    assert np.isfinite(loss), name
    assert all(np.all(np.isfinite(g)) for g in leaves), name
    assert sum(np.abs(g).sum() for g in leaves) > 0, name


def test_dropout_draws_advance_across_calls_and_only_in_training():
  # One dropout site (attention outputs): dropout's random bits are slow to compile on CPU.
  model = make(attention_dropout_rate=0.5, remat=True)
  train = nnx.jit(lambda m: m(SEGMENT_IDS, deterministic=False))
  first, second = train(model), train(model)
  # The RNG counters come out of the scan into the module, so the next call draws anew.
  assert not np.allclose(first, second)
  # Inference is the same model without dropout (dropout does not change the init draws).
  inference = apply(model, SEGMENT_IDS)
  np.testing.assert_allclose(inference, apply(make(), SEGMENT_IDS), atol=1e-6)
  assert not np.allclose(first, inference)


def test_compiled_memory_is_flat_in_length_with_remat():
  model = make(remat=True, max_length=256, num_layers=1)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, ids):
    return nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rest))(ids).sum()

  def temp_bytes(length):
    ids = jax.ShapeDtypeStruct((2, length), jnp.int32)
    compiled = jax.jit(jax.grad(loss)).lower(params, ids).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  short, long = temp_bytes(2 * S), temp_bytes(8 * S)
  assert short > 0
  # At most linear (the brief's bound); in fact flat: with remat the backward pass keeps
  # only the small memory per segment (measured 10.1 KB -> 11.5 KB; 27 KB -> 84 KB without
  # remat, so the tighter bound fails if remat stops working).
  assert long / short < 5, (short, long)
  assert long / short < 2, (short, long)


@pytest.mark.parametrize(
  "key, value",
  [("segment_length", 0), ("num_memory_tokens", 0), ("bptt_segments", 0), ("pooling", "max")],
)
def test_bad_settings_name_the_key(key, value):
  with pytest.raises(ConfigError, match=key):
    make(**{key: value})


def test_input_longer_than_max_length_is_a_config_error(model):
  with pytest.raises(ConfigError, match="max_length"):
    model(jnp.ones((1, TINY["max_length"] + 1), jnp.int32))


def test_segment_config_arg_trains_through_the_training_system(tmp_path):
  # `segment=N` on an LRA config: ListOps' 33 positions read 16 at a time (three segments,
  # the last padded) by the segmented model, two steps through train_and_evaluate.
  import json

  from configs.lra import listops as listops_config
  from efficient_transformers.training import config_lib, train_and_evaluate
  from tests.helpers import shrink

  config = shrink(listops_config.get_config("smoke,attention=local,segment=16"))
  assert config.model.kind == "segmented" and config.model.segment_length == 16
  span = 16 + config_lib.SEGMENTED_MEMORY_TOKENS
  assert config.model.attention_kwargs.block_size == 16 <= span  # The smoke blocks fit a span.
  config.data_dir = str(tmp_path / "data")
  config.data.num_train, config.data.num_val, config.data.num_test = 32, 16, 16
  config.data.min_length, config.data.max_length = 5, 32
  config.model.max_length = 33
  metrics = train_and_evaluate(config, str(tmp_path / "run"))
  assert 0.0 <= metrics["accuracy"] <= 1.0 and np.isfinite(metrics["loss"])
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["model"]["kind"] == "segmented" and saved["model"]["num_memory_tokens"] == 8
