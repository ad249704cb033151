"""Every row of docs/migrating-from-jaxopt.md against jaxopt itself, in float64, to 1e-8.

Each mapping is tested with the settings the page gives as equivalent; most agree to
round-off (the same iterations), the rest to 1e-8 because both converge.
"""

import functools

import jax
import jax.numpy as jnp
import jaxopt
import numpy as np
import pytest
from jaxopt import implicit_diff
from jaxopt import linear_solve
from jaxopt import objective
from jaxopt import prox

import implicit_hyper as ih

N = 40
RNG = np.random.default_rng(0)
_M = RNG.normal(size=(N, N))
SPD = jnp.asarray(_M @ _M.T / N + 0.05 * np.eye(N))  # condition number 81
NONSYMMETRIC = jnp.asarray(1.5 * np.eye(N) + 0.6 * RNG.normal(size=(N, N)) / np.sqrt(N))
B = jnp.asarray(RNG.normal(size=N))


def relative(a, b):
  a, b = jax.flatten_util.ravel_pytree(a)[0], jax.flatten_util.ravel_pytree(b)[0]
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# (jaxopt's solve, the matrix, implicit_hyper's equivalent): jaxopt's Krylov defaults are
# tol=1e-5 and maxiter=10n (GMRES: 10n restart cycles of 20 steps).
LINEAR_ROWS = {
  "solve_cg": (linear_solve.solve_cg, SPD, ih.CG(steps=10 * N, tol=1e-5)),
  "solve_cg ridge": (
    functools.partial(linear_solve.solve_cg, ridge=0.1),
    SPD,
    ih.CG(steps=10 * N, tol=1e-5, ridge=0.1),
  ),
  "solve_normal_cg": (
    linear_solve.solve_normal_cg,
    NONSYMMETRIC,
    ih.NormalCG(steps=10 * N, tol=1e-5),
  ),
  "solve_bicgstab": (
    linear_solve.solve_bicgstab,
    NONSYMMETRIC,
    ih.BiCGStab(steps=10 * N, tol=1e-5),
  ),
  "solve_gmres maxiter restart": (
    functools.partial(linear_solve.solve_gmres, maxiter=3, restart=5, tol=1e-12),
    NONSYMMETRIC,
    ih.GMRES(steps=3 * 5, restart=5, tol=1e-12),
  ),
  "solve_gmres converged": (
    functools.partial(linear_solve.solve_gmres, tol=1e-12),
    NONSYMMETRIC,
    ih.GMRES(steps=10 * N * 20, restart=20, tol=1e-12),
  ),
  "solve_lu": (linear_solve.solve_lu, NONSYMMETRIC, ih.Direct()),
  "solve_cholesky": (
    functools.partial(linear_solve.solve_cholesky, ridge=0.1),
    SPD,
    ih.Direct(ridge=0.1),
  ),
  "solve_inv": (functools.partial(linear_solve.solve_inv, ridge=0.1), SPD, ih.Direct(ridge=0.1)),
  "solve_iterative_refinement": (linear_solve.solve_iterative_refinement, SPD, ih.Direct()),
  "solve_iterative_refinement as solver=": (
    linear_solve.solve_iterative_refinement,
    SPD,
    ih.FunctionSolver(fn=linear_solve.solve_iterative_refinement),
  ),
}


@pytest.mark.parametrize("row", list(LINEAR_ROWS))
def test_linear_solve_row_agrees_with_jaxopt(row):
  theirs, matrix, ours = LINEAR_ROWS[row]
  matvec = lambda v: matrix @ v
  x, info, _ = ours.solve(matvec, B)
  assert relative(x, theirs(matvec, B)) < 1e-8
  assert not bool(info.diverged)


def test_literal_ports_of_the_old_table_are_off():
  """Why the rows carry settings: `GMRES(steps=maxiter)` and `CG()` for jaxopt's defaults."""
  matvec = lambda v: NONSYMMETRIC @ v
  theirs = linear_solve.solve_gmres(matvec, B, maxiter=3, restart=5)
  assert relative(ih.GMRES(steps=3, restart=5).solve(matvec, B)[0], theirs) > 1e-2
  spd = lambda v: SPD @ v
  assert relative(ih.CG().solve(spd, B)[0], linear_solve.solve_cg(spd, B)) > 1e-3


# A ridge problem for the implicit-differentiation rows: F(w, lam) = grad of the loss.
X = jnp.asarray(RNG.normal(size=(30, 8)))
Y = X @ jnp.arange(1.0, 9.0) + 0.1 * jnp.asarray(RNG.normal(size=30))
D = X.shape[1]


def ridge_loss(w, lam, x, y):
  return 0.5 * jnp.mean((x @ w - y) ** 2) + 0.5 * lam * jnp.sum(w**2)


def ridge_closed_form(w0, lam, x, y):
  return jnp.linalg.solve(x.T @ x / x.shape[0] + lam * jnp.eye(x.shape[1]), x.T @ y / x.shape[0])


def _outer(solve):
  return jax.grad(lambda lam: jnp.sum(jnp.sin(solve(jnp.zeros(D), lam, X, Y))))(0.3)


DEFAULT = ih.NormalCG(steps=10 * D, tol=1e-5)  # jaxopt's omitted `solve=`


def test_custom_root_without_solve_is_implicit_root_with_jaxopts_normal_cg():
  theirs = _outer(implicit_diff.custom_root(jax.grad(ridge_loss))(ridge_closed_form))
  ours_root = _outer(ih.implicit_root(jax.grad(ridge_loss), solver=DEFAULT)(ridge_closed_form))
  ours_argmin = _outer(ih.implicit_argmin(ridge_loss, solver=DEFAULT)(ridge_closed_form))
  assert relative(ours_root, theirs) < 1e-8 and relative(ours_argmin, theirs) < 1e-8


def test_custom_root_with_a_solve_is_implicit_root_with_its_equivalent():
  cg = implicit_diff.custom_root(jax.grad(ridge_loss), solve=linear_solve.solve_cg)
  ours = ih.implicit_argmin(ridge_loss, solver=ih.CG(steps=10 * D, tol=1e-5))
  assert relative(_outer(ours(ridge_closed_form)), _outer(cg(ridge_closed_form))) < 1e-8
  passed = ih.implicit_argmin(ridge_loss, solver=linear_solve.solve_cg)  # a jaxopt solve as is
  assert relative(_outer(passed(ridge_closed_form)), _outer(cg(ridge_closed_form))) < 1e-8


def _ista_step(w, lam, x, y):
  step = 1.0 / jnp.linalg.eigvalsh(x.T @ x / x.shape[0])[-1]
  z = w - step * x.T @ (x @ w - y) / x.shape[0]
  return jnp.sign(z) * jnp.maximum(jnp.abs(z) - step * lam, 0.0)


def _ista(w0, lam, x, y):
  return jax.lax.fori_loop(0, 3000, lambda _, w: _ista_step(w, lam, x, y), w0)


def test_custom_fixed_point_without_solve_is_implicit_fixed_point_with_normal_cg():
  theirs = _outer(implicit_diff.custom_fixed_point(_ista_step)(_ista))
  ours = _outer(ih.implicit_fixed_point(_ista_step, solver=DEFAULT)(_ista))
  exact = _outer(ih.implicit_fixed_point(_ista_step, solver=ih.Direct())(_ista))
  assert relative(ours, theirs) < 1e-8
  assert relative(ours, exact) < 1e-4  # jaxopt's default tol=1e-5 is inexact


def test_root_vjp_and_root_jvp_are_jax_vjp_and_jvp_of_a_decorated_identity():
  optimality = jax.grad(ridge_loss)
  w = ridge_closed_form(None, 0.3, X, Y)
  at_solution = ih.implicit_root(optimality, solver=ih.Direct())(lambda w0, lam, x, y: w0)
  cotangent = jnp.arange(1.0, D + 1.0)
  theirs_vjp = implicit_diff.root_vjp(
    optimality, w, (0.3, X, Y), cotangent, solve=linear_solve.solve_lu
  )
  ours_vjp = jax.vjp(lambda lam, x, y: at_solution(w, lam, x, y), 0.3, X, Y)[1](cotangent)
  for theirs, ours in zip(theirs_vjp, ours_vjp, strict=True):
    assert relative(ours, theirs) < 1e-8
  tangents = (1.0, jnp.ones_like(X), jnp.ones_like(Y))
  theirs_jvp = implicit_diff.root_jvp(
    optimality, w, (0.3, X, Y), tangents, solve=linear_solve.solve_lu
  )
  ours_jvp = jax.jvp(lambda lam, x, y: at_solution(w, lam, x, y), (0.3, X, Y), tangents)[1]
  assert relative(ours_jvp, theirs_jvp) < 1e-8


SOLVER_OBJECTS = {
  "ProximalGradient": lambda: jaxopt.ProximalGradient(
    fun=objective.least_squares, prox=prox.prox_lasso, tol=1e-12, maxiter=5000, implicit_diff=True
  ),
  "BlockCoordinateDescent": lambda: jaxopt.BlockCoordinateDescent(
    fun=objective.least_squares,
    block_prox=prox.prox_lasso,
    tol=1e-12,
    maxiter=2000,
    implicit_diff=True,
  ),
}


@pytest.mark.parametrize("name", list(SOLVER_OBJECTS))
def test_jaxopt_solver_object_is_implicit_root_of_its_optimality_fun(name):
  solver = SOLVER_OBJECTS[name]()
  lasso_value = lambda run: jax.grad(lambda lam: jnp.sum(run(jnp.zeros(D), lam, data=(X, Y)) ** 2))(
    0.5
  )
  theirs = lasso_value(lambda w0, lam, data: solver.run(w0, lam, data=data).params)
  decorate = ih.implicit_root(solver.optimality_fun, solver=DEFAULT)
  ours = lasso_value(decorate(lambda w0, lam, data: solver.run(w0, lam, data=data).params))
  exact = lasso_value(
    ih.implicit_root(solver.optimality_fun, solver=ih.Direct())(
      lambda w0, lam, data: solver.run(w0, lam, data=data).params
    )
  )
  assert relative(ours, theirs) < 1e-8
  assert relative(exact, theirs) < 1e-4


def test_anderson_acceleration_is_implicit_root_of_its_optimality_fun():
  """A deep-equilibrium layer z = tanh(W z + x), as in jaxopt's DEQ example."""
  w_matrix = 0.5 * jnp.asarray(RNG.normal(size=(D, D))) / np.sqrt(D)
  layer = lambda z, w, x: jnp.tanh(w @ z + x)
  solver = jaxopt.AndersonAcceleration(layer, tol=1e-12, maxiter=500, implicit_diff=True)
  run = lambda z0, w, x: solver.run(z0, w, x).params
  value = lambda fn: jax.grad(lambda w: jnp.sum(fn(jnp.zeros(D), w, X[0]) ** 2))(w_matrix)
  theirs = value(run)
  ours = value(ih.implicit_root(solver.optimality_fun, solver=DEFAULT)(run))
  exact = value(ih.implicit_fixed_point(layer, solver=ih.Direct())(run))
  assert relative(ours, theirs) < 1e-8
  assert relative(exact, theirs) < 1e-4
