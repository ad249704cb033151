"""F2SA (Kwon, Kwon, Wright & Nowak, ICML 2023): a fully first-order penalty method."""

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

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
from implicit_hyper._src.solvers import _base
from implicit_hyper._src.solvers._base import PyTree


class F2SAState(NamedTuple):
  """What F2SA carries besides the weights (`BilevelState.method_state` of its loop).

  Attributes:
    penalized: y, the minimiser of ``L_V / penalty + L_T`` (the weights are z, the
      minimiser of L_T).
    penalty: the current penalty lambda_k.
  """

  penalized: PyTree
  penalty: jax.Array


@_static.carries_static
def f2sa(
  inner_loss: Callable[..., Any],
  outer_loss: Callable[..., Any],
  *,
  inner_lr: float | jax.Array | optax.Schedule,
  outer_lr: float | jax.Array | optax.Schedule,
  inner_steps: int = 10,
  penalty_init: float = 1.0,
  penalty_growth: float = 0.01,
  penalty_max: float = 1e4,
  hparam_transform: Any = None,
) -> Bilevel:
  r"""F2SA: gradients only, through a penalty lambda that grows over the iterations.

  The hypergradient of :math:`h(\lambda) = L_V(\theta^*(\lambda), \lambda)` is that of the
  penalised value function :math:`\min_y [L_V(y) + \lambda_k L_T(y)] - \lambda_k \min_z
  L_T(z)`, off by :math:`O(1/\lambda_k)`. Each iteration takes `inner_steps` SGD steps
  on both minimisers (one training minibatch each) and one step on the hyperparameters:

  .. math::
    z \leftarrow z - \rho \nabla_\theta L_T(z), \quad
    y \leftarrow y - \rho\,(\nabla_\theta L_T(y) + \nabla_\theta L_V(y) / \lambda_k), \quad
    \lambda \leftarrow \lambda - \gamma\,\bigl(\nabla_\lambda L_V(y)
      + \lambda_k (\nabla_\lambda L_T(y) - \nabla_\lambda L_T(z))\bigr),

  with :math:`\lambda_{k+1} = \min(\lambda_k + \delta, \lambda_{\max})`. No Hessian-vector
  product anywhere. Cost per iteration: ``3 * inner_steps`` gradients on the weights
  plus one reverse pass for the three hyperparameter gradients.

  Departures from the paper: the steps are constant unless given as schedules (the
  paper's decay as powers of k) and the step of y is :math:`\rho / \lambda_k` (the paper keeps
  :math:`\alpha_k \lambda_k` bounded, the same scaling), so `inner_lr` is the step one
  would use on L_T alone. Both L_T gradients of one update use the same minibatch, so
  their difference, multiplied by :math:`\lambda_k`, has noise of the size of
  :math:`\lambda_k (y - z) = O(1)` rather than :math:`O(\lambda_k)`.

  Args:
    inner_loss: ``inner_loss(params, hparams, *args)`` -> scalar training loss.
    outer_loss: ``outer_loss(params, hparams, *args)`` -> scalar validation loss.
    inner_lr: rho, the step on z (below ``2 / L`` of L_T), and ``rho / lambda_k`` on y: a
      number or an `optax.Schedule` of the iteration count k = ``state.step`` (from 0;
      the T steps of iteration k all take rho(k)).
    outer_lr: gamma, the hyperparameters' SGD step (a number or a schedule of k).
    inner_steps: T, steps on z and y per iteration; `step`'s ``inner_args`` leaves lead
      with this axis. Every y step uses the one validation minibatch ``outer_args``.
    penalty_init: lambda_0 (positive).
    penalty_growth: delta, added to the penalty each iteration (non-negative).
    penalty_max: the penalty stops growing here; the bias of the hypergradient is
      ``O(1 / penalty_max)`` at best.
    hparam_transform: as in `ih.bilevel`.

  Returns:
    A `Bilevel`; its state's ``params`` is z, and ``method_state`` an `F2SAState`.

  References:
    Kwon, Kwon, Wright & Nowak, "A Fully First-Order Method for Stochastic Bilevel
    Optimization", ICML 2023. https://arxiv.org/abs/2301.10945
  """
  call = "f2sa"
  _common.check_rates(call, inner_lr=inner_lr, outer_lr=outer_lr)
  _base.check_int(call, "inner_steps", inner_steps, minimum=1)
  if not penalty_init > 0:
    raise ValueError(f"`{call}(penalty_init=...)` must be positive, got {penalty_init!r}.")
  _base.check_nonnegative(call, "penalty_growth", penalty_growth)
  if not penalty_max >= penalty_init:
    raise ValueError(
      f"`{call}(penalty_max=...)` must be at least penalty_init={penalty_init!r}, "
      f"got {penalty_max!r}."
    )
  constrain = transforms.hparam_transformation(hparam_transform)

  def init(params: PyTree, hparams: PyTree) -> BilevelState:
    params, hparams = _common.strongly_typed(params), _common.strongly_typed(hparams)
    _common.check_hparams(call, hparams, constrain)
    penalty = jnp.asarray(penalty_init, _base.tree_dtype(params))
    outer_opt_state = optax.sgd(0.0).init(hparams)  # the same at every step size
    return BilevelState(
      params, hparams, (), outer_opt_state, F2SAState(params, penalty), *_counters()
    )

  def step(
    state: BilevelState, inner_args: Sequence[Any], outer_args: Sequence[Any]
  ) -> tuple[BilevelState, BilevelMetrics]:
    _common.check_args(call, inner_args, outer_args, inner_steps)
    raw, penalty = state.hparams, state.method_state.penalty
    rho = _common.rate(inner_lr, state.step)
    hparams = constrain(raw)
    grad_inner = jax.value_and_grad(inner_loss)
    grad_outer = jax.grad(outer_loss)

    def one_step(
      carry: tuple[PyTree, PyTree], args: tuple[Any, ...]
    ) -> tuple[tuple[PyTree, PyTree], jax.Array]:
      z, y = carry
      loss, g_z = grad_inner(z, hparams, *args)
      g_y = otu.tree_add_scale(
        grad_inner(y, hparams, *args)[1], 1.0 / penalty, grad_outer(y, hparams, *outer_args)
      )
      return (otu.tree_add_scale(z, -rho, g_z), otu.tree_add_scale(y, -rho, g_y)), loss

    (z, y), losses = jax.lax.scan(
      one_step, (state.params, state.method_state.penalized), tuple(inner_args), length=inner_steps
    )
    last = jax.tree.map(lambda b: b[-1], tuple(inner_args))

    def penalized_value(raw: PyTree) -> Any:
      hparams = constrain(raw)
      gap = inner_loss(y, hparams, *last) - inner_loss(z, hparams, *last)
      return outer_loss(y, hparams, *outer_args) + penalty * gap

    grown = jnp.minimum(penalty + penalty_growth, penalty_max).astype(penalty.dtype)
    update = _common.Update(
      params=z,
      inner_opt_state=(),
      grads=jax.grad(penalized_value)(raw),
      method_state=F2SAState(y, grown),
      method_state_if_skipped=F2SAState(z, penalty),  # y restarts from z
      flagged=jnp.zeros((), bool),
      inner_loss=jnp.mean(losses),
      outer_loss=outer_loss(z, hparams, *outer_args),
      outer_value_fn=lambda raw: outer_loss(z, constrain(raw), *outer_args),
      info=_common.no_solve(),
    )
    return _common.finish(state, optax.sgd(_common.rate(outer_lr, state.step)), update)

  settings = dict(inner_lr=inner_lr, outer_lr=outer_lr, inner_steps=inner_steps)
  penalties = dict(
    penalty_init=penalty_init, penalty_growth=penalty_growth, penalty_max=penalty_max
  )
  config = _common.config(call, **settings, **penalties, hparam_transform=repr(hparam_transform))
  return Bilevel(init, step, constrain, config)


def _counters() -> tuple[jax.Array, jax.Array]:
  return jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)
