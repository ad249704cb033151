"""Unrolled differentiation: reverse mode through the last inner optimiser steps.

The implicit function theorem only covers hyperparameters that enter the training loss.
Hyperparameters of the optimiser itself (a learning rate, a momentum) act through the
training trajectory, so their hypergradient comes from differentiating that trajectory:
truncated back-propagation through the last T steps (Lorraine et al. 2020, Section 2;
Shaban et al. 2019), each step rematerialised with `jax.checkpoint`.
"""

from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from implicit_hyper._src import validation
from implicit_hyper._src.methods import _common
from implicit_hyper._src.solvers._base import PyTree


def inner_updates(
  inner_loss: Callable[..., Any],
  optimizer: optax.GradientTransformation,
  params: PyTree,
  opt_state: optax.OptState,
  hparams: PyTree,
  inner_args: Sequence[Any],
  *,
  length: int | None = None,
  remat: bool = False,
  loss_has_aux: bool = False,
) -> tuple[PyTree, optax.OptState, jax.Array, Any]:
  """Runs one optimiser step per leading-axis slice of `inner_args`, in a `jax.lax.scan`.

  Each step is ``params <- params + optimizer.update(grad inner_loss(params, hparams,
  *args_t))``; an `optax.GradientTransformationExtraArgs` (``optax.lbfgs()``) also gets
  ``value``, ``grad`` and ``value_fn`` (the step's training loss as a function of the
  weights). With ``remat=True`` each step is wrapped in `jax.checkpoint`, so reverse mode
  stores only the carry of every step and recomputes the rest. `length` gives the number
  of steps when `inner_args` has no arrays (a loss without data). With
  ``loss_has_aux=True`` the loss returns ``(loss, aux)``.

  Returns:
    ``(params, opt_state, losses, aux)``; `losses` holds the training loss before each
    step, `aux` the stacked aux of every step (None without aux).
  """

  def one_step(
    carry: tuple[PyTree, optax.OptState], args: tuple[Any, ...]
  ) -> tuple[tuple[PyTree, optax.OptState], tuple[jax.Array, Any]]:
    params, opt_state = carry
    (loss, aux), grads = jax.value_and_grad(
      lambda p: _common.value_and_aux(inner_loss, loss_has_aux, p, hparams, *args), has_aux=True
    )(params)
    updates, opt_state = _common.optimizer_update(
      optimizer,
      grads,
      opt_state,
      params,
      value=loss,
      value_fn=lambda p: _common.scalar_loss(inner_loss, loss_has_aux)(p, hparams, *args),
    )
    return (optax.apply_updates(params, updates), opt_state), (loss, aux)

  if remat:
    one_step = jax.checkpoint(one_step, prevent_cse=False)
  (params, opt_state), (losses, aux) = jax.lax.scan(
    one_step, (params, opt_state), tuple(inner_args), length=length
  )
  return params, opt_state, losses, aux


def check_optimizer_hparams(call: str, opt_state: optax.OptState, names: Iterable[str]) -> None:
  """Raises unless `opt_state` is an `optax.inject_hyperparams` state with numeric `names`."""
  hyperparams = getattr(opt_state, "hyperparams", None)
  if not isinstance(hyperparams, dict):
    raise ValueError(
      f"`{call}`: tuning optimiser hyperparameters {sorted(names)} needs an inner optimiser "
      "built with `optax.inject_hyperparams`, e.g. "
      "`optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)`, at the top level; its "
      f"state is a {type(opt_state).__name__}."
    )
  scheduled = getattr(opt_state, "hyperparams_states", {})
  for name in names:
    if name not in hyperparams or name in scheduled:
      raise ValueError(
        f"`{call}`: {name!r} is not a numeric hyperparameter of the inner optimiser; it has "
        f"{sorted(k for k in hyperparams if k not in scheduled)} (schedules cannot be tuned)."
      )


def with_optimizer_hparams(opt_state: Any, values: dict[str, Any]) -> Any:
  """Writes `values` (a dict) into an `optax.inject_hyperparams` state, keeping dtypes."""
  hyperparams = dict(opt_state.hyperparams)
  for name, value in values.items():
    hyperparams[name] = jnp.asarray(value).astype(jnp.result_type(hyperparams[name]))
  return opt_state._replace(hyperparams=hyperparams)


def unrolled_outer_loss(
  inner_loss: Callable[..., Any],
  outer_loss: Callable[..., Any],
  optimizer: optax.GradientTransformation,
  params: PyTree,
  opt_state: optax.OptState,
  inner_args: Sequence[Any],
  outer_args: Sequence[Any],
  *,
  length: int | None = None,
  loss_has_aux: bool = False,
) -> Callable[[PyTree, dict[str, Any]], tuple[Any, tuple[Any, ...]]]:
  """The truncated unrolled objective as a function of the hyperparameters.

  Returns ``f(hparams, opt_hparams) -> (outer_loss(params_T, hparams, *outer_args), aux)``
  where ``params_T`` follows T rematerialised optimiser steps (the leading axis of
  `inner_args`, or `length`) from `params` (held constant, the truncation),
  `opt_hparams` (a dict, possibly empty) is written into `opt_state` first, and
  ``aux = (params_T, opt_state_T, losses, inner_aux, outer_aux)`` (the losses' aux with
  ``loss_has_aux=True``, else None).
  """

  def objective(hparams: PyTree, opt_hparams: dict[str, Any]) -> tuple[Any, tuple[Any, ...]]:
    state = with_optimizer_hparams(opt_state, opt_hparams) if opt_hparams else opt_state
    params_t, state_t, losses, inner_aux = inner_updates(
      inner_loss,
      optimizer,
      params,
      state,
      hparams,
      inner_args,
      length=length,
      remat=True,
      loss_has_aux=loss_has_aux,
    )
    value, outer_aux = _common.value_and_aux(
      outer_loss, loss_has_aux, params_t, hparams, *outer_args
    )
    return value, (params_t, state_t, losses, inner_aux, outer_aux)

  return objective


def unrolled_hypergrad(
  inner_loss: Callable[..., Any],
  outer_loss: Callable[..., Any],
  inner_optimizer: optax.GradientTransformation,
  params: PyTree,
  hparams: PyTree,
  *,
  inner_args: Sequence[Any],
  outer_args: Sequence[Any] = (),
  opt_state: optax.OptState | None = None,
  opt_hparams: dict[str, Any] | None = None,
) -> tuple[PyTree, dict[str, Any] | None]:
  r"""The hypergradient by reverse mode through T inner optimiser steps.

  With :math:`\theta_{t+1} = \theta_t + u(\nabla_\theta L_T(\theta_t, \lambda; x_t),
  s_t; \eta)` for the optimiser update u with hyperparameters :math:`\eta`,

  .. math::
    \frac{d}{d(\lambda, \eta)} L_V(\theta_T(\lambda, \eta), \lambda),

  computed by `jax.grad` through a `jax.lax.scan` whose steps are `jax.checkpoint`-ed:
  memory grows with T only by one parameter vector per step. :math:`\theta_0` and the
  optimiser state are constants (truncated back-propagation).

  Args:
    inner_loss: ``inner_loss(params, hparams, *args)`` -> scalar (training).
    outer_loss: ``outer_loss(params, hparams, *outer_args)`` -> scalar (validation).
    inner_optimizer: an `optax.GradientTransformation`; to differentiate its own
      hyperparameters, build it with `optax.inject_hyperparams`.
    params: the starting parameters :math:`\theta_0`.
    hparams: the loss hyperparameters :math:`\lambda`.
    inner_args: a tuple of the training loss's extra arguments whose leaves have a
      leading axis of length T, one slice per step.
    outer_args: the validation loss's extra arguments (a tuple).
    opt_state: the optimiser state at :math:`\theta_0`; ``inner_optimizer.init(params)``
      when None.
    opt_hparams: a dict of numeric `inject_hyperparams` hyperparameters :math:`\eta` to
      differentiate, e.g. ``{"learning_rate": 0.1}``; None for none.

  Returns:
    ``(d/d hparams, d/d opt_hparams)``; the second is None when `opt_hparams` is None.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import implicit_hyper as ih
    >>> inner = lambda w, lam, x: 0.5 * jnp.sum((w - x) ** 2)
    >>> outer = lambda w, lam: 0.5 * jnp.sum(w ** 2)
    >>> sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=0.5)
    >>> _, d_lr = ih.unrolled_hypergrad(inner, outer, sgd, jnp.zeros(1), jnp.zeros(()),
    ...   inner_args=(jnp.ones((1, 1)),), opt_hparams={"learning_rate": 0.5})
    >>> float(d_lr["learning_rate"])  # one step: w = lr, outer = lr^2 / 2
    0.5
  """
  call = "unrolled_hypergrad"
  opt_state = inner_optimizer.init(params) if opt_state is None else opt_state
  if opt_hparams is not None:
    check_optimizer_hparams(call, opt_state, opt_hparams)
  validation.check_args_tuple(call, "inner_args", inner_args)
  validation.check_args_tuple(call, "outer_args", outer_args)
  objective = unrolled_outer_loss(
    inner_loss, outer_loss, inner_optimizer, params, opt_state, inner_args, outer_args
  )
  grads, _ = jax.grad(objective, argnums=(0, 1), has_aux=True)(hparams, opt_hparams or {})
  return grads[0], (None if opt_hparams is None else grads[1])
