"""The alternating loop of Lorraine et al. 2020 (Algorithm 1) as optax-style pure functions."""

import dataclasses
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from implicit_hyper._src import operators
from implicit_hyper._src import spectral
from implicit_hyper._src import transforms
from implicit_hyper._src import unrolled
from implicit_hyper._src import validation
from implicit_hyper._src.hypergrad import hypergrad_and_adjoint
from implicit_hyper._src.solvers import _base
from implicit_hyper._src.solvers.neumann import Neumann

METHODS = ("implicit", "unrolled")


class BilevelState(NamedTuple):
  """Everything a hyper step reads and writes; a pytree, so it can be checkpointed.

  Attributes:
    params: the inner parameters (trained by the inner optimiser).
    hparams: the raw (unconstrained) hyperparameters the outer optimiser updates.
    inner_opt_state: state of the inner optimiser.
    outer_opt_state: state of the outer optimiser.
    adjoint: the last solve's ``u ~ H^{-1} dL_V/d params``, the next warm start; None
      when the solver takes no warm start.
    neumann_alpha: the cached Neumann step ``1 / lambda_max`` (NaN until the first
      estimate, and when unused).
    step: hyper steps taken.
    num_skipped: hyper steps skipped by the divergence guard.
  """

  params: Any
  hparams: Any
  inner_opt_state: Any
  outer_opt_state: Any
  adjoint: Any
  neumann_alpha: jax.Array
  step: jax.Array
  num_skipped: jax.Array


class BilevelMetrics(NamedTuple):
  """Scalars reported by every hyper step.

  Attributes:
    inner_loss: mean training loss over the step's inner updates.
    outer_loss: validation loss on `outer_batch` after the inner updates.
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
  """The loop returned by `bilevel`: ``init(params, hparams)``, ``step(state, inner_batches,
  outer_batch) -> (state, metrics)``, and ``constrain(raw_hparams)``, the hyperparameter
  values the losses and the inner optimiser see."""

  init: Callable
  step: Callable
  constrain: Callable


def bilevel(
  inner_loss,
  outer_loss,
  inner_optimizer: optax.GradientTransformation,
  outer_optimizer: optax.GradientTransformation,
  *,
  inner_steps: int = 1,
  solver=None,
  method: str = "implicit",
  hparam_transform=None,
  optimizer_hparams: tuple[str, ...] = (),
  unroll_steps: int | None = None,
  refresh_every: int = 10,
  warm_start: bool = True,
) -> Bilevel:
  r"""Alternating bilevel training: `inner_steps` optimiser steps, then one hyper step.

  Algorithm 1 of Lorraine et al. (2020): train the weights, then at the current weights
  take the implicit-function-theorem hypergradient

  .. math::
    \frac{d L_V}{d \lambda} = \frac{\partial L_V}{\partial \lambda}
      - \frac{\partial^2 L_T}{\partial \lambda \partial \theta}^T
        H^{-1} \frac{\partial L_V}{\partial \theta}

  with H and the mixed term on a training minibatch (the last of `inner_batches`) and
  the direct term on a validation minibatch (`outer_batch`), and update :math:`\lambda`
  with `outer_optimizer`. One `step` is one `jax.lax.scan` of inner updates and one hyper
  update; `jax.jit` it. A hyper step whose hypergradient is not finite, or whose solve
  reports `diverged`, leaves the hyperparameters and outer state unchanged and is
  counted (`BilevelMetrics.skipped`, `num_skipped`).

  For `ih.Neumann` without `alpha`, ``1 / lambda_max`` is estimated by power iteration
  every `refresh_every` hyper steps and cached in the state; other solvers start from
  the previous hyper step's adjoint (`warm_start`). With minibatches, or while the
  curvature grows early in training, a cached step can exceed ``2 / lambda_max`` of a
  later Hessian; such solves report `diverged`, are skipped, and the step is re-estimated
  at the next hyper step (lower `refresh_every` or pass ``Neumann(alpha=...)`` if that
  is common).

  Args:
    inner_loss: ``inner_loss(params, hparams, batch)`` -> scalar training loss.
    outer_loss: ``outer_loss(params, hparams, batch)`` -> scalar validation loss.
    inner_optimizer: any `optax.GradientTransformation` for the parameters.
    outer_optimizer: any `optax.GradientTransformation` for the raw hyperparameters.
    inner_steps: inner updates per hyper step; `step`'s `inner_batches` carry a
      leading axis of this length.
    solver: linear solver of the implicit hypergradient; `ih.Neumann()` when None.
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
    refresh_every: M, hyper steps between estimates of the Neumann step.
    warm_start: start the solve from the previous adjoint (ignored by `ih.Neumann`).

  Returns:
    A `Bilevel` of pure functions.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import implicit_hyper as ih
    >>> x, y = jnp.eye(4), jnp.arange(4.0)
    >>> train = lambda w, decay, b: jnp.mean((b[0] @ w - b[1]) ** 2) + decay * w @ w
    >>> valid = lambda w, decay, b: jnp.mean((b[0] @ w - 0.5 * b[1]) ** 2)
    >>> loop = ih.bilevel(train, valid, optax.sgd(1.0), optax.adam(0.1), inner_steps=10,
    ...                   solver=ih.CG(steps=4), hparam_transform="exp")
    >>> state = loop.init(jnp.zeros(4), jnp.log(0.01))
    >>> step = jax.jit(loop.step)
    >>> batches = (jnp.stack([x] * 10), jnp.stack([y] * 10))
    >>> for _ in range(100):
    ...   state, metrics = step(state, batches, (x, y))
    >>> round(float(loop.constrain(state.hparams)), 2)  # the best decay is 1/4
    0.25

  References:
    Lorraine, Vicol & Duvenaud, "Optimizing Millions of Hyperparameters by Implicit
    Differentiation", AISTATS 2020. https://arxiv.org/abs/1911.02590
  """
  call = "bilevel"
  _check_settings(call, inner_steps, method, optimizer_hparams, unroll_steps, refresh_every)
  solver = Neumann() if solver is None else solver
  validation.check_solver(call, solver, symmetric=True)
  for name, opt in (("inner_optimizer", inner_optimizer), ("outer_optimizer", outer_optimizer)):
    if not (callable(getattr(opt, "init", None)) and callable(getattr(opt, "update", None))):
      raise TypeError(f"`{call}({name}=...)` must be an optax.GradientTransformation, got {opt!r}")
  implicit = method == "implicit"
  unroll = 0 if implicit and not optimizer_hparams else (unroll_steps or inner_steps)
  cache_alpha = implicit and isinstance(solver, Neumann) and solver.alpha is None
  keep_adjoint = implicit and warm_start and not isinstance(solver, Neumann)
  constrain = transforms.hparam_transformation(hparam_transform)

  def split(hparams):
    """Constrained hparams -> (what the losses see, the optimiser's hyperparameters)."""
    if not optimizer_hparams:
      return hparams, {}
    rest = {k: v for k, v in hparams.items() if k not in optimizer_hparams}
    return rest, {k: hparams[k] for k in optimizer_hparams}

  def inner_of_raw(params, raw, batch):
    return inner_loss(params, split(constrain(raw))[0], batch)

  def outer_of_raw(params, raw, batch):
    return outer_loss(params, split(constrain(raw))[0], batch)

  def init(params, hparams) -> BilevelState:
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
    dtype = jnp.result_type(*jax.tree.leaves(params))
    return BilevelState(
      params=params,
      hparams=hparams,
      inner_opt_state=inner_state,
      outer_opt_state=outer_optimizer.init(hparams),
      adjoint=otu.tree_zeros_like(params) if keep_adjoint else None,
      neumann_alpha=jnp.full((), jnp.nan, dtype),
      step=jnp.zeros((), jnp.int32),
      num_skipped=jnp.zeros((), jnp.int32),
    )

  def neumann_alpha(state, params, train_batch):
    """The cached Neumann step, re-estimated every `refresh_every` hyper steps."""

    def estimate():
      matvec = operators.hessian_vector_product(inner_of_raw, params, state.hparams, (train_batch,))
      key = jax.random.fold_in(jax.random.PRNGKey(0), state.step)
      lam = spectral.max_eigenvalue(matvec, params, num_iters=solver.power_iterations, key=key)
      lam = lam + solver.ridge
      good = jnp.isfinite(lam) & (lam > 0)
      return jnp.where(good, 1.0 / jnp.where(good, lam, 1.0), state.neumann_alpha).astype(
        state.neumann_alpha.dtype
      )

    due = (state.step % refresh_every == 0) | ~jnp.isfinite(state.neumann_alpha)
    return jax.lax.cond(due, estimate, lambda: state.neumann_alpha)

  def step(state: BilevelState, inner_batches, outer_batch):
    _check_batches(call, inner_batches, inner_steps)
    raw = state.hparams
    loss_hparams, opt_hparams = split(constrain(raw))
    opt_state = state.inner_opt_state
    if opt_hparams:
      opt_state = unrolled.with_optimizer_hparams(opt_state, opt_hparams)
    head = jax.tree.map(lambda b: b[: inner_steps - unroll], inner_batches)
    params, opt_state, losses = unrolled.inner_updates(
      inner_loss, inner_optimizer, state.params, opt_state, loss_hparams, head
    )
    grads = otu.tree_zeros_like(raw)
    if unroll:
      tail = jax.tree.map(lambda b: b[inner_steps - unroll :], inner_batches)
      objective = unrolled.unrolled_outer_loss(
        outer_loss, inner_loss, inner_optimizer, params, opt_state, tail, outer_batch
      )

      def unrolled_of_raw(raw):
        loss_hparams, opt_hparams = split(constrain(raw))
        if implicit:  # The implicit hypergradient below covers the loss hyperparameters.
          loss_hparams = jax.lax.stop_gradient(loss_hparams)
        return objective(loss_hparams, opt_hparams)

      (outer_value, (params, opt_state, tail_losses)), grads = jax.value_and_grad(
        unrolled_of_raw, has_aux=True
      )(raw)
      losses = jnp.concatenate([losses, tail_losses])
    else:
      outer_value = outer_of_raw(params, raw, outer_batch)
    alpha, adjoint = state.neumann_alpha, state.adjoint
    info = _base.SolveInfo(jnp.zeros(()), jnp.zeros((), jnp.int32), jnp.array(False))
    if implicit:
      train_batch = jax.tree.map(lambda b: b[-1], inner_batches)
      step_solver = solver
      if cache_alpha:
        alpha = neumann_alpha(state, params, train_batch)
        step_solver = dataclasses.replace(solver, alpha=alpha)
      implicit_grads, info, new_adjoint = hypergrad_and_adjoint(
        outer_of_raw,
        inner_of_raw,
        params,
        raw,
        inner_args=(train_batch,),
        outer_args=(outer_batch,),
        solver=step_solver,
        init=state.adjoint,
      )
      grads = otu.tree_add(grads, implicit_grads)
      adjoint = new_adjoint if keep_adjoint else None
    skipped = info.diverged | ~_base.tree_all_finite(grads)
    updates, outer_state = outer_optimizer.update(grads, state.outer_opt_state, raw)
    hparams, outer_state, adjoint = otu.tree_where(
      skipped,
      (raw, state.outer_opt_state, state.adjoint),
      (optax.apply_updates(raw, updates), outer_state, adjoint),
    )
    num_skipped = state.num_skipped + skipped.astype(jnp.int32)
    if cache_alpha:  # A skipped step may mean a stale step size: re-estimate it next time.
      alpha = jnp.where(skipped, jnp.nan, alpha).astype(state.neumann_alpha.dtype)
    new_state = BilevelState(
      params, hparams, opt_state, outer_state, adjoint, alpha, state.step + 1, num_skipped
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

  return Bilevel(init, step, constrain)


def _check_settings(call, inner_steps, method, optimizer_hparams, unroll_steps, refresh_every):
  """Validates `bilevel`'s static settings."""
  for name, value in (("inner_steps", inner_steps), ("refresh_every", refresh_every)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"`{call}({name}=...)` must be an int >= 1, got {value!r}.")
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


def _check_batches(call, inner_batches, inner_steps):
  """Raises unless every leaf of `inner_batches` has a leading axis of `inner_steps`."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(inner_batches):
    if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != inner_steps:
      raise ValueError(
        f"`{call}` step: leaf inner_batches{jax.tree_util.keystr(path)} has shape "
        f"{jnp.shape(leaf)}, but needs a leading axis of inner_steps={inner_steps} (one "
        "minibatch per inner update, e.g. stacked with `np.stack`)."
      )


def _strongly_typed(tree):
  """Arrays with fixed dtypes, so that the jitted step sees the same types every call."""
  return jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.result_type(x)), tree)
