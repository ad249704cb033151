"""BOME (Liu, Ye, Wright, Stone & Liu, NeurIPS 2022): a value-function method, gradients only."""

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
def bome(
  inner_loss: Callable[..., Any],
  outer_loss: Callable[..., Any],
  *,
  inner_lr: float | jax.Array | optax.Schedule,
  outer_lr: float | jax.Array | optax.Schedule,
  weights_lr: float | jax.Array | optax.Schedule | None = None,
  inner_steps: int = 10,
  eta: float = 0.5,
  hparam_transform: Any = None,
) -> Bilevel:
  r"""BOME: one step on the weights and hyperparameters together, down a value-function constraint.

  The bilevel problem is read as :math:`\min L_V(\theta, \lambda)` subject to
  :math:`q(\theta, \lambda) = L_T(\theta, \lambda) - L_T(\theta_T, \lambda) \le 0`, with
  :math:`\theta_T` `inner_steps` SGD steps on L_T from :math:`\theta` (held constant
  when differentiating q). Each iteration moves both variables along

  .. math::
    (\theta, \lambda) \leftarrow (\theta, \lambda)
      - (\xi, \gamma) \odot (\nabla L_V + \mu \nabla q), \quad
    \mu = \max\Bigl(\frac{\eta \|\nabla q\|^2 - \langle \nabla L_V, \nabla q \rangle}
      {\|\nabla q\|^2}, 0\Bigr),

  the smallest multiplier that makes q decrease at the rate :math:`\eta \|\nabla q\|^2`
  (the paper's :math:`\phi = \eta \|\nabla q\|^2`). Gradients only: cost per iteration
  `inner_steps` gradients of L_T for :math:`\theta_T`, one of L_T and one of L_V in both
  variables, one of L_T in the hyperparameters at :math:`\theta_T`. It needs no unique
  inner minimiser, only that the inner SGD decreases L_T.

  Args:
    inner_loss: ``inner_loss(params, hparams, *args)`` -> scalar training loss.
    outer_loss: ``outer_loss(params, hparams, *args)`` -> scalar validation loss.
    inner_lr: the SGD step of the `inner_steps` steps that give :math:`\theta_T`: a
      number or an `optax.Schedule` of the iteration count t = ``state.step`` (from 0;
      the T steps of iteration t all take inner_lr(t)).
    outer_lr: gamma, the step of the hyperparameters in the joint update (a number or a
      schedule of t).
    weights_lr: xi, the step of the weights in the joint update, a number or a schedule
      of t; `outer_lr` when None (the paper's one step for both).
    inner_steps: T; `step`'s ``inner_args`` leaves lead with this axis, one minibatch
      per step of :math:`\theta_T`; q and its gradient use the last one.
    eta: the paper's eta (positive); larger values weight the constraint more.
    hparam_transform: as in `ih.bilevel`.

  Returns:
    A `Bilevel` (no state besides the weights, hyperparameters and counters).

  References:
    Liu, Ye, Wright, Stone & Liu, "BOME! Bilevel Optimization Made Easy: A Simple
    First-Order Approach", NeurIPS 2022. https://arxiv.org/abs/2209.08709
  """
  call = "bome"
  weights_lr = outer_lr if weights_lr is None else weights_lr
  _common.check_rates(call, inner_lr=inner_lr, outer_lr=outer_lr, weights_lr=weights_lr)
  _base.check_int(call, "inner_steps", inner_steps, minimum=1)
  if not eta > 0:
    raise ValueError(f"`{call}(eta=...)` must be positive, got {eta!r}.")
  constrain = transforms.hparam_transformation(hparam_transform)

  def init(params: PyTree, hparams: PyTree) -> BilevelState:
    params, hparams = _common.strongly_typed(params), _common.strongly_typed(hparams)
    _common.check_hparams(call, hparams, constrain)
    outer_opt_state = optax.sgd(0.0).init(hparams)  # the same at every step size
    return BilevelState(params, hparams, (), outer_opt_state, (), *_counters())

  def step(
    state: BilevelState, inner_args: Sequence[Any], outer_args: Sequence[Any]
  ) -> tuple[BilevelState, BilevelMetrics]:
    _common.check_args(call, inner_args, outer_args, inner_steps)
    theta, raw = state.params, state.hparams
    alpha, gamma, xi = (_common.rate(lr, state.step) for lr in (inner_lr, outer_lr, weights_lr))
    hparams = constrain(raw)

    def sgd_step(theta: PyTree, args: tuple[Any, ...]) -> tuple[PyTree, jax.Array]:
      loss, grads = jax.value_and_grad(inner_loss)(theta, hparams, *args)
      return otu.tree_add_scale(theta, -alpha, grads), loss

    theta_t, losses = jax.lax.scan(sgd_step, theta, tuple(inner_args), length=inner_steps)
    last = jax.tree.map(lambda b: b[-1], tuple(inner_args))

    def gap(theta: PyTree, raw: PyTree) -> Any:
      hparams = constrain(raw)
      return inner_loss(theta, hparams, *last) - inner_loss(theta_t, hparams, *last)

    outer_value, grad_f = jax.value_and_grad(
      lambda theta, raw: outer_loss(theta, constrain(raw), *outer_args), argnums=(0, 1)
    )(theta, raw)
    grad_q = jax.grad(gap, argnums=(0, 1))(theta, raw)
    squared = otu.tree_norm(grad_q, squared=True)
    safe = jnp.where(squared > 0, squared, 1.0)
    multiplier = jnp.where(
      squared > 0, jnp.maximum(eta * squared - otu.tree_vdot(grad_f, grad_q), 0.0) / safe, 0.0
    )
    d_theta, d_raw = otu.tree_add_scale(grad_f, multiplier, grad_q)
    finite = _base.tree_all_finite(d_theta)
    moved = otu.tree_where(finite, otu.tree_add_scale(theta, -xi, d_theta), theta)
    update = _common.Update(
      params=moved,
      inner_opt_state=(),
      grads=d_raw,
      method_state=(),
      method_state_if_skipped=(),
      flagged=~finite,
      inner_loss=jnp.mean(losses),
      outer_loss=outer_value,
      outer_value_fn=lambda raw: outer_loss(moved, constrain(raw), *outer_args),
      info=_common.no_solve(),
    )
    return _common.finish(state, optax.sgd(gamma), update)

  settings = dict(
    inner_lr=inner_lr, outer_lr=outer_lr, weights_lr=weights_lr, inner_steps=inner_steps
  )
  settings["eta"] = eta
  config = _common.config(call, **settings, hparam_transform=repr(hparam_transform))
  return Bilevel(init, step, constrain, config)
