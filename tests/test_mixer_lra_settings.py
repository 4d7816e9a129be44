"""The papers' LRA settings as the defaults of `attention=s4d|s5|lru` (ListOps, Image, Pathfinder).

The expected values are written here from the sources, not imported from
config_lib's table, so a slip in either shows:
- S4D: state-spaces/s4 tag v3.0.0, configs/experiment/lra/s4-lra-{listops,cifar,
  pathfinder}.yaml, the configs released with the S4D paper (its CHANGELOG [3.0.0]).
- S5: lindermanlab/S5 bin/run_experiments/run_lra_{listops,cifar,pathfinder}.sh (the paper's
  Table 11); lr = lr_factor x ssm_lr_base.
- LRU: jhuang265/s4 configs/experiment/lra/lru-{listops,cifar,pathfinder}.yaml, a public
  reimplementation (the paper's App. D table was not readable when this was written).
Steps are epochs x training examples / batch, with ListOps 96,000, Image 45,000 and
Pathfinder-32 160,000 training examples.
"""

import math

import jax
import numpy as np
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from configs.lra import image, listops, pathfinder
from efficient_transformers.mixers import scan
from efficient_transformers.models import mixing
from efficient_transformers.training import state
from tests.helpers import REPO

TASKS = {"listops": listops, "image": image, "pathfinder": pathfinder}
PAPER_MIXERS = ("s4d", "s5", "lru")
# What the epochs count: configs/lra/listops.py (num_train), image.py (90% of 50,000),
# pathfinder.py (80% of 200,000).
TRAIN_EXAMPLES = {"listops": 96_000, "image": 45_000, "pathfinder": 160_000}

# (task, mixer) -> (num_layers, width, dropout, batch, steps, warmup, lr, ssm lr, weight decay,
# mixer kwargs).
# fmt: off
EXPECTED = {
  # S4D, s4-lra-listops.yaml: n_layers 8, d_model 128, d_state 64 (32 complex modes), dropout
  # 0, batch 50, 40 epochs (1,920 steps each), warmup 1,000 (cosine_warmup.yaml's default),
  # lr 0.01, layer.lr.A 0.001, weight_decay 0.05, dt 0.001..0.1, bidirectional.
  ("listops", "s4d"): (
    8, 128, 0.0, 50, 76_800, 1_000, 0.01, 0.001, 0.05,
    dict(state_size=32, dt_min=0.001, dt_max=0.1, bidirectional=True),
  ),
  # S4D, s4-lra-cifar.yaml: 6 layers, 512, d_state 64, dropout 0.1, batch 50, 200 epochs of 900.
  ("image", "s4d"): (
    6, 512, 0.1, 50, 180_000, 1_000, 0.01, 0.001, 0.05,
    dict(state_size=32, dt_min=0.001, dt_max=0.1, bidirectional=True),
  ),
  # S4D, s4-lra-pathfinder.yaml: 6 layers, 256, dropout 0, batch 64, 200 epochs of 2,500,
  # warmup 2,500 (one epoch), lr 0.004, layer lr 0.001, weight_decay 0.03.
  ("pathfinder", "s4d"): (
    6, 256, 0.0, 64, 500_000, 2_500, 0.004, 0.001, 0.03,
    dict(state_size=32, dt_min=0.001, dt_max=0.1, bidirectional=True),
  ),
  # S5, run_lra_listops.sh: n_layers 8, d_model 128, ssm_size_base 16, p_dropout 0, bsz 50,
  # 40 epochs, warmup_end 1 (1,920 steps), lr_factor 3 x ssm_lr_base 0.001, weight_decay 0.04.
  ("listops", "s5"): (
    8, 128, 0.0, 50, 76_800, 1_920, 0.003, 0.001, 0.04,
    dict(state_size=16, dt_min=0.001, dt_max=0.1, bidirectional=True),
  ),
  # S5, run_lra_cifar.sh: 6 layers, 512, P 384, dropout 0.1, bsz 50, 250 epochs of 900,
  # lr_factor 4.5 x 0.001, weight_decay 0.07.
  ("image", "s5"): (
    6, 512, 0.1, 50, 225_000, 900, 0.0045, 0.001, 0.07,
    dict(state_size=384, dt_min=0.001, dt_max=0.1, bidirectional=True),
  ),
  # S5, run_lra_pathfinder.sh: 6 layers, 192, P 256, dropout 0.05, bsz 64, 200 epochs of
  # 2,500, lr_factor 5 x ssm_lr_base 0.0009, weight_decay 0.03.
  ("pathfinder", "s5"): (
    6, 192, 0.05, 64, 500_000, 2_500, 0.0045, 0.0009, 0.03,
    dict(state_size=256, dt_min=0.001, dt_max=0.1, bidirectional=True),
  ),
  # LRU, lru-listops.yaml: n_layers 6, d_model 128, layer.d_model (N) 256, rmin 0, rmax 0.9,
  # max_phase_factor 2 (2 pi), dropout 0, batch 32, 30 epochs of 3,000 (its 90,000 steps),
  # warmup 12,000, lr 0.003, lr_factor 0.5, weight_decay 0.05.
  ("listops", "lru"): (
    6, 128, 0.0, 32, 90_000, 12_000, 0.003, 0.0015, 0.05,
    dict(state_size=256, r_min=0.0, r_max=0.9, max_phase=2 * math.pi, bidirectional=True),
  ),
  # LRU, lru-cifar.yaml: 6, 512, N 384, rmin 0.9, rmax 0.999, dropout 0.1, batch 50, 200
  # epochs (its 180,000 steps), warmup 18,000, lr 0.005, lr_factor 0.25.
  ("image", "lru"): (
    6, 512, 0.1, 50, 180_000, 18_000, 0.005, 0.00125, 0.05,
    dict(state_size=384, r_min=0.9, r_max=0.999, max_phase=2 * math.pi, bidirectional=True),
  ),
  # LRU, lru-pathfinder.yaml: 6, 192, N 256, rmin 0.9, rmax 0.999, dropout 0, batch 64, 200
  # epochs (its 500,000 steps), warmup 50,000, lr 0.004, lr_factor 0.25.
  ("pathfinder", "lru"): (
    6, 192, 0.0, 64, 500_000, 50_000, 0.004, 0.001, 0.05,
    dict(state_size=256, r_min=0.9, r_max=0.999, max_phase=2 * math.pi, bidirectional=True),
  ),
}
# fmt: on

# The files' settings for every other attention, as they were before the papers' settings
# were added (configs/lra/*.py).
# fmt: off
ATTENTION_SETTINGS = {
  "listops": dict(
    num_layers=4, emb_dim=512, num_heads=8, qkv_dim=512, mlp_dim=1024, classifier_dim=1024,
    dropout_rate=0.1, attention_dropout_rate=0.1, pooling="cls", positional="sinusoidal",
    batch_size=32, num_train_steps=5_000, eval_every_steps=500, learning_rate=0.05,
    schedule="rsqrt", warmup_steps=1_000, weight_decay=0.1, b2=0.98, eps=1e-9,
  ),
  "image": dict(
    num_layers=1, emb_dim=128, num_heads=8, qkv_dim=64, mlp_dim=128, classifier_dim=128,
    dropout_rate=0.3, attention_dropout_rate=0.2, pooling="cls", positional="learned",
    batch_size=256, num_train_steps=35_000, eval_every_steps=1_750, learning_rate=5e-4,
    schedule="cosine", warmup_steps=175, weight_decay=0.0, b2=0.98, eps=1e-9,
  ),
  "pathfinder": dict(
    num_layers=4, emb_dim=32, num_heads=4, qkv_dim=16, mlp_dim=32, classifier_dim=32,
    dropout_rate=0.2, attention_dropout_rate=0.1, pooling="mean", positional="sinusoidal",
    batch_size=512, num_train_steps=62_400, eval_every_steps=312, learning_rate=1e-3,
    schedule="cosine", warmup_steps=312, weight_decay=0.0, b2=0.98, eps=1e-9,
  ),
}
# fmt: on


def without_attention(config) -> dict:
  """config.to_dict() less the mixer's name and kwargs: what the mixer must not change."""
  d = config.to_dict()
  del d["model"]["attention"], d["model"]["attention_kwargs"]
  return d


@pytest.mark.parametrize("task, mixer", sorted(EXPECTED))
def test_a_full_config_has_the_papers_settings(task, mixer):
  layers, width, dropout, batch, steps, warmup, lr, ssm_lr, wd, kwargs = EXPECTED[task, mixer]
  c = TASKS[task].get_config(f"attention={mixer}")
  m, opt = c.model, c.optimizer
  assert (m.num_layers, m.emb_dim, m.qkv_dim) == (layers, width, width)
  # Our choices where the papers have no such key (config_lib.apply_published_mixer_settings).
  assert (m.mlp_dim, m.classifier_dim, m.attention_dropout_rate) == (width, width, 0.0)
  assert m.dropout_rate == dropout
  assert (m.pooling, m.positional) == ("mean", "none")
  assert (c.batch_size, c.num_train_steps) == (batch, steps)
  assert c.eval_every_steps == c.checkpoint_every_steps == TRAIN_EXAMPLES[task] // batch
  assert (opt.schedule, opt.warmup_steps) == ("cosine", warmup)
  assert opt.learning_rate == pytest.approx(lr)
  assert opt.ssm_learning_rate == pytest.approx(ssm_lr)
  assert (opt.weight_decay, opt.ssm_weight_decay) == (wd, 0.0)
  assert (opt.b1, opt.b2, opt.eps) == (0.9, 0.999, 1e-8)
  assert m.attention_kwargs.to_dict() == pytest.approx(kwargs)
  assert m.num_heads and width % m.num_heads == 0


@pytest.mark.parametrize("task", sorted(TASKS))
def test_smoke_configs_keep_the_smoke_model(task):
  smoke = without_attention(TASKS[task].get_config("smoke"))
  for mixer in PAPER_MIXERS:
    assert without_attention(TASKS[task].get_config(f"smoke,attention={mixer}")) == smoke, mixer


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_other_attention_keeps_the_files_settings(task):
  softmax = TASKS[task].get_config("attention=softmax")
  m, opt = softmax.model, softmax.optimizer
  values = {**m.to_dict(), **opt.to_dict(), **softmax.to_dict()}
  assert {k: values[k] for k in ATTENTION_SETTINGS[task]} == ATTENTION_SETTINGS[task]
  assert opt.ssm_learning_rate is None
  others = [n for n in mixing.available() if n not in PAPER_MIXERS]
  assert "local" in others and "lstm" in others
  for name in others:
    config = TASKS[task].get_config(f"attention={name}")
    assert without_attention(config) == without_attention(softmax), name


def test_pathfinder_at_another_resolution_keeps_its_settings():
  # The papers' Pathfinder settings are for 32 x 32 (1,024 tokens).
  softmax = pathfinder.get_config("attention=softmax,resolution=64")
  s5 = pathfinder.get_config("attention=s5,resolution=64")
  assert without_attention(s5) == without_attention(softmax)


def test_the_config_is_locked_and_a_command_line_override_wins():
  c = listops.get_config("attention=s5")
  assert c.is_locked
  with pytest.raises(AttributeError):
    c.model.num_layer = 2  # A misspelt key is an error, not a new one.
  # As train.py parses them (the override flags are defined from the argv).
  argv = [
    "train.py",
    f"--config={REPO}/configs/lra/listops.py:attention=s5",
    "--config.model.num_layers=2",
    "--config.optimizer.ssm_learning_rate=0.002",
    "--config.model.attention_kwargs.state_size=32",
  ]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)
  fv(argv)
  assert fv.config.model.num_layers == 2
  assert fv.config.optimizer.ssm_learning_rate == 0.002
  assert fv.config.model.attention_kwargs.state_size == 32
  assert fv.config.model.emb_dim == 128  # The rest stays the paper's.


@pytest.mark.parametrize("task, mixer", sorted(EXPECTED))
def test_the_models_of_the_papers_settings_build(task, mixer, monkeypatch):
  c = TASKS[task].get_config(f"attention={mixer}")
  c.model.num_layers = 1  # Every block is the same.
  # Shapes only: S5's HiPPO init is an eigendecomposition on the host, seconds at P = 384 on
  # a busy CPU (its values are tested in test_mixers_scan.py); a stand-in of its shapes.
  monkeypatch.setattr(scan, "hippo_legs_diagonal", lambda n: (np.full(n, -0.5 + 0j), np.eye(n)))
  model = nnx.eval_shape(
    lambda: state.build_model(c.model, vocab_size=258, num_classes=10, rngs=nnx.Rngs(0))
  )
  mixer_module = model.encoder.stack.blocks[0].attention
  assert mixer_module.state_size == c.model.attention_kwargs.state_size
  assert mixer_module.bidirectional
  assert model.encoder.stack.blocks[0].mlp.up.kernel.shape == (c.model.emb_dim, c.model.mlp_dim)
  ids = jax.ShapeDtypeStruct((2, c.model.max_length), jax.numpy.int32)
  logits = nnx.eval_shape(lambda m, x: m(x), model, ids)
  assert logits.shape == (2, 10)
