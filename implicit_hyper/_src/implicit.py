"""`implicit_argmin`, `implicit_root`, `implicit_fixed_point`: decorators for inner solvers."""

from collections.abc import Callable
from typing import Any

import jax
import optax.tree_utils as otu

from implicit_hyper._src import decorator
from implicit_hyper._src import differentiable
from implicit_hyper._src import trust
from implicit_hyper._src import validation
from implicit_hyper._src.solvers import resolve
from implicit_hyper._src.solvers._base import PyTree
from implicit_hyper._src.solvers._base import SolverLike
from implicit_hyper._src.solvers.bicgstab import BiCGStab
from implicit_hyper._src.solvers.cg import CG
from implicit_hyper._src.trust import HypergradientWarning as HypergradientWarning

# The backward solve when none is given: a decorated inner solver claims a solution, so
# its derivative is meant to be exact. A Krylov method at its default `tol` (1e-10 in
# float64) within a budget that converges on well-posed problems of a few hundred
# unknowns (condition numbers in the hundreds); one that does not get there is flagged.
# CG for the symmetric Hessian of `implicit_argmin`, BiCGStab (two products a step) for
# the general Jacobians of `implicit_root` and `implicit_fixed_point`.
DEFAULT_ARGMIN_SOLVER = CG(steps=100)
DEFAULT_ROOT_SOLVER = BiCGStab(steps=100)


def implicit_argmin(
  inner_loss: Callable[..., Any],
  *,
  solver: "SolverLike | None" = None,
  has_aux: bool = False,
  loss_has_aux: bool = False,
  on_failure: str = "warn",
  tol: float | None = None,
  stationarity_tol: float | None = trust.DEFAULT_STATIONARITY_TOL,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
  r"""Decorates an inner solver so that its derivatives come from the implicit function theorem.

  The decorated ``solve(init_params, hparams, *args, **kwargs)`` returns (approximately)
  ``argmin_params inner_loss(params, hparams, *args, **kwargs)``. Its derivatives in
  every mode (`jax.grad`, `jax.jvp`, `jax.jacfwd`, `jax.hessian`), with respect to
  `hparams` and every floating-point array in `args` and `kwargs`, are those of

  .. math::
    \dot\theta = -H^{-1} \frac{\partial^2 L}{\partial \theta \partial \lambda} \dot\lambda,
    \qquad H = \frac{\partial^2 L}{\partial \theta^2}(\theta^*),

  with ``H^{-1}`` applied by `solver` using forward-over-reverse Hessian-vector products
  (in reverse mode, the transposed solve :math:`H u = \bar\theta` followed by one mixed
  product). The inner solver is never differentiated: it runs exactly as it would
  undecorated (Python loops, early stopping, iterators, globals) on inputs whose
  derivatives are stopped. Non-array arguments (strings, Python ints) are static.
  The theorem assumes ``solve`` reaches the unique minimum of a locally strongly convex
  `inner_loss`.

  How a call is split, as jaxopt allows it:

  - ``init_params`` may be None for an inner solver that ignores it (a closed form);
    stationarity is then measured from zero.
  - ``hparams`` may be given by keyword under the name of the inner solver's second
    parameter: ``ridge(None, l2reg=1.0, data=(x, y))``.
  - Keyword arguments reach the inner solver as given, and `inner_loss` only those its
    signature accepts (all of them if it takes ``**kwargs``): a setting for the solver
    alone, such as ``steps=100``, is a keyword the loss does not name. Those get no
    derivative.
  - Leaves of the solution that are not floating point (a PRNG key, typed or
    ``uint32``; a step counter) are constants: returned as the inner solver gave them.

  A loss with `jax.lax.stop_gradient` inside it (a bootstrapped TD target, a
  stop-gradient EMA teacher) gives a wrong hypergradient, even with `ih.Direct()`: the
  inner solver stops where the stopped gradient vanishes, but the derivative of that
  stopped gradient is not the derivative of the condition it solves. Write the
  condition out without `stop_gradient` and use `implicit_root` (see the FAQ).

  Args:
    inner_loss: ``inner_loss(params, hparams, *args, **kwargs)`` -> scalar.
    solver: a linear solver for ``H u = v``, or a function ``solve(matvec, b) -> x``;
      ``ih.CG(steps=100)`` when None (flagged when it misses its tolerance).
    has_aux: the solver returns ``(params, aux)``; `aux` is passed through as constant.
    loss_has_aux: `inner_loss` returns ``(loss, aux)``, as for
      ``jax.value_and_grad(has_aux=True)``; `aux` is ignored here.
    on_failure: what to do when a derivative is not to be trusted: the backward solve
      diverged, saw negative curvature or missed `tol`, or the inner solution is not
      stationary: "warn" (a `HypergradientWarning` at the caller's line), "raise" (a
      `HypergradientError` from the host callback; under `jax.jit` JAX re-raises it as
      a runtime error carrying its message), or "ignore". `ih.record_solves` collects
      every solve's `SolveInfo` whatever the policy.
    tol: also flag backward solves whose relative residual exceeds `tol`.
    stationarity_tol: flag inner solutions whose relative stationarity
      ``||grad L(theta*)|| / max(||H theta*||, ||grad L(theta_0)||)`` exceeds this
      (None: no check).

  Returns:
    A decorator.

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
    >>> round(float(jax.jvp(val, (1.0,), (1.0,))[1]), 5)  # forward mode: the same
    -0.5625
  """
  call = "implicit_argmin"
  decorator.check_callable(call, "inner_loss", inner_loss)
  solver = resolve.as_solver(call, solver, DEFAULT_ARGMIN_SOLVER, symmetric=True)
  loss = validation.loss_value(call, "inner_loss", inner_loss, loss_has_aux)

  def condition(params: PyTree, hparams: PyTree, *args: Any, **kwargs: Any) -> PyTree:
    floating, constant = differentiable.partition(params)
    value = lambda f: loss(differentiable.combine(f, constant), hparams, *args, **kwargs)
    return jax.grad(value)(floating)

  def check(params: PyTree, hparams: PyTree, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    validation.check_scalar_loss(call, "inner_loss", loss, params, hparams, *args, **kwargs)

  checks = trust.Checks(on_failure, tol, stationarity_tol).validate(call)
  return decorator.decorator(call, inner_loss, condition, check, solver, True, has_aux, checks)


def implicit_root(
  optimality_fn: Callable[..., PyTree],
  *,
  solver: "SolverLike | None" = None,
  has_aux: bool = False,
  symmetric: bool = False,
  on_failure: str = "warn",
  tol: float | None = None,
  stationarity_tol: float | None = trust.DEFAULT_STATIONARITY_TOL,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
  r"""Decorates a solver of ``optimality_fn(params, hparams, *args) = 0`` with implicit derivatives.

  For a root ``theta*`` of F (a KKT system, a stationarity condition),

  .. math::
    \dot\theta = -A^{-1} \frac{\partial F}{\partial \lambda} \dot\lambda,
    \qquad A = \frac{\partial F}{\partial \theta}(\theta^*),

  in every mode, as `implicit_argmin`. A need not be symmetric, so the default solver is
  ``ih.BiCGStab(steps=100)`` and solvers that need symmetry (`ih.CG`, `ih.Neumann` with
  automatic alpha) are rejected unless ``symmetric=True``. For a fixed point ``theta = T(theta)``
  use `implicit_fixed_point`.

  The call is split as in `implicit_argmin` (``init_params=None``, ``hparams`` by
  keyword, solver-only keywords, non-floating leaves of params as constants, whose
  entries in F's output are ignored).

  Args:
    optimality_fn: ``F(params, hparams, *args, **kwargs)``, a pytree shaped like params.
    solver: a linear solver, or a function ``solve(matvec, b) -> x``;
      ``ih.BiCGStab(steps=100)`` when None.
    has_aux: the solver returns ``(params, aux)``; `aux` is passed through as constant.
    symmetric: promise that ``dF/dparams`` is symmetric, allowing symmetric-only solvers.
    on_failure: "warn", "raise" or "ignore"; see `implicit_argmin`.
    tol: also flag backward solves whose relative residual exceeds `tol`.
    stationarity_tol: flag roots with ``||F(theta*)|| / max(||A theta*||,
      ||F(theta_0)||)`` above this (None: no check).

  Returns:
    A decorator for ``solve(init_params, hparams, *args, **kwargs)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import implicit_hyper as ih
    >>> optimality = lambda x, a: 0.5 * jnp.cos(x) + a - x        # x = 0.5 cos x + a
    >>> @ih.implicit_root(optimality)
    ... def iterate(x0, a):
    ...   return jax.lax.fori_loop(0, 100, lambda _, x: 0.5 * jnp.cos(x) + a, x0)
    >>> x = iterate(0.0, 1.0)
    >>> g = jax.grad(lambda a: iterate(0.0, a))(1.0)
    >>> bool(jnp.isclose(g, 1.0 / (1.0 + 0.5 * jnp.sin(x))))   # dx/da = 1 / (1 + sin(x)/2)
    True
  """
  call = "implicit_root"
  decorator.check_callable(call, "optimality_fn", optimality_fn)
  solver = resolve.as_solver(call, solver, DEFAULT_ROOT_SOLVER, symmetric=symmetric)

  def condition(params: PyTree, hparams: PyTree, *args: Any, **kwargs: Any) -> PyTree:
    return differentiable.like_floating(optimality_fn(params, hparams, *args, **kwargs), params)

  def check(params: PyTree, hparams: PyTree, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    out = validation.eval_shape(
      call, "optimality_fn", optimality_fn, params, hparams, *args, **kwargs
    )
    validation.check_same_structure(call, "the output of `optimality_fn`", out, params, "params")

  checks = trust.Checks(on_failure, tol, stationarity_tol).validate(call)
  return decorator.decorator(
    call, optimality_fn, condition, check, solver, symmetric, has_aux, checks
  )


def implicit_fixed_point(
  fixed_point_fn: Callable[..., PyTree],
  *,
  solver: "SolverLike | None" = None,
  has_aux: bool = False,
  on_failure: str = "warn",
  tol: float | None = None,
  stationarity_tol: float | None = trust.DEFAULT_STATIONARITY_TOL,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
  r"""Decorates a solver of ``theta = T(theta, hparams, *args)`` with implicit derivatives.

  With ``J = dT/dtheta`` at the fixed point,

  .. math::
    \dot\theta = (I - J)^{-1} \frac{\partial T}{\partial \lambda} \dot\lambda,

  and reverse mode solves :math:`(I - J)^T u = \bar\theta`. `ih.Neumann` here is the plain
  series :math:`u = \sum_k (J^T)^k \bar\theta` (step 1), as in deep equilibrium models; it
  converges when T is a contraction and reports divergence otherwise. Proximal-gradient
  and other fixed-point maps of non-smooth problems (lasso) are differentiated this way.

  The call is split as in `implicit_argmin`; non-floating leaves of params (a PRNG
  key) are constants, whatever T returns for them.

  Args:
    fixed_point_fn: ``T(params, hparams, *args, **kwargs)``, a pytree shaped like params.
    solver: a linear solver for ``I - J``, or a function ``solve(matvec, b) -> x``;
      ``ih.BiCGStab(steps=100)`` when None.
    has_aux: the solver returns ``(params, aux)``; `aux` is passed through as constant.
    on_failure: "warn", "raise" or "ignore"; see `implicit_argmin`.
    tol: also flag backward solves whose relative residual exceeds `tol`.
    stationarity_tol: flag fixed points with ``||theta* - T(theta*)||`` above this,
      relative as in `implicit_root` (None: no check).

  Returns:
    A decorator for ``solve(init_params, hparams, *args, **kwargs)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import implicit_hyper as ih
    >>> T = lambda x, a: 0.5 * jnp.cos(x) + a
    >>> @ih.implicit_fixed_point(T, solver=ih.Neumann(steps=60))
    ... def iterate(x0, a):
    ...   return jax.lax.fori_loop(0, 100, lambda _, x: T(x, a), x0)
    >>> x = iterate(0.0, 1.0)
    >>> g = jax.grad(lambda a: iterate(0.0, a))(1.0)
    >>> bool(jnp.isclose(g, 1.0 / (1.0 + 0.5 * jnp.sin(x))))
    True
  """
  call = "implicit_fixed_point"
  decorator.check_callable(call, "fixed_point_fn", fixed_point_fn)
  linear_solver = resolve.as_solver(call, solver, DEFAULT_ROOT_SOLVER, symmetric=True)
  linear_solver = linear_solver.for_fixed_point()
  resolve.as_solver(call, linear_solver, None, symmetric=False)

  def condition(params: PyTree, hparams: PyTree, *args: Any, **kwargs: Any) -> PyTree:
    image = differentiable.like_floating(fixed_point_fn(params, hparams, *args, **kwargs), params)
    return otu.tree_sub(differentiable.partition(params)[0], image)

  def check(params: PyTree, hparams: PyTree, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    out = validation.eval_shape(
      call, "fixed_point_fn", fixed_point_fn, params, hparams, *args, **kwargs
    )
    validation.check_same_structure(call, "the output of `fixed_point_fn`", out, params, "params")

  checks = trust.Checks(on_failure, tol, stationarity_tol).validate(call)
  return decorator.decorator(
    call, fixed_point_fn, condition, check, linear_solver, False, has_aux, checks
  )
