"""Checkpointer: round trip, sharded restore, keep-N, best, damage fallback, mismatch errors."""

import logging
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from efficient_transformers.errors import CheckpointError
from efficient_transformers.training.checkpointing import CHECKSUMS, Checkpointer, seal

LOGGER = "efficient_transformers.training.checkpointing"

# A failed tensorstore read (the damage tests) leaves sibling reads in flight; their late
# callbacks hit Orbax's closed event loop and print "Event loop is closed", harmless, and
# attributed to whichever test is running when they land.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def make_state(step: int, width: int = 3):
  """A small train state whose values identify the step it was saved at."""
  return {
    "params": {"w": jnp.full((8, width), float(step)), "b": jnp.arange(3.0) + step},
    "opt": {"mu": {"w": jnp.full((8, width), step / 10)}, "count": jnp.array(step, jnp.int32)},
    "step": jnp.array(step, jnp.int32),
  }


def abstract(state, sharding=None):
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


@pytest.fixture
def new_checkpointer(tmp_path):
  """Builds Checkpointers on one workdir and closes them all after the test."""
  made = []

  def make(**kwargs):
    made.append(Checkpointer(str(tmp_path), **kwargs))
    return made[-1]

  yield make
  for checkpointer in made:
    checkpointer.close()


def steps_on_disk(workdir: pathlib.Path, folder: str) -> list[int]:
  return sorted(int(p.name) for p in (workdir / folder).iterdir() if p.name.isdigit())


def test_round_trip_with_data_state_and_sharding(new_checkpointer):
  ckpt = new_checkpointer()
  state = make_state(7)
  data_state = {"grain": {"next_index": 42, "worker": [0, 1]}}
  ckpt.save(7, state, data_state=data_state)

  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded = NamedSharding(mesh, PartitionSpec("data"))
  target = abstract(state, NamedSharding(mesh, PartitionSpec()))
  target["params"]["w"] = jax.ShapeDtypeStruct((8, 3), jnp.float32, sharding=sharded)
  step, restored, restored_data = ckpt.restore(target)

  assert step == 7
  assert restored_data == data_state
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert restored["params"]["w"].sharding.is_equivalent_to(sharded, 2)
  assert len(restored["params"]["w"].addressable_shards) == 8
  assert restored["params"]["w"].addressable_shards[0].data.shape == (1, 3)


def test_keep_n_keeps_best_even_if_older(new_checkpointer, tmp_path):
  ckpt = new_checkpointer(max_to_keep=2)
  for step, accuracy in zip(range(1, 6), [0.1, 0.9, 0.3, 0.2, 0.4], strict=True):
    ckpt.save(step, make_state(step), data_state={"i": step}, metrics={"accuracy": accuracy})

  assert steps_on_disk(tmp_path, "checkpoints") == [4, 5]
  assert steps_on_disk(tmp_path, "best") == [2]
  assert (ckpt.latest_step(), ckpt.best_step()) == (5, 2)
  step, state, data_state = ckpt.restore(abstract(make_state(0)), which="best")
  assert (step, int(state["step"]), data_state) == (2, 2, {"i": 2})
  assert float(state["params"]["w"][0, 0]) == 2.0
  assert ckpt.restore(abstract(make_state(0)), which=4)[0] == 4
  with pytest.raises(CheckpointError, match="No checkpoint for which=3"):
    ckpt.restore(abstract(make_state(0)), which=3)


@pytest.mark.parametrize(
  "mode,values,best",
  [("max", [0.5, 0.7, 0.7, 0.6], 2), ("min", [3.0, 1.0, 2.0, 1.0], 2)],
)
def test_best_tracking_ties_keep_earlier(new_checkpointer, mode, values, best):
  ckpt = new_checkpointer(best_metric="loss", best_mode=mode)
  for step, value in enumerate(values, start=1):
    # A jax scalar, as an evaluator returns it: must be stored as a float.
    ckpt.save(step, make_state(step), metrics={"loss": jnp.float32(value), "other": 0.0})
  assert ckpt.best_step() == best
  assert ckpt.restore(abstract(make_state(0)), which="best")[0] == best


def delete_arrays(step_dir: pathlib.Path):
  for f in (step_dir / "state").rglob("d/*"):
    f.unlink()


def truncate_arrays(step_dir: pathlib.Path):
  for f in (step_dir / "state").rglob("d/*"):
    f.write_bytes(f.read_bytes()[:5])


def corrupt_metadata(step_dir: pathlib.Path):
  (step_dir / "state" / "_METADATA").write_text("{not json")


@pytest.mark.parametrize("damage", [delete_arrays, truncate_arrays, corrupt_metadata])
def test_damaged_latest_falls_back(new_checkpointer, tmp_path, caplog, damage):
  ckpt = new_checkpointer()
  for step in (1, 2):
    ckpt.save(step, make_state(step), data_state={"i": step})
  damage(tmp_path / "checkpoints" / "2")
  # A save killed mid-write leaves a tmp folder; it must be neither listed nor restored.
  (tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-99" / "state").mkdir(parents=True)

  ckpt = new_checkpointer()
  assert ckpt.latest_step() == 2
  with caplog.at_level(logging.WARNING, logger=LOGGER):
    step, state, data_state = ckpt.restore(abstract(make_state(0)))
  assert (step, int(state["step"]), data_state) == (1, 1, {"i": 1})
  assert any("step 2" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
  assert list((tmp_path / "checkpoints").glob("*tmp*"))  # A reader deletes nothing.

  # Training goes on from step 1: the damaged step 2 is replaced, not kept or refused.
  ckpt.save(2, make_state(22))
  assert int(ckpt.restore(abstract(make_state(0)))[1]["step"]) == 22
  assert not list((tmp_path / "checkpoints").glob("*tmp*"))  # Cleaned by the writer only.


def test_resuming_from_older_step_replaces_later_steps(new_checkpointer, tmp_path):
  ckpt = new_checkpointer()
  for step in (1, 2, 3):
    ckpt.save(step, make_state(step), data_state={"i": step})
  assert ckpt.restore(abstract(make_state(0)), which=1)[0] == 1
  ckpt.save(2, make_state(20), data_state={"i": 20})
  assert steps_on_disk(tmp_path, "checkpoints") == [1, 2]
  step, state, data_state = new_checkpointer().restore(abstract(make_state(0)))
  assert (step, int(state["step"]), data_state) == (2, 20, {"i": 20})


def test_all_damaged_raises(new_checkpointer, tmp_path):
  ckpt = new_checkpointer()
  for step in (1, 2):
    ckpt.save(step, make_state(step))
    delete_arrays(tmp_path / "checkpoints" / str(step))
  with pytest.raises(
    CheckpointError, match=r"No readable checkpoint for which='latest'.*step 2.*damaged.*step 1"
  ):
    ckpt.restore(abstract(make_state(0)))


def test_incompatible_shape_or_tree_raises(new_checkpointer):
  ckpt = new_checkpointer()
  ckpt.save(1, make_state(1))
  ckpt.save(2, make_state(2))
  with pytest.raises(
    CheckpointError, match=r"'opt/mu/w' is float32\[8, 3\] .* float32\[8, 5\] .*; 'params/w' is"
  ):
    ckpt.restore(abstract(make_state(0, width=5)))
  extra = make_state(0)
  extra["params"]["new"] = jnp.zeros(2)
  with pytest.raises(CheckpointError, match="'params/new' is only in the model.*fresh --workdir"):
    ckpt.restore(abstract(extra))
  wrong_dtype = abstract(make_state(0))
  wrong_dtype["step"] = jax.ShapeDtypeStruct((), jnp.float32, sharding=wrong_dtype["step"].sharding)
  with pytest.raises(CheckpointError, match="'step' is int32"):
    ckpt.restore(wrong_dtype)


def test_fingerprint_mismatch_raises(new_checkpointer, tmp_path):
  fingerprint = {"model": {"attention": "softmax", "num_layers": 2}, "task": "listops"}
  new_checkpointer(fingerprint=fingerprint).save(1, make_state(1))
  # Same fingerprint (tuples/ints JSON round trip): restores.
  assert new_checkpointer(fingerprint=fingerprint).restore(abstract(make_state(0)))[0] == 1
  other = {"model": {"attention": "performer", "num_layers": 2}, "task": "listops"}
  with pytest.raises(
    CheckpointError, match=r"model\.attention: stored 'softmax', current 'performer'"
  ):
    new_checkpointer(fingerprint=other).restore(abstract(make_state(0)))
  assert str(tmp_path) in str(
    pytest.raises(
      CheckpointError, new_checkpointer(fingerprint={}).restore, abstract(make_state(0))
    ).value
  )


def test_data_state_from_other_process_count_raises(new_checkpointer, tmp_path):
  ckpt = new_checkpointer()
  ckpt.save(1, make_state(1), data_state={"i": 1})
  step_dir = tmp_path / "checkpoints" / "1"
  files = list((step_dir / "data_state").glob("process_*.json"))
  assert [f.name for f in files] == ["process_0-of-1.json"]
  # An intact checkpoint of a 2-process run: its own file name, sealed as such.
  files[0].rename(files[0].with_name("process_0-of-2.json"))
  (step_dir / CHECKSUMS).unlink()
  seal(step_dir)
  with pytest.raises(CheckpointError, match="saved by 2 process.*this run has 1"):
    new_checkpointer().restore(abstract(make_state(0)))


def flip_bytes(step_dir: pathlib.Path):
  """16 bytes inverted in the middle of the largest array file: sizes stay, values change."""
  biggest = max((f for f in (step_dir / "state").rglob("d/*")), key=lambda f: f.stat().st_size)
  data = bytearray(biggest.read_bytes())
  middle = len(data) // 2
  data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
  biggest.write_bytes(bytes(data))
  return biggest.relative_to(step_dir).as_posix()


def delete_data_state(step_dir: pathlib.Path):
  (step_dir / "data_state" / "process_0-of-1.json").unlink()
  return "data_state/process_0-of-1.json"


def unseal(step_dir: pathlib.Path):
  """What a kill between Orbax's commit and the checksums leaves."""
  (step_dir / CHECKSUMS).unlink()
  return CHECKSUMS


@pytest.mark.parametrize("damage", [flip_bytes, delete_data_state, unseal])
def test_checksums_catch_damage_restore_falls_back_and_named_reads_refuse(
  new_checkpointer, tmp_path, caplog, damage
):
  ckpt = new_checkpointer()
  for step in (1, 2):
    ckpt.save(step, make_state(step), data_state={"i": step}, metrics={"accuracy": step / 10})
  assert (tmp_path / "checkpoints" / "2" / CHECKSUMS).exists()
  name = damage(tmp_path / "checkpoints" / "2")

  ckpt = new_checkpointer()
  with caplog.at_level(logging.WARNING, logger=LOGGER):
    step, state, data_state = ckpt.restore(abstract(make_state(0)))
  assert (step, data_state) == (1, {"i": 1})
  np.testing.assert_array_equal(state["params"]["w"], make_state(1)["params"]["w"])
  warned = [r.getMessage() for r in caplog.records if "step 2" in r.getMessage()]
  assert warned and name in warned[0] and "damaged" in warned[0], warned
  assert "processes" not in warned[0]  # The real cause, not another process count.

  # A named step (eval.py --checkpoint=2, init_from) is refused, naming the step and file.
  params = abstract(make_state(0))["params"]
  with pytest.raises(CheckpointError, match=rf"step 2 .*damaged.*{name}.*--checkpoint=1"):
    new_checkpointer().restore_params(params, which=2)
  # The best copy of step 2 is intact and still restores.
  assert new_checkpointer().restore_params(params, which="best")[0] == 2


def test_unsealed_best_is_not_preferred(new_checkpointer, tmp_path):
  ckpt = new_checkpointer()
  ckpt.save(1, make_state(1), metrics={"accuracy": 0.5})
  ckpt.save(2, make_state(2), metrics={"accuracy": 0.9})
  ckpt.close()
  # As if killed after Orbax committed best/3, before its checksums and best/2's removal.
  shutil.copytree(tmp_path / "best" / "2", tmp_path / "best" / "3")
  (tmp_path / "best" / "3" / CHECKSUMS).unlink()
  again = new_checkpointer()
  assert again.best_step() == 2
  assert again.restore_params(abstract(make_state(0))["params"], which="best")[0] == 2


# Each of 2 processes owns 2 CPU devices of one global mesh; both run this.
TWO_PROCESS_WORKER = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
process, workdir, port = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process)
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from efficient_transformers.training.checkpointing import Checkpointer

mesh = Mesh(np.array(jax.devices()), ("data",))
def state(step):
  make = lambda shape, spec: jax.make_array_from_callback(
    shape, NamedSharding(mesh, spec), lambda i: np.full(shape, step, np.float32)[i])
  return {"w": make((4, 3), PartitionSpec("data")), "step": make((), PartitionSpec())}
target = jax.tree.map(
  lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state(0))
ckpt = Checkpointer(workdir, max_to_keep=2)
for step, accuracy in [(1, 0.5), (2, 0.9), (3, 0.1), (4, 0.2)]:
  data = {"process": process, "step": step}
  ckpt.save(step, state(step), data_state=data, metrics={"accuracy": accuracy})
ckpt.restore(target, which=3)
ckpt.save(4, state(40), data_state={"process": process, "step": 40})  # Replaces step 4.
for which in ("latest", "best"):
  step, restored, data = ckpt.restore(target, which=which)
  local = [float(s.data.ravel()[0]) for s in restored["w"].addressable_shards]
  print("RESULT", which, step, data, local, flush=True)
ckpt.close()
"""


@pytest.mark.slow
def test_two_processes_save_and_restore_their_own_data_state(tmp_path):
  """Two processes on one mesh: barriers of the two managers must not collide."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  workers = [
    subprocess.Popen(
      [sys.executable, "-c", TWO_PROCESS_WORKER, str(i), str(tmp_path), str(port)],
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env=env,
    )
    for i in range(2)
  ]
  outputs = [w.communicate(timeout=120)[0] for w in workers]
  for process, (worker, output) in enumerate(zip(workers, outputs, strict=True)):
    assert worker.returncode == 0, output[-3000:]
    results = [line.split(" ", 1)[1] for line in output.splitlines() if line.startswith("RESULT")]
    assert results == [
      f"latest 4 {{'process': {process}, 'step': 40}} [40.0, 40.0]",
      f"best 2 {{'process': {process}, 'step': 2}} [2.0, 2.0]",
    ]
  assert sorted(p.name for p in (tmp_path / "checkpoints" / "4" / "data_state").glob("*.json")) == [
    "process_0-of-2.json",
    "process_1-of-2.json",
  ]
