r"""LRA Pathfinder: are two marked points joined by a path? Images as pixel sequences.

Run:
  python train.py --config=configs/lra/pathfinder.py --workdir=workdirs/pathfinder
  python train.py --config=configs/lra/pathfinder.py:smoke --workdir=workdirs/pathfinder_smoke
  python train.py --config=configs/lra/pathfinder.py:resolution=64,difficulty=easy --workdir=...
  python train.py --config=configs/lra/pathfinder.py:attention=performer --workdir=...
  python eval.py  --config=configs/lra/pathfinder.py --workdir=workdirs/pathfinder

Data: the LRA release's `lra_release/pathfinder{N}` folder under `data_dir`
(`data/lra/pathfinder/pathfinder32/curv_contour_length_14/...`); a missing
folder is an error that says where to get it and how to generate a set in the
same layout instead. The smoke variant generates its 2,000 images itself.
Inputs are the N x N pixels row-major, pixel p as token p + 1; 80/10/10 split
by a seeded permutation (see efficient_transformers/data/pathfinder.py).

Settings follow LRA_REFERENCE.md's table for Pathfinder-32, which matches the
original code's Performer config (lra_benchmarks/image/configs/pathfinder32):
4 layers, 32 wide, 4 heads, qkv 16 (head dim 4), MLP 32, dropout 0.2, mean
pooling; length 1024, batch 512, 62,400 steps (200 epochs of 160K images),
Adam(0.9, 0.98, 1e-9), learning rate 1e-3 with linear warmup 312 (one epoch)
and cosine decay, weight decay 0. From the code's base Pathfinder-32 config:
attention dropout 0.1, sinusoidal positions (learn_pos_emb=False), head MLP as
wide as the model's (32). The code's per-model configs differ from one another
(its Transformer: 1 layer, 128 wide, 4 heads, qkv 64, MLP 128; its Performer 8
heads; its Linformer 1 layer and 2 heads); we keep one setting for every
attention so that only the attention differs.

With attention=s4d, s5 or lru (full config, resolution 32) the defaults are that paper's
Pathfinder settings instead (table and sources: config_lib.PUBLISHED_MIXER_SETTINGS), mean
pooling, no positions, AdamW(0.9, 0.999, 1e-8), warmup then cosine decay, the SSM group at
its own rate without weight decay, an evaluation per epoch (2,500 steps of batch 64), 200
epochs (500,000 steps):
  s4d: S4D paper (Gu et al. 2022), state-spaces/s4 v3.0.0 configs/experiment/lra/
    s4-lra-pathfinder.yaml: 6 layers, 256 wide, d_state 64 (state_size 32), dropout 0,
    lr 0.004, SSM lr 0.001, weight decay 0.03, warmup 2,500 (1 epoch), bidirectional.
  s5: S5 paper (Smith et al. 2023) Table 11, lindermanlab/S5 bin/run_experiments/
    run_lra_pathfinder.sh: 6 layers, 192 wide, P 256, dropout 0.05, lr 0.0045 (5 x 0.0009),
    SSM lr 0.0009, weight decay 0.03, warmup 1 epoch, bidirectional.
  lru: LRU paper (Orvieto et al. 2023) App. D, values as in the reimplementation jhuang265/s4
    configs/experiment/lra/lru-pathfinder.yaml (the paper's table unchecked): 6 layers, 192
    wide, N 256, r in [0.9, 0.999], phase in [0, 2 pi], dropout 0, lr 0.004, x 0.25 for
    nu/theta/gamma, weight decay 0.05, warmup 50,000; bidirectional is our choice.
Not as the papers (our block and head are kept): pre-LayerNorm residual blocks (theirs:
pre-BatchNorm), an MLP as wide as the model after the mixer where they have a GLU output
layer (s4d's mixer has its GLU too), a Linear-ReLU-Linear head as wide as the model (theirs:
one Linear), pixels embedded as tokens (theirs: a Linear of the pixel value), no dropout on
the mixer output beyond the residual's; s4d: S4D-Lin init, mean pooling where that config
reads the last position; s5: one HiPPO block of P (theirs: J = 8 blocks), B at the global
rate with weight decay (its opt_config=standard puts B in the SSM group), Re(Lambda)
always clipped (theirs: not); s5, lru: the norms (and lru's B) at the global rate (theirs:
in the SSM group). At other resolutions the three mixers keep this file's settings.

Config args (comma-separated): smoke, attention=NAME, spt (below), segment=N (read the
input N tokens at a time with a recurrent memory: model kind "segmented"),
resolution=32|64|128|256, difficulty=easy|intermediate|hard (curv_baseline,
curv_contour_length_9, curv_contour_length_14). LRA's Pathfinder is resolution 32, hard.

spt: self-pretraining on the task's own training inputs, then fine-tuning, in one workdir
(training/spt.py; Amos, Berant & Gupta 2024): masked-token denoising at 50% of the real
tokens for as many steps as the fine-tuning, with rotary positions where the attention
takes them. Source of the rate: IdoAmos/not-from-scratch
configs/dataset/pathfinder-lm.yaml, mlm_prob: 0.5; there pixels are regressed with an L1
loss, here predicted as one of 256 gray levels.
"""

import ml_collections

from efficient_transformers.data import pathfinder
from efficient_transformers.training import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(
    arg,
    {
      "smoke": False,
      "attention": "softmax",
      "segment": 0,
      "spt": False,
      "resolution": 32,
      "difficulty": "hard",
    },
    config_file="configs/lra/pathfinder.py",
  )
  pathfinder.check_params(args["resolution"], args["difficulty"])
  length = args["resolution"] ** 2
  # Holds pathfinder{N}/ as in the LRA release.
  c = config_lib.lra_base(
    task="pathfinder", attention=args["attention"], data_dir="data/lra/pathfinder"
  )
  c.batch_size = 512
  c.num_train_steps = 62_400
  c.log_every_steps = 100
  c.eval_every_steps = 312  # One epoch, as LRA evaluated.
  c.checkpoint_every_steps = 312

  c.data.resolution = args["resolution"]
  c.data.difficulty = args["difficulty"]
  c.data.split_seed = 0  # The seeded 80/10/10 permutation.
  c.data.num_workers = 0  # PNG-decoding processes; 0 = the CPUs, at most 8.
  c.data.cache = True  # Save decoded pixels next to the data (decoded_pixels.npy).
  # A missing set is generated only when True and num_images is small (smoke);
  # the full 200K images are generated by the command the error prints.
  c.data.generate = False
  c.data.num_images = 200_000  # The release's size; used by the generator only.
  c.data.generator_seed = 0

  c.model.emb_dim = 32
  c.model.num_heads = 4
  c.model.qkv_dim = 16
  c.model.mlp_dim = 32
  c.model.classifier_dim = 32
  c.model.dropout_rate = 0.2
  c.model.pooling = "mean"
  c.model.max_length = length

  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule = "cosine"  # rsqrt | cosine | constant
  c.optimizer.warmup_steps = 312
  c.optimizer.weight_decay = 0.0

  if args["smoke"]:
    # A few minutes at most on a CPU: 2,000 generated 32 px images (1,600 to
    # train on), a one-layer model, 150 steps. Chance is 50%.
    # 1,024-token sequences: a small batch and few steps (1.3 steps/s on 2 busy cores).
    c.data_dir = "data/lra/pathfinder_smoke"
    c.data.generate = True
    c.data.num_images = 2_000
    c.model.num_layers = 1
    c.model.num_heads = 2
    c.model.qkv_dim = 16
    c.batch_size = 8
    c.num_train_steps = 150
    c.log_every_steps = 25
    c.eval_every_steps = 75
    c.checkpoint_every_steps = 75
    c.optimizer.warmup_steps = 15
    c.model.dropout_rate = 0.0
    c.model.attention_dropout_rate = 0.0
  return config_lib.finish(c, smoke=args["smoke"], segment=args["segment"], spt=args["spt"])
