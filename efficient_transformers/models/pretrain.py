"""Self-pretraining on a task's own inputs (Amos, Berant & Gupta 2024, "Never Train from
Scratch"): the classifier's encoder with a token head instead of the classification head.

ids [batch, length] -> logits over the task's vocabulary at every input position
[batch, length, vocab_size]. The encoder is built exactly as the classifier's
(`models.Encoder`, a CLS vector when pooling="cls"), so its parameters carry over to the
fine-tuned classifier under the same names; the token head is dropped there and the
classification head starts fresh. The embedding table has one row more than the task's
vocabulary: id `vocab_size` is the [MASK] token of the masked objective
(`objectives.MaskedTokens`), which the classifier never reads. The objective (masked-token
denoising, or causal next-token prediction with a causal encoder) is
`config.model.pretrain_objective`.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_transformers.errors import ConfigError
from efficient_transformers.layers import param_axes
from efficient_transformers.models.encoder import Encoder
from efficient_transformers.models.heads import POOLINGS

PRETRAIN_OBJECTIVES = ("masked_tokens", "next_tokens")


class TokenPredictor(nnx.Module):
  """An encoder and a linear token head; `mask_id` = vocab_size is the reserved [MASK] id.

  Args:
    vocab_size: the task's vocabulary (padding 0 included); the head predicts these ids.
    pretrain_objective: "masked_tokens" (bidirectional encoder) or "next_tokens" (a causal
      encoder: a ConfigError for a variant that cannot be causal, naming those that can).
    pooling: the classifier's pooling, only to build the same encoder ("cls" adds its
      vector, whose output is not scored here).
    The rest: `Encoder`'s.
  """

  input_names = ("inputs",)
  pretraining = True  # The objective is config.model.pretrain_objective, not the task's.

  def __init__(
    self,
    *,
    vocab_size: int,
    max_length: int,
    num_layers: int,
    emb_dim: int,
    num_heads: int,
    qkv_dim: int,
    mlp_dim: int,
    pretrain_objective: str = "masked_tokens",
    pooling: str = "cls",
    attention_name: str = "softmax",
    attention_kwargs: dict | None = None,
    dropout_rate: float = 0.1,
    attention_dropout_rate: float = 0.1,
    positional: str = "sinusoidal",
    reversible: bool = False,
    share_layers: str | int = "none",
    scan_layers: bool = False,
    remat_policy: str = "none",
    rngs: nnx.Rngs,
    dtype=None,
    param_dtype=jnp.float32,
  ):
    if pretrain_objective not in PRETRAIN_OBJECTIVES:
      raise ConfigError(
        f"pretrain_objective={pretrain_objective!r} is not one of "
        f"{', '.join(PRETRAIN_OBJECTIVES)}.",
        argument="pretrain_objective",
      )
    if pooling not in POOLINGS:
      raise ConfigError(
        f"pooling={pooling!r} is not one of {', '.join(POOLINGS)}.", argument="pooling"
      )
    self.vocab_size = vocab_size
    self.mask_id = vocab_size
    self.use_cls = pooling == "cls"
    self.encoder = Encoder(
      vocab_size=vocab_size + 1,
      max_length=max_length,
      num_layers=num_layers,
      emb_dim=emb_dim,
      num_heads=num_heads,
      qkv_dim=qkv_dim,
      mlp_dim=mlp_dim,
      attention_name=attention_name,
      attention_kwargs=attention_kwargs,
      dropout_rate=dropout_rate,
      attention_dropout_rate=attention_dropout_rate,
      positional=positional,
      use_cls=self.use_cls,
      causal=pretrain_objective == "next_tokens",
      reversible=reversible,
      share_layers=share_layers,
      scan_layers=scan_layers,
      remat_policy=remat_policy,
      rngs=rngs,
      dtype=dtype,
      param_dtype=param_dtype,
    )
    self.token_head = nnx.Linear(
      emb_dim,
      vocab_size,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_metadata=param_axes("embed", "vocab"),
      bias_metadata=param_axes("vocab"),
      rngs=rngs,
    )

  def __call__(self, inputs: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """ids [batch, length] (0 = padding, vocab_size = [MASK]) -> float32 logits
    [batch, length, vocab_size], one row per input position (the CLS output dropped)."""
    x, _ = self.encoder(inputs, deterministic=deterministic)
    if self.use_cls:
      x = x[:, 1:]
    return self.token_head(x).astype(jnp.float32)
