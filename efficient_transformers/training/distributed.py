"""Joining the processes of a multi-host run (TPU pod workers, GPU hosts, CPU tests).

Every process runs the same command. `jax.distributed.initialize` is called
when the flags name a coordinator, or when the environment is one JAX detects
by itself (Cloud TPU pod, SLURM, Open MPI); a plain single-machine run skips it.
"""

import os

import jax
from absl import logging

from efficient_transformers.errors import ConfigError
from efficient_transformers.training.supervisor import AUTO_ENV


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  heartbeat_timeout_seconds: int = 100,
  cpu_collectives: str = "gloo",
) -> bool:
  """Calls `jax.distributed.initialize` when the run is multi-process.

  Returns whether it did. On CPU, cross-process collectives go through
  `cpu_collectives` (gloo), so a multi-process run can be tested on one machine.
  A process that sends no heartbeat for `heartbeat_timeout_seconds` is taken
  for dead, and the others stop (see `supervisor`).
  """
  explicit = [coordinator_address, num_processes, process_id]
  if any(x is not None for x in explicit):
    if any(x is None for x in explicit):
      raise ConfigError(
        "--coordinator_address, --num_processes and --process_id go together; "
        f"got {coordinator_address!r}, {num_processes!r}, {process_id!r}."
      )
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ConfigError(
        f"--process_id={process_id} must be in [0, --num_processes={num_processes})."
      )
  elif not any(v in os.environ for v in AUTO_ENV):
    return False
  try:  # Affects the CPU backend only; accelerators use their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  except (AttributeError, ValueError):  # A JAX where the option is gone.
    logging.warning("Could not select %s CPU collectives on this JAX.", cpu_collectives)
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
    heartbeat_timeout_seconds=heartbeat_timeout_seconds,
  )
  logging.info(
    "Joined process %d of %d; %d local and %d global devices.",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return True
