"""Conjugate gradient, as iMAML uses for the inverse-Hessian-vector product."""

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from implicit_hyper._src.solvers import _base


def check_iteration_settings(call: str, steps, tol) -> None:
  """Validates the `steps` and `tol` settings shared by the Krylov solvers."""
  _base.check_int(call, "steps", steps, minimum=0)
  _base.check_nonnegative(call, "tol", tol)


def conjugate_gradient(matvec, b, init, *, steps: int, tol: float):
  """Runs CG on ``A x = b`` for symmetric positive-definite A; returns ``(x, SolveInfo)``.

  Stops after `steps` iterations or when ``||r|| <= tol ||b||``. A direction with
  ``p^T A p <= 0`` (A is not positive definite there) marks the solve as diverged.
  """
  x = otu.tree_zeros_like(b) if init is None else init
  r = otu.tree_sub(b, matvec(x)) if init is not None else b
  threshold = tol * otu.tree_norm(b)
  rr = otu.tree_vdot(r, r)
  state = (x, r, r, rr, jnp.asarray(0), jnp.asarray(False))

  def keep_going(state):
    _, _, _, rr, k, broke = state
    return (k < steps) & (jnp.sqrt(rr) > threshold) & ~broke

  def iteration(state):
    x, r, p, rr, k, _ = state
    ap = matvec(p)
    curvature = otu.tree_vdot(p, ap)
    broke = ~(curvature > 0)
    step = jnp.where(broke, 0.0, rr / jnp.where(broke, 1.0, curvature))
    x = otu.tree_add_scale(x, step, p)
    r = otu.tree_add_scale(r, -step, ap)
    rr_new = otu.tree_vdot(r, r)
    p = otu.tree_add_scale(r, rr_new / jnp.where(rr > 0, rr, 1.0), p)
    return x, r, p, rr_new, k + 1, broke

  x, r, _, _, k, broke = jax.lax.while_loop(keep_going, iteration, state)
  return x, _base.make_info(x, r, b, k, extra_failure=broke, tol=tol, negative_curvature=broke)


@_base.solver_pytree()
class CG(_base.LinearSolver):
  """Conjugate gradient for symmetric positive-definite A (Hestenes & Stiefel, 1952).

  Exact after n steps for an n-dimensional A in exact arithmetic; each step costs one
  product ``A p``. The reported residual is CG's recursively updated one. A
  non-positive curvature ``p^T A p`` (A indefinite, as for a network away from its
  optimum) stops the solve and reports it as diverged.

  Args:
    steps: the most iterations to run.
    tol: stop once ``||A x - b|| <= tol ||b||``.
    warm_start: start from the previous solution kept in the state (the state is that
      solution; a fresh state starts from zero).
    ridge: solve ``(A + ridge I) x = b`` instead.

  Example:
    >>> import jax.numpy as jnp
    >>> x, info, _ = CG(steps=3).solve(lambda v: jnp.array([1.0, 2.0, 4.0]) * v, jnp.ones(3))
    >>> x.round(6).tolist(), int(info.num_steps)
    ([1.0, 0.5, 0.25], 3)

  References:
    Rajeswaran, Finn, Kakade & Levine, "Meta-Learning with Implicit Gradients",
    NeurIPS 2019. https://arxiv.org/abs/1909.04630
  """

  steps: int = 20
  tol: float = 1e-10
  warm_start: bool = True
  requires_symmetric = True

  def __post_init__(self):
    super().__post_init__()
    check_iteration_settings("CG", self.steps, self.tol)

  def init(self, like):
    return otu.tree_zeros_like(like) if self.warm_start else None

  def compute(self, matvec, b, state):
    x, info = conjugate_gradient(matvec, b, state, steps=self.steps, tol=self.tol)
    return x, info, (x if self.warm_start else None)
