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

Config args (comma-separated): smoke, attention=NAME, segment=N (read the input N tokens
at a time with a recurrent memory: model kind "segmented").
"""

import ml_collections

from efficient_transformers.training import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(
    arg,
    {"smoke": False, "attention": "softmax", "segment": 0},
    config_file="configs/lra/listops.py",
  )
  c = config_lib.lra_base(task="listops", attention=args["attention"], data_dir="data/lra/listops")

  # The generator's parameters (LRA's); used only when data_dir has no files.
  c.data.generate = True  # False: a missing data_dir is an error instead.
  c.data.generator_seed = 0
  c.data.num_train = 96_000
  c.data.num_val = 2_000
  c.data.num_test = 2_000
  c.data.min_length = 500
  c.data.max_length = 2_000
  c.data.max_depth = 10
  c.data.max_args = 10

  if args["smoke"]:
    # Minutes on a laptop CPU: short expressions, a small model, few steps.
    config_lib.smoke_model(c)
    c.data_dir = "data/lra/listops_smoke"
    c.data.num_train = 4_000
    c.data.num_val = 500
    c.data.num_test = 500
    c.data.min_length = 10
    c.data.max_length = 64
    c.data.max_depth = 4
    c.data.max_args = 4
    c.model.max_length = 64
    c.num_train_steps = 400
    c.eval_every_steps = 200
    c.checkpoint_every_steps = 200
    c.optimizer.warmup_steps = 40
  return config_lib.finish(c, smoke=args["smoke"], segment=args["segment"])
