"""Self-pretraining, then fine-tuning, in one workdir (Amos, Berant & Gupta 2024).

    python train.py --config=configs/lra/listops.py:smoke,spt --workdir=workdirs/listops_spt

With `config.spt.pretrain_steps` > 0 one command runs two ordinary training runs:

1. WORKDIR/pretrain: the classifier's encoder with a token head (`models.TokenPredictor`)
   trained `pretrain_steps` on the task's own training inputs (for Retrieval, each of the
   two documents alone), labels unread, with
   `config.spt.objective` (masked-token denoising at `config.spt.mask_rate`, or causal
   next-token prediction) and the run's optimizer settings.
2. WORKDIR/finetune: the classifier, its encoder restored from stage 1's best checkpoint
   (`config.init_encoder_only`: the embedding's [MASK] row is dropped) and a fresh head,
   trained `config.num_train_steps`.

Each stage resumes like any run. Once stage 2 has a checkpoint, stage 1 is not touched
again: a run killed in stage 2 resumes in stage 2, and stage 1's parameters stay as they
were. Every record of a stage's metrics.jsonl carries its "stage"; `eval.py` on the
workdir scores the fine-tuned classifier and writes WORKDIR/results.json with
"stage": "finetune".
"""

import copy

import ml_collections
from absl import logging

from efficient_transformers import paths
from efficient_transformers.errors import ConfigError
from efficient_transformers.training import checkpointing

STAGES = ("pretrain", "finetune")
# The models whose encoder stage 1 pretrains: Retrieval's dual encoder pretrains its one
# shared tower on every document alone (`objectives._documents`).
FINETUNED_KINDS = ("classifier", "dual_encoder")


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether `config` self-pretrains first (config.spt.pretrain_steps > 0)."""
  return bool(config.get("spt") and config.spt.pretrain_steps > 0)


def check_config(config: ml_collections.ConfigDict) -> None:
  """config.spt's values, as messages naming the key."""
  if not config.get("spt"):
    return
  if config.spt.pretrain_steps < 0:
    raise ConfigError(f"config.spt.pretrain_steps must be >= 0; got {config.spt.pretrain_steps}.")
  if not enabled(config):
    return
  if config.model.kind not in FINETUNED_KINDS:
    raise ConfigError(
      f"config.spt pretrains the encoder of a {' or '.join(FINETUNED_KINDS)}; "
      f"config.model.kind is {config.model.kind!r}. Set config.spt.pretrain_steps=0."
    )
  if config.init_from:
    raise ConfigError(
      "config.spt starts stage 2 from stage 1's encoder: leave config.init_from empty, or set "
      "config.spt.pretrain_steps=0 to fine-tune from config.init_from."
    )


def stage_dirs(workdir) -> dict[str, object]:
  """{"pretrain": WORKDIR/pretrain, "finetune": WORKDIR/finetune} of a resolved workdir."""
  return {stage: workdir / stage for stage in STAGES}


def stage_configs(
  config: ml_collections.ConfigDict, workdir
) -> dict[str, ml_collections.ConfigDict]:
  """The two runs' configs: config.spt switched off in both (each is an ordinary run)."""
  dirs = stage_dirs(workdir)
  pretrain, finetune = copy.deepcopy(config), copy.deepcopy(config)
  with pretrain.unlocked():
    pretrain.spt.pretrain_steps = 0
    pretrain.num_train_steps = config.spt.pretrain_steps
    pretrain.model.kind = "token_predictor"
    pretrain.model.pretrain_objective = config.spt.objective
    pretrain.model.mask_rate = config.spt.mask_rate
    for key in ("eval_every_steps", "checkpoint_every_steps"):
      pretrain[key] = min(config[key], config.spt.pretrain_steps)
  with finetune.unlocked():
    finetune.spt.pretrain_steps = 0
    finetune.init_from = str(dirs["pretrain"])
    finetune.init_encoder_only = True
  return {"pretrain": pretrain, "finetune": finetune}


def train_stages(config: ml_collections.ConfigDict, workdir, train) -> dict:
  """Stage 1 (unless stage 2 has begun), then stage 2; returns stage 2's final metrics.

  Args:
    config: the run's config (config.spt on).
    workdir: as the user typed it.
    train: `train_lib.train_and_evaluate(config, workdir, stage=...)`.
  """
  from efficient_transformers.training import workdir as workdir_lib

  workdir = workdir_lib.prepare(workdir)
  dirs, configs = stage_dirs(workdir), stage_configs(config, workdir)
  finetune = checkpointing.Checkpointer(dirs["finetune"])
  started = finetune.latest_step() is not None
  finetune.close()
  if not started:
    logging.info(
      "Stage 1 of 2: self-pretraining (%s) for %d steps in %s.",
      config.spt.objective,
      config.spt.pretrain_steps,
      dirs["pretrain"],
    )
    train(configs["pretrain"], str(dirs["pretrain"]), stage="pretrain")
    pretrain = checkpointing.Checkpointer(dirs["pretrain"])
    finished = pretrain.latest_step() == config.spt.pretrain_steps
    pretrain.close()
    if not finished:  # Stopped by a preemption signal: rerunning resumes stage 1.
      return {}
  logging.info(
    "Stage 2 of 2: fine-tuning in %s%s.",
    dirs["finetune"],
    ", resumed (stage 1 is done)" if started else " from stage 1's best checkpoint",
  )
  return train(configs["finetune"], str(dirs["finetune"]), stage="finetune")


def finetune_run(config: ml_collections.ConfigDict, workdir) -> tuple:
  """(stage 2's config, its workdir) of an SPT run: what eval.py scores."""
  resolved = paths.resolve(workdir, what="--workdir")
  return stage_configs(config, resolved)["finetune"], stage_dirs(resolved)["finetune"]
