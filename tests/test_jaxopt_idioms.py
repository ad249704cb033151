"""jaxopt's calling idioms: `init_params=None`, hyperparameters by keyword, solver-only keywords."""

import _problems
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxopt import implicit_diff
from jaxopt import linear_solve

import implicit_hyper as ih

RIDGE = _problems.Ridge()
DATA = (RIDGE.x, RIDGE.y)
VAL = (RIDGE.x_val, RIDGE.y_val)
EXACT = RIDGE.exact_hypergrad(RIDGE.lam)


def ridge_objective(params, l2reg, data):
  """jaxopt's examples name the hyperparameters and the data and pass them by keyword."""
  return RIDGE.inner_loss(params, l2reg, *data)


def ridge_solver(init_params, l2reg, data):
  del init_params  # a closed form: the starting point is ignored, jaxopt allows None
  return RIDGE.argmin(l2reg, *data)


def _validation(w):
  return RIDGE.outer_loss(w, None, *VAL)


def test_init_params_none_and_hparams_by_keyword_match_jaxopt_and_the_closed_form():
  ours = ih.implicit_argmin(ridge_objective, solver=ih.Direct())(ridge_solver)
  theirs = implicit_diff.custom_root(jax.grad(ridge_objective), solve=linear_solve.solve_lu)(
    ridge_solver
  )
  by_keyword = jax.grad(lambda lam: _validation(ours(None, l2reg=lam, data=DATA)))(RIDGE.lam)
  positional = jax.grad(lambda lam: _validation(ours(None, lam, DATA)))(RIDGE.lam)
  jaxopt = jax.grad(lambda lam: _validation(theirs(None, l2reg=lam, data=DATA)))(RIDGE.lam)
  assert _problems.relative_error(by_keyword, EXACT) < 1e-10
  assert _problems.relative_error(positional, EXACT) < 1e-10
  assert _problems.relative_error(by_keyword, jaxopt) < 1e-10
  init_by_keyword = ours(init_params=None, l2reg=RIDGE.lam, data=DATA)
  np.testing.assert_allclose(init_by_keyword, RIDGE.argmin(RIDGE.lam), rtol=1e-12)


def test_init_params_none_still_checks_stationarity_from_zero():
  half = ih.implicit_argmin(ridge_objective, solver=ih.Direct())(
    lambda init, l2reg, data: 0.5 * RIDGE.argmin(l2reg, *data)
  )
  with pytest.warns(ih.HypergradientWarning, match="not a solution"):
    jax.grad(lambda lam: _validation(half(None, lam, DATA)))(RIDGE.lam)


def _gradient_descent(init_params, l2reg, data, *, steps):
  step = lambda _, w: w - 0.5 * jax.grad(ridge_objective)(w, l2reg, data)
  return jax.lax.fori_loop(0, steps, step, init_params)


def test_a_keyword_the_loss_does_not_take_reaches_the_inner_solver_only():
  solve = ih.implicit_argmin(ridge_objective, solver=ih.Direct())(_gradient_descent)
  w0 = jnp.zeros(RIDGE.d)
  short, long = solve(w0, RIDGE.lam, DATA, steps=1), solve(w0, RIDGE.lam, DATA, steps=3000)
  assert _problems.relative_error(short, long) > 0.1  # `steps` reached the solver
  got = jax.grad(lambda lam: _validation(solve(w0, lam, data=DATA, steps=3000)))(RIDGE.lam)
  assert _problems.relative_error(got, EXACT) < 1e-9


def test_a_loss_that_takes_the_keyword_or_kwargs_receives_it():
  seen = []

  def loss(w, l2reg, data, **kwargs):
    seen.append(sorted(kwargs))
    return ridge_objective(w, l2reg, data)

  solve = ih.implicit_argmin(loss, solver=ih.Direct())(_gradient_descent)
  got = jax.grad(lambda lam: _validation(solve(jnp.zeros(RIDGE.d), lam, DATA, steps=3000)))(
    RIDGE.lam
  )
  assert seen and all(names == ["steps"] for names in seen)
  assert _problems.relative_error(got, EXACT) < 1e-9


def test_missing_hparams_is_an_error_that_names_the_solver_keyword():
  solve = ih.implicit_argmin(ridge_objective)(ridge_solver)
  with pytest.raises(TypeError, match=r"`hparams` was not given.*by keyword as `l2reg=`"):
    solve(None, data=DATA)
