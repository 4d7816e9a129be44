r"""Evaluates a trained model on the test split and writes WORKDIR/results.json.

  python eval.py --config=configs/lra/listops.py:smoke --workdir=workdirs/listops_smoke
  python eval.py --config=... --workdir=... --checkpoint=latest   # or best (default), or a step
  python eval.py --config=... --workdir=... --quantize=int8   # or int8_weights: int8 PTQ,
                                                              # into WORKDIR/results_int8.json

Uses the same config as training (the model must match the checkpoint).
"""

from absl import flags
from ml_collections import config_flags

from efficient_transformers.training import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file used for training.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "best, latest, or a step number.")
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "validation"], "Split to evaluate.")
_RESULTS = flags.DEFINE_string("results", None, "Where to write the results; WORKDIR/results.json.")
# A string, not an enum: the library refuses a bad mode in one line naming the flag.
_QUANTIZE = flags.DEFINE_string(
  "quantize",
  "none",
  "Post-training int8 quantization (qwix) of the restored model before it is evaluated: "
  "none | int8_weights (matmul kernels) | int8 (kernels and their input activations).",
)
flags.mark_flags_as_required(["config", "workdir"])


def main():
  from efficient_transformers.training import eval_lib

  which = eval_lib.parse_which(_CHECKPOINT.value)
  results = eval_lib.evaluate_checkpoint(
    _CONFIG.value,
    _WORKDIR.value,
    which=which,
    split=_SPLIT.value,
    results_path=_RESULTS.value,
    quantize=_QUANTIZE.value,
  )
  print(results)


if __name__ == "__main__":
  cli.run(main)
