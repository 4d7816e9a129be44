"""A 1-D convolutional mixer: depthwise convolution over time, then a pointwise projection.

The depthwise-separable convolution (one `kernel_size`-tap filter per channel,
`nnx.Conv` with feature_group_count=in_features, then a 1x1 projection mixing
channels), optionally gated with a GLU (Dauphin et al., "Language Modeling
with Gated Convolutional Networks", 2017): the pointwise projection gives
2 * in_features channels a, b and the output is a * sigmoid(b).

Receptive field: (kernel_size - 1) * dilation + 1 tokens. causal=True pads on
the left only, so output t sees inputs t - (kernel_size - 1) * dilation .. t;
otherwise the window is centred ('SAME': the extra tap of an odd total goes to
the right, as XLA's 'SAME' does).

Padding: the input is zeroed at masked positions before the convolution and
the output is zeroed there after it, so padded values never reach a real token
(they enter the window as zeros, like the sequence's own edges).

No `step`: decoding one token at a time would need a ring buffer of the last
(kernel_size - 1) * dilation inputs; nothing here needs it yet, so
supports_step stays False.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_transformers.mixers import registry
from efficient_transformers.mixers.base import SequenceMixer


def conv_padding(kernel_size: int, dilation: int, causal: bool) -> tuple[int, int]:
  """(left, right) zero padding of the length axis keeping the output length."""
  total = (kernel_size - 1) * dilation
  if causal:
    return total, 0
  return total // 2, total - total // 2


@registry.register("conv")
class ConvMixer(SequenceMixer):
  """Depthwise-separable 1-D convolution over the sequence, optionally GLU-gated.

  Args (beyond the common ones of `SequenceMixer`):
    kernel_size: taps of the per-channel filter.
    dilation: spacing between the taps.
    gated: pointwise projection to 2 * in_features channels, out = a * sigmoid(b).
  """

  supports_causal = True
  supports_step = False

  def __init__(
    self,
    *,
    kernel_size: int = 3,
    dilation: int = 1,
    gated: bool = False,
    **common,
  ):
    super().__init__(**common)
    in_features, causal, rngs = self.in_features, self.causal, common["rngs"]
    dtype, param_dtype = self.dtype, self.param_dtype
    self.check_positive_int("kernel_size", kernel_size)
    self.check_positive_int("dilation", dilation)
    self.kernel_size = kernel_size
    self.dilation = dilation
    self.gated = bool(gated)
    self.depthwise = nnx.Conv(
      in_features,
      in_features,
      kernel_size=(kernel_size,),
      kernel_dilation=(dilation,),
      feature_group_count=in_features,
      padding=(conv_padding(kernel_size, dilation, causal),),
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    # A 1x1 convolution is a Linear over the channel axis.
    self.pointwise = nnx.Linear(
      in_features,
      2 * in_features if self.gated else in_features,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )

  def mix(self, x: jax.Array, *, mask: jax.Array | None, deterministic: bool) -> jax.Array:
    """x [batch, length, in_features] -> [batch, length, in_features]."""
    del deterministic
    if mask is not None:
      x = jnp.where(mask[..., None], x, 0)
    y = self.pointwise(self.depthwise(x))
    if self.gated:
      a, b = jnp.split(y, 2, axis=-1)
      y = a * jax.nn.sigmoid(b)
    if mask is not None:
      y = jnp.where(mask[..., None], y, 0)
    return y
