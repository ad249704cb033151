"""StocBiO (Ji, Yang & Liang, ICML 2021): inner SGD, a Neumann adjoint with a batch per term."""

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from implicit_hyper._src import operators
from implicit_hyper._src import transforms
from implicit_hyper._src import unrolled
from implicit_hyper._src.methods import _common
from implicit_hyper._src.methods import _static
from implicit_hyper._src.methods._common import Bilevel
from implicit_hyper._src.methods._common import BilevelMetrics
from implicit_hyper._src.methods._common import BilevelState
from implicit_hyper._src.solvers import _base
from implicit_hyper._src.solvers._base import PyTree


@_static.carries_static
def stocbio(
  inner_loss: Callable[..., Any],
  outer_loss: Callable[..., Any],
  *,
  inner_lr: float | jax.Array | optax.Schedule,
  outer_lr: float | jax.Array | optax.Schedule,
  inner_steps: int = 10,
  neumann_steps: int = 10,
  neumann_lr: float | jax.Array | optax.Schedule | None = None,
  hparam_transform: Any = None,
) -> Bilevel:
  r"""StocBiO: warm-started inner SGD, then a stochastic Neumann series for the adjoint.

  Each iteration takes T = `inner_steps` SGD steps on the weights from where the last
  one left them, estimates the adjoint with Q = `neumann_steps` terms of the Neumann
  series, a fresh training batch :math:`B_q` for every factor,

  .. math::
    u = \eta \sum_{q=0}^{Q} \prod_{k=1}^{q} (I - \eta H_{B_k}) \nabla_\theta L_V, \qquad
    \lambda \leftarrow \lambda - \gamma \bigl(\nabla_\lambda L_V
      - \nabla^2_{\lambda\theta} L_{T, B'}\, u\bigr),

  and the mixed product on one more batch :math:`B'` (the paper's Algorithm 1 with its
  eq. (3)). The truncation biases u by :math:`(I - \eta H)^{Q+1} H^{-1} \nabla_\theta
  L_V`: take :math:`\eta \le 1 / \lambda_{\max}` and Q of a few condition numbers.

  Cost per iteration: T training gradients, Q Hessian-vector products, one mixed
  product and one validation gradient.

  Args:
    inner_loss: ``inner_loss(params, hparams, *batch)`` -> scalar training loss.
    outer_loss: ``outer_loss(params, hparams, *batch)`` -> scalar validation loss.
    inner_lr: alpha, the weights' SGD step: a number or an `optax.Schedule` of the
      iteration count t = ``state.step`` (from 0; the T steps of iteration t all take
      alpha(t)).
    outer_lr: gamma, the hyperparameters' step (a number or a schedule of t).
    inner_steps: T, SGD steps per iteration.
    neumann_steps: Q, Hessian-vector products (series terms) per iteration.
    neumann_lr: eta, the series' step, a number or a schedule of t (`inner_lr` when
      None).
    hparam_transform: as in `ih.bilevel`.

  Returns:
    A `Bilevel` whose `step` takes ``inner_args`` with a leading axis of
    ``inner_steps + neumann_steps + 1``: the batches of the T SGD steps, of the Q series
    terms, then the mixed product's.

  References:
    Ji, Yang & Liang, "Bilevel Optimization: Convergence Analysis and Enhanced Design",
    ICML 2021. https://arxiv.org/abs/2010.07962
  """
  call = "stocbio"
  _base.check_int(call, "inner_steps", inner_steps, minimum=0)
  _base.check_int(call, "neumann_steps", neumann_steps, minimum=0)
  _common.check_rates(call, inner_lr=inner_lr, outer_lr=outer_lr, neumann_lr=neumann_lr)
  neumann_lr = inner_lr if neumann_lr is None else neumann_lr
  constrain = transforms.hparam_transformation(hparam_transform)
  inner_of_raw = lambda p, raw, *a: inner_loss(p, constrain(raw), *a)
  outer_of_raw = lambda p, raw, *a: outer_loss(p, constrain(raw), *a)
  length = inner_steps + neumann_steps + 1

  def init(params: PyTree, hparams: PyTree) -> BilevelState:
    params, hparams = _common.strongly_typed(params), _common.strongly_typed(hparams)
    _common.check_hparams(call, hparams, constrain)
    return _common.initial_state(params, hparams, ())

  def adjoint(
    params: PyTree, raw: PyTree, b: PyTree, batches: tuple[Any, ...], eta: jax.Array
  ) -> PyTree:
    """``eta * sum_q prod_k (I - eta H_k) b``, one batch per factor."""

    def term(carry: tuple[PyTree, PyTree], batch: tuple[Any, ...]) -> tuple[Any, None]:
      power, total = carry
      hvp = operators.hessian_vector_product(inner_of_raw, params, raw, batch)(power)
      power = otu.tree_add_scale(power, -eta, hvp)
      return (power, otu.tree_add(total, power)), None

    (_, total), _ = jax.lax.scan(term, (b, b), batches, length=neumann_steps)
    return otu.tree_scale(eta, total)

  def step(
    state: BilevelState, inner_args: Sequence[Any], outer_args: Sequence[Any]
  ) -> tuple[BilevelState, BilevelMetrics]:
    _common.check_args(call, inner_args, outer_args, length, "inner_steps + neumann_steps + 1")
    raw, inner_args = state.hparams, tuple(inner_args)
    alpha, gamma, eta = (_common.rate(lr, state.step) for lr in (inner_lr, outer_lr, neumann_lr))
    params, opt_state, losses, _ = unrolled.inner_updates(
      inner_loss,
      optax.sgd(alpha),
      state.params,
      state.inner_opt_state,
      constrain(raw),
      jax.tree.map(lambda b: b[:inner_steps], inner_args),
      length=inner_steps,
    )
    outer_value, (grad_params, grad_hparams) = jax.value_and_grad(outer_of_raw, argnums=(0, 1))(
      params, raw, *outer_args
    )
    series = jax.tree.map(lambda b: b[inner_steps:-1], inner_args)
    u = adjoint(params, raw, grad_params, series, eta)
    last = jax.tree.map(lambda b: b[-1], inner_args)
    cross = operators.hparams_vjp(jax.grad(inner_of_raw), params, raw, last)(u)
    update = _common.Update(
      params=params,
      inner_opt_state=opt_state,
      grads=otu.tree_sub(grad_hparams, cross),
      method_state=(),
      method_state_if_skipped=(),
      flagged=jnp.array(False),
      inner_loss=jnp.mean(losses) if inner_steps else inner_of_raw(params, raw, *last),
      outer_loss=outer_value,
      outer_value_fn=lambda raw: outer_of_raw(params, raw, *outer_args),
      info=_common.no_solve(),
    )
    return _common.finish(state, optax.sgd(gamma), update)

  config = _common.config(
    call,
    inner_lr=inner_lr,
    outer_lr=outer_lr,
    inner_steps=inner_steps,
    neumann_steps=neumann_steps,
    neumann_lr=neumann_lr,
    hparam_transform=repr(hparam_transform),
  )
  return Bilevel(init, step, constrain, config)
