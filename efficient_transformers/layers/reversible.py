"""Reversible residual layers (Gomez et al., 2017; Reformer, Kitaev et al., 2020).

A stream of two halves (x1, x2) goes through layers i = 0..n-1 of

    y1 = x1 + f_i(x2)
    y2 = x2 + g_i(y1)

which can be run backwards exactly: x2 = y2 - g_i(y1), then x1 = y1 - f_i(x2).
`reversible_sequence` is a `jax.custom_vjp` whose backward pass does that, layer by
layer from the top, and recomputes each layer's activations as it goes: the forward
pass saves only the last layer's outputs, so activation memory does not grow with
depth (the price: each f and g runs twice, and the inputs are reconstructed in
floating point, not restored bit for bit).

Pure functions only: `f(params, aux, x)` and `g(params, aux, x)` take a layer's
parameters (any pytree), its non-differentiable inputs `aux` (random keys, a mask:
whatever must be the same in the forward pass and the recomputation) and
x [..., features]. Gradients reach the parameters and the two inputs; `aux` gets none.
"""

import functools
from collections.abc import Callable, Sequence

import jax

Branch = Callable[[object, object, jax.Array], jax.Array]


def _with_aux(branch: Branch, aux, params, x: jax.Array) -> jax.Array:
  return branch(params, aux, x)


def _add(a, b):
  return jax.tree.map(lambda u, v: u + v, a, b)


def reversible_sequence(
  f: Branch,
  g: Branch,
  params: Sequence,
  f_aux: Sequence,
  g_aux: Sequence,
  x1: jax.Array,
  x2: jax.Array,
  *,
  recompute: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """Runs the reversible layers; returns (y1, y2) of the last one.

  Args:
    f, g: the two branches, pure (see the module docstring).
    params: one pytree per layer application; the same pytree may appear more than
      once (shared layers), and its gradients then add up.
    f_aux, g_aux: per application, the branches' non-differentiable inputs.
    x1, x2: the two halves of the input stream, the same shape.
    recompute: False runs the same layers under plain autodiff (every activation
      saved): the reference the reversible backward pass is tested against.
  """
  if not (len(params) == len(f_aux) == len(g_aux)):
    raise ValueError("params, f_aux and g_aux need one entry per layer application.")
  params, f_aux, g_aux = tuple(params), tuple(f_aux), tuple(g_aux)

  def forward(params, f_aux, g_aux, x1, x2):
    for p, fa, ga in zip(params, f_aux, g_aux, strict=True):
      x1 = x1 + f(p, fa, x2)
      x2 = x2 + g(p, ga, x1)
    return x1, x2

  if not recompute:
    return forward(params, f_aux, g_aux, x1, x2)

  @jax.custom_vjp
  def run(params, f_aux, g_aux, x1, x2):
    return forward(params, f_aux, g_aux, x1, x2)

  def run_fwd(params, f_aux, g_aux, x1, x2):
    y1, y2 = forward(params, f_aux, g_aux, x1, x2)
    # The residuals: parameters, aux and the top outputs; nothing per layer.
    return (y1, y2), (params, f_aux, g_aux, y1, y2)

  def run_bwd(residuals, cotangents):
    params, f_aux, g_aux, y1, y2 = residuals
    dy1, dy2 = cotangents
    grads = [None] * len(params)
    for i in reversed(range(len(params))):
      p = params[i]
      # y2 = x2 + g(y1): recompute g at y1, reconstruct x2, and pull dy2 back.
      g_out, g_vjp = jax.vjp(functools.partial(_with_aux, g, g_aux[i]), p, y1)
      x2 = y2 - g_out
      dp_g, dy1_via_g = g_vjp(dy2)
      dy1 = dy1 + dy1_via_g
      # y1 = x1 + f(x2): recompute f at the reconstructed x2, reconstruct x1.
      f_out, f_vjp = jax.vjp(functools.partial(_with_aux, f, f_aux[i]), p, x2)
      x1 = y1 - f_out
      dp_f, dx2_via_f = f_vjp(dy1)
      grads[i] = _add(dp_f, dp_g)
      y1, y2, dy2 = x1, x2, dy2 + dx2_via_f
    return tuple(grads), None, None, dy1, dy2

  run.defvjp(run_fwd, run_bwd)
  return run(params, f_aux, g_aux, x1, x2)
