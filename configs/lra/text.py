r"""LRA Text: positive/negative IMDB reviews read as UTF-8 bytes.

Run (after preparing the data once, see below):
  python train.py --config=configs/lra/text.py --workdir=workdirs/text
  python train.py --config=configs/lra/text.py:length=4000 --workdir=workdirs/text_4k
  python train.py --config=configs/lra/text.py:smoke --workdir=workdirs/text_smoke
  python train.py --config=configs/lra/text.py:attention=performer --workdir=...
  python eval.py  --config=configs/lra/text.py --workdir=workdirs/text

Settings follow the original code's text classification config (LRA_REFERENCE.md):
4 layers, 256 wide, 4 heads, qkv 256, MLP 1024, reviews cut to 1000 bytes,
batch 32, 20,000 steps, Adam(0.9, 0.98, 1e-9) with weight decay 0.1, learning
rate 0.05 x linear warmup (8000) x rsqrt decay, dropout and attention dropout
0.1, sinusoidal positions, CLS pooling. (The paper's appendix lists 6 layers /
512 / 8 heads / MLP 2048 and lengths up to 4K: `length=4000` gives its 4K
setting, the one of its speed and memory table.)

Data: TFDS `imdb_reviews/plain_text` under `data_dir` (a TFDS data directory,
shared with configs/lra/image.py), read without TensorFlow from array_record
files. Prepare it once (needs network and TensorFlow, which training does not):
  pip install tensorflow importlib_resources
  python -c "import tensorflow_datasets as tfds; tfds.builder('imdb_reviews/plain_text', \
    data_dir='data/tfds').download_and_prepare(file_format='array_record')"
The files land in data/tfds/imdb_reviews/plain_text/1.0.0/. The smoke variant
reads the same files (its first 2,000 train and test reviews).

Validation is a seeded 10% of the 25,000 training reviews (data.split_seed,
data.validation_fraction); test is TFDS's test split. The original code
validated on the test set, so its model selection saw the test data.

Config args (comma-separated): smoke, attention=NAME, spt (below), segment=N (read the
input N tokens at a time with a recurrent memory: model kind "segmented"), length=N (bytes
per review; default 1000, smoke 256).

spt: self-pretraining on the task's own training inputs, then fine-tuning, in one workdir
(training/spt.py; Amos, Berant & Gupta 2024): masked-token denoising at 15% of the real
tokens for as many steps as the fine-tuning, with rotary positions where the attention
takes them. Source of the rate: unchecked. The paper's repository
(IdoAmos/not-from-scratch) leaves this task's mlm_prob at 0.0 in its dataset config, to be
set on the command line, and states no value; 15% is the value commonly quoted for it.
"""

import ml_collections

from efficient_transformers.errors import ConfigError
from efficient_transformers.training import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(
    arg,
    {"smoke": False, "attention": "softmax", "segment": 0, "spt": False, "length": 0},
    config_file="configs/lra/text.py",
  )
  if args["length"] < 0:
    raise ConfigError(f"Config arg length={args['length']} in configs/lra/text.py must be >= 1.")
  length = args["length"] or (256 if args["smoke"] else 1_000)  # 0: the variant's default.
  # The TFDS data directory (holds imdb_reviews/plain_text/1.0.0/).
  c = config_lib.lra_base(task="text", attention=args["attention"], data_dir="data/tfds")
  c.num_train_steps = 20_000
  c.log_every_steps = 100
  c.eval_every_steps = 1_000
  c.checkpoint_every_steps = 1_000

  c.data.validation_fraction = 0.1  # Of TFDS's train split; the rest trains.
  c.data.split_seed = 0  # Which reviews go to validation.
  c.data.max_examples = 0  # Read at most this many reviews per TFDS split; 0 = all.

  c.model.emb_dim = 256
  c.model.num_heads = 4
  c.model.qkv_dim = 256
  c.model.max_length = length  # Bytes per review: longer ones are cut, shorter padded.

  c.optimizer.warmup_steps = 8_000

  if args["smoke"]:
    # About a minute on a laptop CPU: 2,000 reviews cut to 256 bytes, a small model.
    config_lib.smoke_model(c)
    c.data.max_examples = 2_000
    c.num_train_steps = 300
    c.eval_every_steps = 150
    c.checkpoint_every_steps = 150
    c.optimizer.warmup_steps = 30
  return config_lib.finish(c, smoke=args["smoke"], segment=args["segment"], spt=args["spt"])
