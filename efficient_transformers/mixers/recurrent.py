"""Recurrent sequence mixers, `lstm` and `gru`, built from Flax NNX's own layers.

    mixer = registry.make("gru", in_features=64, num_heads=4, head_dim=16, causal=True,
                          rngs=nnx.Rngs(0), hidden_size=128)

causal=True runs one forward `nnx.RNN`; causal=False (encoders) runs an
`nnx.Bidirectional` pair and concatenates the two directions. Where the RNN's
output width (hidden_size, or 2 * hidden_size bidirectionally) differs from
in_features, an `nnx.Linear` projects it back.

Padding: the mask becomes `seq_lengths = mask.sum(-1)`, nnx.RNN's own argument.
This requires RIGHT padding (each row's real tokens first, then padding), which
is this project's layout; a mask with holes would be read as a shorter sequence.
With right padding the forward direction never sees padding before a real token,
and the backward direction (`nnx.flip_sequences`) reverses each row's real part
only, so it starts at the last real token, not at the padding (tested). Inputs
at padded positions are zeroed before the RNN (so even a NaN there cannot leak
into gradients) and outputs there are zeroed after the projection.

Causal mixers decode one token at a time: `init_state(batch_size)` is the
cell's zero carry, `step(x_t, state)` one cell update, equal to the full
forward pass token by token.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_transformers.errors import ConfigError
from efficient_transformers.mixers import registry
from efficient_transformers.mixers.base import SequenceMixer


class _RecurrentMixer(SequenceMixer):
  """An `nnx.RNN` (causal) or `nnx.Bidirectional` (not causal) over one cell type.

  Parameters: `rnn.cell` (causal) or `rnn.forward_rnn.cell` and
  `rnn.backward_rnn.cell` (bidirectional), each the Flax cell's own
  `dense_i` / `dense_h` Linears; `out`, an `nnx.Linear` to in_features, or None
  where the RNN's output width already is in_features.

  Args:
    hidden_size: the cell's hidden width per direction; None = in_features.
    (the rest as `SequenceMixer`.)
  """

  supports_causal = True
  supports_step = True

  def __init__(self, *, hidden_size: int | None = None, **common):
    super().__init__(**common)
    if hidden_size is not None and (not isinstance(hidden_size, int) or hidden_size <= 0):
      raise ConfigError(
        f"mixer {self.registered_name!r}: hidden_size must be a positive int or None, "
        f"got {hidden_size!r}.",
        argument="attention_kwargs.hidden_size",
      )
    rngs = common["rngs"]
    self.supports_step = self.causal  # The bidirectional form reads the whole sequence.
    self.hidden_size = hidden_size or self.in_features
    # The carry is passed in explicitly (zeros), so the RNNs hold no carry RNG stream:
    # a call then mutates no state.
    if self.causal:
      self.rnn = nnx.RNN(self._make_cell(self.in_features, self.hidden_size, rngs), rngs=False)
      width = self.hidden_size
    else:
      self.rnn = nnx.Bidirectional(
        nnx.RNN(self._make_cell(self.in_features, self.hidden_size, rngs), rngs=False),
        nnx.RNN(self._make_cell(self.in_features, self.hidden_size, rngs), rngs=False),
        rngs=False,
      )
      width = 2 * self.hidden_size
    self.out = (
      nnx.Linear(
        width,
        self.in_features,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        rngs=rngs,
      )
      if width != self.in_features
      else None
    )

  # Per cell type: the cell, and its zero carry [batch, hidden] (a (c, h) pair for LSTM).
  def _make_cell(self, in_features: int, hidden: int, rngs: nnx.Rngs) -> nnx.RNNCellBase:
    raise NotImplementedError  # per cell type, below

  def _zero_carry(self, batch_size: int, dtype):
    raise NotImplementedError  # per cell type, below

  def _carry_dtype(self, x_dtype=None):
    # The cell computes in `dtype`, or else in the promotion of input and params; the
    # scan's carry must keep that dtype from step to step.
    if self.dtype is not None:
      return self.dtype
    return self.param_dtype if x_dtype is None else jnp.result_type(x_dtype, self.param_dtype)

  def _project(self, h: jax.Array) -> jax.Array:
    return h if self.out is None else self.out(h)

  def mix(self, x: jax.Array, *, mask: jax.Array | None, deterministic: bool) -> jax.Array:
    """[batch, length, in_features] -> the same shape; mask must be right-padded."""
    del deterministic
    batch = x.shape[0]
    dtype = self._carry_dtype(x.dtype)
    seq_lengths = None
    if mask is not None:
      x = jnp.where(mask[..., None], x, jnp.zeros((), x.dtype))
      seq_lengths = mask.sum(-1).astype(jnp.int32)
    if self.causal:
      h = self.rnn(x, initial_carry=self._zero_carry(batch, dtype), seq_lengths=seq_lengths)
    else:
      carry = (self._zero_carry(batch, dtype), self._zero_carry(batch, dtype))
      h = self.rnn(x, initial_carry=carry, seq_lengths=seq_lengths)
    y = self._project(h)
    if mask is not None:
      y = jnp.where(mask[..., None], y, jnp.zeros((), y.dtype))
    return y

  def _check_step(self):
    if not self.causal:
      raise ConfigError(
        f"mixer {self.registered_name!r} decodes token by token only when causal=True "
        "(the bidirectional one reads the whole sequence).",
        argument="causal",
      )

  def init_state(self, batch_size: int):
    """The cell's zero carry for `batch_size` rows (causal mixers only)."""
    self._check_step()
    return self._zero_carry(batch_size, self._carry_dtype())

  def step(self, x_t: jax.Array, state):
    """One token: x_t [batch, in_features] -> (y_t [batch, in_features], new state).

    No dropout here: `step` is for decoding, where the model is deterministic.
    """
    self._check_step()
    state, h = self.rnn.cell(state, x_t)
    return self._project(h), state


@registry.register("lstm")
class LSTMMixer(_RecurrentMixer):
  """LSTM mixer (`nnx.OptimizedLSTMCell`: i, f, g, o gates; carry (c, h)).

  Args:
    hidden_size: the LSTM's hidden width per direction; None = in_features.
    (the rest as `SequenceMixer`.)
  """

  def __init__(self, *, hidden_size: int | None = None, **common):
    super().__init__(hidden_size=hidden_size, **common)

  def _make_cell(self, in_features, hidden, rngs):
    return nnx.OptimizedLSTMCell(
      in_features, hidden, dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs
    )

  def _zero_carry(self, batch_size, dtype):
    zeros = jnp.zeros((batch_size, self.hidden_size), dtype)
    return (zeros, zeros)


@registry.register("gru")
class GRUMixer(_RecurrentMixer):
  """GRU mixer (`nnx.GRUCell`: r, z, n gates; carry h).

  Args:
    hidden_size: the GRU's hidden width per direction; None = in_features.
    (the rest as `SequenceMixer`.)
  """

  def __init__(self, *, hidden_size: int | None = None, **common):
    super().__init__(hidden_size=hidden_size, **common)

  def _make_cell(self, in_features, hidden, rngs):
    return nnx.GRUCell(
      in_features, hidden, dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs
    )

  def _zero_carry(self, batch_size, dtype):
    return jnp.zeros((batch_size, self.hidden_size), dtype)
