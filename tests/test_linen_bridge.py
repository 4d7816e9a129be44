"""A Linen user reaches every attention variant through `flax.nnx.bridge`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from flax.nnx import bridge

from efficient_transformers import attention
from tests.helpers import SMALL_KWARGS

SIZES = dict(in_features=16, num_heads=2, head_dim=8)


class LinenEncoderLayer(nn.Module):
  """A Linen model holding one of our attention modules, as a Linen user would write it."""

  name_of_attention: str

  @nn.compact
  def __call__(self, x, mask):
    kwargs = SMALL_KWARGS.get(self.name_of_attention, {})
    layer = bridge.to_linen(attention.get_class(self.name_of_attention), **SIZES, **kwargs)
    return x + layer(nn.LayerNorm()(x), mask=mask)


@pytest.mark.parametrize("name", attention.available())
def test_linen_wrapped_attention_matches_the_nnx_module(name):
  x = jax.random.normal(jax.random.key(0), (2, 12, 16))
  mask = jnp.arange(12)[None, :] < jnp.array([[12], [7]])
  model = LinenEncoderLayer(name)
  variables = model.init(jax.random.key(1), x, mask)
  y = model.apply(variables, x, mask)
  assert y.shape == x.shape

  # The same variables in the NNX module give the same output. Linen keeps
  # non-parameter state (e.g. Performer's random features) in collections named
  # after the variable type; together they form the module's whole state.
  variables = nn.unbox(variables)  # Linen boxes NNX metadata (axis names).
  params = variables["params"]
  module = attention.make(name, rngs=nnx.Rngs(2), **SIZES, **SMALL_KWARGS.get(name, {}))
  before = module(x, mask=mask)
  merged = {}
  for tree in variables.values():
    merged.update(jax.tree.map(jnp.asarray, dict(tree.get("ToLinen_0", {}))))
  state = nnx.state(module)
  nnx.replace_by_pure_dict(state, merged)
  nnx.update(module, state)
  normed = nn.LayerNorm().apply({"params": params["LayerNorm_0"]}, x)
  expected = x + module(normed, mask=mask)
  np.testing.assert_allclose(y, expected, atol=1e-5)
  assert not np.allclose(x + before, y, atol=1e-3)  # Other parameters give another output.
