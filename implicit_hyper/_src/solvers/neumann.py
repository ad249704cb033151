"""Truncated Neumann series (Lorraine, Vicol & Duvenaud, AISTATS 2020, Algorithm 3)."""

import dataclasses

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from implicit_hyper._src import spectral
from implicit_hyper._src.solvers import _base


@dataclasses.dataclass(frozen=True, kw_only=True)
class Neumann(_base.LinearSolver):
  r"""Truncated Neumann series for ``A^{-1} b``.

  .. math::
    A^{-1} b \approx \alpha \sum_{j=0}^{K-1} (I - \alpha A)^j b,

  computed with ``K = steps`` products ``A v`` in a `jax.lax.fori_loop`. The residual
  of the truncation is exactly the next term, ``b - A x = (I - \alpha A)^K b``, so it
  comes for free. The series converges iff the spectral radius of ``I - \alpha A`` is
  below one: for symmetric A, iff A is positive definite and ``\alpha \lambda_max < 2``.

  Differentiating K steps of gradient descent with step size ``alpha`` started at the
  optimum gives exactly this K-term series (Lorraine et al., Theorem 1).

  Args:
    steps: K, the number of terms and of matrix-vector products (>= 0).
    alpha: the step ``alpha > 0``. None estimates ``lambda_max`` of A by power
      iteration (`power_iterations` + 1 extra products) and uses ``1 / lambda_max``.
      May be a traced array (e.g. an estimate cached in a training state).
    power_iterations: power-iteration steps used when ``alpha`` is None.
    ridge: solve ``(A + ridge I) x = b`` instead.

  Example:
    >>> import jax.numpy as jnp
    >>> x, info = Neumann(steps=60, alpha=0.5).solve(lambda v: 2.0 * v, jnp.ones(3))
    >>> x.round(6).tolist(), bool(info.diverged)
    ([0.5, 0.5, 0.5], False)

  References:
    Lorraine, Vicol & Duvenaud, "Optimizing Millions of Hyperparameters by Implicit
    Differentiation", AISTATS 2020. https://arxiv.org/abs/1911.02590
  """

  steps: int = 20
  alpha: float | jax.Array | None = None
  power_iterations: int = 20

  def __post_init__(self):
    super().__post_init__()
    for name in ("steps", "power_iterations"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 0:
        raise ValueError(f"`Neumann({name}=...)` must be an int >= 0, got {value!r}.")
    if isinstance(self.alpha, (int, float)) and not self.alpha > 0:
      raise ValueError(f"`Neumann(alpha=...)` must be positive, got {self.alpha!r}.")

  @property
  def requires_symmetric(self) -> bool:
    """Power iteration estimates the step only for symmetric operators."""
    return self.alpha is None

  def step_size(self, matvec, b) -> jax.Array:
    """The alpha this solver uses on ``matvec``: given, or ``1 / lambda_max``."""
    if self.alpha is not None:
      return jnp.asarray(self.alpha)
    lam = spectral.max_eigenvalue(matvec, b, num_iters=self.power_iterations)
    return 1.0 / jnp.where(lam > 0, lam, 1.0)

  def _solve(self, matvec, b, init):
    del init  # The series always starts from the right-hand side.
    alpha = self.step_size(matvec, b)

    def term(_, carry):
      x, p = carry
      x = otu.tree_add_scale(x, alpha, p)
      p = otu.tree_add_scale(p, -alpha, matvec(p))
      return x, p

    x, p = jax.lax.fori_loop(0, self.steps, term, (otu.tree_zeros_like(b), b))
    return x, _base.make_info(x, p, b, self.steps)
