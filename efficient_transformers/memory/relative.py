"""Transformer-XL's relative positions; they live in `attention.relative` (re-exported here)."""

from efficient_transformers.attention.relative import (
  relative_attention,
  relative_shift,
  sinusoidal_relative_encoding,
)

__all__ = ["relative_attention", "relative_shift", "sinusoidal_relative_encoding"]
