"""`implicit_argmin` and `implicit_root`: custom VJPs from the implicit function theorem."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu
from jax.experimental import checkify

from implicit_hyper._src import operators
from implicit_hyper._src import validation
from implicit_hyper._src.solvers import _base
from implicit_hyper._src.solvers.bicgstab import BiCGStab
from implicit_hyper._src.solvers.neumann import Neumann

DIVERGENCE_POLICIES = ("warn", "raise", "ignore")


class HypergradientWarning(RuntimeWarning):
  """Issued when the linear solve behind a hypergradient diverged or is not finite."""


def implicit_argmin(inner_loss, *, solver=None, has_aux=False, on_divergence="warn"):
  r"""Decorates an inner solver so that its gradient comes from the implicit function theorem.

  The decorated ``solve(init_params, hparams, *args)`` returns (approximately)
  ``argmin_params inner_loss(params, hparams, *args)``. Reverse-mode derivatives with
  respect to `hparams` and every floating-point array in `args` are

  .. math::
    \bar\lambda = -\frac{\partial^2 L}{\partial \lambda \partial \theta}^T H^{-1} \bar\theta,
    \qquad H = \frac{\partial^2 L}{\partial \theta^2}(\theta^*),

  with ``H^{-1}`` applied by `solver` using forward-over-reverse Hessian-vector
  products; H is never materialised unless the solver (`ih.Direct`) asks for it. The
  inner solver itself is never differentiated, and may be any Python function: a
  jittable one is closure-converted (arrays it closes over get gradients through
  `inner_loss`), one that branches on concrete values (early stopping) is run as it is
  outside `jit`. `init_params` and integer arrays in `args` (labels) get zero cotangents.
  The theorem assumes ``solve`` reaches the unique minimum of a locally strongly convex
  `inner_loss`.

  Args:
    inner_loss: ``inner_loss(params, hparams, *args)`` -> scalar.
    solver: a linear solver for ``H u = v``; `ih.Neumann()` when None.
    has_aux: the solver returns ``(params, aux)``; `aux` is passed through and treated
      as constant (its cotangent is dropped).
    on_divergence: what to do when the backward solve diverges or gives non-finite
      values: "warn" (a `HypergradientWarning` from a host callback), "raise" (a
      `checkify` error: wrap the differentiated function in `checkify.checkify`), or
      "ignore".

  Returns:
    A decorator. Arguments are positional: ``solve(init_params, hparams, *args)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import implicit_hyper as ih
    >>> loss = lambda w, lam, x, y: jnp.mean((x @ w - y) ** 2) + lam * jnp.sum(w ** 2)
    >>> @ih.implicit_argmin(loss, solver=ih.CG(steps=3))
    ... def ridge(w0, lam, x, y):
    ...   n = x.shape[0]
    ...   return jnp.linalg.solve(x.T @ x / n + lam * jnp.eye(x.shape[1]), x.T @ y / n)
    >>> x, y = jnp.eye(3), jnp.ones(3)
    >>> val = lambda lam: jnp.sum(ridge(jnp.zeros(3), lam, x, y))  # 3 * (1/3) / (1/3 + lam)
    >>> round(float(jax.grad(val)(1.0)), 5)  # -1 / (1/3 + lam)^2
    -0.5625
  """
  if not callable(inner_loss):
    raise TypeError(f"`implicit_argmin(inner_loss=...)` must be callable, got {inner_loss!r}.")
  solver = Neumann() if solver is None else solver
  validation.check_solver("implicit_argmin", solver, symmetric=True)

  def check_inputs(init_params, hparams, args):
    validation.check_scalar_loss(
      "implicit_argmin", "inner_loss", inner_loss, init_params, hparams, *args
    )

  return _decorator(
    "implicit_argmin",
    inner_loss,
    argmin=True,
    check_inputs=check_inputs,
    solver=solver,
    has_aux=has_aux,
    on_divergence=on_divergence,
  )


def implicit_root(
  optimality_fn, *, solver=None, has_aux=False, on_divergence="warn", symmetric=False
):
  r"""Decorates a solver of ``optimality_fn(params, hparams, *args) = 0`` with implicit gradients.

  For a root ``theta*`` of F (a fixed point ``F = T(theta) - theta``, a KKT system),

  .. math::
    \bar\lambda = -\frac{\partial F}{\partial \lambda}^T A^{-T} \bar\theta,
    \qquad A = \frac{\partial F}{\partial \theta}(\theta^*),

  where products with ``A^T`` are VJPs of F. A need not be symmetric, so the default
  solver is `ih.BiCGStab()` and solvers that need symmetry (`ih.CG`, `ih.Neumann`
  with automatic alpha) are rejected unless ``symmetric=True``.

  Args:
    optimality_fn: ``F(params, hparams, *args)``, returning a pytree shaped like params.
    solver: a linear solver; `ih.BiCGStab()` when None.
    has_aux: the solver returns ``(params, aux)``; `aux` is treated as constant.
    on_divergence: "warn", "raise" (through `checkify`) or "ignore"; see
      `implicit_argmin`.
    symmetric: promise that ``dF/dparams`` is symmetric, allowing symmetric-only solvers.

  Returns:
    A decorator for ``solve(init_params, hparams, *args)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import implicit_hyper as ih
    >>> fixed_point = lambda x, a: 0.5 * jnp.cos(x) + a - x        # x = 0.5 cos x + a
    >>> @ih.implicit_root(fixed_point)
    ... def iterate(x0, a):
    ...   return jax.lax.fori_loop(0, 100, lambda _, x: 0.5 * jnp.cos(x) + a, x0)
    >>> x = iterate(0.0, 1.0)
    >>> g = jax.grad(lambda a: iterate(0.0, a))(1.0)
    >>> bool(jnp.isclose(g, 1.0 / (1.0 + 0.5 * jnp.sin(x))))   # dx/da = 1 / (1 + sin(x)/2)
    True
  """
  if not callable(optimality_fn):
    raise TypeError(f"`implicit_root(optimality_fn=...)` must be callable, got {optimality_fn!r}.")
  solver = BiCGStab() if solver is None else solver
  validation.check_solver("implicit_root", solver, symmetric=symmetric)

  def check_inputs(init_params, hparams, args):
    out = jax.eval_shape(optimality_fn, init_params, hparams, *args)
    validation.check_same_structure(
      "implicit_root", "the output of `optimality_fn`", out, init_params, "`init_params`"
    )

  return _decorator(
    "implicit_root",
    optimality_fn,
    argmin=False,
    check_inputs=check_inputs,
    solver=solver,
    has_aux=has_aux,
    on_divergence=on_divergence,
  )


def _decorator(call, fn, *, argmin, check_inputs, solver, has_aux, on_divergence):
  """Builds the decorator shared by `implicit_argmin` (fn is the loss) and `implicit_root`."""
  if on_divergence not in DIVERGENCE_POLICIES:
    raise ValueError(
      f"`{call}(on_divergence=...)` must be one of {DIVERGENCE_POLICIES}, got {on_divergence!r}."
    )

  @functools.partial(jax.jit, static_argnums=0)
  def backward(fn, params, hparams, args, cotangent):
    if argmin:
      matvec = operators.hessian_vector_product(fn, params, hparams, args)
      optimality_fn = jax.grad(fn)
    else:
      matvec = operators.jacobian_transpose_product(fn, params, hparams, args)
      optimality_fn = fn
    u, info = solver.solve(matvec, cotangent)
    vjp = operators.mixed_vjp(optimality_fn, params, hparams, args)
    hparams_bar, args_bar = vjp(otu.tree_scale(-1.0, u))
    float_args_bar = [a for a in jax.tree.leaves(args_bar) if a.dtype != jax.dtypes.float0]
    ok = _base.tree_all_finite(hparams_bar) & _base.tree_all_finite(float_args_bar)
    _report(call, info._replace(diverged=info.diverged | ~ok), on_divergence)
    return hparams_bar, args_bar

  def decorator(inner_solver):
    def run(solver_fn, init_params, hparams, args, solver_consts):
      out = solver_fn(init_params, hparams, *args, *solver_consts)
      params = out[0] if has_aux else out
      name = "the inner solver's output" + (" params" if has_aux else "")
      validation.check_same_structure(call, name, params, init_params, "`init_params`")
      return out

    # `fn` and `solver_fn` are closure-converted: arrays they close over that JAX may
    # differentiate are explicit inputs (`args` holds the loss's after the user's own),
    # so gradients reach them and no tracer leaks into the backward pass.
    @functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
    def solve(fn, solver_fn, num_args, init_params, hparams, args, solver_consts):
      return run(solver_fn, init_params, hparams, args[:num_args], solver_consts)

    def solve_fwd(fn, solver_fn, num_args, init_params, hparams, args, solver_consts):
      out = run(solver_fn, init_params, hparams, args[:num_args], solver_consts)
      return out, (out[0] if has_aux else out, hparams, args, solver_consts)

    def solve_bwd(fn, solver_fn, num_args, residuals, out_bar):
      params, hparams, args, solver_consts = residuals
      hparams_bar, args_bar = backward(
        fn, params, hparams, args, out_bar[0] if has_aux else out_bar
      )
      # The solution depends on the solver's own constants only through `fn` (the theorem).
      consts_bar = jax.tree.map(_zero_cotangent, solver_consts)
      return jax.tree.map(_zero_cotangent, params), hparams_bar, args_bar, consts_bar

    solve.defvjp(solve_fwd, solve_bwd)

    @functools.wraps(inner_solver)
    def wrapper(init_params, hparams, *args, **kwargs):
      validation.check_no_kwargs(call, kwargs)
      validation.check_float_tree(call, "hparams", hparams)
      check_inputs(init_params, hparams, args)
      fn_converted, fn_consts = jax.closure_convert(fn, init_params, hparams, *args)
      try:
        solver_converted, solver_consts = jax.closure_convert(
          inner_solver, init_params, hparams, *args
        )
      except jax.errors.ConcretizationTypeError:
        # The solver branches on values (early stopping in a Python loop): it can only be
        # run eagerly, as it is; then it must not close over arrays being differentiated.
        solver_converted, solver_consts = inner_solver, ()
      return solve(
        fn_converted,
        solver_converted,
        len(args),
        init_params,
        hparams,
        (*args, *fn_consts),
        tuple(solver_consts),
      )

    return wrapper

  return decorator


def _zero_cotangent(x):
  if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(jnp.shape(x), jax.dtypes.float0)


def _report(call, info, policy):
  if policy == "warn":
    jax.debug.callback(
      functools.partial(_warn_if_diverged, call), info.diverged, info.residual_norm
    )
  elif policy == "raise":
    checkify.check(
      ~jnp.any(info.diverged),
      f"{call}: the linear solve behind the hypergradient diverged (relative residual "
      "{residual}); the hypergradient is not to be trusted.",
      residual=jnp.max(info.residual_norm),
    )


def _warn_if_diverged(call, diverged, residual_norm):
  if np.any(diverged):
    warnings.warn(
      f"{call}: the linear solve behind the hypergradient diverged or is not finite "
      f"(relative residual {np.max(residual_norm):.3g}); the hypergradient is not to be "
      "trusted. Remedies: a smaller Neumann alpha, a `ridge`, `ih.CG`, or solving the "
      "inner problem closer to a minimum (the Hessian must be positive definite).",
      HypergradientWarning,
      stacklevel=2,
    )
