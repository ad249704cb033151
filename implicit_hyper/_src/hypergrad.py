"""The hypergradient at a given (approximate) inner solution."""

import jax
import optax.tree_utils as otu

from implicit_hyper._src import operators
from implicit_hyper._src import validation
from implicit_hyper._src.solvers import _base
from implicit_hyper._src.solvers.neumann import Neumann


def hypergrad(
  outer_loss,
  inner_loss,
  params,
  hparams,
  *,
  inner_args=(),
  outer_args=(),
  solver=None,
  init=None,
  return_info=False,
):
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
    outer_loss: ``outer_loss(params, hparams, *outer_args)`` -> scalar (validation).
    inner_loss: ``inner_loss(params, hparams, *inner_args)`` -> scalar (training).
    params: the inner parameters at which to evaluate (a pytree).
    hparams: the hyperparameters (a pytree of floating-point arrays).
    inner_args: extra positional arguments of `inner_loss` (e.g. a training batch).
    outer_args: extra positional arguments of `outer_loss` (a validation batch).
    solver: a linear solver; `ih.Neumann()` when None.
    init: a starting point for the adjoint solve ``H u = dL_V/d params`` (a warm start
      for `ih.CG`, e.g. the previous hyper step's adjoint).
    return_info: also return the solve's `SolveInfo`.

  Returns:
    The hypergradient (shaped like ``hparams``); with ``return_info=True``,
    ``(hypergradient, info)`` where `info` is a `SolveInfo` whose `diverged` also
    flags a non-finite hypergradient.

  Example:
    >>> import jax.numpy as jnp
    >>> import implicit_hyper as ih
    >>> inner = lambda w, lam: 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * lam * jnp.sum(w ** 2)
    >>> outer = lambda w, lam: 0.5 * jnp.sum(w ** 2)
    >>> lam = jnp.array(1.0)
    >>> w_star = jnp.full(3, 1.0 / (1.0 + lam))    # argmin of inner
    >>> g = ih.hypergrad(outer, inner, w_star, lam, solver=ih.Direct())
    >>> round(float(g), 6)  # d/dlam of 1.5 / (1 + lam)^2 = -3 / (1 + lam)^3
    -0.375
  """
  grads, info, _ = hypergrad_and_adjoint(
    outer_loss,
    inner_loss,
    params,
    hparams,
    inner_args=inner_args,
    outer_args=outer_args,
    solver=solver,
    init=init,
  )
  return (grads, info) if return_info else grads


def hypergrad_and_adjoint(
  outer_loss, inner_loss, params, hparams, *, inner_args=(), outer_args=(), solver=None, init=None
):
  """`hypergrad` that also returns the adjoint ``u ~ H^{-1} dL_V/d params``.

  Returns ``(hypergradient, SolveInfo, u)``; pass `u` as `init` of the next call to
  warm-start an iterative solver.
  """
  call = "hypergrad"
  solver = Neumann() if solver is None else solver
  validation.check_solver(call, solver, symmetric=True)
  validation.check_float_tree(call, "hparams", hparams)
  validation.check_float_tree(call, "params", params)
  validation.check_scalar_loss(call, "inner_loss", inner_loss, params, hparams, *inner_args)
  validation.check_scalar_loss(call, "outer_loss", outer_loss, params, hparams, *outer_args)

  grad_params, grad_hparams = jax.grad(outer_loss, argnums=(0, 1))(params, hparams, *outer_args)
  matvec = operators.hessian_vector_product(inner_loss, params, hparams, inner_args)
  u, info = solver.solve(matvec, grad_params, init)
  indirect = operators.hparams_vjp(jax.grad(inner_loss), params, hparams, inner_args)(u)
  grads = otu.tree_sub(grad_hparams, indirect)
  return grads, info._replace(diverged=info.diverged | ~_base.tree_all_finite(grads)), u
