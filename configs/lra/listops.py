r"""LRA ListOps: 10-way classification of nested MIN/MAX/MED/SM expressions.

Run:
  python train.py --config=configs/lra/listops.py --workdir=workdirs/listops
  python train.py --config=configs/lra/listops.py:smoke --workdir=workdirs/listops_smoke
  python train.py --config=configs/lra/listops.py:attention=memory_efficient --workdir=...
  python eval.py  --config=configs/lra/listops.py --workdir=workdirs/listops

Settings follow the original code's listops config (LRA_REFERENCE.md):
4 layers, 512 wide, 8 heads, qkv 512, MLP 1024, length 2000, batch 32,
5,000 steps, Adam(0.9, 0.98, 1e-9) with weight decay 0.1, learning rate
0.05 x linear warmup (1000) x rsqrt decay (peak ~1.6e-3), dropout 0.1,
sinusoidal positions, CLS pooling. (The paper's appendix lists 6 layers / 512 /
8 heads / MLP 2048; that is not what the released code ran.)

The data (96K/2K/2K) is generated on first use into `data_dir` with a fixed
seed, or read from there if the original release's TSV files are present.

Config args (comma-separated): smoke, attention=NAME.
"""

import ml_collections

from efficient_transformers.training import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(
    arg, {"smoke": False, "attention": "softmax"}, config_file="configs/lra/listops.py"
  )
  c = ml_collections.ConfigDict()
  c.task = "listops"
  c.seed = 0
  c.data_dir = "data/lra/listops"
  c.batch_size = 32
  c.num_train_steps = 5_000
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.max_checkpoints_to_keep = 3
  c.num_eval_batches = -1  # -1 = the whole split.
  c.init_from = ""  # A checkpoint directory to start from when the workdir has none.

  # The generator's parameters (LRA's); used only when data_dir has no files.
  c.data = ml_collections.ConfigDict()
  c.data.generate = True  # False: a missing data_dir is an error instead.
  c.data.generator_seed = 0
  c.data.num_train = 96_000
  c.data.num_val = 2_000
  c.data.num_test = 2_000
  c.data.min_length = 500
  c.data.max_length = 2_000
  c.data.max_depth = 10
  c.data.max_args = 10

  c.model = ml_collections.ConfigDict()
  c.model.kind = "classifier"
  c.model.attention = args["attention"]
  c.model.attention_kwargs = ml_collections.ConfigDict()  # Filled in below.
  c.model.num_layers = 4
  c.model.emb_dim = 512
  c.model.num_heads = 8
  c.model.qkv_dim = 512
  c.model.mlp_dim = 1024
  c.model.classifier_dim = 1024
  c.model.dropout_rate = 0.1
  c.model.attention_dropout_rate = 0.1
  c.model.positional = "sinusoidal"
  c.model.pooling = "cls"
  c.model.max_length = 2_000
  c.model.dtype = "float32"  # Compute dtype; parameters stay float32.

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 0.05
  c.optimizer.schedule = "rsqrt"  # rsqrt | cosine | constant
  c.optimizer.warmup_steps = 1_000
  c.optimizer.weight_decay = 0.1
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.98
  c.optimizer.eps = 1e-9
  c.optimizer.grad_clip_norm = 0.0  # 0 = no clipping.
  c.optimizer.grad_accum_steps = 1  # Micro-batches per step (same global batch).

  # Mesh axis sizes; -1 takes the remaining devices.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  # Logical axis -> mesh axes. The one table mapping names the model uses.
  c.sharding_rules = (
    # Data: the batch axis of inputs and activations.
    ("batch", ("data", "fsdp")),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    # Parameters: FSDP shards the embedding axis, tensor parallelism heads/MLP.
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", None),
  )

  if args["smoke"]:
    # Minutes on a laptop CPU: short expressions, a small model, few steps.
    c.data_dir = "data/lra/listops_smoke"
    c.data.num_train = 4_000
    c.data.num_val = 500
    c.data.num_test = 500
    c.data.min_length = 10
    c.data.max_length = 64
    c.data.max_depth = 4
    c.data.max_args = 4
    c.model.max_length = 64
    c.model.num_layers = 2
    c.model.emb_dim = 64
    c.model.num_heads = 4
    c.model.qkv_dim = 64
    c.model.mlp_dim = 128
    c.model.classifier_dim = 128
    c.model.dropout_rate = 0.0
    c.model.attention_dropout_rate = 0.0
    c.batch_size = 32
    c.num_train_steps = 400
    c.log_every_steps = 50
    c.eval_every_steps = 200
    c.checkpoint_every_steps = 200
    c.optimizer.learning_rate = 1e-3
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 40
    c.optimizer.weight_decay = 0.0
  c.model.attention_kwargs = config_lib.attention_defaults(
    args["attention"],
    smoke=args["smoke"],
    sequence_length=c.model.max_length + (c.model.pooling == "cls"),
  )
  return config_lib.finalize(c)
