"""SRBA (Dagreou, Moreau, Vaiter & Ablin, 2023): SOBA's directions with SARAH estimates."""

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import optax
import optax.tree_utils as otu

from implicit_hyper._src import transforms
from implicit_hyper._src.methods import _common
from implicit_hyper._src.methods import _directions
from implicit_hyper._src.methods import _static
from implicit_hyper._src.methods._common import Bilevel
from implicit_hyper._src.methods._common import BilevelMetrics
from implicit_hyper._src.methods._common import BilevelState
from implicit_hyper._src.solvers import _base
from implicit_hyper._src.solvers._base import PyTree


class SRBAState(NamedTuple):
  """What SRBA carries besides the weights (`BilevelState.method_state` of its loop).

  Attributes:
    adjoint: u, the running estimate of ``H^{-1} grad_theta L_V``.
    point: ``(params, raw_hparams, adjoint)`` where the estimates below were taken.
    inner, outer: the SARAH estimates of the five oracles at `point`.
  """

  adjoint: PyTree
  point: tuple[PyTree, PyTree, PyTree]
  inner: _directions.InnerOracles
  outer: _directions.OuterOracles


@_static.carries_static
def srba(
  inner_loss: Callable[..., Any],
  outer_loss: Callable[..., Any],
  *,
  period: int,
  inner_lr: float | jax.Array | optax.Schedule,
  outer_lr: float | jax.Array | optax.Schedule,
  adjoint_lr: float | jax.Array | optax.Schedule | None = None,
  hparam_transform: Any = None,
) -> Bilevel:
  r"""SRBA: the three directions of SOBA, each a SARAH estimate restarted every `period` steps.

  Every `period` iterations (from iteration 0) the oracles o (the training gradient,
  Hessian-vector and mixed products, the validation gradients) are computed on the full
  data; in between, on one training and one validation batch, the estimate is updated
  recursively between the new point :math:`z_t = (\theta_t, u_t, \lambda_t)` and the
  last one,

  .. math::
    \hat o_t = \hat o_{t-1} + o_{i_t}(z_t) - o_{i_t}(z_{t-1}), \qquad
    \theta \leftarrow \theta - \rho \hat D_\theta, \quad
    u \leftarrow u - \rho \hat D_u, \quad \lambda \leftarrow \lambda - \gamma \hat D_\lambda,

  with the directions D of `ih.soba` built from the estimates. Its oracle complexity is
  near-optimal for bilevel empirical risk minimisation (the paper's Theorem 3.3); the
  benchmark's period is ``(n_train + n_valid) / (2 batch)``.

  Cost per iteration: two training gradients and two Hessian-vector and mixed products
  (one VJP of the gradient at each of the two points), two validation gradients; at a
  restart, one of each on the full data.

  Args:
    inner_loss: ``inner_loss(params, hparams, *batch)`` -> scalar training loss.
    outer_loss: ``outer_loss(params, hparams, *batch)`` -> scalar validation loss.
    period: q, iterations between full-batch restarts.
    inner_lr: rho, the weights' step: a number or an `optax.Schedule` of the iteration
      count t = ``state.step`` (from 0; a step the guard skips still counts).
    outer_lr: gamma, the hyperparameters' step (a number or a schedule of t).
    adjoint_lr: the adjoint's step, a number or a schedule of t (rho when None).
    hparam_transform: as in `ih.bilevel`.

  Returns:
    A `Bilevel` whose ``step(state, inner_args, outer_args)`` takes one batch's loss
    arguments (no leading ``inner_steps`` axis) and, when ``state.step % period == 0``,
    the full training and validation sets instead: the restart computes its oracles on
    whatever it is given.

  References:
    Dagreou, Moreau, Vaiter & Ablin, "A Lower Bound and a Near-Optimal Algorithm for
    Bilevel Empirical Risk Minimization", 2023. https://arxiv.org/abs/2302.08766
  """
  call = "srba"
  _base.check_int(call, "period", period, minimum=1)
  _common.check_rates(call, inner_lr=inner_lr, outer_lr=outer_lr, adjoint_lr=adjoint_lr)
  adjoint_lr = inner_lr if adjoint_lr is None else adjoint_lr
  constrain = transforms.hparam_transformation(hparam_transform)
  inner_of_raw = lambda p, raw, *a: inner_loss(p, constrain(raw), *a)
  outer_of_raw = lambda p, raw, *a: outer_loss(p, constrain(raw), *a)

  def init(params: PyTree, hparams: PyTree) -> BilevelState:
    params, hparams = _common.strongly_typed(params), _common.strongly_typed(hparams)
    _common.check_hparams(call, hparams, constrain)
    zero = otu.tree_zeros_like(params)
    inner = _directions.InnerOracles(zero, zero, otu.tree_zeros_like(hparams))
    outer = _directions.OuterOracles(zero, otu.tree_zeros_like(hparams))
    method_state = SRBAState(zero, (params, hparams, zero), inner, outer)
    return _common.initial_state(params, hparams, method_state)

  def step(
    state: BilevelState, inner_args: Sequence[Any], outer_args: Sequence[Any]
  ) -> tuple[BilevelState, BilevelMetrics]:
    _common.check_args(call, inner_args, outer_args, None)
    memory: SRBAState = state.method_state
    point = (state.params, state.hparams, memory.adjoint)

    def oracles(at: tuple[PyTree, PyTree, PyTree]) -> Any:
      return _directions.oracles(inner_of_raw, outer_of_raw, *at, inner_args, outer_args)

    def restart() -> Any:
      return oracles(point)

    def recursive() -> Any:
      new, old = oracles(point), oracles(memory.point)
      inner = jax.tree.map(lambda e, n, o: e + n - o, memory.inner, new[2], old[2])
      outer = jax.tree.map(lambda e, n, o: e + n - o, memory.outer, new[3], old[3])
      return (*new[:2], inner, outer)

    inner_value, outer_value, inner, outer = jax.lax.cond(
      state.step % period == 0, restart, recursive
    )
    return _directions.step(
      state,
      (inner_lr, outer_lr, adjoint_lr),
      inner,
      outer,
      adjoint=memory.adjoint,
      method_state=lambda u: SRBAState(u, point, inner, outer),
      flagged=jax.numpy.array(False),
      values=(inner_value, outer_value),
      outer_value_fn=lambda raw: outer_of_raw(state.params, raw, *outer_args),
    )

  config = _common.config(
    call,
    period=period,
    inner_lr=inner_lr,
    outer_lr=outer_lr,
    adjoint_lr=adjoint_lr,
    hparam_transform=repr(hparam_transform),
  )
  return Bilevel(init, step, constrain, config)
