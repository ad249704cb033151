"""Randomized Nystrom approximations of a symmetric operator: a solver and a CG preconditioner.

Both sketch A with k products ``Y = A Omega`` against a random ``Omega`` (n x k) with
orthonormal columns and use the Nystrom approximation ``A_nys = Y (Omega^T Y)^+ Y^T``,
kept as an orthonormal basis U and the inverses g of its eigenvalues:
``A_nys = U diag(1 / g) U^T``. The factorisation never inverts the core
``W = Omega^T Y``, which is indefinite or singular when A is: with ``Y = P S Z^T`` (thin
SVD), ``G = S^{-1} Z^T W Z S^{-1} = V diag(g) V^T`` and ``U = P V``, so a core
eigenvalue near zero yields a *small* g (an eigenvalue of A_nys that is large, which
an inverse then damps) instead of an overflow. Directions where Y vanishes (A is
singular there) are dropped.

Why a random sketch rather than random columns (Hataya & Yamada's choice, ``Omega`` the
columns of I at k random indices): both cost k products, but sampled columns only see
the eigenvectors of A where those indices put weight, so their error depends on the
coherence of A's top eigenvectors, while that of a Gaussian or random-sign sketch does
not (Gittens & Mahoney, 2016; Tropp et al., 2017). Hessians of networks and of models
with one decay per weight have delocalised top eigenvectors (a mean-input direction
touches every weight), which is where column sampling fails. Measured on the 640 x 640
Hessians of ``benchmarks/accuracy.py`` (median of 10 draws, k = 50):
``||H - H_nys||_2 / ||H||_2`` is 0.23 with a Gaussian sketch against 0.72 with sampled
columns (ridge), 0.37 against 0.58 (logistic).

The sketch is flat: the k vectors of n entries are one (n, k) array in the widest dtype
of the parameters.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jax.typing import DTypeLike

from implicit_hyper._src import parallel
from implicit_hyper._src.solvers import _base
from implicit_hyper._src.solvers._base import Matvec
from implicit_hyper._src.solvers._base import PyTree
from implicit_hyper._src.solvers._base import SolveInfo


class NystromState(NamedTuple):
  """A Nystrom sketch ``A_nys = U diag(1 / g) U^T`` and its age.

  Attributes:
    basis: U, (n, k) with orthonormal columns (zeros before the first sketch).
    inverse_eigenvalues: g, (k,); 0 for an unused column of U (a direction where
      ``A Omega`` vanishes, left to the tail), whose column of U is then 0.
    ritz: the extreme eigenvalues ``(theta_min, theta_max)`` of ``Omega^T A Omega``,
      which lie in ``[lambda_min, lambda_max]``: a negative ``theta_min`` proves that A
      is indefinite.
    age: solves since the sketch (``refresh_every`` before the first: due).
    count: sketches so far (seeds the next one's random test matrix).
  """

  basis: jax.Array
  inverse_eigenvalues: jax.Array
  ritz: jax.Array
  age: jax.Array
  # `count` shadows the method `tuple.count` on purpose (NamedTuple allows it at run time);
  # mypy reports any field over a method of `tuple`.
  count: jax.Array  # type: ignore[assignment]


def _test_matrix(key: jax.Array, n: int, k: int, dtype: DTypeLike) -> jax.Array:
  """An (n, k) random matrix with orthonormal columns.

  Gaussian, or Rademacher (random signs, 32 per random word) when it has more than 2^16
  entries and ``k <= n / 4``: drawing n k Gaussians costs as much as the products
  themselves on a CPU, and both are sub-Gaussian test matrices with the same guarantees
  (Tropp et al., 2017). Such a tall one is orthonormalised by Cholesky QR: ``n^{-1/2}``
  times random signs is within about ``2 sqrt(k / n)`` of orthonormal already.
  """
  if n * k <= 2**16 or 4 * k > n:
    return jnp.linalg.qr(jax.random.normal(key, (n, k), dtype))[0]
  words = jax.random.bits(key, (-(-n * k // 32),), jnp.uint32)
  bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
  omega = (2.0 * bits.ravel()[: n * k].astype(dtype) - 1.0).reshape(n, k)
  factor = jnp.linalg.cholesky(omega.T @ omega)
  return jax.scipy.linalg.solve_triangular(factor, omega.T, lower=True).T


def _range(y: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A thin SVD ``y = P diag(s) Z^T`` of a tall (n, k) y from k x k eigenproblems.

  Two passes of ``P = y Z diag(1/s)`` from the Gram matrix ``y^T y`` (the second restores
  the orthogonality the first loses to round-off) cost a few (n, k) products where
  LAPACK's SVD of the tall matrix takes 20 times longer. Directions with
  ``s < sqrt(eps) max(s)`` are dropped: their columns of P and their s are 0.
  """
  eps = jnp.finfo(y.dtype).eps
  squares, z = jnp.linalg.eigh(y.T @ y)
  s = jnp.sqrt(jnp.maximum(squares, 0.0))
  kept = s > 10.0 * jnp.sqrt(eps) * s[-1]
  p = y @ (z * jnp.where(kept, 1.0 / jnp.where(kept, s, 1.0), 0.0))
  overlaps, v = jnp.linalg.eigh(p.T @ p)  # about 1 on kept directions, 0 on dropped ones
  kept = overlaps > 0.5
  p = p @ (v * jnp.where(kept, 1.0 / jnp.sqrt(jnp.where(kept, overlaps, 1.0)), 0.0))
  u, s, zt = jnp.linalg.svd(p.T @ y)
  kept = s > 10.0 * jnp.sqrt(eps) * s[0]
  return jnp.where(kept[None, :], p @ u, 0.0), jnp.where(kept, s, 0.0), zt


def sketch(
  matvec: Matvec, like: PyTree, rank: int, key: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(U, g, ritz)`` of the Nystrom approximation of ``matvec`` from ``min(rank, n)`` products."""
  flat, unravel = ravel_pytree(like)
  n, dtype = flat.shape[0], flat.dtype
  k = min(rank, n)
  omega = _test_matrix(key, n, k, dtype)
  product = lambda column: ravel_pytree(matvec(unravel(column)))[0].astype(dtype)
  y = jax.lax.map(product, omega.T).T
  core = omega.T @ y
  core = 0.5 * (core + core.T)
  p, s, zt = _range(y)
  kept = s > 0
  inverse_s = jnp.where(kept, 1.0 / jnp.where(kept, s, 1.0), 0.0)
  g_matrix = inverse_s[:, None] * (zt @ core @ zt.T) * inverse_s[None, :]
  # A dropped direction (A p = 0 there) is no eigenvector of A_nys but part of the tail:
  # a sentinel below every other eigenvalue of G keeps it apart, and its column is zeroed.
  sentinel = -1.0 - 2.0 * k * jnp.max(jnp.abs(g_matrix))
  g_matrix = 0.5 * (g_matrix + g_matrix.T) + jnp.diag(jnp.where(kept, 0.0, sentinel))
  g, v = jnp.linalg.eigh(g_matrix)
  dropped = g < 0.5 * sentinel
  basis = jnp.where(dropped[None, :], 0.0, p @ v)
  g = jnp.where(dropped, 0.0, g)
  ritz = jnp.linalg.eigvalsh(core)[jnp.array([0, -1])]
  return basis, g, ritz


def _empty_state(like: PyTree, rank: int, refresh_every: int) -> NystromState:
  flat, _ = ravel_pytree(like)
  k = min(rank, flat.shape[0])
  zeros = jnp.zeros((), jnp.int32)
  return NystromState(
    jnp.zeros((flat.shape[0], k), flat.dtype),
    jnp.zeros(k, flat.dtype),
    jnp.zeros(2, flat.dtype),
    zeros + refresh_every,
    zeros,
  )


def _refreshed(
  matvec: Matvec,
  like: PyTree,
  state: NystromState | None,
  *,
  rank: int,
  refresh_every: int,
  seed: int,
) -> NystromState:
  """`state` aged by one solve, or a new sketch (kept for `refresh_every` solves) when due."""
  old = _empty_state(like, rank, refresh_every) if state is None else state

  def new() -> NystromState:
    key = jax.random.fold_in(jax.random.PRNGKey(seed), old.count)
    basis, g, ritz = sketch(matvec, like, rank, key)
    return NystromState(basis, g, ritz, jnp.zeros_like(old.age), old.count + 1)

  current = jax.lax.cond(
    old.age >= refresh_every,
    lambda: parallel.vary_carry(new(), like),
    lambda: parallel.vary_carry(old, like),
  )
  return current._replace(age=current.age + 1)


def _check(call: str, rank: object, refresh_every: object, seed: object) -> None:
  _base.check_int(call, "rank", rank, minimum=1)
  _base.check_int(call, "refresh_every", refresh_every, minimum=1)
  _base.check_int(call, "seed", seed, minimum=0)


@_base.solver_pytree()
class Nystrom(_base.LinearSolver):
  r"""Nystrom approximation of ``(A + rho I)^{-1}`` with the Woodbury identity, no iteration.

  With the rank-k Nystrom approximation ``A_nys = U diag(1/g) U^T`` of A (module
  docstring) and the damping ``rho`` (the `ridge`),

  .. math::
    (A_{nys} + \rho I)^{-1} b = U \operatorname{diag}\Big(\frac{g}{1 + \rho g}\Big) U^T b
      + \frac{1}{\rho} (I - U U^T) b,

  which is Hataya & Yamada's Woodbury form
  ``rho^{-1} [I - Y (rho W + Y^T Y)^{-1} Y^T]`` (eq. 7) computed without inverting
  ``rho W + Y^T Y``, whose condition number is the square of A's. Exact for
  ``rank >= n``. The damping is what keeps it stable on an indefinite A: every Nystrom
  eigenvalue ``1/g`` is shifted by ``rho`` before it is inverted, so only one within
  round-off of ``-rho`` can blow up, and the unsketched directions get ``1/rho``
  instead of ``1 / lambda``. ``rho = 0`` (the default ridge) gives the pseudo-inverse of
  ``A_nys``: exact at full rank, but blind to the unsketched directions below it.

  Costs k products for the sketch, reused by the next `refresh_every` solves (kept in
  the solver state), plus one for the reported residual of ``(A + rho I) x = b``.

  Args:
    rank: k, the products of the sketch (at most n are used).
    refresh_every: solves that share one sketch when the state is carried; 1 (the
      default) sketches at every solve and keeps no state.
    seed: seed of the random test matrices.
    ridge: ``rho``: solve ``(A + rho I) x = b``; A is sketched without it.

  Example:
    >>> import jax.numpy as jnp
    >>> a = jnp.diag(jnp.array([4.0, 2.0, -1.0]))
    >>> x, info, _ = Nystrom(rank=3, ridge=2.0).solve(lambda v: a @ v, jnp.ones(3))
    >>> x.round(5).tolist(), bool(info.negative_curvature)
    ([0.16667, 0.25, 1.0], False)

  References:
    Hataya & Yamada, "Nystrom Method for Accurate and Scalable Implicit
    Differentiation", AISTATS 2023. https://arxiv.org/abs/2302.09726
    Tropp, Yurtsever, Udell & Cevher, "Fixed-Rank Approximation of a Positive-
    Semidefinite Matrix from Streaming Data", NeurIPS 2017.
  """

  rank: int = 10
  refresh_every: int = 1
  seed: int = 0
  requires_symmetric = True

  def __post_init__(self) -> None:
    super().__post_init__()
    _check("Nystrom", self.rank, self.refresh_every, self.seed)

  def init(self, like: PyTree) -> NystromState | None:
    return None if self.refresh_every == 1 else _empty_state(like, self.rank, self.refresh_every)

  def compute(
    self, matvec: Matvec, b: PyTree, state: NystromState | None
  ) -> tuple[PyTree, SolveInfo, NystromState | None]:
    rho = jnp.asarray(self.ridge)
    flat_b, unravel = ravel_pytree(b)
    sketched = lambda v: jax.tree.map(lambda av, x: av - rho * x, matvec(v), v)  # A without rho
    new = _refreshed(
      sketched, b, state, rank=self.rank, refresh_every=self.refresh_every, seed=self.seed
    )
    g = new.inverse_eigenvalues
    tail = jnp.where(rho > 0, 1.0 / jnp.where(rho > 0, rho, 1.0), 0.0)
    coefficients = new.basis.T @ flat_b
    flat_x = new.basis @ (g / (1.0 + rho * g) * coefficients) + tail * (
      flat_b - new.basis @ coefficients
    )
    x = unravel(flat_x)
    theta_min, theta_max = new.ritz[0] + rho, new.ritz[1] + rho
    negative = theta_min < -jnp.sqrt(jnp.finfo(flat_b.dtype).eps) * jnp.abs(theta_max)
    info = _base.make_info(
      x, _base.residual(matvec, x, b), b, g.shape[0], negative_curvature=negative
    )
    return x, info, (None if self.refresh_every == 1 else new)


@_base.solver_pytree(data=())
class NystromPreconditioner:
  r"""Randomized Nystrom preconditioner for `ih.CG`, kept in CG's state and reused.

  From the rank-k Nystrom approximation ``A_nys = U diag(lambda_hat) U^T`` of the
  operator CG solves (ridge included; module docstring),

  .. math::
    P^{-1} = \hat\lambda_k U \operatorname{diag}(\hat\lambda)^{-1} U^T + (I - U U^T),

  which maps the k captured eigenvalues to about ``lambda_hat_k``, the smallest of
  them, and leaves the rest alone: preconditioned CG then converges at the rate of the
  condition number ``lambda_{k+1} / lambda_min`` instead of ``lambda_1 / lambda_min``
  (Frangella, Tropp & Udell, Theorem 5.1 with mu = 0). The sketch costs k products and
  is reused by the next `refresh_every` solves: as the Hessian changes slowly between
  the hyper steps of `ih.bilevel`, a stale sketch still preconditions well, and CG stays
  exact whatever P is.

  Args:
    rank: k, the products of each sketch (at most n are used).
    refresh_every: solves that share one sketch.
    seed: seed of the random test matrices.

  Example:
    >>> import jax.numpy as jnp
    >>> import implicit_hyper as ih
    >>> a = jnp.diag(jnp.array([1000.0, 500.0, 250.0, 1.0, 1.0, 1.0, 1.0, 1.0]))
    >>> exact = 1.0 / jnp.diag(a)
    >>> for preconditioner in (None, NystromPreconditioner(rank=5)):
    ...   cg = ih.CG(steps=2, tol=0.0, preconditioner=preconditioner)
    ...   x, _, state = cg.solve(lambda v: a @ v, jnp.ones(8))
    ...   print(float(jnp.linalg.norm(x - exact) / jnp.linalg.norm(exact)) < 0.01)
    False
    True
    >>> int(state.preconditioner.age), int(state.preconditioner.count)  # one sketch, one use
    (1, 1)

  References:
    Frangella, Tropp & Udell, "Randomized Nystrom Preconditioning", SIAM J. Matrix
    Anal. Appl., 2023. https://arxiv.org/abs/2110.02820
  """

  rank: int = 20
  refresh_every: int = 10
  seed: int = 0

  def __post_init__(self) -> None:
    _check("NystromPreconditioner", self.rank, self.refresh_every, self.seed)

  def init(self, like: PyTree) -> NystromState:
    """The state before any solve: an empty sketch, due at the first."""
    return _empty_state(like, self.rank, self.refresh_every)

  def update(self, matvec: Matvec, like: PyTree, state: NystromState | None) -> NystromState:
    """The state for the next solve: sketched anew when due, else aged by one (no products)."""
    return _refreshed(
      matvec, like, state, rank=self.rank, refresh_every=self.refresh_every, seed=self.seed
    )

  def apply(self, state: NystromState, v: PyTree) -> PyTree:
    """``P^{-1} v``."""
    flat, unravel = ravel_pytree(v)
    g = state.inverse_eigenvalues
    captured = g > 0
    largest = jnp.max(jnp.where(captured, g, 0.0))  # 1 / lambda_hat_k
    scale = jnp.where(captured, g / jnp.where(captured, largest, 1.0), 1.0)
    return unravel(flat + state.basis @ ((scale - 1.0) * (state.basis.T @ flat)))
