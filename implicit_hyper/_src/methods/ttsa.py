"""TTSA (Hong, Wai, Wang & Yang, SIOPT 2023): one SGD step, a randomly truncated Neumann adjoint."""

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
from implicit_hyper._src.solvers import _base
from implicit_hyper._src.solvers._base import PyTree


class TTSAState(NamedTuple):
  """What TTSA carries (`BilevelState.method_state`): the key that draws each truncation.

  Attributes:
    key: raw ``uint32`` PRNG key data (`jax.random.key_data`), so that checkpoints hold a
      plain array; split once per iteration.
  """

  key: jax.Array


@_static.carries_static
def ttsa(
  inner_loss: Callable[..., Any],
  outer_loss: Callable[..., Any],
  *,
  inner_lr: float | jax.Array | optax.Schedule,
  outer_lr: float | jax.Array | optax.Schedule,
  neumann_steps: int = 10,
  neumann_lr: float | jax.Array | optax.Schedule | None = None,
  seed: int = 0,
  hparam_transform: Any = None,
) -> Bilevel:
  r"""TTSA: two-timescale stochastic approximation with a randomly truncated series.

  Each iteration takes one SGD step on the weights and draws a truncation p uniformly
  from :math:`\{0, \dots, Q - 1\}` (Q = `neumann_steps`), then

  .. math::
    u = Q \eta \prod_{k=1}^{p} (I - \eta H_{B_k}) \nabla_\theta L_V, \qquad
    \lambda \leftarrow \lambda - \gamma \bigl(\nabla_\lambda L_V
      - \nabla^2_{\lambda\theta} L_{T, B'}\, u\bigr),

  a fresh training batch :math:`B_k` per factor (the paper's Hessian-inverse estimator,
  with :math:`\eta = c_h / L`). Averaged over p, u is the Q-term Neumann series
  :math:`\eta \sum_{q<Q} (I - \eta H)^q \nabla_\theta L_V`, so it carries the series'
  truncation bias and, on top of it, the variance of one random term; the two
  timescales (``outer_lr`` much below ``inner_lr``, decreasing as schedules in the
  paper: t^(-3/5) and t^(-2/5)) average the noise out.

  Cost per iteration: one training gradient, p Hessian-vector products ((Q - 1) / 2 on
  average; the products past p are not computed), one mixed product and one validation
  gradient.

  Args:
    inner_loss: ``inner_loss(params, hparams, *batch)`` -> scalar training loss.
    outer_loss: ``outer_loss(params, hparams, *batch)`` -> scalar validation loss.
    inner_lr: beta, the weights' SGD step: a number or an `optax.Schedule` of the
      iteration count t = ``state.step`` (from 0).
    outer_lr: gamma, the hyperparameters' step (a number or a schedule of t).
    neumann_steps: Q, the largest truncation plus one.
    neumann_lr: eta, the series' step, a number or a schedule of t (`inner_lr` when
      None).
    seed: the seed of the truncations (`TTSAState.key`).
    hparam_transform: as in `ih.bilevel`.

  Returns:
    A `Bilevel` whose `step` takes ``inner_args`` with a leading axis of
    ``neumann_steps + 2``: the batch of the SGD step, those of the Q possible factors,
    then the mixed product's.

  References:
    Hong, Wai, Wang & Yang, "A Two-Timescale Stochastic Algorithm Framework for Bilevel
    Optimization: Complexity Analysis and Application to Actor-Critic", SIAM J. Optim.
    2023. https://arxiv.org/abs/2007.05170
  """
  call = "ttsa"
  _base.check_int(call, "neumann_steps", neumann_steps, minimum=1)
  _base.check_int(call, "seed", seed, minimum=0)
  _common.check_rates(call, inner_lr=inner_lr, outer_lr=outer_lr, neumann_lr=neumann_lr)
  neumann_lr = inner_lr if neumann_lr is None else neumann_lr
  constrain = transforms.hparam_transformation(hparam_transform)
  inner_of_raw = lambda p, raw, *a: inner_loss(p, constrain(raw), *a)
  outer_of_raw = lambda p, raw, *a: outer_loss(p, constrain(raw), *a)
  length = neumann_steps + 2

  def init(params: PyTree, hparams: PyTree) -> BilevelState:
    params, hparams = _common.strongly_typed(params), _common.strongly_typed(hparams)
    _common.check_hparams(call, hparams, constrain)
    key = jax.random.key_data(jax.random.key(seed))
    return _common.initial_state(params, hparams, TTSAState(key))

  def step(
    state: BilevelState, inner_args: Sequence[Any], outer_args: Sequence[Any]
  ) -> tuple[BilevelState, BilevelMetrics]:
    _common.check_args(call, inner_args, outer_args, length, "neumann_steps + 2")
    raw, inner_args = state.hparams, tuple(inner_args)
    beta, gamma, eta = (_common.rate(lr, state.step) for lr in (inner_lr, outer_lr, neumann_lr))
    key, draw = jax.random.split(jax.random.wrap_key_data(state.method_state.key))
    depth = jax.random.randint(draw, (), 0, neumann_steps)
    first = jax.tree.map(lambda b: b[0], inner_args)
    inner_value, grad = jax.value_and_grad(inner_of_raw)(state.params, raw, *first)
    params = otu.tree_add_scale(state.params, -beta, grad)
    outer_value, (grad_params, grad_hparams) = jax.value_and_grad(outer_of_raw, argnums=(0, 1))(
      params, raw, *outer_args
    )
    factors = jax.tree.map(lambda b: b[1:-1], inner_args)
    hvp = lambda batch, v: operators.hessian_vector_product(inner_of_raw, params, raw, batch)(v)
    power = truncated_product(hvp, grad_params, factors, depth, eta)
    u = otu.tree_scale(neumann_steps * eta, power)
    last = jax.tree.map(lambda b: b[-1], inner_args)
    cross = operators.hparams_vjp(jax.grad(inner_of_raw), params, raw, last)(u)
    new_state = TTSAState(jax.random.key_data(key))
    update = _common.Update(
      params=params,
      inner_opt_state=state.inner_opt_state,
      grads=otu.tree_sub(grad_hparams, cross),
      method_state=new_state,
      method_state_if_skipped=new_state,
      flagged=jnp.array(False),
      inner_loss=inner_value,
      outer_loss=outer_value,
      outer_value_fn=lambda raw: outer_of_raw(params, raw, *outer_args),
      info=_common.no_solve(),
    )
    return _common.finish(state, optax.sgd(gamma), update)

  config = _common.config(
    call,
    inner_lr=inner_lr,
    outer_lr=outer_lr,
    neumann_steps=neumann_steps,
    neumann_lr=neumann_lr,
    seed=seed,
    hparam_transform=repr(hparam_transform),
  )
  return Bilevel(init, step, constrain, config)


def truncated_product(
  hvp: Callable[[Any, PyTree], PyTree], b: PyTree, factors: Any, depth: jax.Array, eta: jax.Array
) -> PyTree:
  """``prod_{k < depth} (I - eta H_k) b``, ``H_k`` on ``factors[k]``; only `depth` products run."""

  def factor(k: jax.Array, power: PyTree) -> PyTree:
    batch = jax.tree.map(lambda x: x[k], factors)
    return otu.tree_add_scale(power, -eta, hvp(batch, power))

  return jax.lax.fori_loop(0, depth, factor, b)
