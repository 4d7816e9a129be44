"""The peer benchmark (`python -m efficient_transformers.benchmarks.peers`): its timing
protocol, arithmetic, rows and files with fake peers and a fake clock, its bad flags, and
our real adapters at a tiny length. No torch needed: torch peers here are reasons."""

import csv
import importlib.util
import json
import sys

import numpy as np
import pytest

from efficient_transformers.benchmarks import peers

SHAPE_TAIL = (peers.HEADS, peers.HEAD_DIM)


class FakeClock:
  """A clock that only moves when a fake step says so."""

  def __init__(self):
    self.now = 0

  def __call__(self):
    return self.now


class FakePeer(peers.Peer):
  """A side whose calls take `durations` (the first is the warm-up) on `clock`."""

  def __init__(self, name, clock, durations, log, *, packages=(), fail_at=(), scale=1.0,
               compare="exact", mib=None):  # fmt: skip
    self.name, self.clock, self.durations, self.log = name, clock, durations, log
    self.packages, self.fail_at, self.scale, self.compare = packages, fail_at, scale, compare
    self.mib, self.memory_method, self.settings = mib, "fake", f"{name} settings"

  def prepare(self, shape, dtype, seed):
    self.log.append(("prepare", self.name, shape, dtype, seed))
    if shape[1] in self.fail_at:
      raise ValueError(f"length {shape[1]} rejected")
    durations = iter(self.durations)

    def step():
      self.log.append(("call", self.name))
      self.clock.now += next(durations)

    return step

  def forward(self, shape, dtype, seed):
    self.log.append(("forward", self.name, shape, dtype, seed))
    return peers.make_inputs(shape, seed)[2] * self.scale  # "Attention" = v, same inputs.

  def memory_mib(self, shape, dtype, seed):
    return self.mib


def _calls(log):
  return [entry[1] for entry in log if entry[0] == "call"]


def _fake_rows(clock, log, **peer_kwargs):
  ours_durations = [100, 1, 2, 3, 4, 5] * 4  # Per length: warm-up, then 1..5 seconds.
  peer_durations = [100, 2, 4, 6, 8, 10] * 4
  ours = FakePeer("ours fake", clock, ours_durations, log, mib=1.5)
  peer = FakePeer("fake peer", clock, peer_durations, log, mib=2.5, **peer_kwargs)
  return {"fake": peers.Row("fake", ours, (peer,))}


def _no_pause():
  pass


def _read(out):
  document = json.loads((out / "peers.json").read_text())
  with open(out / "peers.csv") as f:
    return document, list(csv.DictReader(f)), (out / "peers.md").read_text()


def test_time_pair_warms_up_each_side_then_alternates_abba():
  log = []
  ours = lambda: log.append("ours")
  peer = lambda: log.append("peer")
  ours_times, peer_times = peers.time_pair(
    ours, peer, 4, clock=lambda: 0.0, pause=lambda: log.append("pause")
  )
  timed = ["ours", "peer", "peer", "ours", "ours", "peer", "peer", "ours"]
  assert log[:2] == ["ours", "peer"]  # The warm-ups, untimed and unpaused.
  assert log[2:] == [x for side in timed for x in ("pause", side)]
  assert len(ours_times) == len(peer_times) == 4


def test_medians_and_ratio_come_from_the_clock_and_every_side_gets_the_same_inputs(
  tmp_path, monkeypatch
):
  monkeypatch.setattr(peers, "setup_torch", lambda: "9.9")
  # One torch thread per CPU this process may use (its affinity), as JAX's pool.
  monkeypatch.setattr(peers.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
  clock, log = FakeClock(), []
  status = peers.benchmark(
    ["--lengths=128,256", "--repeats=5", "--seed=7", f"--out={tmp_path}"],
    rows=_fake_rows(clock, log),
    clock=clock,
    pause=_no_pause,
  )
  assert status == 0
  document, csv_rows, markdown = _read(tmp_path)
  rows = document["rows"]
  assert [(r["peer"], r["length"]) for r in rows] == [("fake peer", 128), ("fake peer", 256)]
  for r in rows:
    assert r["ours_times_ms"] == [1000.0 * t for t in (1, 2, 3, 4, 5)]
    assert r["peer_times_ms"] == [1000.0 * t for t in (2, 4, 6, 8, 10)]
    assert r["ours_ms"] == 3000.0 and r["peer_ms"] == 6000.0 and r["ratio"] == 0.5
    assert r["ours_mib"] == 1.5 and r["peer_mib"] == 2.5 and r["peer_memory"] == "fake"
    assert r["max_abs_diff"] == 0.0 and r["check"] == "ok"
  prepared = [e for e in log if e[0] in ("prepare", "forward")]
  assert {e[2] for e in prepared} == {(1, 128, *SHAPE_TAIL), (1, 256, *SHAPE_TAIL)}
  assert {(e[3], e[4]) for e in prepared} == {("float32", 7)}
  assert {e[1] for e in prepared} == {"ours fake", "fake peer"}
  # Per length: two warm-ups, then five ABBA rounds.
  abba = ["ours fake", "fake peer", "fake peer", "ours fake"]
  per_length = ["ours fake", "fake peer", *abba, *abba, "ours fake", "fake peer"]
  assert _calls(log) == per_length * 2
  # The files: the table, the CSV and the JSON say the same.
  assert "| fake | fake peer | 128 | 3000.00 | 6000.00 | 0.50 | 1.5 | 2.5 | fake |" in markdown
  assert "Device:" in markdown and "torch 9.9 with 3 threads" in markdown
  assert "fake: ours ours fake settings." in markdown
  assert [(r["length"], float(r["ratio"]), r["check"]) for r in csv_rows] == [
    ("128", 0.5, "ok"),
    ("256", 0.5, "ok"),
  ]
  assert document["settings"]["repeats"] == 5 and document["settings"]["lengths"] == [128, 256]
  assert document["settings"]["dtype"] == "float32" and "jax" in document["versions"]


def test_a_missing_peer_is_a_row_with_its_reason_and_the_others_still_run(tmp_path):
  clock, log = FakeClock(), []
  rows = _fake_rows(clock, log)
  missing = FakePeer("missing peer", clock, [], log, packages=("no_such_module_xyz",))
  rows["absent"] = peers.Row("absent", rows["fake"].ours, (missing,))
  status = peers.benchmark(
    ["--rows=absent,fake", "--lengths=128", "--repeats=1", f"--out={tmp_path}"],
    rows=rows,
    clock=clock,
    pause=_no_pause,
  )
  assert status == 0
  document, _, markdown = _read(tmp_path)
  absent, fake = document["rows"]
  assert absent["row"] == "absent" and absent["length"] is None
  assert absent["error"] == "no_such_module_xyz is not installed: pip install no_such_module_xyz"
  assert "| absent | missing peer | - | error: no_such_module_xyz is not installed" in markdown
  assert fake["ratio"] == 0.5 and "error" not in fake
  assert not any(e[1] == "missing peer" for e in log)  # Never prepared.


def test_a_missing_torch_names_the_cpu_wheel(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError.
  reason = peers.ROWS["linear"].peers[0].available()
  assert reason == f"torch is not installed: {peers.TORCH_CPU}"
  assert "download.pytorch.org/whl/cpu" in reason


def test_a_peer_failing_on_one_length_is_recorded_for_that_length_only(tmp_path):
  clock, log = FakeClock(), []
  status = peers.benchmark(
    ["--lengths=128,256,384", "--repeats=1", f"--out={tmp_path}"],
    rows=_fake_rows(clock, log, fail_at={256}),
    clock=clock,
    pause=_no_pause,
  )
  assert status == 0
  document, _, markdown = _read(tmp_path)
  by_length = {r["length"]: r for r in document["rows"]}
  assert by_length[256]["error"] == "ValueError: length 256 rejected"
  assert "ratio" not in by_length[256]
  assert "error" not in by_length[128] and "error" not in by_length[384]
  assert by_length[128]["ratio"] is not None and by_length[384]["ratio"] is not None
  assert "| fake | fake peer | 256 | error: ValueError: length 256 rejected |" in markdown


def test_a_mismatch_is_marked_not_fatal_and_randomized_peers_are_not_compared(tmp_path):
  clock, log = FakeClock(), []
  rows = _fake_rows(clock, log, scale=2.0)
  other = FakePeer("random peer", clock, [100, 1, 1], log, scale=5.0, compare="n/a (randomized)")
  rows["fake"] = peers.Row("fake", rows["fake"].ours, (*rows["fake"].peers, other))
  status = peers.benchmark(
    ["--lengths=128", "--repeats=1", f"--out={tmp_path}"], rows=rows, clock=clock, pause=_no_pause
  )
  assert status == 0
  document, _, _ = _read(tmp_path)
  mismatch, randomized = document["rows"]
  v = peers.make_inputs((1, 128, *SHAPE_TAIL), 0)[2]
  assert mismatch["max_abs_diff"] == pytest.approx(float(np.abs(v).max()))
  assert mismatch["check"].startswith("MISMATCH") and mismatch["ratio"] is not None
  assert randomized["check"] == "n/a (randomized)" and "max_abs_diff" not in randomized


def test_no_pair_ran_exits_1_with_the_reasons_in_the_table(tmp_path, capsys):
  clock, log = FakeClock(), []
  rows = _fake_rows(clock, log, fail_at={128})
  status = peers.benchmark(
    ["--lengths=128", "--repeats=1", f"--out={tmp_path}"], rows=rows, clock=clock, pause=_no_pause
  )
  assert status == 1
  assert "no pair ran" in capsys.readouterr().err
  assert "length 128 rejected" in (tmp_path / "peers.md").read_text()


def test_dry_run_checks_every_adapter_and_writes_nothing(tmp_path, capsys):
  clock, log = FakeClock(), []
  out = tmp_path / "out"
  status = peers.benchmark(
    ["--lengths=256,128", "--dry_run", f"--out={out}"], rows=_fake_rows(clock, log), clock=clock
  )
  assert status == 0
  assert out.is_dir() and not list(out.iterdir())  # Checked writable, nothing written.
  assert _calls(log) == []  # Nothing timed.
  assert {e[2] for e in log} == {(1, 128, *SHAPE_TAIL)}  # The smallest length only.
  printed = capsys.readouterr().out
  assert "fake / fake peer: ok" in printed and "1 of 1 pair(s) ready at L=128" in printed


@pytest.mark.parametrize(
  "flag, message",
  [
    ("--rows=local,bogus", "--rows: unknown bogus; valid: local,"),
    ("--lengths=128,0", "--lengths='128,0': give positive integers"),
    ("--lengths=abc", "--lengths='abc': give positive integers"),
    ("--repeats=0", "--repeats=0 must be a positive integer"),
  ],
)
def test_bad_flags_are_one_line_and_write_nothing(flag, message, tmp_path, capsys):
  out = tmp_path / "out"
  assert peers.main([flag, f"--out={out}"]) == 2
  err = capsys.readouterr().err
  assert message in err and len(err.strip().splitlines()) == 1
  assert not out.exists()


def test_our_adapters_build_at_a_tiny_length_and_match_jax_exactly(tmp_path):
  lines = peers.dry_run(list(peers.ROWS.values()), 128, dtype="float32", seed=0)
  assert len(lines) == sum(len(r.peers) for r in peers.ROWS.values())
  # Ours runs first in each pair: a line is ok, or the peer's package is missing.
  assert all(line.endswith(": ok") or "is not installed" in line for line in lines), lines
  status = peers.benchmark(
    ["--rows=memory_efficient", "--lengths=128", "--repeats=1", f"--out={tmp_path}"],
    pause=_no_pause,
  )
  assert status == 0
  rows = {r["peer"]: r for r in _read(tmp_path)[0]["rows"]}
  jax_row = rows["jax.nn.dot_product_attention"]
  assert jax_row["check"] == "ok" and jax_row["max_abs_diff"] < 1e-5
  assert jax_row["ours_mib"] > 0 and jax_row["peer_mib"] > 0 and jax_row["ratio"] > 0
  if importlib.util.find_spec("torch") is None:
    assert rows["torch SDPA"]["error"] == f"torch is not installed: {peers.TORCH_CPU}"


def test_the_header_names_the_cpu_even_where_jax_defaults_to_an_accelerator(monkeypatch):
  monkeypatch.setattr(peers.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(peers.os, "sched_getaffinity", lambda pid: {4}, raising=False)
  line = peers.device_line()
  assert line.startswith("Device: CPU ") and line.endswith("(CPU backend).")
  assert ", 1 cores (cpu)" in line


def test_rss_growth_is_measured_in_a_fresh_process():
  # Any adapter of ROWS can be measured this way; the JAX one needs no torch.
  mib = peers.rss_growth_mib(
    "memory_efficient", "jax.nn.dot_product_attention", (1, 512, *SHAPE_TAIL), "float32", 0
  )
  # One [1, 4, 512, 512] float32 logits block is 4 MiB; the step holds a few.
  assert 1.0 < mib < 512.0
