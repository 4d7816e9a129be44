"""Metric writers: `metrics.jsonl`, TensorBoard event files and a console progress bar.

Only process 0 writes; the others keep a no-op writer so every process runs the
same code.
"""

import json
import math
import os

import numpy as np
import tqdm
from absl import logging


def _scalar(value) -> float:
  return float(np.asarray(value))


class MetricWriter:
  """Writes scalar metrics for a step to every sink.

  `DIR/metrics.jsonl` holds one JSON object per write: {"step": N, "split":
  "train"|"validation"|..., "<name>": value, ...}; TensorBoard scalars are
  tagged "<split>/<name>".
  """

  def __init__(self, workdir: str, *, enabled: bool, total_steps: int, initial_step: int = 0):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    self._bar = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
    from tensorboardX import SummaryWriter  # Imported lazily: pulls in protobuf.

    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self._bar = tqdm.tqdm(
      total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True, mininterval=1.0
    )

  def write(self, step: int, split: str, metrics: dict) -> None:
    if not self.enabled:
      return
    values = {k: _scalar(v) for k, v in metrics.items()}
    record = {"step": int(step), "split": split, **values}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for k, v in values.items():
      if math.isfinite(v):
        self._tb.add_scalar(f"{split}/{k}", v, global_step=step)
    self._tb.flush()
    shown = {k: f"{v:.4g}" for k, v in values.items() if k in ("loss", "accuracy")}
    self._bar.set_postfix({f"{split[:5]}_{k}": v for k, v in shown.items()}, refresh=False)
    logging.info(
      "step %d %s: %s", step, split, ", ".join(f"{k}={v:.5g}" for k, v in values.items())
    )

  def advance(self, step: int) -> None:
    """Moves the progress bar to `step`."""
    if self.enabled and step > self._bar.n:
      self._bar.update(step - self._bar.n)

  def close(self) -> None:
    if not self.enabled:
      return
    self._bar.close()
    self._tb.close()
    self._jsonl.close()
