"""SAMA (Choe et al., NeurIPS 2023): a first-order hypergradient for any optax inner optimiser."""

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from implicit_hyper._src import transforms
from implicit_hyper._src.methods import _common
from implicit_hyper._src.methods import _static
from implicit_hyper._src.methods._common import Bilevel
from implicit_hyper._src.methods._common import BilevelMetrics
from implicit_hyper._src.methods._common import BilevelState
from implicit_hyper._src.methods.f2sa import _counters
from implicit_hyper._src.solvers import _base
from implicit_hyper._src.solvers._base import PyTree


@_static.carries_static
def sama(
  inner_loss: Callable[..., Any],
  outer_loss: Callable[..., Any],
  inner_optimizer: optax.GradientTransformation,
  outer_optimizer: optax.GradientTransformation,
  *,
  inner_steps: int = 1,
  radius: float = 1e-2,
  hparam_transform: Any = None,
) -> Bilevel:
  r"""Algorithm 1 with SAMA's hypergradient: no Hessian, three gradients per hyper step.

  SAMA replaces :math:`H^{-1}` in the implicit hypergradient by the Jacobian of the inner
  optimiser's last update :math:`u(g)` with respect to the gradient g (the base Jacobian
  taken as the identity, the "algorithmic adaptation" to the optimiser: :math:`\rho I`
  for ``optax.sgd(rho)``, Adam's diagonal for ``optax.adam``), and the mixed product by
  a central difference of two training gradients:

  .. math::
    v = -\Bigl(\frac{\partial u}{\partial g}\Bigr)^T \nabla_\theta L_V, \quad
    \frac{d L_V}{d \lambda} \approx \nabla_\lambda L_V
      - \frac{\nabla_\lambda L_T(\theta + \epsilon v) - \nabla_\lambda L_T(\theta - \epsilon v)}
        {2 \epsilon}, \quad \epsilon = r / \|v\|.

  Cost per hyper step: `inner_steps` optimiser steps, then one validation gradient (in
  both variables), two training gradients in the hyperparameters, and one
  vector-Jacobian product through the optimiser's update (element-wise for SGD, Adam and
  their kin: the cost of an optimiser step). It equals the implicit hypergradient when
  :math:`-\partial u / \partial g = H^{-1}` (SGD with step 1/c on a training loss of
  Hessian c I) and is biased otherwise: a direction where H is small gets weight
  :math:`\rho` instead of :math:`1/h`. The difference is exact (up to rounding) when L_T
  is quadratic in the weights, and otherwise off by :math:`O(r^2)`.

  Args:
    inner_loss: ``inner_loss(params, hparams, *args)`` -> scalar training loss.
    outer_loss: ``outer_loss(params, hparams, *args)`` -> scalar validation loss.
    inner_optimizer: any `optax.GradientTransformation` for the weights; its update's
      Jacobian is taken at the last step's gradient and state.
    outer_optimizer: any `optax.GradientTransformation` for the raw hyperparameters.
    inner_steps: optimiser steps per hyper step (the leading axis of `inner_args`); the
      hypergradient uses the last minibatch.
    radius: r, the length of the difference's displacement :math:`\epsilon v`.
    hparam_transform: as in `ih.bilevel`.

  Returns:
    A `Bilevel` (no state besides the weights, the optimisers' states and counters).

  References:
    Choe, Mehta, Ahn, Neiswanger, Xie, Strubell & Xing, "Making Scalable Meta Learning
    Practical", NeurIPS 2023. https://arxiv.org/abs/2310.05674
  """
  call = "sama"
  _common.check_optimizer(call, "inner_optimizer", inner_optimizer)
  _common.check_optimizer(call, "outer_optimizer", outer_optimizer)
  _base.check_int(call, "inner_steps", inner_steps, minimum=1)
  if not radius > 0:
    raise ValueError(f"`{call}(radius=...)` must be positive, got {radius!r}.")
  constrain = transforms.hparam_transformation(hparam_transform)

  def init(params: PyTree, hparams: PyTree) -> BilevelState:
    params, hparams = _common.strongly_typed(params), _common.strongly_typed(hparams)
    _common.check_hparams(call, hparams, constrain)
    inner_state, outer_state = inner_optimizer.init(params), outer_optimizer.init(hparams)
    return BilevelState(params, hparams, inner_state, outer_state, (), *_counters())

  def step(
    state: BilevelState, inner_args: Sequence[Any], outer_args: Sequence[Any]
  ) -> tuple[BilevelState, BilevelMetrics]:
    _common.check_args(call, inner_args, outer_args, inner_steps)
    raw = state.hparams
    hparams = constrain(raw)

    def optimizer_step(
      params: PyTree, opt_state: Any, args: tuple[Any, ...]
    ) -> tuple[jax.Array, PyTree, Callable[[PyTree], tuple[PyTree, Any]]]:
      value_fn = lambda p: inner_loss(p, hparams, *args)
      loss, grads = jax.value_and_grad(value_fn)(params)
      update = lambda g: _common.optimizer_update(
        inner_optimizer, g, opt_state, params, value=loss, value_fn=value_fn
      )
      return loss, grads, update

    def one_step(carry: tuple[PyTree, Any], args: tuple[Any, ...]) -> tuple[Any, jax.Array]:
      params, opt_state = carry
      loss, grads, update = optimizer_step(params, opt_state, args)
      updates, opt_state = update(grads)
      return (optax.apply_updates(params, updates), opt_state), loss

    head = jax.tree.map(lambda b: b[:-1], tuple(inner_args))
    last = jax.tree.map(lambda b: b[-1], tuple(inner_args))
    (params, opt_state), losses = jax.lax.scan(
      one_step, (state.params, state.inner_opt_state), head, length=inner_steps - 1
    )
    loss, grads, update = optimizer_step(params, opt_state, last)
    updates, update_vjp, opt_state = jax.vjp(update, grads, has_aux=True)
    params = optax.apply_updates(params, updates)

    outer_of_raw = lambda theta, raw: outer_loss(theta, constrain(raw), *outer_args)
    outer_value, (grad_theta, grad_raw) = jax.value_and_grad(outer_of_raw, argnums=(0, 1))(
      params, raw
    )
    (direction,) = update_vjp(grad_theta)
    direction = otu.tree_scale(-1.0, direction)
    length = otu.tree_norm(direction)
    eps = radius / jnp.where(length > 0, length, 1.0)
    inner_grad_raw = jax.grad(lambda raw, theta: inner_loss(theta, constrain(raw), *last))
    plus = inner_grad_raw(raw, otu.tree_add_scale(params, eps, direction))
    minus = inner_grad_raw(raw, otu.tree_add_scale(params, -eps, direction))
    mixed = otu.tree_scale(1.0 / (2.0 * eps), otu.tree_sub(plus, minus))
    result = _common.Update(
      params=params,
      inner_opt_state=opt_state,
      grads=otu.tree_sub(grad_raw, mixed),
      method_state=(),
      method_state_if_skipped=(),
      flagged=jnp.zeros((), bool),
      inner_loss=jnp.mean(jnp.append(losses, loss)),
      outer_loss=outer_value,
      outer_value_fn=lambda raw: outer_of_raw(params, raw),
      info=_common.no_solve(),
    )
    return _common.finish(state, outer_optimizer, result)

  config = _common.config(
    call,
    inner_optimizer=inner_optimizer,
    outer_optimizer=outer_optimizer,
    inner_steps=inner_steps,
    radius=radius,
    hparam_transform=repr(hparam_transform),
  )
  return Bilevel(init, step, constrain, config)
