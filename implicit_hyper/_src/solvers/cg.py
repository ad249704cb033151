"""Conjugate gradient (iMAML's inverse-Hessian-vector product), optionally preconditioned."""

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from implicit_hyper._src import parallel
from implicit_hyper._src.solvers import _base
from implicit_hyper._src.solvers import _vectors
from implicit_hyper._src.solvers._base import Matvec
from implicit_hyper._src.solvers._base import PyTree
from implicit_hyper._src.solvers._base import SolveInfo

# A CG iterate: (x, r, p, r^T z, ||r||, k, broke).
_Carry = tuple[PyTree, PyTree, PyTree, jax.Array, jax.Array, jax.Array, jax.Array]


def conjugate_gradient(
  matvec: Matvec,
  b: PyTree,
  init: PyTree | None,
  *,
  steps: int,
  tol: float,
  precondition: Callable[[PyTree], PyTree] | None = None,
) -> tuple[PyTree, SolveInfo]:
  """Runs CG on ``A x = b`` for symmetric positive-definite A; returns ``(x, SolveInfo)``.

  Stops after `steps` iterations or when ``||r|| <= tol ||b||``. A direction with
  ``p^T A p <= 0`` (A is not positive definite there) marks the solve as diverged.
  `precondition` (``r -> P^{-1} r``, symmetric positive definite) gives preconditioned CG.
  """
  apply: Callable[[PyTree], PyTree] = (lambda r: r) if precondition is None else precondition
  dtype = _base.tree_dtype(b)
  x = otu.tree_zeros_like(b) if init is None else init
  r = otu.tree_sub(b, matvec(x)) if init is not None else b
  threshold = tol * _vectors.norm(b)
  z = _vectors.like_tree(apply(r), b)
  rz = otu.tree_vdot(r, z).astype(dtype)
  state = (x, r, z, rz, _vectors.norm(r).astype(dtype), jnp.asarray(0), jnp.asarray(False))

  def keep_going(state: _Carry) -> jax.Array:
    *_, r_norm, k, broke = state
    return (k < steps) & (r_norm > threshold) & ~broke

  def iteration(state: _Carry) -> _Carry:
    x, r, p, rz, _, k, _ = state
    ap = matvec(p)
    curvature = otu.tree_vdot(p, ap).astype(dtype)
    broke = ~(curvature > 0)
    step = jnp.where(broke, 0.0, rz / jnp.where(broke, 1.0, curvature))
    x = _vectors.add_scaled(x, step, p)
    r = _vectors.add_scaled(r, -step, ap)
    z = _vectors.like_tree(apply(r), b)
    rz_new = otu.tree_vdot(r, z).astype(dtype)
    p = _vectors.add_scaled(z, rz_new / jnp.where(rz > 0, rz, 1.0), p)
    return x, r, p, rz_new, _vectors.norm(r).astype(dtype), k + 1, broke

  x, r, *_, k, broke = jax.lax.while_loop(keep_going, iteration, parallel.vary_carry(state, b))
  return x, _base.make_info(x, r, b, k, extra_failure=broke, tol=tol, negative_curvature=broke)


class CGState(NamedTuple):
  """The state of `CG` with a preconditioner.

  Attributes:
    solution: the last solution, the next solve's start (None without `warm_start`).
    preconditioner: the preconditioner's own state (for `ih.NystromPreconditioner`,
      its sketch and age).
  """

  solution: Any
  preconditioner: Any


@_base.solver_pytree()
class CG(_base.KrylovSolver):
  """Conjugate gradient for symmetric positive-definite A (Hestenes & Stiefel, 1952).

  Exact after n steps for an n-dimensional A in exact arithmetic; each step costs one
  product ``A p``, and after k steps the A-norm error has shrunk by at least
  ``2 ((sqrt(kappa) - 1) / (sqrt(kappa) + 1))^k`` for condition number kappa. The
  reported residual is CG's recursively updated one. A non-positive curvature
  ``p^T A p`` (A indefinite, as for a network away from its optimum) stops the solve
  and reports it as diverged; `ih.MINRES` solves such systems.

  With a `preconditioner` (``ih.NystromPreconditioner(rank=k, refresh_every=n)``) CG
  runs on ``P^{-1} A`` and the rate depends on the condition number of that instead.
  The preconditioner's state is kept in CG's (a `CGState`) and renewed by the
  preconditioner itself, so `ih.bilevel` carries one sketch over n hyper steps.

  Args:
    steps: the most iterations to run.
    tol: stop once ``||A x - b|| <= tol ||b||`` (None: `default_tol` of the dtype,
      1e-10 in float64); a solve that stops at `steps` above it is not converged.
    warm_start: start from the previous solution kept in the state (without a
      preconditioner the state is that solution; a fresh state starts from zero).
    preconditioner: None, or an object with ``init(like) -> state``,
      ``update(matvec, like, state) -> state`` (called once per solve) and
      ``apply(state, r) -> P^{-1} r`` such as `ih.NystromPreconditioner`.
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

  warm_start: bool = True
  preconditioner: Any = None
  requires_symmetric = True

  def __post_init__(self) -> None:
    super().__post_init__()
    methods = ("init", "update", "apply")
    if self.preconditioner is not None and not all(
      callable(getattr(self.preconditioner, m, None)) for m in methods
    ):
      raise TypeError(
        "`CG(preconditioner=...)` must have `init`, `update` and `apply` methods, such as "
        f"`ih.NystromPreconditioner(rank=20)`, got {self.preconditioner!r}."
      )

  def init(self, like: PyTree) -> CGState | PyTree | None:
    solution = otu.tree_zeros_like(like) if self.warm_start else None
    if self.preconditioner is None:
      return solution
    return CGState(solution, self.preconditioner.init(like))

  def compute(
    self, matvec: Matvec, b: PyTree, state: CGState | PyTree | None
  ) -> tuple[PyTree, SolveInfo, CGState | PyTree | None]:
    tol = self.stop_tol(_base.tree_dtype(b))
    if self.preconditioner is None:
      x, info = conjugate_gradient(matvec, b, state, steps=self.steps, tol=tol)
      return x, info, (x if self.warm_start else None)
    start, preconditioner = (None, None) if state is None else state
    preconditioner = self.preconditioner.update(matvec, b, preconditioner)
    x, info = conjugate_gradient(
      matvec,
      b,
      start if self.warm_start else None,
      steps=self.steps,
      tol=tol,
      precondition=lambda r: self.preconditioner.apply(preconditioner, r),
    )
    return x, info, CGState(x if self.warm_start else None, preconditioner)
