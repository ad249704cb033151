"""FSLA (Li, Gu & Huang, AAAI 2022): SOBA's updates with a STORM momentum on the hypergradient."""

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from implicit_hyper._src import operators
from implicit_hyper._src import transforms
from implicit_hyper._src.methods import _common
from implicit_hyper._src.methods import _static
from implicit_hyper._src.methods._common import Bilevel
from implicit_hyper._src.methods._common import BilevelMetrics
from implicit_hyper._src.methods._common import BilevelState
from implicit_hyper._src.solvers._base import PyTree


class FSLAState(NamedTuple):
  """What FSLA carries besides the weights (`BilevelState.method_state` of its loop).

  Attributes:
    adjoint: u, the running estimate of ``H^{-1} grad_theta L_V``.
    direction: d, the momentum estimate of the hypergradient.
    previous_hparams: the raw hyperparameters of the previous iteration.
  """

  adjoint: PyTree
  direction: PyTree
  previous_hparams: PyTree


@_static.carries_static
def fsla(
  inner_loss: Callable[..., Any],
  outer_loss: Callable[..., Any],
  *,
  inner_lr: float | jax.Array | optax.Schedule,
  outer_lr: float | jax.Array | optax.Schedule,
  momentum: float | jax.Array = 0.5,
  adjoint_lr: float | jax.Array | optax.Schedule | None = None,
  hparam_transform: Any = None,
) -> Bilevel:
  r"""FSLA: fully single-loop, the hypergradient estimate corrected STORM-style.

  With :math:`w(\theta, u, \lambda) = \nabla_\lambda L_V - \nabla^2_{\lambda\theta} L_T\, u`
  on the step's batches,

  .. math::
    \theta' = \theta - \rho \nabla_\theta L_T, \quad
    u' = u - \rho (H(\theta') u - \nabla_\theta L_V(\theta')), \quad
    d \leftarrow w(\theta', u', \lambda) + (1 - \eta)\,(d - w(\theta, u, \lambda_{\rm prev})),
    \quad \lambda \leftarrow \lambda - \gamma d,

  the two w on the same batches (the recursive momentum of Cutkosky & Orabona's STORM);
  :math:`\eta = 1` is SOBA's update in turn. Benchopt's implementation draws a batch per
  oracle; here the step's one training and one validation batch serve all of them.

  Cost per iteration: one training gradient, one Hessian-vector product, two mixed
  products and two validation gradients.

  Args:
    inner_loss: ``inner_loss(params, hparams, *batch)`` -> scalar training loss.
    outer_loss: ``outer_loss(params, hparams, *batch)`` -> scalar validation loss.
    inner_lr: rho, the weights' step: a number or an `optax.Schedule` of the iteration
      count t = ``state.step`` (from 0).
    outer_lr: gamma, the hyperparameters' step (a number or a schedule of t).
    momentum: eta in (0, 1], the weight of the new estimate.
    adjoint_lr: the adjoint's step, a number or a schedule of t (rho when None).
    hparam_transform: as in `ih.bilevel`.

  Returns:
    A `Bilevel` whose `step` takes one batch's loss arguments (no leading axis).

  References:
    Li, Gu & Huang, "A Fully Single Loop Algorithm for Bilevel Optimization without
    Hessian Inverse", AAAI 2022. https://arxiv.org/abs/2112.04660
  """
  call = "fsla"
  _common.check_rates(call, inner_lr=inner_lr, outer_lr=outer_lr, adjoint_lr=adjoint_lr)
  if isinstance(momentum, int | float) and not 0 < momentum <= 1:
    raise ValueError(f"`{call}(momentum=...)` must be in (0, 1], got {momentum!r}.")
  adjoint_lr = inner_lr if adjoint_lr is None else adjoint_lr
  constrain = transforms.hparam_transformation(hparam_transform)
  inner_of_raw = lambda p, raw, *a: inner_loss(p, constrain(raw), *a)
  outer_of_raw = lambda p, raw, *a: outer_loss(p, constrain(raw), *a)

  def init(params: PyTree, hparams: PyTree) -> BilevelState:
    params, hparams = _common.strongly_typed(params), _common.strongly_typed(hparams)
    _common.check_hparams(call, hparams, constrain)
    zeros = otu.tree_zeros_like(params), otu.tree_zeros_like(hparams)
    return _common.initial_state(params, hparams, FSLAState(*zeros, hparams))

  def estimate(params: PyTree, raw: PyTree, u: PyTree, inner: Any, outer: Any) -> PyTree:
    """w: the validation gradient in the raw hparams minus the mixed product with u."""
    direct = jax.grad(outer_of_raw, argnums=1)(params, raw, *outer)
    cross = operators.hparams_vjp(jax.grad(inner_of_raw), params, raw, inner)(u)
    return otu.tree_sub(direct, cross)

  def step(
    state: BilevelState, inner_args: Sequence[Any], outer_args: Sequence[Any]
  ) -> tuple[BilevelState, BilevelMetrics]:
    _common.check_args(call, inner_args, outer_args, None)
    memory: FSLAState = state.method_state
    raw, inner, outer = state.hparams, tuple(inner_args), tuple(outer_args)
    rho, gamma, omega = (_common.rate(lr, state.step) for lr in (inner_lr, outer_lr, adjoint_lr))
    inner_value, grad = jax.value_and_grad(inner_of_raw)(state.params, raw, *inner)
    updates, inner_opt_state = optax.sgd(rho).update(grad, state.inner_opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    hvp = operators.hessian_vector_product(inner_of_raw, params, raw, inner)(memory.adjoint)
    outer_value, grad_params = jax.value_and_grad(outer_of_raw)(params, raw, *outer)
    adjoint = otu.tree_add_scale(memory.adjoint, -omega, otu.tree_sub(hvp, grad_params))
    new = estimate(params, raw, adjoint, inner, outer)
    old = estimate(state.params, memory.previous_hparams, memory.adjoint, inner, outer)
    direction = otu.tree_add_scale(new, 1.0 - momentum, otu.tree_sub(memory.direction, old))
    update = _common.Update(
      params=params,
      inner_opt_state=inner_opt_state,
      grads=direction,
      method_state=FSLAState(adjoint, direction, raw),
      method_state_if_skipped=state.method_state,
      flagged=jnp.array(False),
      inner_loss=inner_value,
      outer_loss=outer_value,
      outer_value_fn=lambda r: outer_of_raw(params, r, *outer),
      info=_common.no_solve(),
    )
    return _common.finish(state, optax.sgd(gamma), update)

  config = _common.config(
    call,
    inner_lr=inner_lr,
    outer_lr=outer_lr,
    momentum=momentum,
    adjoint_lr=adjoint_lr,
    hparam_transform=repr(hparam_transform),
  )
  return Bilevel(init, step, constrain, config)
