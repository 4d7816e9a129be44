"""Capturing every layer's attention map from a model (`maps.capture`), and that the capture
hook leaves a function traced outside it unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_transformers.attention import maps
from efficient_transformers.errors import ConfigError
from efficient_transformers.models import EncoderClassifier


def classifier(attention_name="softmax", **kwargs):
  return EncoderClassifier(
    num_classes=3,
    pooling="cls",
    classifier_dim=16,
    vocab_size=20,
    max_length=12,
    num_layers=2,
    emb_dim=16,
    num_heads=2,
    qkv_dim=16,
    mlp_dim=32,
    attention_name=attention_name,
    attention_kwargs=kwargs,
    dropout_rate=0.0,
    rngs=nnx.Rngs(0),
  )


IDS = jnp.array([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [5, 6, 7, 8, 9, 0, 0, 0, 0, 0, 0, 0]])


def test_capture_records_every_layer_in_order():
  model = classifier()
  with maps.capture() as layers:
    logits = model(IDS)
  assert [r["attention"] for r in layers] == ["softmax", "softmax"]
  # An independent replay: run the encoder block by block and take each block's map.
  x = jnp.concatenate(
    [jnp.broadcast_to(model.encoder.cls[...], (2, 1, 16)), model.encoder.embed(IDS, offset=1)], 1
  )
  mask = jnp.concatenate([jnp.ones((2, 1), bool), IDS != 0], axis=1)
  for block, record in zip(model.encoder.stack.blocks, layers, strict=True):
    expected = block.attention.attention_weights(block.attention_norm(x), mask=mask)
    np.testing.assert_allclose(record["weights"], expected, atol=1e-6)
    assert record["weights"].shape == (2, 2, 13, 13)
    x = block(x, mask=mask)
  np.testing.assert_allclose(logits, model(IDS), atol=1e-6)  # The capture changed nothing.


def test_capture_inside_jit_and_nothing_outside_it():
  model = classifier()
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward_with_maps(state, ids):
    with maps.capture() as layers:
      logits = nnx.merge(graphdef, state)(ids)
    return logits, [r["weights"] for r in layers]

  _, weights = forward_with_maps(state, IDS)
  assert len(weights) == 2 and weights[0].shape == (2, 2, 13, 13)
  with maps.capture() as layers:
    pass
  assert layers == []
  model(IDS)  # Outside a capture: nothing is recorded anywhere.
  assert getattr(maps._CAPTURE, "state", None) is None


def test_the_hook_adds_nothing_to_a_function_traced_outside_capture(monkeypatch):
  model = classifier("local", block_size=4)
  graphdef, state = nnx.split(model)

  def forward(state, ids):
    return nnx.merge(graphdef, state)(ids)

  with_hook = str(jax.make_jaxpr(forward)(state, IDS))
  monkeypatch.setattr(maps, "record", lambda *args, **kwargs: None)
  without_hook = str(jax.make_jaxpr(forward)(state, IDS))
  assert with_hook == without_hook


def test_a_length_above_the_limit_fails_clearly_inside_capture():
  model = classifier("softmax")
  with maps.capture(max_length=4), pytest.raises(ConfigError, match=r"\[13, 13\].*max_length=4"):
    model(IDS)
