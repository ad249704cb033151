"""The alternating loop of Lorraine et al. 2020 (Algorithm 1) as optax-style pure functions."""

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from implicit_hyper._src import transforms
from implicit_hyper._src import unrolled
from implicit_hyper._src import validation
from implicit_hyper._src.describe import describe
from implicit_hyper._src.hypergrad import hypergrad_with_info
from implicit_hyper._src.solvers import _base
from implicit_hyper._src.solvers._base import Matvec
from implicit_hyper._src.solvers._base import PyTree
from implicit_hyper._src.solvers._base import Solver
from implicit_hyper._src.solvers.neumann import Neumann

METHODS = ("implicit", "unrolled")


class BilevelState(NamedTuple):
  """Everything a hyper step reads and writes; a pytree, so it can be checkpointed.

  Attributes:
    params: the inner parameters (trained by the inner optimiser).
    hparams: the raw (unconstrained) hyperparameters the outer optimiser updates.
    inner_opt_state: state of the inner optimiser.
    outer_opt_state: state of the outer optimiser.
    solver_state: what the linear solver keeps between hyper steps (`ih.Neumann`'s
      cached step, `ih.CG`'s warm start); opaque to the loop.
    step: hyper steps taken.
    num_skipped: hyper steps skipped by the divergence guard.
  """

  params: Any
  hparams: Any
  inner_opt_state: Any
  outer_opt_state: Any
  solver_state: Any
  step: jax.Array
  num_skipped: jax.Array


class BilevelMetrics(NamedTuple):
  """Scalars reported by every hyper step.

  Attributes:
    inner_loss: mean training loss over the step's inner updates.
    outer_loss: validation loss on `outer_args` after the inner updates.
    hypergrad_norm: norm of the hypergradient with respect to the raw hyperparameters.
    residual_norm: relative residual of the linear solve (0 for ``method="unrolled"``).
    solver_steps: iterations of the linear solve (0 for ``method="unrolled"``).
    skipped: whether the divergence guard skipped this hyper step.
    num_skipped: hyper steps skipped so far.
  """

  inner_loss: jax.Array
  outer_loss: jax.Array
  hypergrad_norm: jax.Array
  residual_norm: jax.Array
  solver_steps: jax.Array
  skipped: jax.Array
  num_skipped: jax.Array


class Bilevel(NamedTuple):
  """The loop returned by `bilevel`.

  Attributes:
    init: ``init(params, hparams) -> BilevelState``.
    step: ``step(state, inner_args, outer_args) -> (state, BilevelMetrics)``.
    constrain: ``constrain(raw_hparams)``, the values the losses and the inner
      optimiser see.
    config: the loop's settings as a JSON-able dict (`ih.fit` refuses to resume a
      checkpoint written under other settings).
  """

  init: Callable[[PyTree, PyTree], BilevelState]
  step: Callable[[BilevelState, Sequence[Any], Sequence[Any]], tuple[BilevelState, BilevelMetrics]]
  constrain: Callable[[PyTree], PyTree]
  config: dict[str, Any]


def bilevel(
  inner_loss: Callable[..., Any],
  outer_loss: Callable[..., Any],
  inner_optimizer: optax.GradientTransformation,
  outer_optimizer: optax.GradientTransformation,
  *,
  inner_steps: int = 1,
  solver: Solver | Callable[[Matvec, PyTree], PyTree] | None = None,
  method: str = "implicit",
  hparam_transform: Any = None,
  optimizer_hparams: tuple[str, ...] = (),
  unroll_steps: int | None = None,
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

  The solver's state (`ih.Neumann`'s cached ``1 / lambda_max``, renewed every
  `refresh_every` solves; `ih.CG`'s warm start) is carried in `BilevelState.solver_state`
  without the loop knowing what it holds. A skipped hyper step resets it to
  ``solver.init(params)``: with minibatches, or while the curvature grows early in
  training, a cached Neumann step can exceed ``2 / lambda_max`` of a later Hessian, and
  the next step then re-estimates it.

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
  linear_solver: Solver = _base.as_solver(call, solver, Neumann(), symmetric=True)
  for name, opt in (("inner_optimizer", inner_optimizer), ("outer_optimizer", outer_optimizer)):
    if not (callable(getattr(opt, "init", None)) and callable(getattr(opt, "update", None))):
      raise TypeError(f"`{call}({name}=...)` must be an optax.GradientTransformation, got {opt!r}")
  implicit = method == "implicit"
  unroll = 0 if implicit and not optimizer_hparams else (unroll_steps or inner_steps)
  constrain = transforms.hparam_transformation(hparam_transform)

  def split(hparams: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """Constrained hparams -> (what the losses see, the optimiser's hyperparameters)."""
    if not optimizer_hparams:
      return hparams, {}
    rest = {k: v for k, v in hparams.items() if k not in optimizer_hparams}
    return rest, {k: hparams[k] for k in optimizer_hparams}

  def inner_of_raw(params: PyTree, raw: PyTree, *args: Any) -> Any:
    return inner_loss(params, split(constrain(raw))[0], *args)

  def outer_of_raw(params: PyTree, raw: PyTree, *args: Any) -> Any:
    return outer_loss(params, split(constrain(raw))[0], *args)

  def init(params: PyTree, hparams: PyTree) -> BilevelState:
    params, hparams = _strongly_typed(params), _strongly_typed(hparams)
    validation.check_float_tree(call, "hparams", hparams)
    if optimizer_hparams and not (
      isinstance(hparams, dict) and set(optimizer_hparams) <= hparams.keys()
    ):
      raise ValueError(
        f"`{call}(optimizer_hparams={optimizer_hparams!r})`: `hparams` must be a dict "
        f"holding these keys, got {jax.tree.structure(hparams)}."
      )
    try:
      loss_hparams, opt_hparams = split(constrain(hparams))
    except ValueError as err:
      raise ValueError(f"`{call}(hparam_transform=...)` does not fit `hparams`: {err}") from err
    inner_state = inner_optimizer.init(params)
    if optimizer_hparams:
      unrolled.check_optimizer_hparams(call, inner_state, optimizer_hparams)
      inner_state = unrolled.with_optimizer_hparams(inner_state, opt_hparams)
    return BilevelState(
      params=params,
      hparams=hparams,
      inner_opt_state=inner_state,
      outer_opt_state=outer_optimizer.init(hparams),
      solver_state=linear_solver.init(params) if implicit else None,
      step=jnp.zeros((), jnp.int32),
      num_skipped=jnp.zeros((), jnp.int32),
    )

  def step(
    state: BilevelState, inner_args: Sequence[Any], outer_args: Sequence[Any]
  ) -> tuple[BilevelState, BilevelMetrics]:
    _check_args(call, inner_args, outer_args, inner_steps)
    raw = state.hparams
    loss_hparams, opt_hparams = split(constrain(raw))
    opt_state = state.inner_opt_state
    if opt_hparams:
      opt_state = unrolled.with_optimizer_hparams(opt_state, opt_hparams)
    head = jax.tree.map(lambda b: b[: inner_steps - unroll], tuple(inner_args))
    params, opt_state, losses = unrolled.inner_updates(
      inner_loss,
      inner_optimizer,
      state.params,
      opt_state,
      loss_hparams,
      head,
      length=inner_steps - unroll,
    )
    grads = otu.tree_zeros_like(raw)
    if unroll:
      tail = jax.tree.map(lambda b: b[inner_steps - unroll :], tuple(inner_args))
      objective = unrolled.unrolled_outer_loss(
        inner_loss, outer_loss, inner_optimizer, params, opt_state, tail, outer_args, length=unroll
      )

      def unrolled_of_raw(raw: PyTree) -> tuple[Any, Any]:
        loss_hparams, opt_hparams = split(constrain(raw))
        if implicit:  # The implicit hypergradient below covers the loss hyperparameters.
          loss_hparams = jax.lax.stop_gradient(loss_hparams)
        return objective(loss_hparams, opt_hparams)

      (outer_value, (params, opt_state, tail_losses)), grads = jax.value_and_grad(
        unrolled_of_raw, has_aux=True
      )(raw)
      losses = jnp.concatenate([losses, tail_losses])
    else:
      outer_value = outer_of_raw(params, raw, *outer_args)
    solver_state = state.solver_state
    info = _base.no_solve_info(_base.tree_dtype(params))
    if implicit:
      last_args = jax.tree.map(lambda b: b[-1], tuple(inner_args))
      implicit_grads, info, solver_state = hypergrad_with_info(
        inner_of_raw,
        outer_of_raw,
        params,
        raw,
        inner_args=last_args,
        outer_args=tuple(outer_args),
        solver=linear_solver,
        solver_state=state.solver_state,
      )
      grads = otu.tree_add(grads, implicit_grads)
    skipped = info.diverged | ~_base.tree_all_finite(grads)
    updates, outer_state = outer_optimizer.update(grads, state.outer_opt_state, raw)
    # A skipped step may come from what the solver kept (a stale step size): start afresh.
    fresh = linear_solver.init(params) if implicit else None
    hparams, outer_state, solver_state = otu.tree_where(
      skipped,
      (raw, state.outer_opt_state, fresh),
      (optax.apply_updates(raw, updates), outer_state, solver_state),
    )
    num_skipped = state.num_skipped + skipped.astype(jnp.int32)
    new_state = BilevelState(
      params, hparams, opt_state, outer_state, solver_state, state.step + 1, num_skipped
    )
    metrics = BilevelMetrics(
      inner_loss=jnp.mean(losses),
      outer_loss=outer_value,
      hypergrad_norm=otu.tree_norm(grads),
      residual_norm=info.residual_norm,
      solver_steps=info.num_steps,
      skipped=skipped,
      num_skipped=num_skipped,
    )
    return new_state, metrics

  config = {
    "inner_steps": inner_steps,
    "method": method,
    "solver": repr(linear_solver),
    "hparam_transform": repr(hparam_transform),
    "optimizer_hparams": list(optimizer_hparams),
    "unroll_steps": unroll_steps,
    "inner_optimizer": describe(inner_optimizer),
    "outer_optimizer": describe(outer_optimizer),
  }
  return Bilevel(init, step, constrain, config)


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


def _check_args(
  call: str, inner_args: Sequence[Any], outer_args: Sequence[Any], inner_steps: int
) -> None:
  """Raises unless both are tuples and `inner_args` leaves lead with `inner_steps`."""
  validation.check_args_tuple("bilevel.step", "inner_args", inner_args)
  validation.check_args_tuple("bilevel.step", "outer_args", outer_args)
  for path, leaf in jax.tree_util.tree_leaves_with_path(tuple(inner_args)):
    if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != inner_steps:
      raise ValueError(
        f"`{call}` step: leaf inner_args{jax.tree_util.keystr(path)} has shape "
        f"{jnp.shape(leaf)}, but needs a leading axis of inner_steps={inner_steps} (one "
        "minibatch per inner update, e.g. stacked with `np.stack`)."
      )


def _strongly_typed(tree: PyTree) -> PyTree:
  """Arrays with fixed dtypes, so that the jitted step sees the same types every call."""
  return jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.result_type(x)), tree)
