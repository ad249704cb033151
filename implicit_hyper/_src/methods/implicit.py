"""`ih.bilevel`: the alternating loop of Lorraine et al. 2020 (Algorithm 1), or unrolled."""

import dataclasses
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from implicit_hyper._src import differentiable
from implicit_hyper._src import transforms
from implicit_hyper._src import unrolled
from implicit_hyper._src.hypergrad import hypergrad_with_info
from implicit_hyper._src.methods import _common
from implicit_hyper._src.methods import _static
from implicit_hyper._src.methods._common import Bilevel
from implicit_hyper._src.methods._common import BilevelMetrics
from implicit_hyper._src.methods._common import BilevelState
from implicit_hyper._src.solvers import _base
from implicit_hyper._src.solvers import resolve
from implicit_hyper._src.solvers._base import PyTree
from implicit_hyper._src.solvers._base import Solver
from implicit_hyper._src.solvers._base import SolverLike
from implicit_hyper._src.solvers.neumann import Neumann

METHODS = ("implicit", "unrolled")


class ImplicitState(NamedTuple):
  r"""`BilevelState.method_state` of ``bilevel(method="implicit")`` (and of SOBA, AmIGO).

  Attributes:
    solver: the linear solver's state (`ih.Neumann`'s cached step, `ih.CG`'s warm start,
      SOBA's adjoint).
    stationarity_scale: :math:`\|\nabla_\theta L_T(\theta_0)\|` at the weights of the first
      hyper step on its last training batch, the denominator of
      `BilevelMetrics.stationarity`; NaN until that step sets it.
  """

  solver: Any
  stationarity_scale: jax.Array


@_static.carries_static
def bilevel(
  inner_loss: Callable[..., Any],
  outer_loss: Callable[..., Any],
  inner_optimizer: optax.GradientTransformation,
  outer_optimizer: optax.GradientTransformation,
  *,
  inner_steps: int = 1,
  solver: "SolverLike | None" = None,
  method: str = "implicit",
  hparam_transform: Any = None,
  optimizer_hparams: tuple[str, ...] = (),
  unroll_steps: int | None = None,
  loss_has_aux: bool = False,
) -> Bilevel:
  r"""Alternating bilevel training: `inner_steps` optimiser steps, then one hyper step.

  Algorithm 1 of Lorraine et al. (2020): train the weights, then at the current weights
  take the implicit-function-theorem hypergradient

  .. math::
    \frac{d L_V}{d \lambda} = \frac{\partial L_V}{\partial \lambda}
      - \frac{\partial^2 L_T}{\partial \lambda \partial \theta}^T
        H^{-1} \frac{\partial L_V}{\partial \theta}

  with H and the mixed term on a training minibatch (the last slice of `inner_args`) and
  the direct term on the validation data (`outer_args`), and update :math:`\lambda`
  with `outer_optimizer`. One `step` is one `jax.lax.scan` of inner updates and one hyper
  update; `jax.jit` it. A hyper step whose hypergradient is not finite, or whose solve
  reports `diverged`, leaves the hyperparameters and outer state unchanged and is
  counted (`BilevelMetrics.skipped`, `num_skipped`).

  Cost per hyper step: `inner_steps` gradients, one gradient of the validation loss, the
  solver's Hessian-vector products and one mixed product.

  `BilevelMetrics.stationarity` is
  :math:`\|\nabla_\theta L_T(\theta_k)\| / \|\nabla_\theta L_T(\theta_0)\|`: the training
  gradient at the weights where the hypergradient is taken, on the last training batch of
  the step, relative to the one at the weights of the first hyper step (`init`'s `params`),
  on that step's last batch (1 when that is zero). The denominator is computed once and
  kept in `method_state` (`ImplicitState`); the numerator is the metric's only cost, one
  gradient per step at most (XLA shares part of it with the mixed product). It should
  fall as training proceeds; a value that stays of order one says the weights are not
  near a training minimum (too few or too small inner steps, or an inner optimiser whose
  fixed point is another one).

  The solver's state (`ih.Neumann`'s cached ``1 / lambda_max``, renewed every
  `refresh_every` solves; `ih.CG`'s warm start) is ``BilevelState.method_state.solver``, carried
  without the loop knowing what it holds. A skipped hyper step resets it to
  ``solver.init(params)``: with minibatches, or while the curvature grows early in
  training, a cached Neumann step can exceed ``2 / lambda_max`` of a later Hessian, and
  the next step then re-estimates it.

  The weights and hyperparameters may be equinox Modules whose fields include functions
  (``activation: Callable = jax.nn.relu``) or other leaves that are not arrays or numbers:
  as with ``eqx.partition(tree, eqx.is_inexact_array)``, the arrays are trained and
  differentiated and the other leaves are carried unchanged in the state. Jit the step
  with ``eqx.filter_jit`` then (``jax.jit`` refuses a function among its arguments);
  `ih.fit` does so itself and checkpoints only the arrays.

  Optimisers of the `optax.GradientTransformationExtraArgs` kind get ``value``, ``grad``
  and ``value_fn`` by keyword: the inner one the minibatch training loss as a function of
  the weights (``optax.lbfgs()``'s line search works there), the outer one the validation
  loss and the hypergradient, with ``value_fn`` the validation loss at the current
  weights as a function of the raw hyperparameters (not the value function
  :math:`L_V(\theta^*(\lambda), \lambda)`, so a line search on it is not one on the
  hyper-objective: an outer ``optax.lbfgs()`` is not recommended).

  Args:
    inner_loss: ``inner_loss(params, hparams, *args)`` -> scalar training loss.
    outer_loss: ``outer_loss(params, hparams, *args)`` -> scalar validation loss.
    inner_optimizer: any `optax.GradientTransformation` for the parameters.
    outer_optimizer: any `optax.GradientTransformation` for the raw hyperparameters.
    inner_steps: inner updates per hyper step; the leaves of `step`'s `inner_args`
      carry a leading axis of this length.
    solver: linear solver of the implicit hypergradient, or a function
      ``solve(matvec, b) -> x``; `ih.Neumann()` when None.
    method: "implicit", or "unrolled" to differentiate through the last
      `unroll_steps` inner steps for every hyperparameter instead (the baseline).
    hparam_transform: the losses see ``transform(raw)`` while the outer optimiser updates
      ``raw``: None, "exp", "softplus", "sigmoid", a callable, or a pytree prefix of those.
    optimizer_hparams: keys of a dict `hparams` that are numeric hyperparameters of an
      ``optax.inject_hyperparams`` inner optimiser (e.g. ``("learning_rate",)``). The
      losses get the other keys; these get their hypergradient by unrolling, even
      when the other keys use the implicit method.
    unroll_steps: T, the inner steps differentiated by unrolling (the last T of each
      hyper step; the default is all `inner_steps`).
    loss_has_aux: both losses return ``(loss, aux)`` (as for
      ``jax.value_and_grad(has_aux=True)``); the aux of the last inner update and of the
      validation loss are reported in `BilevelMetrics` (``inner_aux``, ``outer_aux``).

  Returns:
    A `Bilevel` of pure functions.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import implicit_hyper as ih
    >>> x, y = jnp.eye(4), jnp.arange(4.0)
    >>> train = lambda w, decay, x, y: jnp.mean((x @ w - y) ** 2) + decay * w @ w
    >>> valid = lambda w, decay, x, y: jnp.mean((x @ w - 0.5 * y) ** 2)
    >>> loop = ih.bilevel(train, valid, optax.sgd(1.0), optax.adam(0.1), inner_steps=10,
    ...                   solver=ih.CG(steps=4), hparam_transform="exp")
    >>> state = loop.init(jnp.zeros(4), jnp.log(0.01))
    >>> step = jax.jit(loop.step)
    >>> inner_args = (jnp.stack([x] * 10), jnp.stack([y] * 10))
    >>> for _ in range(100):
    ...   state, metrics = step(state, inner_args, (x, y))
    >>> round(float(loop.constrain(state.hparams)), 2)  # the best decay is 1/4
    0.25

  References:
    Lorraine, Vicol & Duvenaud, "Optimizing Millions of Hyperparameters by Implicit
    Differentiation", AISTATS 2020. https://arxiv.org/abs/1911.02590
  """
  call = "bilevel"
  _check_settings(call, inner_steps, method, optimizer_hparams, unroll_steps)
  algorithm = _Algorithm1(
    inner_loss=inner_loss,
    outer_loss=outer_loss,
    inner_optimizer=inner_optimizer,
    outer_optimizer=outer_optimizer,
    inner_steps=inner_steps,
    solver=resolve.as_solver(call, solver, Neumann(), symmetric=True),
    implicit=method == "implicit",
    unroll=0 if method == "implicit" and not optimizer_hparams else (unroll_steps or inner_steps),
    constrain=transforms.hparam_transformation(hparam_transform),
    optimizer_hparams=optimizer_hparams,
    loss_has_aux=bool(loss_has_aux),
  )
  _common.check_optimizer(call, "inner_optimizer", inner_optimizer)
  _common.check_optimizer(call, "outer_optimizer", outer_optimizer)
  config = _common.config(
    method,
    inner_steps=inner_steps,
    solver=repr(algorithm.solver),
    hparam_transform=repr(hparam_transform),
    optimizer_hparams=list(optimizer_hparams),
    unroll_steps=unroll_steps,
    inner_optimizer=inner_optimizer,
    outer_optimizer=outer_optimizer,
    loss_has_aux=bool(loss_has_aux),
  )
  return Bilevel(algorithm.init, algorithm.step, algorithm.constrain, config)


@dataclasses.dataclass(frozen=True, eq=False)
class _Algorithm1:
  """The settings of one `bilevel` loop and its `init` / `step`."""

  inner_loss: Callable[..., Any]
  outer_loss: Callable[..., Any]
  inner_optimizer: optax.GradientTransformation
  outer_optimizer: optax.GradientTransformation
  inner_steps: int
  solver: Solver
  implicit: bool
  unroll: int  # the last `unroll` inner steps are differentiated by unrolling
  constrain: Callable[[PyTree], PyTree]
  optimizer_hparams: tuple[str, ...]
  loss_has_aux: bool

  def split(self, raw: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """Raw hparams -> (what the losses see, the inner optimiser's hyperparameters)."""
    hparams = self.constrain(raw)
    if not self.optimizer_hparams:
      return hparams, {}
    rest = {k: v for k, v in hparams.items() if k not in self.optimizer_hparams}
    return rest, {k: hparams[k] for k in self.optimizer_hparams}

  def of_raw(self, loss: Callable[..., Any]) -> Callable[..., Any]:
    """``loss`` as a scalar function of ``(params, raw_hparams, *args)``."""
    scalar = _common.scalar_loss(loss, self.loss_has_aux)
    return lambda params, raw, *args: scalar(params, self.split(raw)[0], *args)

  def init(self, params: PyTree, hparams: PyTree) -> BilevelState:
    call = "bilevel"
    params, hparams = _common.strongly_typed(params), _common.strongly_typed(hparams)
    if self.optimizer_hparams and not (
      isinstance(hparams, dict) and set(self.optimizer_hparams) <= hparams.keys()
    ):
      raise ValueError(
        f"`{call}(optimizer_hparams={self.optimizer_hparams!r})`: `hparams` must be a dict "
        f"holding these keys, got {jax.tree.structure(hparams)}."
      )
    _common.check_hparams(call, hparams, self.split)
    inner_state = self.inner_optimizer.init(params)
    if self.optimizer_hparams:
      unrolled.check_optimizer_hparams(call, inner_state, self.optimizer_hparams)
      inner_state = unrolled.with_optimizer_hparams(inner_state, self.split(hparams)[1])
    return BilevelState(
      params=params,
      hparams=hparams,
      inner_opt_state=inner_state,
      outer_opt_state=self.outer_optimizer.init(hparams),
      method_state=self.implicit_state(params) if self.implicit else None,
      step=jnp.zeros((), jnp.int32),
      num_skipped=jnp.zeros((), jnp.int32),
    )

  def step(
    self, state: BilevelState, inner_args: Sequence[Any], outer_args: Sequence[Any]
  ) -> tuple[BilevelState, BilevelMetrics]:
    _common.check_args("bilevel", inner_args, outer_args, self.inner_steps)
    params, opt_state, losses, inner_aux, grads, outer_value, outer_aux = self.train(
      state, tuple(inner_args), tuple(outer_args)
    )
    method_state, fresh = state.method_state, None
    info = _base.no_solve_info(_base.tree_dtype(params))
    if self.implicit:
      batch = jax.tree.map(lambda b: b[-1], tuple(inner_args))
      inner_of_raw = self.of_raw(self.inner_loss)
      implicit_grads, info, solver_state = hypergrad_with_info(
        inner_of_raw,
        self.of_raw(self.outer_loss),
        params,
        state.hparams,
        inner_args=batch,
        outer_args=tuple(outer_args),
        solver=self.solver,
        solver_state=state.method_state.solver,
      )
      grads = otu.tree_add(grads, implicit_grads)
      scale = state.method_state.stationarity_scale
      # Once, at the first hyper step: the denominator of the stationarity.
      scale = jax.lax.cond(
        jnp.isnan(scale),
        lambda: _gradient_norm(inner_of_raw, state.params, state.hparams, batch).astype(
          scale.dtype
        ),
        lambda: scale,
      )
      stationarity = _gradient_norm(inner_of_raw, params, state.hparams, batch)
      # It replaces hypergrad_with_info's, whose gradient at zero `jit` then never computes.
      info = info._replace(
        stationarity=(stationarity / jnp.where(scale > 0, scale, 1.0)).astype(
          info.stationarity.dtype
        )
      )
      method_state = ImplicitState(solver_state, scale)
      # A skipped step may come from what the solver kept (a stale step size): start afresh.
      fresh = ImplicitState(self.solver.init(params), scale)
    outer_of_raw = self.of_raw(self.outer_loss)
    update = _common.Update(
      params=params,
      inner_opt_state=opt_state,
      grads=grads,
      method_state=method_state,
      method_state_if_skipped=fresh,
      flagged=info.diverged,
      inner_loss=jnp.mean(losses),
      outer_loss=outer_value,
      outer_value_fn=lambda raw: outer_of_raw(params, raw, *outer_args),
      info=info,
      inner_aux=jax.tree.map(lambda a: a[-1], inner_aux),
      outer_aux=outer_aux,
    )
    return _common.finish(state, self.outer_optimizer, update)

  def implicit_state(self, params: PyTree) -> ImplicitState:
    """The method state at step 0: the solver's, and no stationarity scale yet."""
    dtype = _base.tree_dtype(differentiable.partition(params)[0])
    return ImplicitState(self.solver.init(params), jnp.full((), jnp.nan, dtype))

  def train(
    self, state: BilevelState, inner_args: tuple[Any, ...], outer_args: tuple[Any, ...]
  ) -> tuple[Any, ...]:
    """The inner updates, the last `unroll` of them differentiated for the unrolled part.

    Returns ``(params, opt_state, losses, inner_aux, unrolled_grads, outer_value,
    outer_aux)``; `unrolled_grads` is zero when nothing is unrolled.
    """
    raw = state.hparams
    loss_hparams, opt_hparams = self.split(raw)
    opt_state = state.inner_opt_state
    if opt_hparams:
      opt_state = unrolled.with_optimizer_hparams(opt_state, opt_hparams)
    head_length = self.inner_steps - self.unroll
    params, opt_state, losses, inner_aux = unrolled.inner_updates(
      self.inner_loss,
      self.inner_optimizer,
      state.params,
      opt_state,
      loss_hparams,
      jax.tree.map(lambda b: b[:head_length], inner_args),
      length=head_length,
      loss_has_aux=self.loss_has_aux,
    )
    if not self.unroll:
      outer_value, outer_aux = _common.value_and_aux(
        self.outer_loss, self.loss_has_aux, params, loss_hparams, *outer_args
      )
      return params, opt_state, losses, inner_aux, otu.tree_zeros_like(raw), outer_value, outer_aux
    objective = unrolled.unrolled_outer_loss(
      self.inner_loss,
      self.outer_loss,
      self.inner_optimizer,
      params,
      opt_state,
      jax.tree.map(lambda b: b[head_length:], inner_args),
      outer_args,
      length=self.unroll,
      loss_has_aux=self.loss_has_aux,
    )

    def unrolled_of_raw(raw: PyTree) -> tuple[Any, Any]:
      loss_hparams, opt_hparams = self.split(raw)
      if self.implicit:  # The implicit hypergradient covers the loss hyperparameters.
        loss_hparams = jax.lax.stop_gradient(loss_hparams)
      return objective(loss_hparams, opt_hparams)

    (outer_value, aux), grads = jax.value_and_grad(unrolled_of_raw, has_aux=True)(raw)
    params, opt_state, tail_losses, tail_aux, outer_aux = aux
    losses = jnp.concatenate([losses, tail_losses])
    return params, opt_state, losses, tail_aux, grads, outer_value, outer_aux


def _gradient_norm(
  loss: Callable[..., Any], params: PyTree, raw: PyTree, args: Sequence[Any]
) -> jax.Array:
  """``||grad_params loss(params, raw, *args)||`` over the floating leaves of `params`."""
  floating, constant = differentiable.partition(params)
  of_floating = lambda f: loss(differentiable.combine(f, constant), raw, *args)
  return otu.tree_norm(jax.grad(of_floating)(floating))


def _check_settings(
  call: str, inner_steps: int, method: str, optimizer_hparams: object, unroll_steps: object
) -> None:
  """Validates `bilevel`'s static settings."""
  _base.check_int(call, "inner_steps", inner_steps, minimum=1)
  if method not in METHODS:
    raise ValueError(f"`{call}(method=...)` must be one of {METHODS}, got {method!r}.")
  if not (
    isinstance(optimizer_hparams, tuple) and all(isinstance(k, str) for k in optimizer_hparams)
  ):
    raise TypeError(
      f"`{call}(optimizer_hparams=...)` must be a tuple of key names, got {optimizer_hparams!r}."
    )
  if unroll_steps is not None:
    if method == "implicit" and not optimizer_hparams:
      raise ValueError(
        f"`{call}(unroll_steps=...)` applies to method='unrolled' or `optimizer_hparams`; "
        "with neither, nothing is unrolled."
      )
    if not isinstance(unroll_steps, int) or not 1 <= unroll_steps <= inner_steps:
      raise ValueError(
        f"`{call}(unroll_steps=...)` must be an int in [1, inner_steps={inner_steps}], "
        f"got {unroll_steps!r}."
      )
