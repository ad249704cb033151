r"""The three directions of the single-loop framework of Dagreou et al. (2022): SABA, SRBA.

The weights :math:`\theta`, the adjoint :math:`u \approx H^{-1} \nabla_\theta L_V` and the
raw hyperparameters :math:`\lambda` move together along

.. math::
  D_\theta = \nabla_\theta L_T, \quad
  D_u = H u - \nabla_\theta L_V, \quad
  D_\lambda = \nabla_\lambda L_V - \nabla^2_{\lambda\theta} L_T\, u,

each a sum of per-batch terms, so any unbiased or variance-reduced estimate of the five
oracles below gives an estimate of the directions. (The paper's ``v`` is ``-u``.)
"""

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from implicit_hyper._src.methods import _common
from implicit_hyper._src.methods._common import BilevelMetrics
from implicit_hyper._src.methods._common import BilevelState
from implicit_hyper._src.solvers._base import PyTree


class InnerOracles(NamedTuple):
  """The training-loss oracles on one batch: gradient, Hessian-vector and mixed products."""

  grad: PyTree
  hvp: PyTree
  cross: PyTree


class OuterOracles(NamedTuple):
  """The validation-loss gradients on one batch, in the weights and in the raw hparams."""

  grad_params: PyTree
  grad_hparams: PyTree


def oracles(
  inner_of_raw: Callable[..., Any],
  outer_of_raw: Callable[..., Any],
  params: PyTree,
  raw: PyTree,
  adjoint: PyTree,
  inner_batch: Sequence[Any],
  outer_batch: Sequence[Any],
) -> tuple[jax.Array, jax.Array, InnerOracles, OuterOracles]:
  """``(L_T, L_V, inner, outer)`` at one point on one training and one validation batch."""
  inner_value, grad, hvp, cross = _common.inner_oracles(
    inner_of_raw, params, raw, inner_batch, adjoint
  )
  outer_value, (grad_params, grad_hparams) = jax.value_and_grad(outer_of_raw, argnums=(0, 1))(
    params, raw, *outer_batch
  )
  return (
    inner_value,
    outer_value,
    InnerOracles(grad, hvp, cross),
    OuterOracles(grad_params, grad_hparams),
  )


def step(
  state: BilevelState,
  rates: tuple[Any, Any, Any],
  inner: InnerOracles,
  outer: OuterOracles,
  *,
  adjoint: PyTree,
  method_state: Any,
  flagged: jax.Array,
  values: tuple[jax.Array, jax.Array],
  outer_value_fn: Callable[[PyTree], jax.Array],
) -> tuple[BilevelState, BilevelMetrics]:
  """Moves the weights, `adjoint` and hyperparameters along the (estimated) directions.

  `rates` are the SGD steps ``(inner_lr, outer_lr, adjoint_lr)``, numbers or schedules
  evaluated at ``state.step``. `method_state` is the method's new state, which must hold
  the moved adjoint: it is built by ``method_state(new_adjoint)``. A skipped step keeps
  the old method state.
  """
  inner_lr, outer_lr, adjoint_lr = (_common.rate(lr, state.step) for lr in rates)
  updates, inner_opt_state = optax.sgd(inner_lr).update(
    inner.grad, state.inner_opt_state, state.params
  )
  params = optax.apply_updates(state.params, updates)
  new_adjoint = otu.tree_add_scale(adjoint, -adjoint_lr, otu.tree_sub(inner.hvp, outer.grad_params))
  update = _common.Update(
    params=params,
    inner_opt_state=inner_opt_state,
    grads=otu.tree_sub(outer.grad_hparams, inner.cross),
    method_state=method_state(new_adjoint),
    method_state_if_skipped=state.method_state,
    flagged=jnp.asarray(flagged),
    inner_loss=values[0],
    outer_loss=values[1],
    outer_value_fn=outer_value_fn,
    info=_common.no_solve(),
  )
  return _common.finish(state, optax.sgd(outer_lr), update)
