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

Config args (comma-separated): smoke, attention=NAME, segment=N (read the input N tokens
at a time with a recurrent memory: model kind "segmented").
"""

import ml_collections

from efficient_transformers.training import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(
    arg, {"smoke": False, "attention": "softmax", "segment": 0}, config_file="configs/lra/image.py"
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
  return config_lib.finish(c, smoke=args["smoke"], segment=args["segment"])
