"""What a ``solver=`` argument resolves to: a solver object, a wrapped function, or the default."""

from typing import Any

from implicit_hyper._src.solvers._base import Solver
from implicit_hyper._src.solvers.function import FunctionSolver


def as_solver(call: str, solver: object, default: Solver | None, *, symmetric: bool) -> Any:
  """`solver` as an object with `init` and `solve`; raises naming `call` when it is not one.

  None gives `default`. A plain function ``solve(matvec, b) -> x`` (jaxopt's
  ``linear_solve.solve_cg`` and friends) is wrapped in `FunctionSolver`.
  """
  if solver is None:
    solver = default
  if isinstance(solver, type):
    raise TypeError(
      f"`{call}(solver=...)` must be a solver instance, got the class {solver.__name__}; "
      f"call it: `solver={solver.__name__}()`."
    )
  if not (callable(getattr(solver, "solve", None)) and callable(getattr(solver, "init", None))):
    if not callable(solver):
      raise TypeError(
        f"`{call}(solver=...)` must be a linear solver such as `ih.Neumann()` (with `init` "
        f"and `solve` methods) or a function `solve(matvec, b) -> x`, got {solver!r}."
      )
    solver = FunctionSolver(fn=solver)
  if not symmetric and getattr(solver, "requires_symmetric", False):
    raise ValueError(
      f"`{call}(solver=...)`: {solver!r} needs a symmetric operator, but the Jacobian of a "
      "general optimality condition need not be symmetric. Use `ih.BiCGStab()`, "
      "`ih.NormalCG()`, `ih.Direct()` or `ih.Neumann(alpha=...)`, or pass "
      "`symmetric=True` if dF/dparams is symmetric."
    )
  return solver
