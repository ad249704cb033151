"""The zero-term approximation ``A^{-1} ~ I``."""

from typing import Any

from implicit_hyper._src.solvers import _base
from implicit_hyper._src.solvers import _vectors
from implicit_hyper._src.solvers._base import Matvec
from implicit_hyper._src.solvers._base import PyTree
from implicit_hyper._src.solvers._base import SolveInfo


@_base.solver_pytree(data=("ridge", "scale"))
class Identity(_base.LinearSolver):
  """Approximates ``A^{-1} b`` by ``scale * b``.

  The cheapest hypergradient: Lorraine et al. (2020) use it for dataset distillation,
  where it amounts to differentiating one step of training. One product ``A b`` is
  spent on the reported residual; divergence is not flagged from the residual (this
  approximation makes no claim to converge), only for non-finite values.

  Args:
    scale: the multiple of ``b`` to return, e.g. an inner learning rate.
    ridge: accepted for a uniform interface; it only changes the reported residual.

  Example:
    >>> import jax.numpy as jnp
    >>> x, _, _ = Identity().solve(lambda v: 2.0 * v, jnp.ones(2))
    >>> x.tolist()
    [1.0, 1.0]
  """

  scale: float = 1.0

  def compute(self, matvec: Matvec, b: PyTree, state: Any) -> tuple[PyTree, SolveInfo, Any]:
    x = _vectors.scaled(self.scale, b)
    info = _base.make_info(x, _base.residual(matvec, x, b), b, 0)
    return x, info._replace(diverged=~_base.tree_all_finite(x)), state
