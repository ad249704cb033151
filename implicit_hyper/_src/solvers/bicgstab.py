"""BiCGStab: a Krylov solver for non-symmetric operators."""

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from implicit_hyper._src import parallel
from implicit_hyper._src.solvers import _base
from implicit_hyper._src.solvers import _vectors
from implicit_hyper._src.solvers._base import Matvec
from implicit_hyper._src.solvers._base import PyTree
from implicit_hyper._src.solvers._base import SolveInfo

# A BiCGStab iterate: (x, r, p, v, rho, alpha, omega, k, broke).
_Carry = tuple[
  PyTree, PyTree, PyTree, PyTree, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array
]


def _ratio(num: jax.Array, den: jax.Array) -> jax.Array:
  """``num / den`` with a zero denominator giving 0 (reported as a breakdown)."""
  return jnp.where(den == 0, 0.0, num / jnp.where(den == 0, 1.0, den))


@_base.solver_pytree()
class BiCGStab(_base.KrylovSolver):
  """Biconjugate gradient stabilised (van der Vorst, 1992) for any invertible A.

  Needs only products ``A v`` (two per step), so it suits the non-symmetric Jacobians
  of `implicit_root` (fixed points, KKT systems). A zero inner product that stops the
  recurrence is reported as diverged unless the residual is already below `tol`.

  Args:
    steps: the most iterations to run.
    tol: stop once ``||A x - b|| <= tol ||b||`` (None: `default_tol` of the dtype,
      1e-10 in float64); a solve that stops at `steps` above it is not converged.
    ridge: solve ``(A + ridge I) x = b`` instead.

  Example:
    >>> import jax.numpy as jnp
    >>> a = jnp.array([[2.0, 1.0], [0.0, 1.0]])
    >>> x, _, _ = BiCGStab(steps=4).solve(lambda v: a @ v, jnp.array([3.0, 1.0]))
    >>> x.round(6).tolist()
    [1.0, 1.0]

  References:
    van der Vorst, "Bi-CGSTAB: A Fast and Smoothly Converging Variant of Bi-CG for the
    Solution of Nonsymmetric Linear Systems", SIAM J. Sci. Stat. Comput., 1992.
  """

  def compute(self, matvec: Matvec, b: PyTree, state: None) -> tuple[PyTree, SolveInfo, None]:
    del state
    tol = self.stop_tol(_base.tree_dtype(b))
    x, r = otu.tree_zeros_like(b), b
    shadow = r
    threshold = tol * otu.tree_norm(b)
    one = jnp.ones((), otu.tree_dtype(b, "highest"))
    zeros = otu.tree_zeros_like(b)
    start = (x, r, zeros, zeros, one, one, one, jnp.asarray(0), jnp.asarray(False))

    def keep_going(state: _Carry) -> jax.Array:
      r, k, broke = state[1], state[7], state[8]
      return (k < self.steps) & (otu.tree_norm(r) > threshold) & ~broke

    def iteration(state: _Carry) -> _Carry:
      x, r, p, v, rho, alpha, omega, k, _ = state
      rho_new = otu.tree_vdot(shadow, r)
      beta = _ratio(rho_new, rho) * _ratio(alpha, omega)
      p = otu.tree_add(r, _vectors.scaled(beta, _vectors.add_scaled(p, -omega, v)))
      v = matvec(p)
      shadow_v = otu.tree_vdot(shadow, v)
      alpha = _ratio(rho_new, shadow_v)
      s = _vectors.add_scaled(r, -alpha, v)
      t = matvec(s)
      tt = otu.tree_vdot(t, t)
      omega = _ratio(otu.tree_vdot(t, s), tt)
      x = _vectors.add_scaled(_vectors.add_scaled(x, alpha, p), omega, s)
      r = _vectors.add_scaled(s, -omega, t)
      converged = otu.tree_norm(r) <= threshold
      broke = ~converged & ((rho_new == 0) | (shadow_v == 0) | (tt == 0) | (omega == 0))
      rho_new, alpha, omega = (c.astype(one.dtype) for c in (rho_new, alpha, omega))
      return x, r, p, v, rho_new, alpha, omega, k + 1, broke

    final = jax.lax.while_loop(keep_going, iteration, parallel.vary_carry(start, b))
    x, k, broke = final[0], final[7], final[8]
    return x, _base.make_info(x, _base.residual(matvec, x, b), b, k, broke, tol=tol), None
