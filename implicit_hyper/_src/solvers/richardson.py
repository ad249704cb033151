"""Richardson iteration: gradient descent on the adjoint quadratic, warm-started."""

import jax
import jax.numpy as jnp
import optax.tree_utils as otu
from jax.typing import DTypeLike

from implicit_hyper._src.solvers import _base
from implicit_hyper._src.solvers import _vectors
from implicit_hyper._src.solvers._base import Matvec
from implicit_hyper._src.solvers._base import PyTree
from implicit_hyper._src.solvers._base import SolveInfo


@_base.solver_pytree(data=("ridge", "step_size"))
class Richardson(_base.LinearSolver):
  r"""``x <- x + omega (b - A x)``, `steps` times, from the previous solution.

  For symmetric positive-definite A this is gradient descent on
  ``x^T A x / 2 - b^T x`` with step ``omega``: it converges when ``omega lambda_max < 2``.
  Kept warm across the hyper steps of `ih.bilevel`, one step per hyper step is the adjoint
  update of SOBA (Dagreou et al., 2022) and a few steps that of AmIGO (Arbel & Mairal,
  2022): the solution tracks ``A^{-1} b`` as both drift. From a zero start, K steps equal
  the K-term Neumann series with ``alpha = omega``.

  The reported residual is that of the iterate before the last step (computed by the
  iteration anyway, so no extra product); `diverged` flags only non-finite values, since a
  warm start on a changed operator may begin with a residual above ``||b||``.

  Args:
    step_size: ``omega > 0``.
    steps: products per solve (>= 1).
    warm_start: start from the previous solution kept in the state (zero when fresh).
    tol: None (inexact by design: a step of an online adjoint update claims nothing but
      finite values), or a relative residual the solve claims: above it (for the iterate
      before the last step) it reports ``converged=False``. It does not stop the loop.
    ridge: solve ``(A + ridge I) x = b`` instead.

  Example:
    >>> import jax.numpy as jnp
    >>> solver = Richardson(step_size=0.5, steps=60)
    >>> x, info, state = solver.solve(lambda v: 2.0 * v, jnp.ones(2))
    >>> x.round(6).tolist(), bool(info.diverged)
    ([0.5, 0.5], False)

  References:
    Dagreou, Ablin, Vaiter & Moreau, "A framework for bilevel optimization that enables
    stochastic and global variance reduction algorithms", NeurIPS 2022.
    https://arxiv.org/abs/2201.13409
  """

  step_size: float | jax.Array = 0.1
  steps: int = 1
  warm_start: bool = True
  tol: float | None = None

  def __post_init__(self) -> None:
    super().__post_init__()
    if self.tol is not None:
      _base.check_nonnegative("Richardson", "tol", self.tol)
    _base.check_int("Richardson", "steps", self.steps, minimum=1)
    if isinstance(self.step_size, bool) or (
      isinstance(self.step_size, (int, float)) and not self.step_size > 0
    ):
      raise ValueError(f"`Richardson(step_size=...)` must be positive, got {self.step_size!r}.")

  def residual_target(self, dtype: DTypeLike) -> float | None:
    """`tol` (None: no claim beyond finite values)."""
    del dtype
    return self.tol

  def init(self, like: PyTree) -> PyTree | None:
    return otu.tree_zeros_like(like) if self.warm_start else None

  def compute(
    self, matvec: Matvec, b: PyTree, state: PyTree | None
  ) -> tuple[PyTree, SolveInfo, PyTree | None]:
    x0 = otu.tree_zeros_like(b) if state is None else state

    def step(_: jax.Array, carry: tuple[PyTree, PyTree]) -> tuple[PyTree, PyTree]:
      x, _ = carry
      r = _base.residual(matvec, x, b)
      return _vectors.add_scaled(x, self.step_size, r), r

    x, r = jax.lax.fori_loop(0, self.steps, step, (x0, b))
    info = _base.make_info(x, r, b, self.steps)
    info = info._replace(diverged=~_base.tree_all_finite(x) | ~jnp.isfinite(info.residual_norm))
    info = info._replace(converged=~info.diverged)
    return x, info, (x if self.warm_start else None)
