r"""Trains a model: flags -> `efficient_transformers.training.train_and_evaluate`.

  python train.py --config=configs/lra/listops.py:smoke --workdir=workdirs/listops_smoke
  python train.py --config=configs/lra/listops.py:attention=memory_efficient \
      --workdir=workdirs/listops_me --config.batch_size=64

Rerunning the same command resumes from the latest checkpoint in --workdir.
Multi-host: run the same command on every host; on a Cloud TPU pod or under
SLURM the processes find each other, elsewhere pass --coordinator_address,
--num_processes and --process_id.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from efficient_transformers.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file, e.g. configs/lra/listops.py:smoke."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0 (multi-host)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    from efficient_transformers.training import distributed, train_and_evaluate

    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  from efficient_transformers.training import cli

  app.run(main, flags_parser=cli.parse_flags)
