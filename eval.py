r"""Evaluates a trained model on the test split and writes WORKDIR/results.json.

  python eval.py --config=configs/lra/listops.py:smoke --workdir=workdirs/listops_smoke
  python eval.py --config=... --workdir=... --checkpoint=latest   # or best (default), or a step

Uses the same config as training (the model must match the checkpoint).
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from efficient_transformers.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file used for training.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "best, latest, or a step number.")
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "validation"], "Split to evaluate.")
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
    from efficient_transformers.training import distributed, eval_lib

    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    results = eval_lib.evaluate_checkpoint(
      _CONFIG.value,
      _WORKDIR.value,
      which=eval_lib.parse_which(_CHECKPOINT.value),
      split=_SPLIT.value,
    )
    print(results)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  from efficient_transformers.training import cli

  app.run(main, flags_parser=cli.parse_flags)
