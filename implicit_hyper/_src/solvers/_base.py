"""What every linear solver shares: `SolveInfo`, the solver protocol, operator helpers.

A solver is a small immutable pytree. Its settings are static fields; array fields (a
step size, a ridge) may be traced, so a solver can cross `jax.jit` boundaries. It keeps
whatever it carries between solves (a cached step size, a warm start, a preconditioner)
in a state of its own, threaded by the caller without looking inside:

    state = solver.init(like)                    # for right-hand sides shaped like `like`
    x, info, state = solver.solve(matvec, b, state)

``state=None`` means a fresh state: the solver computes whatever it caches.
"""

import dataclasses
import functools
import numbers
from collections.abc import Callable
from typing import Any
from typing import NamedTuple
from typing import Protocol
from typing import TypeAlias
from typing import TypeVar
from typing import dataclass_transform

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu
from jax.typing import DTypeLike

from implicit_hyper._src.solvers import _vectors

# JAX has no type for pytrees (any nesting of containers around arrays): `PyTree` names them.
PyTree: TypeAlias = Any
Matvec: TypeAlias = Callable[[PyTree], PyTree]
SolverClass = TypeVar("SolverClass", bound=type)

# A truncated Neumann series or a Krylov method never makes the residual larger than the
# right-hand side when it converges; allowing a little slack avoids flagging round-off.
DIVERGENCE_FACTOR = 1.0 + 1e-4


class SolveInfo(NamedTuple):
  """Diagnostics returned with every solve.

  Attributes:
    residual_norm: relative residual ``||A x - b|| / ||b||`` (0 when ``b == 0``).
    num_steps: number of iterations the solver ran.
    diverged: True when the answer is not finite or the residual grew beyond ``||b||``
      (or the method broke down): the answer must not be trusted.
    converged: True when the solve did not diverge and its residual is within what the
      solver claims (`LinearSolver.residual_target`: a Krylov solver's `tol`; for a
      solver inexact by design, such as a truncated Neumann series, whenever it did not
      diverge).
    negative_curvature: True when the solver saw ``v^T A v <= 0`` (CG, Lanczos), i.e.
      A is not positive definite: the point is not a strict local minimum.
    stationarity: for the decorators, the norm of the optimality condition at the
      inner solution relative to its norm at ``init_params`` (``||grad L(theta*)|| /
      ||grad L(theta_0)||`` for `implicit_argmin`); NaN where not measured.
  """

  residual_norm: jax.Array
  num_steps: jax.Array
  diverged: jax.Array
  converged: jax.Array
  negative_curvature: jax.Array
  stationarity: jax.Array


@dataclass_transform(kw_only_default=True, frozen_default=True)
def solver_pytree(*, data: tuple[str, ...] = ("ridge",)) -> Callable[[SolverClass], SolverClass]:
  """Class decorator: a frozen keyword-only dataclass registered as a pytree.

  The fields named in `data` are pytree children (arrays that may be traced); every other
  field is static and must be hashable.
  """

  def register(cls: SolverClass) -> SolverClass:
    # Both calls change `cls` itself and return it (a dataclass without slots is no copy).
    dataclasses.dataclass(frozen=True, kw_only=True)(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    data_fields = [n for n in names if n in data]
    meta_fields = [n for n in names if n not in data]
    jax.tree_util.register_dataclass(cls, data_fields=data_fields, meta_fields=meta_fields)
    return cls

  return register


def check_int(call: str, name: str, value: object, *, minimum: int) -> None:
  """Raises unless `value` is an integer (not a bool) of at least `minimum`."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
    raise ValueError(f"`{call}({name}=...)` must be an int >= {minimum}, got {value!r}.")


def check_nonnegative(call: str, name: str, value: object) -> None:
  """Raises when a concrete `value` is negative or NaN; traced values are left to `SolveInfo`."""
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f"`{call}({name}=...)` must be a non-negative number, got {value!r}.")
  if isinstance(value, numbers.Real) and not value >= 0:  # type: ignore[operator]
    raise ValueError(f"`{call}({name}=...)` must be a non-negative number, got {value!r}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearSolver:
  """Base class: solves ``(A + ridge * I) x = b`` on pytrees given ``matvec(x) = A x``.

  Subclasses are decorated with `solver_pytree` and implement ``compute(matvec, b,
  state) -> (x, SolveInfo, state)`` on the operator with the ridge already added, and
  `init` if they keep a state. `requires_symmetric` says whether the method is only
  valid for a symmetric A.
  """

  ridge: float | jax.Array = 0.0

  def __post_init__(self) -> None:
    check_nonnegative(type(self).__name__, "ridge", self.ridge)

  @property
  def requires_symmetric(self) -> bool:
    """Whether the method is only valid for a symmetric A (False here).

    A subclass overrides it with a class attribute (``requires_symmetric = True``) or a
    property of its settings.
    """
    return False

  def init(self, like: PyTree) -> Any:
    """The state before any solve, for right-hand sides shaped like `like` (None here)."""
    del like
    return None

  def residual_target(self, dtype: DTypeLike) -> float | None:
    """The relative residual this solver claims to reach: the convergence policy.

    This is the one place that decides what `SolveInfo.converged` means, for every
    solver: ``converged = not diverged and residual_norm <= residual_target(dtype)``.
    None (here) is a solver that is inexact by design (a truncated Neumann series,
    `ih.Identity`, a low-rank `ih.Nystrom`): it claims only not to diverge. A solver with
    a `tol` (the Krylov methods; `ih.Neumann` and `ih.Richardson` when given one) claims
    that tolerance, `ih.Direct` round-off; the decorators flag a solve that misses it.
    """
    del dtype
    return None

  def solve(self, matvec: Matvec, b: PyTree, state: Any = None) -> tuple[PyTree, SolveInfo, Any]:
    """Approximately solves ``(A + ridge * I) x = b``; returns ``(x, SolveInfo, state)``."""
    x, info, state = self.compute(with_ridge(matvec, self.ridge), b, state)
    target = self.residual_target(tree_dtype(b))
    if target is not None:
      info = info._replace(converged=~info.diverged & (info.residual_norm <= target))
    return x, info, state

  def compute(self, matvec: Matvec, b: PyTree, state: Any) -> tuple[PyTree, SolveInfo, Any]:
    """Solves ``A x = b`` for the operator `matvec` (the ridge already added)."""
    raise NotImplementedError

  def for_fixed_point(self) -> "LinearSolver":
    """This solver configured for ``(I - J) u = v`` with J a contraction (here: unchanged)."""
    return self


def default_tol(dtype: DTypeLike) -> float:
  """The Krylov solvers' default `tol`: 1e-10 in float64, ``eps^(2/3)`` in lower precision.

  ``eps^(2/3)`` (2.4e-5 in float32, 1e-2 in float16) is a residual that the true residual
  of a moderately conditioned system can still reach in that precision, so that the
  default claim is one the solver can keep.
  """
  return max(1e-10, float(jnp.finfo(dtype).eps) ** (2.0 / 3.0))


def check_iteration_settings(call: str, steps: object, tol: object) -> None:
  """Validates the `steps` and `tol` settings shared by the Krylov solvers."""
  check_int(call, "steps", steps, minimum=0)
  if tol is not None:
    check_nonnegative(call, "tol", tol)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KrylovSolver(LinearSolver):
  """Base class of the Krylov solvers: at most `steps` iterations, stopping at `tol`.

  A Krylov solver's answer is meant to be the solution: it claims its `tol`
  (`default_tol` of the right-hand side's dtype when None), and a solve that stops at
  `steps` above it reports ``converged=False``, which the decorators flag.
  """

  steps: int = 20
  tol: float | None = None

  def __post_init__(self) -> None:
    super().__post_init__()
    check_iteration_settings(type(self).__name__, self.steps, self.tol)

  def stop_tol(self, dtype: DTypeLike) -> float:
    """The relative residual to stop at: `tol`, or `default_tol` of `dtype` when None."""
    return default_tol(dtype) if self.tol is None else float(self.tol)

  def residual_target(self, dtype: DTypeLike) -> float:
    """`stop_tol`, but never below ``min(100 eps, default_tol)``: ``tol=0`` asks to run
    every step, and a solve exact to round-off keeps its claim."""
    floor = min(100.0 * float(jnp.finfo(dtype).eps), default_tol(dtype))
    return max(self.stop_tol(dtype), floor)


class Solver(Protocol):
  """What the ``solver=`` arguments take: any object with `init` and `solve`.

  `LinearSolver` and its subclasses are such objects; a plain function
  ``solve(matvec, b) -> x`` given instead is wrapped in `FunctionSolver` (see
  `resolve.as_solver`).
  """

  def init(self, like: PyTree) -> Any: ...

  def solve(
    self, matvec: Matvec, b: PyTree, state: Any = None
  ) -> tuple[PyTree, SolveInfo, Any]: ...


SolverLike: TypeAlias = Solver | Callable[[Matvec, PyTree], PyTree]
"""What every ``solver=`` argument takes: a solver object (`ih.Neumann()`, `ih.CG()`, ...: any
object with `init` and `solve`) or a plain function ``solve(matvec, b) -> x`` such as jaxopt's
``linear_solve.solve_cg``. The signatures name it ``"SolverLike | None"`` (a string), so that
``help()`` shows this name rather than the union it stands for."""


def with_ridge(matvec: Matvec, ridge: float | jax.Array) -> Matvec:
  """Returns ``x -> matvec(x) + ridge * x`` (`matvec` itself for a Python zero)."""
  if isinstance(ridge, numbers.Real) and ridge == 0:
    return matvec
  return lambda x: _vectors.add_scaled(matvec(x), ridge, x)


def relative_norm(r: PyTree, b: PyTree) -> jax.Array:
  """``||r|| / ||b||``, defined as ``||r||`` when ``b == 0``."""
  b_norm = otu.tree_norm(b)
  return otu.tree_norm(r) / jnp.where(b_norm > 0, b_norm, 1.0)


def tree_all_finite(tree: PyTree) -> jax.Array:
  """True when every leaf of `tree` is finite."""
  finite = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]
  return functools.reduce(jnp.logical_and, finite, jnp.array(True))


def make_info(
  x: PyTree,
  residual: PyTree,
  b: PyTree,
  num_steps: int | jax.Array,
  extra_failure: bool | jax.Array = False,
  *,
  tol: float | jax.Array | None = None,
  negative_curvature: bool | jax.Array = False,
) -> SolveInfo:
  """Builds `SolveInfo` from the final iterate and residual ``b - A x``.

  `extra_failure` marks a breakdown as divergence; `tol` (None: none) is the relative
  residual below which the solve counts as converged.
  """
  residual_norm = relative_norm(residual, b)
  diverged = (
    ~tree_all_finite(x)
    | ~jnp.isfinite(residual_norm)
    | (residual_norm > DIVERGENCE_FACTOR)
    | extra_failure
  )
  converged = ~diverged if tol is None else ~diverged & (residual_norm <= tol)
  return SolveInfo(
    residual_norm=residual_norm,
    num_steps=jnp.asarray(num_steps, jnp.int32),
    diverged=jnp.asarray(diverged),
    converged=jnp.asarray(converged),
    negative_curvature=jnp.asarray(negative_curvature),
    stationarity=jnp.full((), jnp.nan, residual_norm.dtype),
  )


def no_solve_info(dtype: DTypeLike = jnp.float32) -> SolveInfo:
  """The `SolveInfo` of no solve at all (an unrolled hypergradient)."""
  zero = jnp.zeros((), dtype)
  false = jnp.array(False)
  return SolveInfo(zero, jnp.zeros((), jnp.int32), false, jnp.array(True), false, zero * jnp.nan)


def residual(matvec: Matvec, x: PyTree, b: PyTree) -> PyTree:
  """``b - A x``."""
  return otu.tree_sub(b, matvec(x))


def tree_dtype(tree: PyTree) -> np.dtype:
  """The widest floating dtype among the leaves of `tree` (float32 for none)."""
  dtypes = [jnp.result_type(leaf) for leaf in jax.tree.leaves(tree)]
  return jnp.result_type(*dtypes) if dtypes else jnp.dtype(jnp.float32)
