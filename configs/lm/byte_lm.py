r"""Byte-level language modelling with a recurrent memory (Transformer-XL and successors).

Run:
  python train.py --config=configs/lm/byte_lm.py --workdir=workdirs/byte_lm
  python train.py --config=configs/lm/byte_lm.py:smoke --workdir=workdirs/byte_lm_smoke
  python train.py --config=configs/lm/byte_lm.py:memory=rmt,smoke --workdir=...
  python train.py --config=configs/lm/byte_lm.py:corpus=enwik8 --workdir=...
  python train.py --config=configs/lm/byte_lm.py:attention=performer,smoke --workdir=...
  python eval.py  --config=configs/lm/byte_lm.py --workdir=workdirs/byte_lm  # bits_per_byte

Memory (`memory=`): none (a plain causal decoder over each segment),
transformer_xl (Dai et al. 2019), compressive (Rae et al. 2020), rmt (Bulatov
et al. 2022). The default is transformer_xl with softmax attention, none with
any other.

Attention (`attention=`): any variant that can be causal
(`attention.available(causal=True)`: softmax, dot_product, memory_efficient,
local, sparse, longformer, reformer, linear, performer, sinkhorn,
synthesizer), with memory=none, transformer_xl or compressive (the memory is
the context of every layer's attention); rmt takes softmax or dot_product (it
needs an additive bias). A causal baseline mixer (`mixers.available(causal=True)`:
lstm, gru, conv, s4d, ...) takes the attention's place with memory=none. Its
keyword arguments are in config.model.attention_kwargs (the smoke sizes in the smoke config).
Positions (`config.model.positional`): the memory's own by default (relative
for Transformer-XL with softmax, rope with another attention; sinusoidal with
memory=none, none with a baseline mixer).

Decoding token by token with O(1) state (`DecoderLM.decode_step` / `decode`):
memory=none with a mixer or attention that has a recurrent form (lstm, gru,
s4d, lru, s5, linear, performer) and positional none, sinusoidal or rope.

Data (`corpus=`): `stdlib` (default) is built offline, deterministically, from
this Python's standard-library sources into data_dir on first use; `enwik8`
and `text8` are read from the file the user places in data_dir (the standard
90M / 5M / 5M split). See efficient_transformers/data/byte_lm.py.

Settings follow the Transformer-XL release's enwik8 base script: 12 layers,
512 wide, 8 heads of 64, inner 2048, dropout 0.1, Adam at 2.5e-4 with a cosine
decay, gradient clip 0.25, segments of 512 with a memory of 512, batch 22,
400K steps; evaluation uses a longer memory (`model.eval_mem_len`, 2,100 in
the release; it evaluated segments of 128, here evaluation segments are
`model.segment_length` long). Compressive: a compressed
memory of 512 at rate 3 (the paper's); RMT: 10 memory tokens, gradients
through 2 segments per step.

Config args (comma-separated): smoke, memory=NAME, attention=NAME,
corpus=stdlib|enwik8|text8.
"""

import ml_collections

from efficient_transformers.errors import ConfigError
from efficient_transformers.models import mixing
from efficient_transformers.training import config_lib

MEMORIES = ("none", "transformer_xl", "compressive", "rmt")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(
    arg,
    {"smoke": False, "memory": "", "attention": "softmax", "corpus": "stdlib"},
    config_file="configs/lm/byte_lm.py",
  )
  if not args["memory"]:
    args["memory"] = "transformer_xl" if args["attention"] == "softmax" else "none"
  if args["memory"] not in MEMORIES:
    raise ConfigError(
      f"configs/lm/byte_lm.py: memory={args['memory']!r} is unknown; valid: {', '.join(MEMORIES)}."
    )
  causal = mixing.available(causal=True)
  if args["attention"] not in causal:
    raise ConfigError(
      f"configs/lm/byte_lm.py: attention={args['attention']!r} is not a causal attention or "
      f"mixer; valid: {', '.join(causal)}."
    )
  if args["memory"] != "none" and not mixing.is_attention(args["attention"]):
    raise ConfigError(
      f"configs/lm/byte_lm.py: memory={args['memory']} feeds an attention; mixer "
      f"attention={args['attention']} takes no memory: add memory=none."
    )
  if args["memory"] == "rmt" and not mixing.get_class(args["attention"]).supports_bias:
    takers = [n for n in causal if mixing.get_class(n).supports_bias]
    raise ConfigError(
      f"configs/lm/byte_lm.py: memory=rmt needs an attention that takes an additive bias (its "
      f"read/write pattern); attention={args['attention']} does not. Valid: {', '.join(takers)}."
    )
  c = config_lib.training_base(task="byte_lm", data_dir=f"data/lm/{args['corpus']}")
  c.data.corpus = args["corpus"]
  c.data.max_bytes = 16 * 2**20  # stdlib only: the corpus cap (the whole stdlib is ~12 MB).
  c.data.split_seed = 0  # stdlib only: the key of the per-file train/validation/test split.

  c.model.kind = "decoder_lm"
  c.model.memory = args["memory"]
  c.model.attention = args["attention"]
  # memory=none: sinusoidal | learned | axial | rope | alibi | none (rope and alibi
  # act inside the attention; alibi only where the variant takes a bias).
  # transformer_xl, compressive: relative (Transformer-XL's, softmax only) | rope |
  # alibi | none. rmt: sinusoidal (over [read; segment; write], its own).
  c.model.positional = _default_positional(args["memory"], args["attention"])
  c.model.num_layers = 12
  c.model.emb_dim = 512
  c.model.num_heads = 8
  c.model.qkv_dim = 512
  c.model.mlp_dim = 2048
  c.model.dropout_rate = 0.1
  c.model.attention_dropout_rate = 0.0
  c.model.segment_length = 512
  # Segments per train step, with gradients through the memory between them
  # (RMT); the Transformer-XL kinds stop gradients at the memory anyway.
  c.model.bptt_segments = 2 if args["memory"] == "rmt" else 1
  xl = args["memory"] in ("transformer_xl", "compressive")
  c.model.mem_len = 512 if xl else 0
  c.model.eval_mem_len = 2_100 if xl else 0  # 0 = the training mem_len.
  c.model.cmem_len = 512 if args["memory"] == "compressive" else 0
  c.model.compression = "conv"  # conv | mean | max
  c.model.compression_rate = 3 if args["memory"] == "compressive" else 1
  c.model.num_memory_tokens = 10 if args["memory"] == "rmt" else 0
  # The stack's layer options (memory=none only; the memory stacks keep the defaults).
  config_lib.layer_options(c.model)

  c.batch_size = 22
  c.num_train_steps = 400_000
  c.log_every_steps = 200
  c.eval_every_steps = 4_000
  c.checkpoint_every_steps = 4_000
  c.num_eval_batches = -1
  c.optimizer.learning_rate = 2.5e-4
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 0
  c.optimizer.weight_decay = 0.0
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.grad_clip_norm = 0.25

  if args["smoke"]:
    # Minutes on a laptop CPU.
    c.data_dir = "data/lm/stdlib_smoke" if args["corpus"] == "stdlib" else c.data_dir
    c.data.max_bytes = 2 * 2**20
    c.model.num_layers = 2
    c.model.emb_dim = 64
    c.model.num_heads = 4
    c.model.qkv_dim = 64
    c.model.mlp_dim = 256
    c.model.dropout_rate = 0.0
    c.model.segment_length = 64
    c.model.mem_len = 64 if xl else 0
    c.model.eval_mem_len = 128 if xl else 0
    c.model.cmem_len = 32 if args["memory"] == "compressive" else 0
    c.model.compression_rate = 2 if args["memory"] == "compressive" else 1
    c.model.num_memory_tokens = 4 if args["memory"] == "rmt" else 0
    c.batch_size = 16
    c.num_train_steps = 300
    c.log_every_steps = 50
    c.eval_every_steps = 150
    c.checkpoint_every_steps = 150
    c.num_eval_batches = 20
    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_steps = 20
  # Keys per query: the segment and, with a memory, its longest (evaluation) context.
  context = max(c.model.mem_len, c.model.eval_mem_len) + c.model.cmem_len if xl else 0
  c.model.attention_kwargs = config_lib.attention_defaults(
    args["attention"], smoke=args["smoke"], sequence_length=c.model.segment_length + context
  )
  return config_lib.finalize(c)


def _default_positional(memory: str, attention_name: str) -> str:
  if memory == "rmt":
    return "sinusoidal"
  if memory == "none":
    # A baseline mixer is position-aware by construction: no positions, so decoding
    # token by token (DecoderLM.decode_step) goes on past the training segment.
    return "sinusoidal" if mixing.is_attention(attention_name) else "none"
  if attention_name == "softmax":
    return "relative"
  return "rope" if mixing.get_class(attention_name).supports_rope else "none"
