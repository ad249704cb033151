"""Restarted GMRES: a Krylov solver for non-symmetric operators."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from implicit_hyper._src import parallel
from implicit_hyper._src.solvers import _base
from implicit_hyper._src.solvers._base import Matvec
from implicit_hyper._src.solvers._base import PyTree
from implicit_hyper._src.solvers._base import SolveInfo

# An Arnoldi step's carry: (j, basis, hessenberg, g, rotations, invariant).
_Arnoldi = tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]
# A cycle's carry: (x, r, k, invariant), flat.
_Cycle = tuple[jax.Array, jax.Array, jax.Array, jax.Array]


def _givens(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(c, s)`` with ``[[c, s], [-s, c]] @ [a, b] = [hypot(a, b), 0]``."""
  r = jnp.hypot(a, b)
  safe = jnp.where(r == 0, 1.0, r)
  return jnp.where(r == 0, 1.0, a / safe), jnp.where(r == 0, 0.0, b / safe)


def _cycle(
  matvec: Callable[[jax.Array], jax.Array],
  x: jax.Array,
  r: jax.Array,
  *,
  restart: int,
  budget: jax.Array,
  threshold: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One GMRES(m) cycle from ``x`` with residual ``r``: at most `budget` Arnoldi steps.

  Returns the new x, the number of steps and whether the Krylov space became invariant.
  """
  n, dtype = r.shape[0], r.dtype
  beta = jnp.linalg.norm(r)
  basis = jnp.zeros((restart + 1, n), dtype).at[0].set(r / jnp.where(beta > 0, beta, 1.0))
  hessenberg = jnp.zeros((restart + 1, restart), dtype)  # rotated to upper triangular
  g = jnp.zeros(restart + 1, dtype).at[0].set(beta)
  rotations = jnp.zeros((2, restart), dtype)
  eps = jnp.finfo(dtype).eps

  def keep_going(it: _Arnoldi) -> jax.Array:
    j, _, _, g, _, invariant = it
    return (j < jnp.minimum(budget, restart)) & (jnp.abs(g[j]) > threshold) & ~invariant

  def arnoldi(it: _Arnoldi) -> _Arnoldi:
    j, basis, hessenberg, g, rotations, _ = it
    w = matvec(basis[j])
    scale = jnp.linalg.norm(w)
    # Classical Gram-Schmidt, twice ("twice is enough": Giraud et al., 2005); rows > j are 0.
    h = basis @ w
    w = w - basis.T @ h
    correction = basis @ w
    w, h = w - basis.T @ correction, h + correction
    h_next = jnp.linalg.norm(w)
    invariant = h_next <= eps * scale  # A maps the basis into its own span
    basis = basis.at[j + 1].set(jnp.where(invariant, 0.0, w / jnp.where(invariant, 1.0, h_next)))
    column = h.at[j + 1].set(h_next)

    def rotate(i: jax.Array, column: jax.Array) -> jax.Array:
      c, s = rotations[0, i], rotations[1, i]
      a, b = column[i], column[i + 1]
      rotated = column.at[i].set(c * a + s * b).at[i + 1].set(-s * a + c * b)
      return jnp.where(i < j, rotated, column)

    column = jax.lax.fori_loop(0, restart, rotate, column)
    c, s = _givens(column[j], column[j + 1])
    column = column.at[j].set(c * column[j] + s * column[j + 1]).at[j + 1].set(0.0)
    g = g.at[j + 1].set(-s * g[j]).at[j].set(c * g[j])
    rotations = rotations.at[:, j].set(jnp.stack([c, s]))
    hessenberg = hessenberg.at[:, j].set(column)
    return j + 1, basis, hessenberg, g, rotations, invariant

  start = (jnp.zeros((), jnp.int32), basis, hessenberg, g, rotations, jnp.array(False))
  k, basis, hessenberg, g, _, invariant = jax.lax.while_loop(
    keep_going, arnoldi, parallel.vary_carry(start)
  )
  # Solve the k x k triangle R y = g; unused rows get a unit diagonal and a zero right side.
  used = jnp.arange(restart) < k
  triangle = jnp.where(used[:, None] & used[None, :], hessenberg[:restart], 0.0)
  triangle = triangle + jnp.diag(jnp.where(used, 0.0, 1.0))
  y = jax.scipy.linalg.solve_triangular(triangle, jnp.where(used, g[:restart], 0.0))
  return x + basis[:restart].T @ y, k, invariant


@_base.solver_pytree()
class GMRES(_base.KrylovSolver):
  r"""Restarted generalised minimal residual method (Saad & Schultz, 1986) for any invertible A.

  Each cycle builds an orthonormal basis of the Krylov space ``span{r, A r, ...,
  A^{m-1} r}`` by Arnoldi (``m = restart`` products) and takes the x minimising
  ``||b - A x||`` over it, by Givens rotations of the Hessenberg matrix; then it
  restarts from the true residual ``b - A x`` (one more product). Without a restart
  (``restart >= steps``) it is exact after n steps on an n-dimensional A, and its
  residual never grows; restarts bound the memory at ``restart + 1`` vectors. For the
  non-symmetric Jacobians of `ih.implicit_root`: one product a step where `ih.BiCGStab`
  needs two, and a monotone residual where BiCGStab's oscillates.

  Args:
    steps: the most Arnoldi steps in all (each one product).
    restart: Arnoldi steps per cycle (the basis kept in memory); each cycle ends with one
      extra product for the true residual.
    tol: stop once ``||A x - b|| <= tol ||b||`` (None: `default_tol` of the dtype,
      1e-10 in float64); a solve that stops at `steps` above it is not converged.
    ridge: solve ``(A + ridge I) x = b`` instead.

  Example:
    >>> import jax.numpy as jnp
    >>> a = jnp.array([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [1.0, 0.0, 1.0]])
    >>> x, info, _ = GMRES(steps=3).solve(lambda v: a @ v, a @ jnp.ones(3))
    >>> x.round(5).tolist(), int(info.num_steps)
    ([1.0, 1.0, 1.0], 3)

  References:
    Saad & Schultz, "GMRES: A Generalized Minimal Residual Algorithm for Solving
    Nonsymmetric Linear Systems", SIAM J. Sci. Stat. Comput., 1986.
  """

  restart: int = 20

  def __post_init__(self) -> None:
    super().__post_init__()
    _base.check_int("GMRES", "restart", self.restart, minimum=1)

  def compute(self, matvec: Matvec, b: PyTree, state: None) -> tuple[PyTree, SolveInfo, None]:
    del state
    tol = self.stop_tol(_base.tree_dtype(b))
    flat_b, unravel = ravel_pytree(b)
    flat_matvec = lambda v: ravel_pytree(matvec(unravel(v)))[0].astype(flat_b.dtype)
    threshold = tol * jnp.linalg.norm(flat_b)
    restart = min(self.restart, max(self.steps, 1))

    def keep_going(it: _Cycle) -> jax.Array:
      _, r, k, invariant = it
      return (k < self.steps) & (jnp.linalg.norm(r) > threshold) & ~invariant

    def cycle(it: _Cycle) -> _Cycle:
      x, r, k, _ = it
      x, taken, invariant = _cycle(
        flat_matvec, x, r, restart=restart, budget=self.steps - k, threshold=threshold
      )
      return x, flat_b - flat_matvec(x), k + taken, invariant

    start = (jnp.zeros_like(flat_b), flat_b, jnp.zeros((), jnp.int32), jnp.array(False))
    flat_x, r, k, _ = jax.lax.while_loop(keep_going, cycle, parallel.vary_carry(start))
    x = unravel(flat_x)
    return x, _base.make_info(x, unravel(r), b, k, tol=tol), None
