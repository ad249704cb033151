r"""The one differentiation rule of the implicit function theorem, for every mode.

For a solution ``theta*`` of ``F(theta, hparams, *args) = 0`` the theorem gives the tangent

.. math::
  \dot\theta = -A^{-1} \left(\frac{\partial F}{\partial \lambda} \dot\lambda
    + \frac{\partial F}{\partial x} \dot x\right), \qquad A = \frac{\partial F}{\partial \theta},

written here as a `jax.custom_jvp` whose linear solve is `jax.lax.custom_linear_solve`
with the chosen solver as `solve` and `transpose_solve` (the design optimistix uses).
Reverse mode comes from JAX transposing that rule: the transposed solve is the adjoint
system ``A^T u = v`` and the transposed right-hand side is the mixed product
``-(dF/d(hparams, args))^T u``. Forward mode (`jax.jvp`, `jax.jacfwd`) uses it as it
is, and second derivatives (`jax.hessian`) differentiate the rule itself, never the
inner solver, whose output enters with its own derivative stopped.
"""

import numbers
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu
from jax.custom_derivatives import SymbolicZero

from implicit_hyper._src import operators
from implicit_hyper._src import parallel
from implicit_hyper._src.solvers._base import Matvec
from implicit_hyper._src.solvers._base import PyTree
from implicit_hyper._src.solvers._base import SolveInfo


def implicit_solution(
  condition: Callable[..., PyTree],
  params: PyTree,
  hparams: PyTree,
  args: Sequence[Any],
  *,
  solver: Any,
  symmetric: bool,
  report: Callable[[SolveInfo], None],
  init_params: PyTree | None = None,
) -> PyTree:
  """Returns `params` carrying the derivatives of the implicit function theorem.

  Args:
    condition: ``F(params, hparams, *args)``, a pytree shaped like `params`; must close
      over no tracer (closure-convert it first).
    params: the solution ``theta*`` (its own derivative is ignored).
    hparams: a pytree of floating-point arrays.
    args: a tuple of arrays (floating ones get derivatives, integer ones none).
    solver: a linear solver (`init` / `solve`).
    symmetric: whether ``dF/dparams`` is symmetric (then the transposed solve reuses
      `matvec`).
    report: ``report(info)``, called (traced) with every solve's `SolveInfo`.
    init_params: the inner solver's starting point; when given, `SolveInfo.stationarity`
      reports ``||F(params)|| / max(||A params||, ||F(init_params)||)``, which for a
      quadratic is the relative residual of the normal equations ``A theta = -F(0)``.
  """

  @jax.custom_jvp
  def solution(
    params: PyTree, init_params: PyTree, hparams: PyTree, args: tuple[Any, ...]
  ) -> PyTree:
    return params

  def solution_jvp(primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> tuple[PyTree, PyTree]:
    params, init_params, hparams, args = primals
    _, _, hparams_dot, args_dot = tangents
    # The solution again through this rule, so that differentiating the rule itself
    # (second derivatives) sees theta* move with hparams by the theorem.
    params = solution(params, init_params, hparams, args)
    leaves, treedef = jax.tree.flatten((hparams, args))
    # jaxlib ships no stub for its C++ `PyTreeDef`, so mypy does not know its methods.
    dots = treedef.flatten_up_to((hparams_dot, args_dot))  # type: ignore[attr-defined]
    moving = [i for i, dot in enumerate(dots) if not isinstance(dot, SymbolicZero)]

    def condition_of_moving(*values: Any) -> PyTree:
      merged = list(leaves)
      for i, value in zip(moving, values, strict=True):
        merged[i] = value
      h, a = jax.tree.unflatten(treedef, merged)
      return condition(params, h, *a)

    moving_dots = tuple(dots[i] for i in moving)
    _, rhs = jax.jvp(condition_of_moving, tuple(leaves[i] for i in moving), moving_dots)
    # `custom_linear_solve` can only transpose a right-hand side whose every leaf is linear
    # in the tangents; a leaf of F that does not depend on them (a parameter that no
    # hyperparameter touches) would be a constant zero. Tie each leaf to a tangent entry.
    anchor = _zero_linear_in(moving_dots)
    if anchor is not None:
      rhs = jax.tree.map(lambda r: r + anchor.astype(r.dtype), rhs)
    matvec = operators.jacobian_product(condition, params, hparams, args)
    stationarity = relative_stationarity(condition, matvec, params, hparams, args, init_params)
    # Under `shard_map`, `custom_linear_solve` casts every array it is given (the operator's
    # and the right-hand side) to vary along every axis any of them varies along (a batch
    # split over devices), and then evaluates `matvec` and `solve`, traced before the
    # cast, at the cast arrays. Hand it arrays of that type, and cast the linearisation
    # point back inside the product (a mean over devices of equal values).
    axes = parallel.union_varying(primals)
    point = (params, hparams, args)
    varying_point, stationarity = parallel.vary_along((point, stationarity), axes)

    def product(v: PyTree) -> PyTree:
      p, h, a = parallel.match_varying(varying_point, point)
      return parallel.vary_along(operators.jacobian_product(condition, p, h, a)(v), axes)

    def solve(matvec: Matvec, b: PyTree) -> PyTree:
      x, info, _ = solver.solve(matvec, b)
      report(info._replace(stationarity=stationarity.astype(info.residual_norm.dtype)))
      return x

    b = parallel.vary_along(otu.tree_scale(-1.0, rhs), axes)

    def transpose_solve(_: Matvec, u: PyTree) -> PyTree:
      # The transpose of `product` taken here, not the one JAX hands over: that one hoists
      # replicated residuals, which the cast above would make varying.
      return solve(lambda w: jax.linear_transpose(product, b)(w)[0], u)

    params_dot = jax.lax.custom_linear_solve(
      product,
      b,
      solve,
      transpose_solve=solve if symmetric or not axes else transpose_solve,
      symmetric=symmetric,
    )
    return params, parallel.match_varying(params_dot, params)

  solution.defjvp(solution_jvp, symbolic_zeros=True)
  return solution(jax.lax.stop_gradient(params), init_params, hparams, tuple(args))


def _zero_linear_in(dots: PyTree) -> jax.Array | None:
  """A zero scalar that is linear in the first non-empty floating tangent, or None."""
  for dot in jax.tree.leaves(dots):
    if jnp.issubdtype(jnp.result_type(dot), jnp.inexact) and jnp.size(dot) > 0:
      return 0.0 * jnp.ravel(dot)[0]
  return None


def relative_stationarity(
  condition: Callable[..., PyTree],
  matvec: Matvec,
  params: PyTree,
  hparams: PyTree,
  args: Sequence[Any],
  init_params: PyTree | None,
) -> jax.Array:
  """``||F(theta)|| / max(||A theta||, ||F(theta_0)||)`` (NaN without `init_params`)."""
  norm = lambda p: otu.tree_norm(condition(p, hparams, *args))
  if init_params is None:
    return jnp.full((), jnp.nan)
  # Under `shard_map` the condition was traced at the type of `params`.
  start = parallel.match_varying(init_params, params)
  scale = jnp.maximum(otu.tree_norm(matvec(params)), norm(start))
  return norm(params) / jnp.where(scale > 0, scale, 1.0)


def is_array(x: object) -> bool:
  """Whether a leaf is an array (differentiable input) rather than a static setting."""
  return isinstance(x, (jax.Array, np.ndarray, np.generic)) or (
    isinstance(x, numbers.Number) and not isinstance(x, (bool, int))
  )


def stop_gradient_arrays(tree: PyTree) -> PyTree:
  """`jax.lax.stop_gradient` on the array leaves of `tree`; other leaves as they are."""
  return jax.tree.map(lambda x: jax.lax.stop_gradient(x) if is_array(x) else x, tree)


def zero_like(x: Any) -> jax.Array | np.ndarray:
  """A zero of `x`'s dtype and shape (float0 for integer arrays)."""
  if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(jnp.shape(x), jax.dtypes.float0)
