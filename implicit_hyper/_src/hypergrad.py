"""The hypergradient at a given (approximate) inner solution."""

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from implicit_hyper._src import differentiable
from implicit_hyper._src import operators
from implicit_hyper._src import parallel
from implicit_hyper._src import trust
from implicit_hyper._src import validation
from implicit_hyper._src.solvers import _base
from implicit_hyper._src.solvers import resolve
from implicit_hyper._src.solvers._base import PyTree
from implicit_hyper._src.solvers._base import SolveInfo
from implicit_hyper._src.solvers._base import Solver
from implicit_hyper._src.solvers._base import SolverLike
from implicit_hyper._src.solvers.neumann import Neumann


def hypergrad(
  inner_loss: Callable[..., Any],
  outer_loss: Callable[..., Any],
  params: PyTree,
  hparams: PyTree,
  *,
  inner_args: Sequence[Any] = (),
  outer_args: Sequence[Any] = (),
  solver: "SolverLike | None" = None,
  loss_has_aux: bool = False,
  on_failure: str = "warn",
  stationarity_tol: float | None = None,
) -> PyTree:
  r"""The hypergradient of ``outer_loss`` at an approximate inner optimum ``params``.

  By the implicit function theorem (Lorraine et al. 2020, eq. 2),

  .. math::
    \frac{d L_V}{d \lambda} = \frac{\partial L_V}{\partial \lambda}
      - \frac{\partial^2 L_T}{\partial \lambda \partial \theta}^T
        H^{-1} \frac{\partial L_V}{\partial \theta},
    \qquad H = \frac{\partial^2 L_T}{\partial \theta^2},

  evaluated at ``params``, with ``H^{-1} v`` approximated by `solver` (the paper's
  Algorithm 2 with a Neumann series). This is the online setting of the paper's
  Algorithm 1: ``params`` is the current iterate of training, not an exact optimum.
  Compose it with `jax.jit` and `jax.vmap` as usual.

  Args:
    inner_loss: ``inner_loss(params, hparams, *inner_args)`` -> scalar (training).
    outer_loss: ``outer_loss(params, hparams, *outer_args)`` -> scalar (validation).
    params: the inner parameters at which to evaluate (a pytree). Leaves that are not
      floating point (a PRNG key, a step counter) are constants.
    hparams: the hyperparameters (a pytree of floating-point arrays).
    inner_args: extra positional arguments of `inner_loss` (e.g. a training batch).
    outer_args: extra positional arguments of `outer_loss` (a validation batch).
    solver: a linear solver, or a function ``solve(matvec, b) -> x``; `ih.Neumann()`
      when None.
    loss_has_aux: both losses return ``(loss, aux)``; `aux` is discarded.
    on_failure: "warn", "raise" or "ignore" when the solve diverges or the
      hypergradient is not finite (see `implicit_argmin`; the point is the current
      iterate of training by design, so neither its stationarity nor its curvature is
      checked unless asked: `SolveInfo` reports both);
      `hypergrad_with_info` returns the `SolveInfo` instead.
    stationarity_tol: also flag ``params`` whose relative stationarity (see
      `hypergrad_with_info`) exceeds this, as the decorators do; None (the default)
      reports it without flagging, since an iterate of training is not stationary by
      design. Set it when ``params`` is meant to be the inner solution: swapped losses,
      ``hypergrad(outer, inner, ...)``, then show up as a stationarity of order one.

  Returns:
    The hypergradient, shaped like ``hparams``.

  Example:
    >>> import jax.numpy as jnp
    >>> import implicit_hyper as ih
    >>> inner = lambda w, lam: 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * lam * jnp.sum(w ** 2)
    >>> outer = lambda w, lam: 0.5 * jnp.sum(w ** 2)
    >>> lam = jnp.array(1.0)
    >>> w_star = jnp.full(3, 1.0 / (1.0 + lam))    # argmin of inner
    >>> g = ih.hypergrad(inner, outer, w_star, lam, solver=ih.Direct())
    >>> round(float(g), 6)  # d/dlam of 1.5 / (1 + lam)^2 = -3 / (1 + lam)^3
    -0.375
  """
  checks = trust.Checks(
    on_failure, stationarity_tol=stationarity_tol, curvature=False, unconverged=False
  )
  report = trust.reporter("hypergrad", checks.validate("hypergrad"))
  grads, info, _ = hypergrad_with_info(
    inner_loss,
    outer_loss,
    params,
    hparams,
    inner_args=inner_args,
    outer_args=outer_args,
    solver=solver,
    loss_has_aux=loss_has_aux,
  )
  report(info)
  return grads


def hypergrad_with_info(
  inner_loss: Callable[..., Any],
  outer_loss: Callable[..., Any],
  params: PyTree,
  hparams: PyTree,
  *,
  inner_args: Sequence[Any] = (),
  outer_args: Sequence[Any] = (),
  solver: "SolverLike | None" = None,
  solver_state: Any = None,
  loss_has_aux: bool = False,
) -> tuple[PyTree, SolveInfo, Any]:
  r"""`hypergrad` that also returns the solve's `SolveInfo` and the solver's new state.

  The adjoint system ``H u = dL_V/d params`` is solved with `solver` from
  `solver_state` (None: a fresh state; pass the returned one back to reuse what the
  solver keeps, such as `ih.CG`'s warm start or `ih.Neumann`'s cached step), then
  one mixed product gives the hypergradient: the two steps that JAX performs when it
  transposes the rule of `implicit_argmin`, written out so that the diagnostics and the
  state come back as values (e.g. for `ih.bilevel`'s divergence guard).

  `info.stationarity` is :math:`\|\nabla_\theta L_T(\theta)\| / \|\nabla_\theta
  L_T(0)\|` at ``params``: 0 at the inner solution, 1 at zero weights, and for a
  quadratic the relative residual of the normal equations, as the decorators report
  it (they measure from ``init_params`` instead of zero). It costs one gradient more
  than the solve. A value of order one at what should be the inner solution means it
  is not: most often the two losses or ``(params, hparams)`` are in the wrong order.

  Returns:
    ``(hypergradient, info, solver_state)``; `info.diverged` also flags a non-finite
    hypergradient.
  """
  call = "hypergrad"
  linear_solver: Solver = resolve.as_solver(call, solver, Neumann(), symmetric=True)
  validation.check_float_tree(call, "hparams", hparams)
  validation.check_real_tree(call, "params", params)
  validation.check_args_tuple(call, "inner_args", inner_args)
  validation.check_args_tuple(call, "outer_args", outer_args)
  inner_value = validation.loss_value(call, "inner_loss", inner_loss, loss_has_aux)
  outer_value = validation.loss_value(call, "outer_loss", outer_loss, loss_has_aux)
  validation.check_scalar_loss(call, "inner_loss", inner_value, params, hparams, *inner_args)
  validation.check_scalar_loss(call, "outer_loss", outer_value, params, hparams, *outer_args)
  parallel.check_collectives(f"`{call}(inner_loss=...)`", inner_value, params, hparams, *inner_args)
  parallel.check_collectives(f"`{call}(outer_loss=...)`", outer_value, params, hparams, *outer_args)
  # Leaves of params that are not floating point (a PRNG key) are constants.
  floating, constant = differentiable.partition(params)
  inner = lambda f, h, *a: inner_value(differentiable.combine(f, constant), h, *a)
  outer = lambda f, h, *a: outer_value(differentiable.combine(f, constant), h, *a)

  grad_params, grad_hparams = jax.grad(outer, argnums=(0, 1))(floating, hparams, *outer_args)
  matvec = operators.hessian_vector_product(inner, floating, hparams, inner_args)
  u, info, solver_state = linear_solver.solve(matvec, grad_params, solver_state)
  indirect = operators.hparams_vjp(jax.grad(inner), floating, hparams, inner_args)(u)
  grads = otu.tree_sub(grad_hparams, indirect)
  stationarity = _stationarity(jax.grad(inner), floating, hparams, inner_args)
  info = info._replace(
    diverged=info.diverged | ~_base.tree_all_finite(grads),
    stationarity=stationarity.astype(info.residual_norm.dtype),
  )
  return grads, info, solver_state


def _stationarity(
  grad_fn: Callable[..., PyTree], params: PyTree, hparams: PyTree, args: Sequence[Any]
) -> jax.Array:
  """``||F(theta)|| / ||F(0)||``, ``F = grad_params L_T``: one gradient more than the solve.

  ``F(theta)`` is the primal of the mixed product (XLA computes it once). For a
  quadratic it is the relative residual of the normal equations, as the decorators'
  measure; 1 at ``theta = 0``.
  """
  at = lambda p: otu.tree_norm(grad_fn(p, hparams, *args))
  scale = at(otu.tree_zeros_like(params))
  return at(params) / jnp.where(scale > 0, scale, 1.0)
