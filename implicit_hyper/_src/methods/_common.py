"""What every bilevel method shares: its state, its metrics, its loop type and the guard.

A method is a factory (one file in this package) returning a `Bilevel` of pure functions
over one `BilevelState`. What a method keeps beyond the weights, the hyperparameters and
the two optimiser states (a solver's state, an adjoint, SAGA tables, a restart counter,
an auxiliary inner variable) is its `method_state`, any pytree: `ih.fit` checkpoints it
without looking inside, and the loop never asks which method it runs.
"""

import numbers
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from implicit_hyper._src import validation
from implicit_hyper._src.describe import describe
from implicit_hyper._src.solvers import _base
from implicit_hyper._src.solvers._base import PyTree
from implicit_hyper._src.solvers._base import SolveInfo


class BilevelState(NamedTuple):
  """Everything a hyper step reads and writes; a pytree, so it can be checkpointed.

  Attributes:
    params: the inner parameters (trained by the inner optimiser).
    hparams: the raw (unconstrained) hyperparameters the outer optimiser updates.
    inner_opt_state: state of the inner optimiser.
    outer_opt_state: state of the outer optimiser.
    method_state: what the method keeps between hyper steps, opaque to the loop and to
      `ih.fit`: for `ih.bilevel` an `ih.ImplicitState` (the linear solver's state:
      `ih.Neumann`'s cached step, `ih.CG`'s warm start, SOBA's adjoint; and the
      stationarity's reference norm); for `ih.saba` its adjoint and tables.
    step: hyper steps taken.
    num_skipped: hyper steps skipped by the divergence guard.
  """

  params: Any
  hparams: Any
  inner_opt_state: Any
  outer_opt_state: Any
  method_state: Any
  step: jax.Array
  num_skipped: jax.Array


class BilevelMetrics(NamedTuple):
  """Scalars reported by every hyper step.

  Attributes:
    inner_loss: mean training loss over the step's inner updates.
    outer_loss: validation loss on `outer_args` after the inner updates.
    hypergrad_norm: norm of the hypergradient (or its estimate) with respect to the raw
      hyperparameters.
    residual_norm: relative residual of the linear solve (0 for a method without one).
    solver_steps: iterations of the linear solve (0 for a method without one).
    stationarity: ``||grad L_T(theta)|| / ||grad L_T(0)||`` on the last training batch at
      the weights where the hypergradient is taken (`SolveInfo.stationarity`); NaN where
      the method does not measure it (`ih.saba`, `ih.srba`, `ih.stocbio`). It stays high
      when the inner optimiser's fixed point is not the training argmin (``optax.adamw``'s
      own weight decay).
    negative_curvature: whether the solve saw a non-positive curvature ``v^T H v``.
    skipped: whether the divergence guard skipped this hyper step.
    num_skipped: hyper steps skipped so far.
    non_finite: whether the new weights or hyperparameters hold a NaN or an infinity
      (`ih.fit` warns or raises on it).
    inner_aux: with ``loss_has_aux=True``, the training loss's aux at the last inner
      update; None otherwise.
    outer_aux: with ``loss_has_aux=True``, the validation loss's aux; None otherwise.
  """

  inner_loss: jax.Array
  outer_loss: jax.Array
  hypergrad_norm: jax.Array
  residual_norm: jax.Array
  solver_steps: jax.Array
  stationarity: jax.Array
  negative_curvature: jax.Array
  skipped: jax.Array
  num_skipped: jax.Array
  non_finite: jax.Array
  inner_aux: Any = None
  outer_aux: Any = None


class Bilevel(NamedTuple):
  """A bilevel method as pure functions, run by `ih.fit` or a `jax.jit`-ed loop.

  Attributes:
    init: ``init(params, hparams) -> BilevelState``.
    step: ``step(state, inner_args, outer_args) -> (state, BilevelMetrics)``.
    constrain: ``constrain(raw_hparams)``, the values the losses and the inner
      optimiser see.
    config: the method's settings as a JSON-able dict, its name under ``"method"``
      (`ih.fit` refuses to resume a checkpoint written under other settings).
  """

  init: Callable[[PyTree, PyTree], BilevelState]
  step: Callable[[BilevelState, Sequence[Any], Sequence[Any]], tuple[BilevelState, BilevelMetrics]]
  constrain: Callable[[PyTree], PyTree]
  config: dict[str, Any]


def check_optimizer(call: str, name: str, optimizer: object) -> None:
  """Raises `TypeError` unless `optimizer` has optax's ``init`` and ``update``."""
  if not (
    callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))
  ):
    raise TypeError(
      f"`{call}({name}=...)` must be an optax.GradientTransformation, got {optimizer!r}"
    )


def check_args(
  call: str,
  inner_args: Sequence[Any],
  outer_args: Sequence[Any],
  leading: int | None,
  leading_name: str = "inner_steps",
) -> None:
  """Raises unless both are tuples and (`leading` set) `inner_args` leaves lead with `leading`."""
  validation.check_args_tuple(f"{call}.step", "inner_args", inner_args)
  validation.check_args_tuple(f"{call}.step", "outer_args", outer_args)
  if leading is None:
    return
  for path, leaf in jax.tree_util.tree_leaves_with_path(tuple(inner_args)):
    if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != leading:
      raise ValueError(
        f"`{call}` step: leaf inner_args{jax.tree_util.keystr(path)} has shape "
        f"{jnp.shape(leaf)}, but needs a leading axis of {leading_name}={leading} (one "
        "minibatch per inner update, e.g. stacked with `np.stack`)."
      )


def check_rates(call: str, **rates: "float | jax.Array | optax.Schedule | None") -> None:
  """Raises unless each step size is a number, an array or a schedule; a number must be >= 0.

  None means not given; a schedule (any callable) is only called in the step.
  """
  for name, lr in rates.items():
    if lr is None or callable(lr):
      continue
    if not isinstance(lr, numbers.Real | np.ndarray | np.generic | jax.Array):
      raise TypeError(
        f"`{call}({name}=...)` must be a number, an array or an optax schedule (a callable "
        f"of the iteration count), got {lr!r}."
      )
    _base.check_nonnegative(call, name, lr)


def rate(lr: "float | jax.Array | optax.Schedule", step: jax.Array) -> Any:
  """The step size at iteration `step`: ``lr(step)`` for a schedule, `lr` itself otherwise."""
  return lr(step) if callable(lr) else lr


def strongly_typed(tree: PyTree) -> PyTree:
  """Arrays with fixed dtypes, so that the jitted step sees the same types every call."""
  return jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.result_type(x)), tree)


def initial_state(params: PyTree, hparams: PyTree, method_state: Any) -> BilevelState:
  """The `BilevelState` at step 0 of a method that takes SGD steps on both levels.

  The method builds ``optax.sgd(rate(lr, state.step))`` in every step; its state is the
  same at every step size.
  """
  return BilevelState(
    params=params,
    hparams=hparams,
    inner_opt_state=optax.sgd(0.0).init(params),
    outer_opt_state=optax.sgd(0.0).init(hparams),
    method_state=method_state,
    step=jnp.zeros((), jnp.int32),
    num_skipped=jnp.zeros((), jnp.int32),
  )


def check_hparams(call: str, hparams: PyTree, constrain: Callable[[PyTree], PyTree]) -> PyTree:
  """Checks the raw hyperparameters and returns the constrained ones."""
  validation.check_float_tree(call, "hparams", hparams)
  try:
    return constrain(hparams)
  except ValueError as err:
    raise ValueError(f"`{call}(hparam_transform=...)` does not fit `hparams`: {err}") from err


def scalar_loss(loss: Callable[..., Any], has_aux: bool) -> Callable[..., Any]:
  """`loss` without its aux: ``(params, hparams, *args) -> scalar``."""
  return (lambda *a: loss(*a)[0]) if has_aux else loss


def value_and_aux(loss: Callable[..., Any], has_aux: bool, *args: Any) -> tuple[jax.Array, Any]:
  """``(value, aux)`` of ``loss(*args)``; aux is None when the loss has none."""
  return loss(*args) if has_aux else (loss(*args), None)


def optimizer_update(
  optimizer: optax.GradientTransformation,
  grads: PyTree,
  opt_state: optax.OptState,
  params: PyTree,
  *,
  value: jax.Array,
  value_fn: Callable[[PyTree], jax.Array],
) -> tuple[PyTree, optax.OptState]:
  """``optimizer.update``, given ``value``, ``grad`` and ``value_fn`` when it takes extra args.

  An `optax.GradientTransformationExtraArgs` (``optax.lbfgs()``'s line search,
  ``optax.contrib.reduce_on_plateau()``, ``optax.contrib.momo()``) reads them by keyword,
  as `optax` documents: the objective's value at `params`, its gradient there, and the
  objective as a function of `params`.
  """
  if isinstance(optimizer, optax.GradientTransformationExtraArgs):
    return optimizer.update(grads, opt_state, params, value=value, grad=grads, value_fn=value_fn)
  return optimizer.update(grads, opt_state, params)


def inner_oracles(
  inner_loss: Callable[..., Any], params: PyTree, raw: PyTree, args: Sequence[Any], u: PyTree
) -> tuple[jax.Array, PyTree, PyTree, PyTree]:
  """``(L_T, grad_theta L_T, H u, (d^2 L_T / d lambda d theta)^T u)`` from one VJP of the gradient.

  `inner_loss` takes ``(params, raw, *args)``: the last product is with respect to the raw
  hyperparameters. The stochastic methods' three inner oracles at one point and batch.
  """

  def gradient(p: PyTree, r: PyTree) -> tuple[PyTree, jax.Array]:
    value, grad = jax.value_and_grad(inner_loss)(p, r, *args)
    return grad, value

  grad, vjp, value = jax.vjp(gradient, params, raw, has_aux=True)
  hvp, cross = vjp(u)
  return value, grad, hvp, cross


def no_solve() -> SolveInfo:
  """The `SolveInfo` of a method that solves no linear system (zero residual, no steps)."""
  return _base.no_solve_info(jnp.float32)


class Update(NamedTuple):
  """What a method computed in one step, before the outer update and the guard.

  Attributes:
    params, inner_opt_state: the weights and inner optimiser state after the step.
    grads: the hypergradient (estimate) with respect to the raw hyperparameters.
    method_state: the method's new state; `method_state_if_skipped` replaces it when the
      guard skips the step.
    flagged: True to skip the outer update (e.g. a diverged solve); a non-finite
      `grads` is always skipped.
    inner_loss, outer_loss: the values reported in the metrics; `outer_loss` is also the
      `value` an extra-args outer optimiser reads.
    outer_value_fn: the validation loss as a function of the raw hyperparameters at the
      new weights, the `value_fn` of an extra-args outer optimiser.
    info: the solve's diagnostics (`no_solve()` for a method without one).
  """

  params: PyTree
  inner_opt_state: Any
  grads: PyTree
  method_state: Any
  method_state_if_skipped: Any
  flagged: jax.Array
  inner_loss: jax.Array
  outer_loss: jax.Array
  outer_value_fn: Callable[[PyTree], jax.Array]
  info: SolveInfo
  inner_aux: Any = None
  outer_aux: Any = None


def finish(
  state: BilevelState, outer_optimizer: optax.GradientTransformation, update: Update
) -> tuple[BilevelState, BilevelMetrics]:
  """The outer update with the divergence guard, the new state and the metrics.

  A step whose hypergradient or outer update is not finite, or that the method flagged, leaves the
  hyperparameters and outer state unchanged, puts `update.method_state_if_skipped` in
  place of the method's state, and is counted.
  """
  raw = state.hparams
  grads = update.grads
  updates, outer_state = optimizer_update(
    outer_optimizer,
    grads,
    state.outer_opt_state,
    raw,
    value=update.outer_loss,
    value_fn=update.outer_value_fn,
  )
  # An optimiser can overflow on finite gradients (its own step-size estimate): skip that too.
  finite = _base.tree_all_finite(grads) & _base.tree_all_finite(updates)
  skipped = jnp.asarray(update.flagged) | ~finite
  hparams, outer_state, method_state = otu.tree_where(
    skipped,
    (raw, state.outer_opt_state, update.method_state_if_skipped),
    (optax.apply_updates(raw, updates), outer_state, update.method_state),
  )
  num_skipped = state.num_skipped + skipped.astype(jnp.int32)
  new_state = BilevelState(
    update.params,
    hparams,
    update.inner_opt_state,
    outer_state,
    method_state,
    state.step + 1,
    num_skipped,
  )
  info = update.info
  metrics = BilevelMetrics(
    inner_loss=update.inner_loss,
    outer_loss=update.outer_loss,
    hypergrad_norm=otu.tree_norm(grads),
    residual_norm=info.residual_norm,
    solver_steps=info.num_steps,
    stationarity=info.stationarity,
    negative_curvature=info.negative_curvature,
    skipped=skipped,
    num_skipped=num_skipped,
    non_finite=~(_base.tree_all_finite(update.params) & _base.tree_all_finite(hparams)),
    inner_aux=update.inner_aux,
    outer_aux=update.outer_aux,
  )
  return new_state, metrics


def config(method: str, /, **settings: Any) -> dict[str, Any]:
  """A method's `Bilevel.config`: its name and settings, optimisers described as text."""
  return {"method": method, **{k: _setting(v) for k, v in settings.items()}}


def _setting(value: Any) -> Any:
  """`value` as JSON: optimisers and schedules as text, concrete arrays as numbers."""
  if isinstance(value, optax.GradientTransformation) or callable(value):
    # A schedule's own numbers (``lambda t: 0.1 / (t + 1)``) are in its code, not its closure.
    code = getattr(value, "__code__", None)
    constants = [c for c in getattr(code, "co_consts", ()) if isinstance(c, int | float)]
    return describe(value) + (f"{constants}" if constants else "")
  if isinstance(value, np.ndarray | np.generic | jax.Array):
    try:
      return np.asarray(value).tolist()
    except jax.errors.TracerArrayConversionError:
      return describe(value)
  return value
