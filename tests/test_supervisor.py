"""The supervisor of a multi-process run: another process's death ends in one line."""

import os
import re
import signal
import subprocess
import sys

import pytest

from efficient_transformers.training import supervisor

# Stands in for train.py: some normal output, then what JAX's coordination service
# prints when it aborts a survivor (abridged from a real run), then the abort.
FAKE_TRAINER = r"""
import os, sys, time
sys.stderr.write("step 50 train: loss=2.3\n 2%|##  | 59/3000 [00:08<08:37]")
sys.stderr.flush()
time.sleep(0.2)
# A progress bar leaves its line open; the abort's log line may or may not close it.
sys.stderr.write(
  ("" if "--open" in sys.argv else "\n")
  + "E1202 18:52:08.397507 coordination_service.cc:1549] Use error polling to propagate the "
  "following error to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped "
  "sending heartbeats):\n1\nThe tasks have crashed.\n"
  "F1202 18:52:08.398147 client.h:80] Terminating process because the JAX distributed "
  "service detected fatal errors.\n*** Check failure stack trace: ***\n"
)
for i in range(80):
  sys.stderr.write(f'  File "threading.py", line {i} in wait\n')
sys.stderr.flush()
if sys.argv[-1] == "--crash":
  os.abort()
sys.exit(int(sys.argv[-1]))
"""


@pytest.fixture
def fake(tmp_path):
  path = tmp_path / "fake_train.py"
  path.write_text(FAKE_TRAINER)
  return str(path)


@pytest.mark.parametrize("bar", ["closed", "open"])
def test_fatal_coordination_error_becomes_one_line_and_a_log(
  fake, tmp_path, capfd, monkeypatch, bar
):
  monkeypatch.delenv("EFFICIENT_TRANSFORMERS_SUPERVISED", raising=False)
  workdir = tmp_path / "run"
  argv = [fake, "--coordinator_address=h:1", "--num_processes=2", "--process_id=0"]
  argv += [f"--workdir={workdir}"] + (["--open"] if bar == "open" else []) + ["--crash"]
  handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
  code = supervisor.maybe_supervise(argv)
  assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)] == handlers
  err = capfd.readouterr().err
  assert code == 1
  assert "step 50 train: loss=2.3" in err and "59/3000" in err  # Passed through as it came.
  assert "Check failure" not in err and "threading.py" not in err and "E1202" not in err
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, err
  assert "process 1 of 2 stopped" in errors[0]
  assert f"--workdir={workdir}" in errors[0] and "--process_id=0" in errors[0]
  log = re.search(r"its last output is in (\S+)\.", errors[0]).group(1)
  assert log.startswith(str(workdir / "logs"))
  dump = open(log).read()
  assert "Check failure stack trace" in dump and "line 79 in wait" in dump


def test_single_process_and_clean_exits_are_left_alone(fake, capfd, monkeypatch):
  monkeypatch.delenv("EFFICIENT_TRANSFORMERS_SUPERVISED", raising=False)
  for var in supervisor.AUTO_ENV:
    monkeypatch.delenv(var, raising=False)
  assert supervisor.maybe_supervise([fake, "--workdir=w", "0"]) is None  # Not multi-process.
  # The child (its supervisor's pid in the variable) runs the command itself.
  code = "from efficient_transformers.training import supervisor as s; "
  code += "print(s.maybe_supervise(['train.py', '--num_processes=2']))"
  env = {**os.environ, "EFFICIENT_TRANSFORMERS_SUPERVISED": str(os.getpid())}
  child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert child.stdout.strip() == "None", child.stderr[-2000:]
  capfd.readouterr()
  # The marker seen, but the child exits by itself with its own code: still one line.
  assert supervisor.maybe_supervise([fake, "--num_processes=2", "3"]) == 1
  assert sum(line.startswith("error:") for line in capfd.readouterr().err.splitlines()) == 1


def test_a_child_killed_by_a_signal_is_reported(tmp_path, capfd, monkeypatch):
  monkeypatch.delenv("EFFICIENT_TRANSFORMERS_SUPERVISED", raising=False)
  script = tmp_path / "killed.py"
  script.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
  assert supervisor.maybe_supervise([str(script), "--num_processes=2"]) == 128 + 9
  assert "killed by signal 9" in capfd.readouterr().err
