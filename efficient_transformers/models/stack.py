"""The one block and the one stack of blocks that every model is built from.

A `Block` is pre-LayerNorm and residual: x + Mixer(LN(x)), then x + MLP(LN(x)).
The mixer is any registered attention variant or baseline mixer (LSTM, GRU,
convolution, state-space), built by name through `mixing.make`; a `Stack` is
`num_layers` blocks and a final LayerNorm. The encoder classifiers, the
segmented classifier and the decoder LM all run a `Stack`, so a mixer (causal
or not), a block option or a stack option reaches every model at once.

Shapes: x [batch, length, features]; mask [batch, length] bool, True = real.

Layer options of the stack (`Stack(reversible=, share_layers=, scan_layers=,
remat_policy=, heads_per_layer=)`), every default the plain stack above:
- reversible: Reformer's reversible residual layers (layers/reversible.py).
- share_layers: ALBERT-style parameter sharing across layers.
- scan_layers: one `nnx.scan` over parameters stacked on a leading "layers" axis.
- remat_policy: `jax.checkpoint` of each layer, with or without scan.
- heads_per_layer: a head count per layer (a head-pruned model,
  `training/head_pruning.py`).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_transformers import memory as recurrent
from efficient_transformers.errors import ConfigError
from efficient_transformers.layers import ACTIVATION_AXES, FeedForward, constrain, layer_norm
from efficient_transformers.layers.reversible import reversible_sequence
from efficient_transformers.models import mixing


class Block(nnx.Module):
  """x + Attention(LN(x)), then x + MLP(LN(x)); shapes [batch, length, features].

  Args:
    features: the residual stream's width.
    num_heads, head_dim: the attention's shape.
    mlp_dim: the MLP's hidden width.
    attention_name, attention_kwargs: the mixer, as `attention.make` takes them (or
      `mixers.make` for a baseline: `mixing.available()` lists both).
    dropout_rate: on the residual branches and inside the MLP.
    attention_dropout_rate: on the per-head attention outputs.
    causal: a query sees no later token (a ConfigError for a variant that
      cannot be causal, naming those that can).
  """

  def __init__(
    self,
    *,
    features: int,
    num_heads: int,
    head_dim: int,
    mlp_dim: int,
    attention_name: str = "softmax",
    attention_kwargs: dict | None = None,
    dropout_rate: float = 0.0,
    attention_dropout_rate: float = 0.0,
    causal: bool = False,
    rngs: nnx.Rngs,
    dtype=None,
    param_dtype=jnp.float32,
  ):
    self.attention_norm = layer_norm(features, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.attention = mixing.make(
      attention_name,
      in_features=features,
      num_heads=num_heads,
      head_dim=head_dim,
      dropout_rate=attention_dropout_rate,
      causal=causal,
      rngs=rngs,
      dtype=dtype,
      param_dtype=param_dtype,
      **dict(attention_kwargs or {}),
    )
    self.mlp_norm = layer_norm(features, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.mlp = FeedForward(
      features,
      mlp_dim,
      dropout_rate=dropout_rate,
      rngs=rngs,
      dtype=dtype,
      param_dtype=param_dtype,
    )
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

  def __call__(
    self,
    x: jax.Array,
    *,
    mask: jax.Array | None = None,
    context: jax.Array | None = None,
    context_mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    deterministic: bool = True,
  ) -> jax.Array:
    """x [batch, length, features] -> the same; context (a memory's layer inputs,
    [batch, context_length, features]) is normalized like x and read as keys and
    values before x's (the attention contract, `attention.base`)."""
    if context is not None:
      context = self.attention_norm(context.astype(x.dtype))
    h = self.attention(
      self.attention_norm(x),
      mask=mask,
      context=context,
      context_mask=context_mask,
      bias=bias,
      deterministic=deterministic,
    )
    x = x + self.dropout(h, deterministic=deterministic)
    h = self.mlp(self.mlp_norm(x), deterministic=deterministic)
    x = x + self.dropout(h, deterministic=deterministic)
    return constrain(x, ACTIVATION_AXES)

  def init_state(self, batch_size: int):
    """The mixer's empty decoding state (`step`)."""
    return self.attention.init_state(batch_size)

  def step(self, x_t: jax.Array, state, *, real: jax.Array | None = None):
    """One token through the block, deterministically: x_t [batch, features] -> (y_t, state).

    Rows where `real` [batch] is False (padding) keep their state, as the full
    pass does not update a recurrence at padding.
    """
    h, new_state = self.attention.step(self.attention_norm(x_t), state)
    x = x_t + h
    x = x + self.mlp(self.mlp_norm(x), deterministic=True)
    if real is not None:
      new_state = jax.tree.map(lambda new, old: _keep_where(real, new, old), new_state, state)
    return x, new_state

  def attention_branch(
    self, x: jax.Array, *, mask: jax.Array | None = None, deterministic: bool = True
  ) -> jax.Array:
    """F of a reversible layer: Dropout(Attention(LN(x))), without the residual."""
    h = self.attention(self.attention_norm(x), mask=mask, deterministic=deterministic)
    return self.dropout(h, deterministic=deterministic)

  def mlp_branch(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """G of a reversible layer: Dropout(MLP(LN(x))), without the residual."""
    h = self.mlp(self.mlp_norm(x), deterministic=deterministic)
    return self.dropout(h, deterministic=deterministic)


class Stack(nnx.Module):
  """`num_layers` Blocks and a final LayerNorm: x [batch, length, features] -> the same.

  Args:
    num_layers: >= 0 (0: the final LayerNorm alone).
    memory: "none" or a recurrent memory from `memory.available()`
      (transformer_xl, compressive, rmt), built by `memory.make` from
      `memory_kwargs`. With a memory, `call_with_aux(x, memory_state, ...)` runs
      one segment and returns the next state; the memory feeds each block a
      context (`Block`), so it works with the attentions it can feed (see
      each memory's `check_attention`).
    reversible: reversible residual layers (Gomez et al. 2017, as in Reformer).
      The stream x is duplicated into (x1, x2) = (x, x); layer i is
      y1 = x1 + F_i(x2), y2 = x2 + G_i(y1) with F = the block's attention branch
      (LN, attention, dropout) and G its MLP branch (LN, MLP, dropout). The
      stack's output is the mean (y1 + y2) / 2 of the two streams, then the
      final LayerNorm: the mean keeps the residual stream's scale (and with
      0 layers it is x, as in the plain stack). The backward pass
      reconstructs each layer's inputs from its outputs and recomputes it
      (`layers.reversible`), so no per-layer activations are saved. Dropout
      (and any other randomness, e.g. Reformer's hashes) is reproducible: each
      layer application gets keys drawn before the pass and used again in
      the recomputation.
    share_layers: "none"; "all" (ALBERT / Universal Transformer: one Block
      applied num_layers times); or an int N (ALBERT's groups): num_layers / N
      distinct Blocks, block j applied to the N consecutive layers
      j*N .. j*N + N - 1 (N must divide num_layers; a digit string, as a
      command-line override of a str config key gives, is read as the int).
      The parameters are those of the distinct blocks only.
    scan_layers: the distinct blocks are made by `nnx.vmap` (parameters stacked
      on a leading axis named "layers" for sharding) and run by one `nnx.scan`,
      so compile time does not grow with depth. With share_layers=N, the scan
      runs over the num_layers / N distinct blocks and an inner scan applies
      each one N times. Not with reversible (a ConfigError).
    remat_policy: "none"; "full" (jax.checkpoint of each layer, default policy:
      only the layer's input saved); "dots_saveable" (matmul results saved,
      the rest recomputed); "nothing_saveable" (jax.checkpoint_policies; saves
      what "full" saves). Per layer, with or without scan; not with reversible,
      which recomputes every layer already (a ConfigError).
    heads_per_layer: None (or ()): num_heads in every layer; else one head
      count >= 1 per layer, layer i's Block built with heads_per_layer[i] heads
      of head_dim each (Michel et al. 2019's pruned heads, as genuinely smaller
      shapes). Only for unlike blocks: not with share_layers, scan_layers,
      reversible or a memory, which need their blocks alike (a ConfigError).
    The rest: as `Block`, the same for every layer. With a memory, the layer
    options must keep their defaults (a ConfigError names the option).
  """

  def __init__(
    self,
    *,
    num_layers: int,
    features: int,
    num_heads: int,
    head_dim: int,
    mlp_dim: int,
    attention_name: str = "softmax",
    attention_kwargs: dict | None = None,
    dropout_rate: float = 0.0,
    attention_dropout_rate: float = 0.0,
    causal: bool = False,
    memory: str = "none",
    memory_kwargs: dict | None = None,
    reversible: bool = False,
    share_layers: str | int = "none",
    scan_layers: bool = False,
    remat_policy: str = "none",
    heads_per_layer: tuple[int, ...] | None = None,
    rngs: nnx.Rngs,
    dtype=None,
    param_dtype=jnp.float32,
  ):
    if not isinstance(num_layers, int) or num_layers < 0:
      raise ConfigError(
        f"num_layers={num_layers!r} must be an integer >= 0.", argument="num_layers"
      )
    if memory != "none":
      if not mixing.is_attention(attention_name):
        mixing.get_class(attention_name)  # An unknown name is named first.
        raise ConfigError(
          f"memory {memory!r} feeds an attention its keys and values; mixer "
          f"{attention_name!r} takes none: use memory='none', or an attention.",
          argument="memory",
        )
      recurrent.check_attention(memory, attention_name, attention_kwargs, causal=causal)
    self.share_every = layer_group_size(
      num_layers,
      reversible=reversible,
      share_layers=share_layers,
      scan_layers=scan_layers,
      remat_policy=remat_policy,
      memory=memory,
    )
    layer_heads = heads_of_layers(
      heads_per_layer,
      num_layers,
      num_heads,
      shared=self.share_every != 1,
      reversible=reversible,
      scan_layers=scan_layers,
      memory=memory,
    )
    self.causal = causal
    self.attention_name = attention_name
    self.num_layers = num_layers
    self.reversible = reversible
    self.scan_layers = scan_layers
    self.remat_policy = remat_policy

    def make_block(layer_rngs, heads=num_heads):
      return Block(
        features=features,
        num_heads=heads,
        head_dim=head_dim,
        mlp_dim=mlp_dim,
        attention_name=attention_name,
        attention_kwargs=attention_kwargs,
        dropout_rate=dropout_rate,
        attention_dropout_rate=attention_dropout_rate,
        causal=causal,
        rngs=layer_rngs,
        dtype=dtype,
        param_dtype=param_dtype,
      )

    num_blocks = num_layers // self.share_every
    if scan_layers and num_blocks:
      self.blocks = stacked_blocks(make_block, num_blocks, rngs)
    else:
      self.blocks = nnx.List([make_block(rngs, heads) for heads in layer_heads[:num_blocks]])
    self.final_norm = layer_norm(features, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.memory_kind = memory
    if memory != "none":
      self.memory = recurrent.make(
        memory,
        num_layers=num_layers,
        features=features,
        rngs=rngs,
        dtype=dtype,
        param_dtype=param_dtype,
        **dict(memory_kwargs or {}),
      )

  def __call__(
    self, x: jax.Array, *, mask: jax.Array | None = None, deterministic: bool = True
  ) -> jax.Array:
    """The blocks without a memory: x [batch, length, features] -> the same."""
    x = self.run_blocks(x, mask=mask, deterministic=deterministic)
    return self.final_norm(x)

  def run_blocks(
    self,
    x: jax.Array,
    *,
    mask: jax.Array | None = None,
    deterministic: bool = True,
    reversible_reference: bool = False,
  ) -> jax.Array:
    """The num_layers layers as the layer options say, without the final LayerNorm.

    `reversible_reference` runs the reversible layers under plain autodiff
    (every activation saved), with the same keys: the tests' reference.
    """
    if self.reversible:
      return self._reversible(x, mask, deterministic, recompute=not reversible_reference)

    def apply(block, x, mask):
      return block(x, mask=mask, deterministic=deterministic)

    if self.remat_policy != "none":
      apply = nnx.remat(apply, policy=REMAT_POLICIES[self.remat_policy])
    if self.scan_layers and self.num_layers:
      return _scan_layers(self.blocks, x, mask, apply, every=self.share_every)
    for i in range(self.num_layers):
      x = apply(self.blocks[i // self.share_every], x, mask)
    return x

  def _reversible(self, x, mask, deterministic, *, recompute: bool) -> jax.Array:
    split = [nnx.split(block, nnx.Param, ...) for block in self.blocks]
    # The blocks are made alike, so one graphdef describes each of them.
    graphdef = split[0][0] if split else None

    def merge(params, rest):
      # Fresh Variables for this trace: dropout advances the copies' counters.
      return nnx.merge(graphdef, params, jax.tree.map(lambda a: a, rest))

    def f(params, aux, x2):
      rest, mask = aux
      return merge(params, rest).attention_branch(x2, mask=mask, deterministic=deterministic)

    def g(params, rest, y1):
      return merge(params, rest).mlp_branch(y1, deterministic=deterministic)

    params, f_aux, g_aux = [], [], []
    for i in range(self.num_layers):
      block = self.blocks[i // self.share_every]
      _, block_params, rest = split[i // self.share_every]
      # One draw per application advances the block's stream (fresh masks every
      # call); F and G get keys of their own, so the backward pass may recompute
      # them in either order and still see the forward pass's masks.
      key = block.dropout.rngs()
      params.append(block_params)
      f_aux.append((_reseeded(graphdef, block_params, rest, jax.random.fold_in(key, 0)), mask))
      g_aux.append(_reseeded(graphdef, block_params, rest, jax.random.fold_in(key, 1)))
    y1, y2 = reversible_sequence(f, g, params, f_aux, g_aux, x, x, recompute=recompute)
    return constrain((y1 + y2) / 2, ACTIVATION_AXES)

  def check_step(self) -> None:
    """A ConfigError naming the setting unless this stack decodes token by token (`step`)."""
    if self.memory_kind != "none":
      raise ConfigError(
        f"memory={self.memory_kind!r} decodes through its memory, one-token segments at a "
        "time (DecoderLM.run(..., segment_length=1)); token-by-token `step` is for "
        "memory='none' with a recurrent mixer.",
        argument="memory",
      )
    for name, value, default in (
      ("reversible", self.reversible, False),
      ("scan_layers", self.scan_layers, False),
    ):
      if value != default:
        raise ConfigError(
          f"{name}={value!r}: token-by-token decoding runs the plain stack; "
          f"set {name}={default!r}.",
          argument=name,
        )
    if self.num_layers and not self.blocks[0].attention.supports_step:
      stepping = [n for n in mixing.available(causal=True) if mixing.get_class(n).supports_step]
      raise ConfigError(
        f"{self.attention_name!r} has no token-by-token form with these settings (its "
        "state would grow with the context, or it reads later tokens); the causal ones "
        f"with one: {', '.join(stepping)}.",
        argument="attention_name",
      )

  def init_state(self, batch_size: int) -> list:
    """The empty decoding state: one per layer, each O(1) in the sequence length."""
    self.check_step()
    every = self.share_every
    return [self.blocks[i // every].init_state(batch_size) for i in range(self.num_layers)]

  def step(self, x_t: jax.Array, state: list, *, real: jax.Array | None = None):
    """One token through every layer and the final LayerNorm, deterministically.

    Args:
      x_t: [batch, features].
      state: from `init_state` or the previous step.
      real: [batch] bool; False rows (padding) keep their state.

    Returns:
      (y_t [batch, features], the new state). Token by token this equals
      `__call__` over the sequence (tested per mixer).
    """
    self.check_step()
    new_state = []
    for i in range(self.num_layers):
      x_t, layer_state = self.blocks[i // self.share_every].step(x_t, state[i], real=real)
      new_state.append(layer_state)
    return self.final_norm(x_t), new_state

  def init_memory(self, batch_size: int, **lengths) -> dict:
    """The memory's empty state ({} without one); `lengths` override the
    memory's own sizes (mem_len=, cmem_len=), e.g. a longer memory at evaluation."""
    if self.memory_kind == "none":
      return {}
    return self.memory.init_memory(batch_size, **lengths)

  def call_with_aux(
    self,
    x: jax.Array,
    memory: dict,
    *,
    mask: jax.Array | None = None,
    reset: jax.Array | None = None,
    deterministic: bool = True,
  ) -> tuple[jax.Array, dict, dict]:
    """One segment x [batch, seg, features] with the memory's state.

    Returns:
      (y [batch, seg, features], the next state, auxiliary losses by name).
    """
    if self.memory_kind == "none":
      del memory, reset
      return self(x, mask=mask, deterministic=deterministic), {}, {}
    return self.memory.run(self, x, memory, mask=mask, reset=reset, deterministic=deterministic)


# remat_policy -> the jax.checkpoint policy (None: jax.checkpoint's default).
REMAT_POLICIES = {
  "none": None,
  "full": None,
  "dots_saveable": jax.checkpoint_policies.dots_saveable,
  "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}
# The logical name of the leading axis of scanned (stacked) parameters.
LAYER_AXIS = "layers"
_LAYER_OPTION_DEFAULTS = {
  "reversible": False,
  "share_layers": "none",
  "scan_layers": False,
  "remat_policy": "none",
}


def layer_group_size(
  num_layers: int,
  *,
  reversible: bool = False,
  share_layers: str | int = "none",
  scan_layers: bool = False,
  remat_policy: str = "none",
  memory: str = "none",
) -> int:
  """Checks the stack's layer options; returns N, the layers that share one Block.

  Raises ConfigError naming the option (and the one it conflicts with).
  """
  options = dict(
    reversible=reversible,
    share_layers=share_layers,
    scan_layers=scan_layers,
    remat_policy=remat_policy,
  )
  for name in ("reversible", "scan_layers"):
    if not isinstance(options[name], bool):
      raise ConfigError(f"{name}={options[name]!r} must be True or False.", argument=name)
  if remat_policy not in REMAT_POLICIES:
    raise ConfigError(
      f"remat_policy={remat_policy!r} is unknown; valid: {', '.join(REMAT_POLICIES)}.",
      argument="remat_policy",
    )
  if isinstance(share_layers, str) and share_layers.isdigit():
    share_layers = int(share_layers)
  if share_layers == "none":
    every = 1
  elif share_layers == "all":
    every = max(num_layers, 1)
  elif isinstance(share_layers, int) and not isinstance(share_layers, bool) and share_layers > 0:
    if num_layers % share_layers:
      raise ConfigError(
        f"share_layers={share_layers} (layers per shared block) must divide "
        f"num_layers={num_layers}.",
        argument="share_layers",
      )
    every = share_layers
  else:
    raise ConfigError(
      "share_layers must be 'none', 'all' or a positive integer N (N consecutive layers "
      f"share one block); got {share_layers!r}.",
      argument="share_layers",
    )
  if reversible and scan_layers:
    raise ConfigError(
      "reversible=True does not combine with scan_layers=True (the reversible backward "
      "pass runs its layers unrolled); set one of them to False.",
      argument="scan_layers",
    )
  if reversible and remat_policy != "none":
    raise ConfigError(
      f"reversible=True with remat_policy={remat_policy!r}: the reversible stack "
      "recomputes every layer in its backward pass already; set remat_policy='none'.",
      argument="remat_policy",
    )
  if memory != "none":
    for name, default in _LAYER_OPTION_DEFAULTS.items():
      if options[name] != default:
        raise ConfigError(
          f"{name}={options[name]!r} does not work with memory={memory!r} (its blocks read "
          f"a per-layer memory); leave {name}={default!r} or use memory='none'.",
          argument=name,
        )
  return every


def heads_of_layers(
  heads_per_layer,
  num_layers: int,
  num_heads: int,
  *,
  shared: bool = False,
  reversible: bool = False,
  scan_layers: bool = False,
  memory: str = "none",
) -> tuple[int, ...]:
  """The head count of each layer: `heads_per_layer` checked, or num_heads everywhere.

  Raises ConfigError (argument "heads_per_layer") for a wrong length, an entry that
  is not an integer >= 1, or a layer option whose blocks must be alike.
  """
  if heads_per_layer is None:
    return (num_heads,) * num_layers
  if not isinstance(heads_per_layer, tuple | list):
    raise ConfigError(
      f"heads_per_layer={heads_per_layer!r} must be a tuple of head counts, one per layer.",
      argument="heads_per_layer",
    )
  heads = tuple(heads_per_layer)
  if not heads:
    return (num_heads,) * num_layers
  if len(heads) != num_layers:
    raise ConfigError(
      f"heads_per_layer={heads!r} gives {len(heads)} head count(s) for num_layers="
      f"{num_layers}; give one per layer, or () for num_heads in every layer.",
      argument="heads_per_layer",
    )
  for h in heads:
    if not isinstance(h, int) or isinstance(h, bool) or h < 1:
      raise ConfigError(
        f"heads_per_layer={heads!r}: every entry must be an integer >= 1; got {h!r}.",
        argument="heads_per_layer",
      )
  # Shared, scanned and reversible layers run one block structure (one graphdef, or
  # parameters stacked on one axis) for every layer. The memory stacks are left alike
  # too: head pruning (training/head_pruning.py) serves the encoder classifiers.
  for name, active, off in (
    ("share_layers", shared, "'none'"),
    ("scan_layers", scan_layers, "False"),
    ("reversible", reversible, "False"),
    ("memory", memory != "none", "'none'"),
  ):
    if active:
      raise ConfigError(
        f"heads_per_layer={heads!r} does not combine with {name}, whose layers are alike; "
        f"set heads_per_layer=() or {name}={off}.",
        argument="heads_per_layer",
      )
  return heads


def stacked_blocks(make_block, num_blocks: int, rngs: nnx.Rngs) -> Block:
  """`num_blocks` Blocks as one, every parameter stacked on a leading LAYER_AXIS.

  The blocks' RNG streams are kept scalar (the first block's): `nnx.reseed`, which
  the train step uses, takes scalar keys only, and the scan splits them per layer
  on every call (`_scan_layers`).
  """

  @nnx.split_rngs(splits=num_blocks)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYER_AXIS})
  def create(layer_rngs):
    return make_block(layer_rngs)

  blocks = create(rngs)
  for _, stream in nnx.iter_graph(blocks):
    if isinstance(stream, nnx.RngStream):
      stream.key.set_value(stream.key[...][0])
      stream.count.set_value(stream.count[...][0])
  return blocks


def _scan_layers(blocks: Block, x: jax.Array, mask, apply, *, every: int) -> jax.Array:
  """One scan over the stacked blocks; each applied `every` times (an inner scan)."""

  def repeated(block, x):
    if every == 1:
      return apply(block, x, mask)

    # The block's parameters are broadcast to every application; its RNG streams
    # are split, so each application draws its own dropout masks.
    @nnx.split_rngs(splits=every)
    @nnx.scan(in_axes=(nnx.StateAxes({nnx.RngState: 0, ...: None}), nnx.Carry), out_axes=nnx.Carry)
    def inner(block, x):
      return apply(block, x, mask)

    return inner(block, x)

  num_blocks = jax.tree.leaves(nnx.state(blocks, nnx.Param))[0].shape[0]

  @nnx.split_rngs(splits=num_blocks)
  @nnx.scan(
    in_axes=(0, nnx.Carry),
    out_axes=nnx.Carry,
    transform_metadata={nnx.PARTITION_NAME: LAYER_AXIS},
  )
  def outer(block, x):
    return repeated(block, x)

  return outer(blocks, x)


def _keep_where(real: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
  """`new` in rows where real [batch] is True, else `old` (leaves without a batch axis: new)."""
  if new.ndim == 0:
    return new
  return jnp.where(real.reshape(real.shape + (1,) * (new.ndim - 1)), new, old)


def _reseeded(graphdef, params, rest, key) -> nnx.State:
  """The non-parameter state of a block whose dropout streams restart from `key`."""
  block = nnx.merge(graphdef, params, jax.tree.map(lambda a: a, rest))
  nnx.reseed(block, dropout=key)
  return nnx.split(block, nnx.Param, ...)[2]
