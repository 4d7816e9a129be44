r"""Trains a model: flags -> `efficient_transformers.training.train_and_evaluate`.

  python train.py --config=configs/lra/listops.py:smoke --workdir=workdirs/listops_smoke
  python train.py --config=configs/lra/listops.py:attention=memory_efficient \
      --workdir=workdirs/listops_me --config.batch_size=64

Rerunning the same command resumes from the latest checkpoint in --workdir.
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
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main():
  from efficient_transformers.training import train_and_evaluate

  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
