"""Conjugate gradient on the normal equations, for non-symmetric operators."""

import jax

from implicit_hyper._src.solvers import _base
from implicit_hyper._src.solvers import cg
from implicit_hyper._src.solvers._base import Matvec
from implicit_hyper._src.solvers._base import PyTree
from implicit_hyper._src.solvers._base import SolveInfo


@_base.solver_pytree()
class NormalCG(_base.KrylovSolver):
  """Solves ``A x = b`` for any invertible A by CG on ``A^T A x = A^T b``.

  The transpose product comes from `jax.linear_transpose` of `matvec`, so no extra
  code is needed from the caller; each step costs one product with A and one with
  ``A^T``. Converges for any invertible A, but at the square of A's condition number.

  Args:
    steps: the most CG iterations to run.
    tol: stop once the normal-equation residual is below ``tol`` relative.
    ridge: solve ``(A + ridge I) x = b`` instead.

  Example:
    >>> import jax.numpy as jnp
    >>> a = jnp.array([[2.0, 1.0], [0.0, 1.0]])
    >>> x, _, _ = NormalCG(steps=2).solve(lambda v: a @ v, jnp.array([3.0, 1.0]))
    >>> x.round(6).tolist()
    [1.0, 1.0]
  """

  def compute(self, matvec: Matvec, b: PyTree, state: None) -> tuple[PyTree, SolveInfo, None]:
    del state
    tol = self.stop_tol(_base.tree_dtype(b))
    rmatvec = jax.linear_transpose(matvec, b)

    def normal_matvec(v: PyTree) -> PyTree:
      (out,) = rmatvec(matvec(v))
      return out

    (rhs,) = rmatvec(b)
    x, info = cg.conjugate_gradient(normal_matvec, rhs, None, steps=self.steps, tol=tol)
    info = _base.make_info(
      x, _base.residual(matvec, x, b), b, info.num_steps, info.diverged, tol=tol
    )
    return x, info, None
