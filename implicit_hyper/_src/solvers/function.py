"""A plain function ``solve(matvec, b) -> x`` (jaxopt's `linear_solve`) as a solver."""

from collections.abc import Callable
from typing import Any

from implicit_hyper._src.solvers import _base
from implicit_hyper._src.solvers._base import Matvec
from implicit_hyper._src.solvers._base import PyTree
from implicit_hyper._src.solvers._base import SolveInfo


@_base.solver_pytree()
class FunctionSolver(_base.LinearSolver):
  """Wraps a stateless linear solve function, such as ``jaxopt.linear_solve.solve_cg``.

  `solver=` arguments accept such a function directly and wrap it in this class. The
  function is trusted to solve ``A x = b``; one extra product ``A x`` measures the
  residual reported in `SolveInfo`.

  Args:
    fn: ``fn(matvec, b) -> x`` on pytrees.
    ridge: solve ``(A + ridge I) x = b`` instead.

  Example:
    >>> import jax.numpy as jnp
    >>> halve = lambda matvec, b: b / 2.0
    >>> x, info, _ = FunctionSolver(fn=halve).solve(lambda v: 2.0 * v, jnp.ones(2))
    >>> x.tolist(), float(info.residual_norm)
    ([0.5, 0.5], 0.0)
  """

  fn: Callable[[Matvec, PyTree], PyTree]

  def __post_init__(self) -> None:
    super().__post_init__()
    if not callable(self.fn):
      raise TypeError(f"`FunctionSolver(fn=...)` must be callable, got {self.fn!r}.")

  def compute(self, matvec: Matvec, b: PyTree, state: Any) -> tuple[PyTree, SolveInfo, Any]:
    x = self.fn(matvec, b)
    return x, _base.make_info(x, _base.residual(matvec, x, b), b, 0), state
