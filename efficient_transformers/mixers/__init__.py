"""Sequence mixers beside attention: recurrent (LSTM, GRU), convolutional and state-space.

Each mixer is an `nnx.Module` with the attention module's call contract
(`module(x, *, mask, deterministic) -> y`, [batch, length, features] in and
out, True in `mask` = real token), built by `make(name, ...)` from the same
common arguments as `attention.make`, so a stack block can hold either.
Mixers register by name in `registry`.
"""

from efficient_transformers.mixers import conv, recurrent, s4d, scan  # noqa: F401 - registering.
from efficient_transformers.mixers.registry import available, get_class, make, register

# The state-space parameters (Λ and Δ, in each mixer's parameterization) that the
# papers train at their own learning rate without weight decay (config.optimizer.ssm_*).
SSM_PARAMETER_NAMES = (*s4d.SSM_PARAMETER_NAMES, *scan.SSM_PARAMETER_NAMES)

__all__ = ["SSM_PARAMETER_NAMES", "available", "get_class", "make", "register"]
