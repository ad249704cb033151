"""Truncated Neumann series (Lorraine, Vicol & Duvenaud, AISTATS 2020, Algorithm 3)."""

import dataclasses
from typing import NamedTuple
from typing import TypeAlias

import jax
import jax.numpy as jnp
import optax.tree_utils as otu
from jax.typing import DTypeLike

from implicit_hyper._src import parallel
from implicit_hyper._src import spectral
from implicit_hyper._src.solvers import _base
from implicit_hyper._src.solvers import _vectors
from implicit_hyper._src.solvers._base import Matvec
from implicit_hyper._src.solvers._base import PyTree
from implicit_hyper._src.solvers._base import SolveInfo

# The automatic step keeps alpha * (theta_max + residual) <= SAFETY < 2, so the series
# converges whenever the Lanczos bound theta_max + residual holds lambda_max.
SAFETY = 1.9


class NeumannState(NamedTuple):
  """The cached step of `Neumann(alpha=None)` and the spectrum estimate it came from.

  Attributes:
    alpha: the step from the last estimate (about ``1 / lambda_max``); NaN until the first.
    age: solves since that estimate.
    count: solves so far (seeds the next estimate's start vector).
    min_eigenvalue: the smallest Ritz value of that estimate, ``>= lambda_min``: when it
      is negative the operator is indefinite and the series diverges (NaN until the first).
  """

  alpha: jax.Array
  age: jax.Array
  # `count` shadows the method `tuple.count` on purpose (NamedTuple allows it at run time);
  # mypy reports any field over a method of `tuple`.
  count: jax.Array  # type: ignore[assignment]
  min_eigenvalue: jax.Array


# `(alpha, min_eigenvalue, age)`, the branches of the cached-or-estimated step.
_Step: TypeAlias = tuple[jax.Array, jax.Array, jax.Array]


@_base.solver_pytree(data=("ridge", "alpha"))
class Neumann(_base.LinearSolver):
  r"""Truncated Neumann series for ``A^{-1} b``.

  .. math::
    A^{-1} b \approx \alpha \sum_{j=0}^{K-1} (I - \alpha A)^j b,

  computed with ``K = steps`` products ``A v`` in a `jax.lax.fori_loop`. The residual
  of the truncation is exactly the next term, :math:`b - A x = (I - \alpha A)^K b`, so it
  comes for free. The series converges iff the spectral radius of :math:`I - \alpha A` is
  below one: for symmetric A, iff A is positive definite and :math:`\alpha \lambda_{\max} < 2`.

  Differentiating K steps of gradient descent with step size ``alpha`` started at the
  optimum gives exactly this K-term series (Lorraine et al., Theorem 1). On a fixed
  point ``theta = T(theta)`` (`ih.implicit_fixed_point`) the step defaults to 1: the
  plain series ``sum_k J_T^k v``.

  With ``alpha=None`` the step comes from `estimate_steps` Lanczos steps (`ih.lanczos`,
  one product each): the Ritz values ``theta_min <= theta_max`` and the residual r of
  the top Ritz pair give

  .. math::
    \alpha = 1 / \max(\theta_{max}, |\theta_{min}|, (\theta_{max} + r) / 1.9),

  about ``1 / lambda_max``, and ``alpha lambda_max <= 1.9 < 2`` whenever
  ``lambda_max <= theta_max + r`` (which holds in practice; Zhou & Li, 2011). A
  negative ``theta_min`` proves that A is indefinite, so the series diverges: the solve
  reports it as `SolveInfo.negative_curvature`.

  The series is inexact by design (the paper's method): its `SolveInfo` reports
  ``converged`` whenever it did not diverge, unless a `tol` is given, which it then
  claims: the loop stops once the residual is below it (a `jax.lax.while_loop` then; the
  `fori_loop` of K terms otherwise) and a solve that ends above it is not converged.
  Zero terms (``steps=0``) return ``x = 0`` and are never converged (unless ``b = 0``).

  Args:
    steps: K, the number of terms and of matrix-vector products (>= 0); with `tol`, the
      most terms.
    alpha: the step ``alpha > 0``. None estimates it as above; the estimate is kept in
      the solver state and renewed every `refresh_every` solves. May be a traced array.
    estimate_steps: Lanczos steps (products) of the estimate when ``alpha`` is None.
    refresh_every: solves between estimates when the state is carried (`ih.bilevel`).
    tol: None (K terms, inexact by design), or a relative residual to stop at and claim.
    ridge: solve ``(A + ridge I) x = b`` instead.

  Example:
    >>> import jax.numpy as jnp
    >>> x, info, _ = Neumann(steps=60, alpha=0.5).solve(lambda v: 2.0 * v, jnp.ones(3))
    >>> x.round(6).tolist(), bool(info.diverged)
    ([0.5, 0.5, 0.5], False)
    >>> _, info, state = Neumann(steps=60).solve(lambda v: 2.0 * v, jnp.ones(3))
    >>> round(float(state.alpha), 6), bool(info.negative_curvature)
    (0.5, False)

  References:
    Lorraine, Vicol & Duvenaud, "Optimizing Millions of Hyperparameters by Implicit
    Differentiation", AISTATS 2020. https://arxiv.org/abs/1911.02590
  """

  steps: int = 20
  alpha: float | jax.Array | None = None
  estimate_steps: int = 4
  refresh_every: int = 10
  tol: float | None = None

  def __post_init__(self) -> None:
    super().__post_init__()
    if self.tol is not None:
      _base.check_nonnegative("Neumann", "tol", self.tol)
    _base.check_int("Neumann", "steps", self.steps, minimum=0)
    _base.check_int("Neumann", "estimate_steps", self.estimate_steps, minimum=1)
    _base.check_int("Neumann", "refresh_every", self.refresh_every, minimum=1)
    if isinstance(self.alpha, bool) or (
      isinstance(self.alpha, (int, float)) and not self.alpha > 0
    ):
      raise ValueError(f"`Neumann(alpha=...)` must be positive, got {self.alpha!r}.")

  def residual_target(self, dtype: DTypeLike) -> float | None:
    """`tol` (None: no claim beyond not diverging); 0 for zero terms, which solve nothing."""
    del dtype
    return 0.0 if self.steps == 0 else self.tol

  @property
  def requires_symmetric(self) -> bool:
    """Lanczos estimates the step only for symmetric operators."""
    return self.alpha is None

  def for_fixed_point(self) -> "Neumann":
    """Step 1 on ``I - J``: the series ``sum_k J^k``."""
    return self if self.alpha is not None else dataclasses.replace(self, alpha=1.0)

  def init(self, like: PyTree) -> NeumannState | None:
    if self.alpha is not None:
      return None
    zero = jnp.zeros((), jnp.int32)
    nan = jnp.full((), jnp.nan, _base.tree_dtype(like))
    return NeumannState(nan, zero, zero, nan)

  def estimate_step(
    self, matvec: Matvec, like: PyTree, key: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array]:
    """``(alpha, theta_min)`` from `estimate_steps` Lanczos steps (alpha 1 when A is 0)."""
    ritz = spectral.lanczos(matvec, like, steps=self.estimate_steps, key=key)
    scale = jnp.maximum(
      jnp.maximum(ritz.largest, -ritz.smallest), (ritz.largest + ritz.largest_residual) / SAFETY
    )
    good = jnp.isfinite(scale) & (scale > 0)
    return 1.0 / jnp.where(good, scale, 1.0), ritz.smallest

  def step_size(
    self, matvec: Matvec, b: PyTree, state: NeumannState | None
  ) -> tuple[jax.Array, NeumannState | None]:
    """The step used on ``matvec`` and the state after it."""
    if self.alpha is not None:
      return jnp.asarray(self.alpha), state
    dtype = _base.tree_dtype(b)
    if state is None:
      alpha, smallest = self.estimate_step(matvec, b)
      one = jnp.ones((), jnp.int32)
      return alpha, NeumannState(alpha.astype(dtype), one, one, smallest.astype(dtype))

    def estimate() -> _Step:
      key = jax.random.fold_in(jax.random.PRNGKey(0), state.count)
      alpha, smallest = self.estimate_step(matvec, b, key)
      return alpha.astype(dtype), smallest.astype(dtype), jnp.zeros_like(state.age)

    def cached() -> _Step:
      return state.alpha, state.min_eigenvalue, state.age

    due = ~jnp.isfinite(state.alpha) | (state.age >= self.refresh_every)
    alpha, smallest, age = jax.lax.cond(
      due, lambda: parallel.vary_carry(estimate(), b), lambda: parallel.vary_carry(cached(), b)
    )
    return alpha, NeumannState(alpha, age + 1, state.count + 1, smallest)

  def compute(
    self, matvec: Matvec, b: PyTree, state: NeumannState | None
  ) -> tuple[PyTree, SolveInfo, NeumannState | None]:
    alpha, state = self.step_size(matvec, b, state)

    def term(_: jax.Array, carry: tuple[PyTree, PyTree]) -> tuple[PyTree, PyTree]:
      x, p = carry
      x = _vectors.add_scaled(x, alpha, p)
      p = _vectors.add_scaled(p, -alpha, matvec(p))
      return x, p

    start = (otu.tree_zeros_like(b), b)
    if self.tol is None:
      x, p = jax.lax.fori_loop(0, self.steps, term, start)
      num_steps: int | jax.Array = self.steps
    else:
      threshold = self.tol * otu.tree_norm(b)
      x, p, num_steps = jax.lax.while_loop(
        lambda c: (c[2] < self.steps) & (otu.tree_norm(c[1]) > threshold),
        lambda c: (*term(c[2], (c[0], c[1])), c[2] + 1),
        parallel.vary_carry((*start, jnp.zeros((), jnp.int32))),
      )
    negative: bool | jax.Array = False
    if state is not None:
      # Ritz values are exact to about sqrt(eps) |A|: below that, round-off is no proof.
      tolerance = jnp.sqrt(jnp.finfo(_base.tree_dtype(b)).eps) / alpha
      negative = state.min_eigenvalue < -tolerance
    return x, _base.make_info(x, p, b, num_steps, negative_curvature=negative), state
