"""Model stack: embeddings, pooling, classifier and dual-encoder heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_transformers.errors import ConfigError
from efficient_transformers.layers import sinusoidal_table
from efficient_transformers.models import DualEncoderClassifier, EncoderClassifier, pool

ENCODER = dict(
  vocab_size=12,
  max_length=24,
  num_layers=2,
  emb_dim=16,
  num_heads=2,
  qkv_dim=16,
  mlp_dim=32,
  dropout_rate=0.0,
  attention_dropout_rate=0.0,
)


def test_sinusoidal_table_matches_formula():
  table = sinusoidal_table(50, 8)
  # features 8 -> 4 frequencies 10000^(-i/4); sin in the first half, cos in the second.
  for pos in (0, 1, 7, 49):
    for i in range(4):
      angle = pos / 10_000 ** (i / 4)
      assert table[pos, i] == pytest.approx(np.sin(angle), abs=1e-6)
      assert table[pos, 4 + i] == pytest.approx(np.cos(angle), abs=1e-6)


def test_mean_pooling_excludes_padding():
  x = jnp.array([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
  mask = jnp.array([[True, True, False]])
  np.testing.assert_allclose(pool(x, mask, "mean"), [[2.0, 3.0]])
  np.testing.assert_allclose(pool(x, mask, "cls"), [[1.0, 2.0]])
  with pytest.raises(ConfigError, match="pooling"):
    pool(x, mask, "max")


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("positional", ["sinusoidal", "learned"])
def test_classifier_ignores_padding(pooling, positional):
  model = EncoderClassifier(
    num_classes=5,
    pooling=pooling,
    classifier_dim=16,
    positional=positional,
    rngs=nnx.Rngs(0),
    **ENCODER,
  )
  ids = jax.random.randint(jax.random.key(1), (3, 10), 1, 12)
  ids = ids.at[0, 6:].set(0).at[1, 3:].set(0)
  longer = jnp.concatenate([ids, jnp.zeros((3, 8), ids.dtype)], axis=1)
  a, b = model(ids), model(longer)
  assert a.shape == (3, 5)
  np.testing.assert_allclose(a, b, atol=1e-5)
  # A real token does change the output: the test above could fail.
  changed = ids.at[0, 0].set(ids[0, 0] % 11 + 1)
  assert not np.allclose(model(changed)[0], a[0], atol=1e-5)


def test_dual_encoder_features_are_u_v_product_difference():
  model = DualEncoderClassifier(
    num_classes=2, pooling="cls", classifier_dim=16, rngs=nnx.Rngs(0), **ENCODER
  )
  a = jax.random.randint(jax.random.key(2), (2, 9), 1, 12)
  b = jax.random.randint(jax.random.key(3), (2, 9), 1, 12).at[:, 5:].set(0)
  u, v = model.encode(a), model.encode(b)
  expected = model.head(jnp.concatenate([u, v, u * v, u - v], axis=-1))
  np.testing.assert_allclose(model(a, b), expected, atol=1e-5)
  # Order matters (u - v is not symmetric), so swapping the towers' inputs changes the logits.
  assert not np.allclose(model(b, a), model(a, b), atol=1e-6)


def test_cls_token_is_prepended_and_tokens_take_positions_from_one():
  cfg = dict(ENCODER, num_layers=0)  # No blocks: features = LayerNorm(embeddings).
  model = EncoderClassifier(num_classes=3, pooling="cls", classifier_dim=8, rngs=nnx.Rngs(0), **cfg)
  ids = jnp.array([[3, 4, 0]])
  features, mask = model.encoder(ids)
  np.testing.assert_array_equal(mask, [[True, True, True, False]])
  table = sinusoidal_table(ENCODER["max_length"] + 1, 16)
  tokens = model.encoder.embed.tokens(ids)[0] + table[1:4]  # Positions 1..L.
  expected = jnp.concatenate([model.encoder.cls[...][None], tokens], axis=0)
  np.testing.assert_allclose(features[0], model.encoder.stack.final_norm(expected), atol=1e-5)


def test_dropout_is_active_only_in_training():
  cfg = dict(ENCODER, dropout_rate=0.5)
  model = EncoderClassifier(
    num_classes=3, pooling="mean", classifier_dim=8, rngs=nnx.Rngs(params=0, dropout=1), **cfg
  )
  ids = jnp.array([[3, 4, 5, 6]])
  np.testing.assert_allclose(model(ids), model(ids))
  assert not np.allclose(model(ids, deterministic=False), model(ids, deterministic=False))


def test_bad_model_settings_name_the_key():
  with pytest.raises(ConfigError, match="qkv_dim"):
    EncoderClassifier(
      num_classes=3, classifier_dim=8, rngs=nnx.Rngs(0), **dict(ENCODER, qkv_dim=15)
    )
  with pytest.raises(ConfigError, match="positional"):
    EncoderClassifier(
      num_classes=3, classifier_dim=8, positional="rotary", rngs=nnx.Rngs(0), **ENCODER
    )
  model = EncoderClassifier(num_classes=3, classifier_dim=8, rngs=nnx.Rngs(0), **ENCODER)
  with pytest.raises(ConfigError, match="max_length"):
    model(jnp.ones((1, 30), jnp.int32))
