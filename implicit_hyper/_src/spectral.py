"""Extreme eigenvalues of a symmetric operator: power iteration and Lanczos.

They give the automatic Neumann step size and its safety check (`ih.Neumann`).
"""

from typing import NamedTuple
from typing import TypeAlias

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from implicit_hyper._src import parallel
from implicit_hyper._src.solvers import _base
from implicit_hyper._src.solvers import _vectors
from implicit_hyper._src.solvers._base import Matvec
from implicit_hyper._src.solvers._base import PyTree

METHODS = ("power", "lanczos")


class RitzValues(NamedTuple):
  """The extreme Ritz values of a symmetric A from `lanczos`, with their residuals.

  Every Ritz value lies in ``[lambda_min, lambda_max]``, and each interval
  ``[theta - residual, theta + residual]`` holds an eigenvalue of A.

  Attributes:
    smallest: ``theta_min >= lambda_min``; negative means A is not positive semidefinite.
    largest: ``theta_max <= lambda_max``.
    smallest_residual: ``||A s - theta_min s||`` for the unit Ritz vector s.
    largest_residual: ``||A s - theta_max s||``; ``largest + largest_residual`` bounds
      ``lambda_max`` from above in practice (Zhou & Li, 2011).
    num_steps: Lanczos steps taken (products of A); fewer than asked when the Krylov
      space became invariant, and then the Ritz values are eigenvalues.
  """

  smallest: jax.Array
  largest: jax.Array
  smallest_residual: jax.Array
  largest_residual: jax.Array
  num_steps: jax.Array


# A Lanczos step's carry: (j, v, v_prev, beta_prev, alphas, betas, scale, done).
_Carry: TypeAlias = tuple[
  jax.Array, PyTree, PyTree, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array
]


def lanczos(
  matvec: Matvec, like: PyTree, *, steps: int = 10, key: jax.Array | None = None
) -> RitzValues:
  r"""Extreme eigenvalues of a symmetric linear operator by `steps` Lanczos steps.

  The three-term recurrence ``beta_{j+1} v_{j+1} = A v_j - alpha_j v_j - beta_j v_{j-1}``
  from a random unit ``v_1`` builds the tridiagonal ``T_k = V_k^T A V_k`` of the Krylov
  space ``span{v_1, A v_1, ..., A^{k-1} v_1}``; the extreme eigenvalues of ``T_k``
  (Ritz values) converge to those of A far faster than power iteration: for a random
  start the relative error of ``theta_max`` after k steps is of order ``(log n / k)^2``
  whatever the gap, against ``log n / k`` for power iteration (Kuczynski & Wozniakowski,
  1992). The residual of the Ritz pair ``(theta, V_k s)`` is ``beta_{k+1} |s_k|``, free
  from the recurrence. Costs `steps` products and keeps three vectors.

  The basis is not reorthogonalised: in floating point it loses orthogonality once a
  Ritz value converges, which only repeats converged Ritz values; every Ritz value still
  lies in ``[lambda_min, lambda_max]`` up to a small multiple of ``eps ||A||`` (Paige,
  1980), which is all an estimate of the extremes needs.

  Args:
    matvec: ``v -> A v`` on pytrees shaped like `like`, A symmetric.
    like: a pytree giving the shapes and dtypes of v.
    steps: Lanczos steps (>= 1); it stops early once the Krylov space is invariant.
    key: PRNG key of the start vector; a fixed key when None (deterministic).

  Returns:
    `RitzValues`.

  Example:
    >>> import jax.numpy as jnp
    >>> ritz = lanczos(lambda v: jnp.array([3.0, 1.0, -0.5]) * v, jnp.zeros(3), steps=3)
    >>> round(float(ritz.largest), 6), round(float(ritz.smallest), 6), int(ritz.num_steps)
    (3.0, -0.5, 3)

  References:
    Kuczynski & Wozniakowski, "Estimating the Largest Eigenvalue by the Power and
    Lanczos Algorithms with a Random Start", SIAM J. Matrix Anal. Appl., 1992.
    Paige, "Accuracy and effectiveness of the Lanczos algorithm for the symmetric
    eigenproblem", Linear Algebra Appl., 1980.
    Zhou & Li, "Bounding the spectrum of large Hermitian matrices", Linear Algebra
    Appl., 2011.
  """
  _base.check_int("lanczos", "steps", steps, minimum=1)
  dtype = _base.tree_dtype(like)
  v = _vectors.random_unit(like, jax.random.PRNGKey(0) if key is None else key)
  zero = jnp.zeros((), dtype)
  # Below this fraction of |T| a new basis vector is round-off: the space is invariant.
  invariant = jnp.sqrt(jnp.finfo(dtype).eps)

  def keep_going(carry: _Carry) -> jax.Array:
    j, done = carry[0], carry[-1]
    return (j < steps) & ~done

  def step(carry: _Carry) -> _Carry:
    j, v, v_prev, beta_prev, alphas, betas, scale, _ = carry
    # Paige's ordering (his A(2)): alpha from A v - beta v_prev, the most stable one.
    w = _vectors.add_scaled(matvec(v), -beta_prev, v_prev)
    alpha = otu.tree_vdot(v, w).astype(dtype)
    w = _vectors.add_scaled(w, -alpha, v)
    beta = _vectors.norm(w).astype(dtype)
    scale = jnp.maximum(scale, jnp.maximum(jnp.abs(alpha), beta))
    done = ~(beta > invariant * scale)  # also on NaN
    v_next = _vectors.scaled(1.0 / jnp.where(done, 1.0, beta), w)
    alphas, betas = alphas.at[j].set(alpha), betas.at[j].set(beta)
    return j + 1, v_next, v, beta, alphas, betas, scale, done

  start = (
    jnp.zeros((), jnp.int32),
    v,
    otu.tree_zeros_like(v),
    zero,
    jnp.zeros(steps, dtype),
    jnp.zeros(steps, dtype),
    zero,
    jnp.array(False),
  )
  k, _, _, _, alphas, betas, _, _ = jax.lax.while_loop(
    keep_going, step, parallel.vary_carry(start, like)
  )
  return _ritz_values(alphas, betas, k)


def _ritz_values(alphas: jax.Array, betas: jax.Array, k: jax.Array) -> RitzValues:
  """The extreme eigenpairs of the leading k x k block of the tridiagonal (alphas, betas).

  The unused trailing diagonal is filled with the mean of the used one, which lies
  strictly between the extreme Ritz values (k >= 2), so the extreme eigenvectors of the
  padded matrix are those of the leading block.
  """
  steps = alphas.shape[0]
  index = jnp.arange(steps)
  used = index < k
  mean = jnp.sum(jnp.where(used, alphas, 0.0)) / k
  diagonal = jnp.where(used, alphas, mean)
  off = jnp.where(index < k - 1, betas, 0.0)[:-1]
  tridiagonal = jnp.diag(diagonal) + jnp.diag(off, 1) + jnp.diag(off, -1)
  theta, vectors = jnp.linalg.eigh(tridiagonal)
  last = betas[k - 1]
  residual = lambda i: jnp.where(k == 1, last, last * jnp.abs(vectors[k - 1, i]))
  return RitzValues(theta[0], theta[-1], residual(0), residual(-1), k)


def max_eigenvalue(
  matvec: Matvec,
  like: PyTree,
  *,
  steps: int = 20,
  key: jax.Array | None = None,
  method: str = "power",
) -> jax.Array:
  """Estimates the largest-magnitude eigenvalue of a symmetric linear operator.

  ``method="power"`` runs `steps` steps of power iteration, ``v <- A v / ||A v||``,
  from a random start shaped like `like`, and returns the magnitude of the Rayleigh
  quotient ``|v^T A v|``; it costs ``steps + 1`` calls of `matvec` and approaches
  ``|lambda|_max`` from below, at a rate set by the gap to the second eigenvalue.
  ``method="lanczos"`` returns ``max(|theta_min|, |theta_max|)`` of `lanczos` with
  `steps` steps: `steps` calls, and far fewer needed for the same accuracy.

  Args:
    matvec: ``v -> A v`` on pytrees shaped like `like`.
    like: a pytree giving the shapes and dtypes of `v`.
    steps: iterations (power: >= 0; Lanczos: >= 1).
    key: PRNG key for the start vector; a fixed key when None, so the estimate is
      deterministic.
    method: "power" or "lanczos".

  Returns:
    A non-negative scalar.

  Example:
    >>> import jax.numpy as jnp
    >>> float(max_eigenvalue(lambda v: jnp.array([3.0, 1.0]) * v, jnp.zeros(2), steps=50))
    3.0
    >>> matvec = lambda v: jnp.linspace(1.0, 5.0, 100) * v
    >>> round(float(max_eigenvalue(matvec, jnp.zeros(100), steps=10, method="lanczos")), 1)
    5.0
  """
  if method not in METHODS:
    raise ValueError(f"`max_eigenvalue(method=...)` must be one of {METHODS}, got {method!r}.")
  if method == "lanczos":
    ritz = lanczos(matvec, like, steps=steps, key=key)
    return jnp.maximum(jnp.abs(ritz.smallest), jnp.abs(ritz.largest))
  _base.check_int("max_eigenvalue", "steps", steps, minimum=0)
  v = _vectors.random_unit(like, jax.random.PRNGKey(0) if key is None else key)

  def step(_: jax.Array, v: PyTree) -> PyTree:
    w = matvec(v)
    return _vectors.scaled(1.0 / _safe(_vectors.norm(w)), w)

  v = jax.lax.fori_loop(0, steps, step, parallel.vary_carry(v, like))
  return jnp.abs(otu.tree_vdot(v, matvec(v)))


def _safe(norm: jax.Array) -> jax.Array:
  return jnp.where(norm > 0, norm, 1.0)
