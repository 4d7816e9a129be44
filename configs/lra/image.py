r"""LRA Image: 10-way CIFAR-10 classification from grayscale pixels, one token per pixel.

Run (after preparing the data once, see below):
  python train.py --config=configs/lra/image.py --workdir=workdirs/image
  python train.py --config=configs/lra/image.py:smoke --workdir=workdirs/image_smoke
  python train.py --config=configs/lra/image.py:attention=performer --workdir=...
  python eval.py  --config=configs/lra/image.py --workdir=workdirs/image

Settings follow the original code's CIFAR-10 config (LRA_REFERENCE.md; the
paper gives no other): 1 layer, 128 wide, 8 heads, qkv 64, MLP 128, dropout
0.3, attention dropout 0.2, learned positions, CLS pooling, 1024 pixels, batch
256, 35,000 steps, Adam(0.9, 0.98, 1e-9) without weight decay, learning rate
5e-4 with 175 warmup steps (one epoch) and cosine decay.

With attention=s4d, s5 or lru (full config) the defaults are that paper's (grayscale)
CIFAR-10 settings instead (table and sources: config_lib.PUBLISHED_MIXER_SETTINGS), mean
pooling, no positions, AdamW(0.9, 0.999, 1e-8), warmup then cosine decay, the SSM group at
its own rate without weight decay, an evaluation per epoch (900 steps of batch 50):
  s4d: S4D paper (Gu et al. 2022), state-spaces/s4 v3.0.0 configs/experiment/lra/
    s4-lra-cifar.yaml: 6 layers, 512 wide, d_state 64 (state_size 32), dropout 0.1, batch 50,
    200 epochs, lr 0.01, A's lr 0.001, weight decay 0.05, warmup 1,000, bidirectional.
  s5: S5 paper (Smith et al. 2023) Table 11, lindermanlab/S5 bin/run_experiments/
    run_lra_cifar.sh: 6 layers, 512 wide, P 384, dropout 0.1, batch 50, 250 epochs, lr 0.0045
    (4.5 x 0.001), SSM lr 0.001, weight decay 0.07, warmup 1 epoch, bidirectional.
  lru: LRU paper (Orvieto et al. 2023) App. D, values as in the reimplementation jhuang265/s4
    configs/experiment/lra/lru-cifar.yaml (the paper's table unchecked; the paper itself used
    color CIFAR): 6 layers, 512 wide, N 384, r in [0.9, 0.999], phase in [0, 2 pi], dropout
    0.1, batch 50, 200 epochs, lr 0.005, x 0.25 for nu/theta/gamma, weight decay 0.05, warmup
    18,000; bidirectional is our choice.
Not as the papers (our block and head are kept): pre-LayerNorm residual blocks (theirs:
S4D post-LayerNorm, S5 and LRU BatchNorm), an MLP of width 512 after the mixer where they
have a GLU output layer (s4d's mixer has its GLU too), a Linear-ReLU-Linear head 512 wide
(theirs: one Linear), gray levels embedded as tokens (theirs: a Linear of the pixel value),
dropout not tied across the sequence (S4D's and LRU's tie_dropout), none on the mixer output
beyond the residual's; s4d: S4D-Lin init, one A per channel (theirs: n_ssm 2), dt at A's
rate (theirs: the global one), 180,000 steps where its cosine spans 200,000; s5: one HiPPO
block of P (theirs: J = 3 blocks); s5, lru: the norms (and lru's B) at the global rate
(theirs: in the SSM group).

Pixels: RGB to gray as tf.image.rgb_to_grayscale does (0.2989 R + 0.5870 G +
0.1140 B, the original pipeline's conversion), row-major, gray level v as
token v + 1 (0 = padding).

Data: TFDS `cifar10` under `data_dir` (a TFDS data directory, shared with
configs/lra/text.py), read without TensorFlow from array_record files. Prepare
it once (needs network and TensorFlow, which training does not):
  pip install tensorflow importlib_resources
  python -c "import tensorflow_datasets as tfds; tfds.builder('cifar10', \
    data_dir='data/tfds').download_and_prepare(file_format='array_record')"
The files land in data/tfds/cifar10/3.0.2/. The smoke variant reads the same
files (its first 2,000 train and test images).

Validation is a seeded 10% (5,000) of the 50,000 training images
(data.split_seed, data.validation_fraction), as LRA's 90/10 split; test is
TFDS's test split (10,000).

Config args (comma-separated): smoke, attention=NAME, spt (below), segment=N (read the
input N tokens at a time with a recurrent memory: model kind "segmented").

spt: self-pretraining on the task's own training inputs, then fine-tuning, in one workdir
(training/spt.py; Amos, Berant & Gupta 2024): masked-token denoising at 50% of the real
tokens for as many steps as the fine-tuning, with rotary positions where the attention
takes them. Source of the rate: IdoAmos/not-from-scratch's README pretrains Image with
dataset.mlm_prob=0.5; there pixels are regressed with an L1 loss, here predicted as one of
256 gray levels.
"""

import ml_collections

from efficient_transformers.training import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(
    arg,
    {"smoke": False, "attention": "softmax", "segment": 0, "spt": False},
    config_file="configs/lra/image.py",
  )
  # The TFDS data directory (holds cifar10/3.0.2/).
  c = config_lib.lra_base(task="image", attention=args["attention"], data_dir="data/tfds")
  c.batch_size = 256
  c.num_train_steps = 35_000
  c.log_every_steps = 175
  c.eval_every_steps = 1_750  # Every 10 epochs of 45,000 images.
  c.checkpoint_every_steps = 1_750

  c.data.validation_fraction = 0.1  # Of TFDS's train split; the rest trains.
  c.data.split_seed = 0  # Which images go to validation.
  c.data.max_examples = 0  # Read at most this many images per TFDS split; 0 = all.

  c.model.num_layers = 1
  c.model.emb_dim = 128
  c.model.qkv_dim = 64
  c.model.mlp_dim = 128
  c.model.classifier_dim = 128
  c.model.dropout_rate = 0.3
  c.model.attention_dropout_rate = 0.2
  c.model.positional = "learned"
  c.model.max_length = 1024  # 32 x 32 pixels; the loader accepts nothing else.

  c.optimizer.learning_rate = 5e-4
  c.optimizer.schedule = "cosine"  # rsqrt | cosine | constant
  c.optimizer.warmup_steps = 175
  c.optimizer.weight_decay = 0.0

  if args["smoke"]:
    # About a minute on a laptop CPU: 2,000 images, a narrow model. The length
    # stays 1024 (one token per pixel), so the model and batch are smaller than
    # the text smoke run's.
    c.data.max_examples = 2_000
    c.model.emb_dim = 32
    c.model.num_heads = 2
    c.model.qkv_dim = 32
    c.model.mlp_dim = 64
    c.model.classifier_dim = 64
    c.batch_size = 16
    c.num_train_steps = 200
    c.eval_every_steps = 100
    c.checkpoint_every_steps = 100
    c.optimizer.warmup_steps = 20
    c.model.dropout_rate = 0.0
    c.model.attention_dropout_rate = 0.0
    c.log_every_steps = 50
    c.optimizer.learning_rate = 1e-3
  return config_lib.finish(c, smoke=args["smoke"], segment=args["segment"], spt=args["spt"])
