"""Exact solve by materialising the operator: for small problems and tests."""

from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from implicit_hyper._src.solvers import _base
from implicit_hyper._src.solvers._base import Matvec
from implicit_hyper._src.solvers._base import PyTree
from implicit_hyper._src.solvers._base import SolveInfo


@_base.solver_pytree()
class Direct(_base.LinearSolver):
  """Builds the dense matrix of A with n products (`jax.jacfwd`) and solves by LU.

  Costs O(n) products, O(n^2) memory and O(n^3) time for n unknowns: use it as the
  exact reference on problems with up to a few thousand parameters. Works for any
  invertible A, symmetric or not. When LU gives non-finite values (A singular, e.g. a
  parameter that the loss does not use) it falls back to the least-squares solution of
  minimum norm, which is exact whenever b lies in A's range; the residual then says
  whether it does. Half-precision operators are solved in float32.

  Args:
    ridge: solve ``(A + ridge I) x = b`` instead.

  Example:
    >>> import jax.numpy as jnp
    >>> x, _, _ = Direct().solve(lambda v: jnp.array([[2.0, 1.0], [0.0, 1.0]]) @ v,
    ...                       jnp.array([3.0, 1.0]))
    >>> x.tolist()
    [1.0, 1.0]
  """

  def compute(self, matvec: Matvec, b: PyTree, state: Any) -> tuple[PyTree, SolveInfo, Any]:
    flat_b, unravel = ravel_pytree(b)
    matrix = jax.jacfwd(lambda v: ravel_pytree(matvec(unravel(v)))[0])(flat_b)
    dtype = jnp.promote_types(flat_b.dtype, jnp.float32)
    matrix, rhs = matrix.astype(dtype), flat_b.astype(dtype)
    lu = jnp.linalg.solve(matrix, rhs)
    flat_x = jax.lax.cond(
      jnp.all(jnp.isfinite(lu)),
      lambda: lu,
      lambda: jnp.linalg.lstsq(matrix, rhs)[0],
    )
    x = unravel(flat_x.astype(flat_b.dtype))
    return x, _base.make_info(x, _base.residual(matvec, x, b), b, flat_b.size), state
