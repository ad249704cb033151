"""MINRES: a Krylov solver for symmetric indefinite operators."""

from typing import Any

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from implicit_hyper._src import parallel
from implicit_hyper._src.solvers import _base
from implicit_hyper._src.solvers import _vectors
from implicit_hyper._src.solvers._base import Matvec
from implicit_hyper._src.solvers._base import PyTree
from implicit_hyper._src.solvers._base import SolveInfo


@_base.solver_pytree()
class MINRES(_base.KrylovSolver):
  r"""Minimum residual method (Paige & Saunders, 1975) for symmetric A, definite or not.

  After k steps (k products), ``x_k`` minimises ``||b - A x||`` over the Krylov space
  ``span{b, A b, ..., A^{k-1} b}``: the residual never grows, and the solve is exact
  after n steps on an n-dimensional A in exact arithmetic, whatever the signs of A's
  eigenvalues. The Lanczos recurrence gives the tridiagonal ``T_k = V_k^T A V_k``; a
  QR factorisation of it by Givens rotations, updated by one rotation a step, gives
  ``x_k`` with five vectors of memory, and its residual norm :math:`|\bar\phi_k|` for the
  stopping test. The reported residual is the true ``b - A x`` (one more product at the
  end): a recursively updated residual vector drifts from it once the direction vectors
  grow, as they do on an ill-conditioned indefinite A. This is the solver for a network
  away from its minimum, where `ih.CG` stops at the first negative curvature and
  `ih.Neumann` diverges; for a positive-definite A its residual after k steps is at
  most CG's.

  The pivots ``d_j`` of ``T_k = L D L^T`` (those of CG) are tracked too: a
  non-positive one proves that A is not positive definite, reported as
  `SolveInfo.negative_curvature` while the solve goes on.

  Args:
    steps: the most iterations to run (one product each, and one for the residual).
    tol: stop once ``||A x - b|| <= tol ||b||`` (None: `default_tol` of the dtype,
      1e-10 in float64); a solve that stops at `steps` above it is not converged.
    ridge: solve ``(A + ridge I) x = b`` instead.

  Example:
    >>> import jax.numpy as jnp
    >>> a = jnp.array([2.0, -1.0, 0.5])
    >>> x, info, _ = MINRES(steps=3).solve(lambda v: a * v, jnp.ones(3))
    >>> x.round(6).tolist(), bool(info.negative_curvature), bool(info.diverged)
    ([0.5, -1.0, 2.0], True, False)

  References:
    Paige & Saunders, "Solution of Sparse Indefinite Systems of Linear Equations",
    SIAM J. Numer. Anal., 1975.
  """

  requires_symmetric = True

  def compute(self, matvec: Matvec, b: PyTree, state: None) -> tuple[PyTree, SolveInfo, None]:
    del state
    tol = self.stop_tol(_base.tree_dtype(b))
    dtype = _base.tree_dtype(b)
    scalar = lambda value: jnp.asarray(value, dtype)
    beta_1 = _vectors.norm(b).astype(dtype)
    threshold = tol * beta_1
    v = _vectors.scaled(1.0 / jnp.where(beta_1 > 0, beta_1, 1.0), b)
    zeros = otu.tree_zeros_like(b)
    start = {
      "x": zeros,
      "v": v,
      "v_prev": zeros,
      "w": zeros,
      "w_prev": zeros,
      "beta": scalar(0.0),  # couples v to v_prev
      "c": scalar(-1.0),
      "s": scalar(0.0),
      "delta_bar": scalar(0.0),
      "epsilon": scalar(0.0),
      "phi_bar": beta_1,
      "pivot": scalar(1.0),
      "k": jnp.zeros((), jnp.int32),
      "negative": jnp.array(False),
      "broke": jnp.array(False),
    }

    def keep_going(it: dict[str, Any]) -> jax.Array:
      return (it["k"] < self.steps) & (jnp.abs(it["phi_bar"]) > threshold) & ~it["broke"]

    def iteration(it: dict[str, Any]) -> dict[str, Any]:
      # Lanczos: beta_next v_next = A v - alpha v - beta v_prev.
      u = _vectors.add_scaled(matvec(it["v"]), -it["beta"], it["v_prev"])
      alpha = otu.tree_vdot(it["v"], u).astype(dtype)
      u = _vectors.add_scaled(u, -alpha, it["v"])
      beta_next = _vectors.norm(u).astype(dtype)
      v_next = _vectors.scaled(1.0 / jnp.where(beta_next > 0, beta_next, 1.0), u)
      # CG's pivot: T_k is positive definite iff every pivot is positive.
      previous = jnp.where(it["k"] == 0, 1.0, it["pivot"])
      pivot = alpha - jnp.where(it["k"] == 0, 0.0, it["beta"] ** 2 / _nonzero(previous))
      # Apply the previous rotation to the new column of T, then rotate its subdiagonal away.
      delta = it["c"] * it["delta_bar"] + it["s"] * alpha
      gamma_bar = it["s"] * it["delta_bar"] - it["c"] * alpha
      epsilon_next = it["s"] * beta_next
      delta_bar = -it["c"] * beta_next
      gamma = jnp.hypot(gamma_bar, beta_next)
      broke = gamma == 0  # T_k singular: b is not in the range of A on this space
      c, s = gamma_bar / _nonzero(gamma), beta_next / _nonzero(gamma)
      phi, phi_bar = c * it["phi_bar"], s * it["phi_bar"]
      w = _vectors.add_scaled(
        _vectors.add_scaled(it["v"], -it["epsilon"], it["w_prev"]), -delta, it["w"]
      )
      w = _vectors.scaled(1.0 / _nonzero(gamma), w)
      return {
        "x": _vectors.add_scaled(it["x"], phi, w),
        "v": v_next,
        "v_prev": it["v"],
        "w": w,
        "w_prev": it["w"],
        "beta": beta_next,
        "c": c,
        "s": s,
        "delta_bar": delta_bar,
        "epsilon": epsilon_next,
        "phi_bar": phi_bar,
        "pivot": pivot,
        "k": it["k"] + 1,
        "negative": it["negative"] | ~(pivot > 0),
        "broke": broke,
      }

    it = jax.lax.while_loop(keep_going, iteration, parallel.vary_carry(start, b))
    info = _base.make_info(
      it["x"],
      _base.residual(matvec, it["x"], b),
      b,
      it["k"],
      it["broke"],
      tol=tol,
      negative_curvature=it["negative"],
    )
    return it["x"], info, None


def _nonzero(value: jax.Array) -> jax.Array:
  return jnp.where(value == 0, 1.0, value)
