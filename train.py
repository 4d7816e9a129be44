r"""Trains a model: flags -> `efficient_transformers.training.train_and_evaluate`.

  python train.py --config=configs/lra/listops.py:smoke --workdir=workdirs/listops_smoke
  python train.py --config=configs/lra/listops.py:attention=memory_efficient \
      --workdir=workdirs/listops_me --config.batch_size=64
  python train.py --config=configs/lra/listops.py --dry_run   # compile only, report memory

Rerunning the same command resumes from the latest checkpoint in --workdir; a
second run on a workdir in use is refused. --workdir may be relative, or gs://.
Multi-host: run the same command on every host; on a Cloud TPU pod or under
SLURM the processes find each other, elsewhere pass --coordinator_address,
--num_processes and --process_id.
"""

from absl import flags
from ml_collections import config_flags

from efficient_transformers.training import cli

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file and argument, e.g. configs/lra/listops.py:smoke."
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Directory (or gs:// URL) for checkpoints and metrics."
)
_DRY_RUN = flags.DEFINE_bool(
  "dry_run",
  False,
  "Check the config and compile the train step for its real shapes on this machine's "
  "devices, print parameters, memory and FLOPs per step, and exit: no data is read, "
  "nothing is written.",
)
flags.mark_flags_as_required(["config"])
flags.register_multi_flags_validator(
  ["workdir", "dry_run"],
  lambda f: bool(f["workdir"]) or f["dry_run"],
  message="--workdir is required (only --dry_run runs without one).",
)


def main():
  from efficient_transformers.training import train_lib

  if _DRY_RUN.value:
    print(train_lib.format_dry_run(train_lib.dry_run(_CONFIG.value)))
    return
  train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
