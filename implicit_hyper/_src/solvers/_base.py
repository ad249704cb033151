"""What every linear solver shares: `SolveInfo`, the solver base class, operator helpers."""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any
from typing import ClassVar
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

Matvec = Callable[[Any], Any]

# A truncated Neumann series or a Krylov method never makes the residual larger than the
# right-hand side when it converges; allowing a little slack avoids flagging round-off.
DIVERGENCE_FACTOR = 1.0 + 1e-4


class SolveInfo(NamedTuple):
  """Diagnostics returned with every solve.

  Attributes:
    residual_norm: relative residual ``||A x - b|| / ||b||`` (0 when ``b == 0``).
    num_steps: number of iterations the solver ran.
    diverged: True when the answer is not finite or the residual grew beyond ``||b||``:
      the answer must not be trusted.
  """

  residual_norm: jax.Array
  num_steps: jax.Array
  diverged: jax.Array


def check_nonnegative(call: str, name: str, value) -> None:
  """Raises when a concrete `value` is negative; traced values are left to `SolveInfo`."""
  if isinstance(value, (int, float)) and value < 0:
    raise ValueError(f"`{call}({name}=...)` must be non-negative, got {value!r}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearSolver:
  """Base class: solves ``(A + ridge * I) x = b`` on pytrees given ``matvec(x) = A x``.

  Subclasses implement `_solve(matvec, b, init)`; `solve` adds the ridge term.
  `requires_symmetric` says whether the method is only valid for a symmetric A.
  """

  ridge: float = 0.0
  requires_symmetric: ClassVar[bool] = False

  def __post_init__(self):
    check_nonnegative(type(self).__name__, "ridge", self.ridge)

  def solve(self, matvec: Matvec, b, init=None) -> tuple[Any, SolveInfo]:
    """Approximately solves ``(A + ridge * I) x = b``; returns ``(x, SolveInfo)``."""
    if not (isinstance(self.ridge, (int, float)) and self.ridge == 0):
      matvec = with_ridge(matvec, self.ridge)
    return self._solve(matvec, b, init)

  def _solve(self, matvec: Matvec, b, init) -> tuple[Any, SolveInfo]:
    raise NotImplementedError


def with_ridge(matvec: Matvec, ridge) -> Matvec:
  """Returns ``x -> matvec(x) + ridge * x``."""
  return lambda x: otu.tree_add_scale(matvec(x), ridge, x)


def relative_norm(r, b) -> jax.Array:
  """``||r|| / ||b||``, defined as ``||r||`` when ``b == 0``."""
  b_norm = otu.tree_norm(b)
  return otu.tree_norm(r) / jnp.where(b_norm > 0, b_norm, 1.0)


def tree_all_finite(tree) -> jax.Array:
  """True when every leaf of `tree` is finite."""
  finite = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]
  return functools.reduce(jnp.logical_and, finite, jnp.array(True))


def make_info(x, residual, b, num_steps, extra_failure=False) -> SolveInfo:
  """Builds `SolveInfo` from the final iterate and residual ``b - A x``."""
  residual_norm = relative_norm(residual, b)
  diverged = (
    ~tree_all_finite(x)
    | ~jnp.isfinite(residual_norm)
    | (residual_norm > DIVERGENCE_FACTOR)
    | extra_failure
  )
  return SolveInfo(residual_norm, jnp.asarray(num_steps, jnp.int32), diverged)


def residual(matvec: Matvec, x, b):
  """``b - A x``."""
  return otu.tree_sub(b, matvec(x))
