"""Metric writers: `metrics.jsonl`, TensorBoard event files and a console progress bar.

Only process 0 writes; the others keep a no-op writer so every process runs the
same code. Both files go through `etils.epath`, so a gs:// workdir works (an
object store has no appends: there the writer rewrites the whole object on
each flush, which for a metrics file of a few thousand lines is cheap).

A run resumed at step N continues the files of the run it resumes: records
logged after step N (steps that are about to be trained again) are dropped
from `metrics.jsonl`, and the new TensorBoard event file starts with a
SessionLog START at step N + 1, TensorBoard's own mark for "a restart: forget
what older files logged from this step on". Both then read like one
uninterrupted run.
"""

import io
import json
import logging as std_logging
import math

import numpy as np
import tqdm
from absl import logging
from etils import epath

from efficient_transformers import paths

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _scalar(value) -> float:
  return float(np.asarray(value))


def read_records(workdir) -> list[dict]:
  """The records of `workdir/metrics.jsonl`; a line torn by a kill is skipped."""
  text = paths.read_text(epath.Path(workdir) / METRICS_FILE) or ""
  records = []
  for line in text.splitlines():
    try:
      records.append(json.loads(line))
    except ValueError:
      continue
  return records


class _JsonLines:
  """metrics.jsonl, truncated to steps <= `keep_through` on open, then appended to."""

  def __init__(self, path: epath.Path, keep_through: int):
    self._path = path
    records = read_records(path.parent)
    kept = [r for r in records if int(r.get("step", 0)) <= keep_through]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    if len(kept) != len(records) or (path.exists() and paths.read_text(path) != text):
      dropped = len(records) - len(kept)
      if dropped:
        logging.info("%s: dropped %d record(s) past step %d.", path, dropped, keep_through)
      paths.write_text(path, text)  # Whole: a kill now leaves the old file or this one.
    self._remote = paths.is_url(path)
    self._lines = [text] if self._remote else None
    self._file = None if self._remote else open(path, "a")  # noqa: SIM115

  def write(self, record: dict) -> None:
    line = json.dumps(record) + "\n"
    if self._remote:
      self._lines.append(line)
      paths.write_text(self._path, "".join(self._lines))
    else:
      self._file.write(line)
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()


class _EpathRecordFile:
  """A TensorBoard event file written through epath: buffered, the whole object
  rewritten on flush (object stores cannot append). Registered with tensorboardX
  for gs://, in place of its own writer, so one layer writes every workdir file."""

  def __init__(self, path: str):
    self._path = epath.Path(path)
    self._buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self._buffer.write(data)

  def flush(self) -> None:
    with self._path.open("wb") as f:
      f.write(self._buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _EpathWriterFactory:
  def open(self, path: str) -> _EpathRecordFile:
    return _EpathRecordFile(path)

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def _tensorboard_writer(logdir: epath.Path, restart_step: int):
  # Imported lazily: pulls in protobuf.
  from tensorboardX import SummaryWriter, record_writer
  from tensorboardX.proto.event_pb2 import Event, SessionLog

  for scheme in paths.URL_SCHEMES:
    record_writer.register_writer_factory(scheme, _EpathWriterFactory())
  writer = SummaryWriter(str(logdir))
  if restart_step > 0:
    # TensorBoard purges every older event at steps >= this one (its purge_orphaned_data).
    start = Event(step=restart_step + 1, session_log=SessionLog(status=SessionLog.START))
    writer._get_file_writer().add_event(start)
  return writer


class MetricWriter:
  """Writes scalar metrics for a step to every sink.

  `DIR/metrics.jsonl` holds one JSON object per write: {"step": N, "split":
  "train"|"validation"|..., "<name>": value, ...}; TensorBoard scalars are
  tagged "<split>/<name>".

  Args:
    workdir: the resolved workdir (local path or gs:// URL).
    enabled: False on every process but 0.
    total_steps: for the progress bar.
    initial_step: the step the run starts (or resumes) at; records after it
      are dropped (see the module docstring).
    stage: written into every record ({"stage": ...}), e.g. a self-pretraining run's
      "pretrain" or "finetune"; None writes none.
  """

  def __init__(
    self,
    workdir,
    *,
    enabled: bool,
    total_steps: int,
    initial_step: int = 0,
    stage: str | None = None,
  ):
    self.enabled = enabled
    self._stage = {"stage": stage} if stage else {}
    self._jsonl = None
    self._tb = None
    self._bar = None
    if not enabled:
      return
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self._jsonl = _JsonLines(workdir / METRICS_FILE, keep_through=initial_step)
    self._tb = _tensorboard_writer(workdir / TENSORBOARD_DIR, initial_step)
    self._bar = tqdm.tqdm(
      total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True, mininterval=1.0
    )

  def write(self, step: int, split: str, metrics: dict) -> None:
    if not self.enabled:
      return
    values = {k: _scalar(v) for k, v in metrics.items()}
    record = {"step": int(step), "split": split, **self._stage, **values}
    self._jsonl.write(record)
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


# gcsfs asks the bucket for its type with the default credentials and logs a
# warning each time none are found (with an emulator, say); it then goes on.
std_logging.getLogger("gcsfs").setLevel(std_logging.ERROR)
