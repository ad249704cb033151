"""Power iteration: the largest eigenvalue of a symmetric operator, for the Neumann step size."""

import jax
import jax.numpy as jnp
import optax.tree_utils as otu
from jax.flatten_util import ravel_pytree

from implicit_hyper._src.solvers import _base


def max_eigenvalue(matvec, like, *, steps: int = 20, key=None) -> jax.Array:
  """Estimates the largest-magnitude eigenvalue of a symmetric linear operator.

  Runs `steps` steps of power iteration, ``v <- A v / ||A v||``, from a random
  start shaped like `like`, and returns the magnitude of the Rayleigh quotient
  ``|v^T A v|``. Costs ``steps + 1`` calls of `matvec`. The estimate approaches
  ``|lambda|_max`` from below, at a rate set by the gap to the second eigenvalue.

  Args:
    matvec: ``v -> A v`` on pytrees shaped like `like`.
    like: a pytree giving the shapes and dtypes of `v`.
    steps: power-iteration steps.
    key: PRNG key for the start vector; a fixed key when None, so the estimate is
      deterministic.

  Returns:
    A non-negative scalar.

  Example:
    >>> import jax.numpy as jnp
    >>> float(max_eigenvalue(lambda v: jnp.array([3.0, 1.0]) * v, jnp.zeros(2), steps=50))
    3.0
  """
  _base.check_int("max_eigenvalue", "steps", steps, minimum=0)
  key = jax.random.PRNGKey(0) if key is None else key
  # One flat draw: a draw per leaf (`otu.tree_random_like`) is slow to compile for large trees.
  flat, unravel = ravel_pytree(like)
  v = unravel(jax.random.normal(key, flat.shape, flat.dtype))
  v = otu.tree_scale(1.0 / otu.tree_norm(v), v)

  def step(_, v):
    w = matvec(v)
    return otu.tree_scale(1.0 / _safe(otu.tree_norm(w)), w)

  v = jax.lax.fori_loop(0, steps, step, v)
  return jnp.abs(otu.tree_vdot(v, matvec(v)))


def _safe(norm):
  return jnp.where(norm > 0, norm, 1.0)
