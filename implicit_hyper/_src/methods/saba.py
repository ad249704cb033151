"""SABA (Dagreou, Ablin, Vaiter & Moreau, NeurIPS 2022): SOBA with SAGA variance reduction."""

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
from implicit_hyper._src.methods import _directions
from implicit_hyper._src.methods import _static
from implicit_hyper._src.methods._common import Bilevel
from implicit_hyper._src.methods._common import BilevelMetrics
from implicit_hyper._src.methods._common import BilevelState
from implicit_hyper._src.solvers import _base
from implicit_hyper._src.solvers._base import PyTree


class SABAState(NamedTuple):
  """What SABA carries besides the weights (`BilevelState.method_state` of its loop).

  Attributes:
    adjoint: u, the running estimate of ``H^{-1} grad_theta L_V``.
    inner_table: the last oracles of every training batch (`InnerOracles`, each leaf
      with a leading axis of `num_inner_batches`); zero before a batch is first seen.
    outer_table: the same for the validation batches (`OuterOracles`).
    inner_mean, outer_mean: the means of the tables over their batches.
  """

  adjoint: PyTree
  inner_table: _directions.InnerOracles
  outer_table: _directions.OuterOracles
  inner_mean: _directions.InnerOracles
  outer_mean: _directions.OuterOracles


@_static.carries_static
def saba(
  inner_loss: Callable[..., Any],
  outer_loss: Callable[..., Any],
  *,
  num_inner_batches: int,
  num_outer_batches: int,
  inner_lr: float | jax.Array | optax.Schedule,
  outer_lr: float | jax.Array | optax.Schedule,
  adjoint_lr: float | jax.Array | optax.Schedule | None = None,
  hparam_transform: Any = None,
) -> Bilevel:
  r"""SABA: the three directions of SOBA, each a SAGA estimate over fixed minibatches.

  The training set is split once into `num_inner_batches` fixed minibatches (the
  validation set into `num_outer_batches`), and the losses are their means over the
  batches. Every step draws one batch of each; for every oracle o (the training
  gradient, Hessian-vector and mixed products, the validation gradients) with table
  :math:`m_j` and mean :math:`\bar m`, the estimate at batch i is

  .. math::
    \hat o = o_i(\theta, u, \lambda) - m_i + \bar m, \qquad
    \theta \leftarrow \theta - \rho \hat D_\theta, \quad
    u \leftarrow u - \rho \hat D_u, \quad \lambda \leftarrow \lambda - \gamma \hat D_\lambda,

  then :math:`m_i \leftarrow o_i` (the directions D are those of `ih.soba`; all three at
  the same point). The variance of the estimates vanishes at the solution, so constant
  steps converge linearly on strongly convex inner problems (the paper's Theorem 2). The
  tables start at zero (benchopt's default), and cost memory of
  ``num_inner_batches * (2 dim(theta) + dim(lambda)) + num_outer_batches * (dim(theta) +
  dim(lambda))``.

  Cost per iteration: one training gradient and one Hessian-vector and mixed product
  (one VJP of the gradient), one validation gradient in both variables.

  Args:
    inner_loss: ``inner_loss(params, hparams, *batch)`` -> scalar training loss on a batch.
    outer_loss: ``outer_loss(params, hparams, *batch)`` -> scalar validation loss.
    num_inner_batches: how many fixed training batches there are.
    num_outer_batches: how many fixed validation batches there are.
    inner_lr: rho, the weights' step: a number or an `optax.Schedule` of the iteration
      count t = ``state.step`` (from 0; a step the guard skips still counts).
    outer_lr: gamma, the hyperparameters' step (a number or a schedule of t).
    adjoint_lr: the adjoint's step, a number or a schedule of t (rho when None).
    hparam_transform: as in `ih.bilevel`.

  Returns:
    A `Bilevel` whose ``step(state, inner_args, outer_args)`` takes
    ``inner_args = (i, *batch)``: an integer batch index i in
    ``[0, num_inner_batches)`` followed by that batch's loss arguments (no leading
    ``inner_steps`` axis), and ``outer_args = (j, *batch)`` likewise. A step with an
    index out of range is skipped (`BilevelMetrics.skipped`).

  References:
    Dagreou, Ablin, Vaiter & Moreau, "A framework for bilevel optimization that enables
    stochastic and global variance reduction algorithms", NeurIPS 2022.
    https://arxiv.org/abs/2201.13409
  """
  call = "saba"
  for name, value in (
    ("num_inner_batches", num_inner_batches),
    ("num_outer_batches", num_outer_batches),
  ):
    _base.check_int(call, name, value, minimum=1)
  _common.check_rates(call, inner_lr=inner_lr, outer_lr=outer_lr, adjoint_lr=adjoint_lr)
  adjoint_lr = inner_lr if adjoint_lr is None else adjoint_lr
  constrain = transforms.hparam_transformation(hparam_transform)
  inner_of_raw = lambda p, raw, *a: inner_loss(p, constrain(raw), *a)
  outer_of_raw = lambda p, raw, *a: outer_loss(p, constrain(raw), *a)

  def init(params: PyTree, hparams: PyTree) -> BilevelState:
    params, hparams = _common.strongly_typed(params), _common.strongly_typed(hparams)
    _common.check_hparams(call, hparams, constrain)
    inner = _directions.InnerOracles(params, params, hparams)
    outer = _directions.OuterOracles(params, hparams)
    tables = [
      jax.tree.map(lambda x, n=n: jnp.zeros((n, *jnp.shape(x)), jnp.result_type(x)), oracles)
      for n, oracles in ((num_inner_batches, inner), (num_outer_batches, outer))
    ]
    means = [otu.tree_zeros_like(inner), otu.tree_zeros_like(outer)]
    method_state = SABAState(otu.tree_zeros_like(params), *tables, *means)
    return _common.initial_state(params, hparams, method_state)

  def step(
    state: BilevelState, inner_args: Sequence[Any], outer_args: Sequence[Any]
  ) -> tuple[BilevelState, BilevelMetrics]:
    _common.check_args(call, inner_args, outer_args, None)
    (i, *inner_batch), (j, *outer_batch) = _indexed(call, inner_args, outer_args)
    memory: SABAState = state.method_state
    values = _directions.oracles(
      inner_of_raw,
      outer_of_raw,
      state.params,
      state.hparams,
      memory.adjoint,
      inner_batch,
      outer_batch,
    )
    inner, inner_table, inner_mean = _saga(
      values[2], memory.inner_table, memory.inner_mean, i, num_inner_batches
    )
    outer, outer_table, outer_mean = _saga(
      values[3], memory.outer_table, memory.outer_mean, j, num_outer_batches
    )
    out_of_range = (i < 0) | (i >= num_inner_batches) | (j < 0) | (j >= num_outer_batches)
    return _directions.step(
      state,
      (inner_lr, outer_lr, adjoint_lr),
      inner,
      outer,
      adjoint=memory.adjoint,
      method_state=lambda u: SABAState(u, inner_table, outer_table, inner_mean, outer_mean),
      flagged=out_of_range,
      values=values[:2],
      outer_value_fn=lambda raw: outer_of_raw(state.params, raw, *outer_batch),
    )

  config = _common.config(
    call,
    num_inner_batches=num_inner_batches,
    num_outer_batches=num_outer_batches,
    inner_lr=inner_lr,
    outer_lr=outer_lr,
    adjoint_lr=adjoint_lr,
    hparam_transform=repr(hparam_transform),
  )
  return Bilevel(init, step, constrain, config)


def _saga(
  new: Any, table: Any, mean: Any, index: jax.Array, num_batches: int
) -> tuple[Any, Any, Any]:
  """``(estimate, table, mean)``: SAGA's estimate ``new - table[i] + mean`` and the updates."""
  old = jax.tree.map(lambda t: t[index], table)
  change = otu.tree_sub(new, old)
  estimate = otu.tree_add(change, mean)
  table = jax.tree.map(lambda t, n: t.at[index].set(n), table, new)
  return estimate, table, otu.tree_add_scale(mean, 1.0 / num_batches, change)


def _indexed(
  call: str, inner_args: Sequence[Any], outer_args: Sequence[Any]
) -> tuple[Sequence[Any], Sequence[Any]]:
  """Checks that both argument tuples start with an integer scalar batch index."""
  for name, args in (("inner_args", inner_args), ("outer_args", outer_args)):
    index = args[0] if len(args) else None
    if (
      index is None
      or jnp.shape(index) != ()
      or not jnp.issubdtype(jnp.result_type(index), jnp.integer)
    ):
      raise TypeError(
        f"`{call}` step: `{name}` must start with the batch's integer index (a scalar), "
        f"then the batch, e.g. `(i, x[i], y[i])`; got {type(index).__name__} "
        f"{getattr(index, 'shape', '')}."
      )
  return inner_args, outer_args
