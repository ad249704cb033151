"""`ih.hypergrad` against closed forms, finite differences and exact solves, in float64."""

import _problems
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import implicit_hyper as ih

RIDGE = _problems.Ridge()


def _ridge_hypergrad(solver, problem=RIDGE, hypergrad=ih.hypergrad):
  w = problem.argmin(problem.lam)
  return hypergrad(
    problem.inner_loss,
    problem.outer_loss,
    w,
    problem.lam,
    inner_args=(problem.x, problem.y),
    outer_args=(problem.x_val, problem.y_val),
    solver=solver,
  )


def test_direct_matches_closed_form_ridge_hypergradient_to_1e10():
  exact = RIDGE.exact_hypergrad(RIDGE.lam)
  assert _problems.relative_error(_ridge_hypergrad(ih.Direct()), exact) < 1e-10


def test_cg_with_as_many_steps_as_features_matches_closed_form_to_1e8():
  exact = RIDGE.exact_hypergrad(RIDGE.lam)
  got, info, _ = _ridge_hypergrad(ih.CG(steps=RIDGE.d, tol=0.0), hypergrad=ih.hypergrad_with_info)
  assert _problems.relative_error(got, exact) < 1e-8
  assert int(info.num_steps) == RIDGE.d and not bool(info.diverged)


def test_identity_has_positive_cosine_with_exact_hypergradient():
  exact = RIDGE.exact_hypergrad(RIDGE.lam)
  assert _problems.cosine(_ridge_hypergrad(ih.Identity()), exact) > 0


def test_closed_form_agrees_with_central_finite_differences_of_bilevel_objective():
  """Checks the test's own closed form: d/dlam_i L_V(w*(lam)) by central differences."""
  eps = 1e-5
  exact = RIDGE.exact_hypergrad(RIDGE.lam)
  fd = np.array(
    [
      (RIDGE.objective(RIDGE.lam.at[i].add(eps)) - RIDGE.objective(RIDGE.lam.at[i].add(-eps)))
      / (2 * eps)
      for i in range(RIDGE.d)
    ]
  )
  assert _problems.relative_error(exact, fd) < 1e-8


def test_hypergrad_matches_finite_differences_with_iteratively_solved_inner_problem():
  """The whole pipeline: inner problem solved by gradient descent to tolerance, then CG."""

  def solve(lam):
    h = RIDGE.hessian(lam)
    step = 1.0 / jnp.linalg.eigvalsh(h)[-1]
    grad = jax.grad(RIDGE.inner_loss)
    w = jax.lax.fori_loop(
      0, 5000, lambda _, w: w - step * grad(w, lam, RIDGE.x, RIDGE.y), jnp.zeros(RIDGE.d)
    )
    return w

  w = solve(RIDGE.lam)
  assert float(jnp.linalg.norm(jax.grad(RIDGE.inner_loss)(w, RIDGE.lam, RIDGE.x, RIDGE.y))) < 1e-13
  got = ih.hypergrad(
    RIDGE.inner_loss,
    RIDGE.outer_loss,
    w,
    RIDGE.lam,
    inner_args=(RIDGE.x, RIDGE.y),
    outer_args=(RIDGE.x_val, RIDGE.y_val),
    solver=ih.CG(steps=50),
  )
  eps = 1e-5

  def objective(lam):
    return RIDGE.outer_loss(solve(lam), lam, RIDGE.x_val, RIDGE.y_val)

  fd = np.array(
    [
      (objective(RIDGE.lam.at[i].add(eps)) - objective(RIDGE.lam.at[i].add(-eps))) / (2 * eps)
      for i in range(RIDGE.d)
    ]
  )
  assert _problems.relative_error(got, fd) < 1e-8


def test_direct_term_of_outer_loss_is_included():
  """L_V(w, lam) = ridge validation loss + sum(lam^2): adds 2 lam to the hypergradient."""

  def outer(w, lam, x, y):
    return RIDGE.outer_loss(w, lam, x, y) + jnp.sum(lam**2)

  w = RIDGE.argmin(RIDGE.lam)
  got = ih.hypergrad(
    RIDGE.inner_loss,
    outer,
    w,
    RIDGE.lam,
    inner_args=(RIDGE.x, RIDGE.y),
    outer_args=(RIDGE.x_val, RIDGE.y_val),
    solver=ih.Direct(),
  )
  expected = RIDGE.exact_hypergrad(RIDGE.lam) + 2 * RIDGE.lam
  assert _problems.relative_error(got, expected) < 1e-10


@pytest.fixture(scope="module")
def digits():
  inner, outer, w0, train, val = _problems.digits_logistic()
  log_decay = jnp.full(64, -3.0)
  w = _problems.newton_argmin(inner, w0, log_decay, *train)
  exact = _problems.jit_hypergrad(
    inner, outer, w, log_decay, inner_args=train, outer_args=val, solver=ih.Direct()
  )
  return inner, outer, w, log_decay, train, val, exact


def test_digits_logistic_cg_matches_direct(digits):
  inner, outer, w, log_decay, train, val, exact = digits
  got = _problems.jit_hypergrad(
    inner, outer, w, log_decay, inner_args=train, outer_args=val, solver=ih.CG(steps=300)
  )
  assert _problems.relative_error(got, exact) < 1e-8


def test_digits_logistic_neumann_converges_to_direct(digits):
  inner, outer, w, log_decay, train, val, exact = digits

  def error(steps):
    solver = ih.Neumann(steps=steps)
    got, info, _ = _problems.jit_hypergrad_with_info(
      inner, outer, w, log_decay, inner_args=train, outer_args=val, solver=solver
    )
    assert not bool(info.diverged)
    return _problems.relative_error(got, exact)

  errors = [error(k) for k in (10, 100, 1000)]
  assert errors[0] > errors[1] > errors[2]
  assert errors[2] < 1e-3


def test_hypergrad_reports_info_and_accepts_pytrees(digits):
  inner, outer, w, log_decay, train, val, _ = digits
  hparams = {"decay": log_decay}

  def inner_tree(w, h, x, y):
    return inner(w, h["decay"], x, y)

  g, info, adjoint = ih.hypergrad_with_info(
    inner_tree,
    outer,
    w,
    hparams,
    inner_args=train,
    outer_args=val,
    solver=ih.CG(steps=5),
  )
  assert jax.tree.structure(g) == jax.tree.structure(hparams)
  assert info.residual_norm.shape == () and int(info.num_steps) == 5
  # CG's state is its solution, the adjoint u of H u = dL_V/dw: a warm start for the next call.
  assert jax.tree.structure(adjoint) == jax.tree.structure(w)


def test_hypergrad_rejects_integer_hparams_and_nonscalar_losses():
  w = RIDGE.argmin(RIDGE.lam)
  args = dict(inner_args=(RIDGE.x, RIDGE.y), outer_args=(RIDGE.x_val, RIDGE.y_val))
  with pytest.raises(TypeError, match="hparams"):
    ih.hypergrad(RIDGE.inner_loss, RIDGE.outer_loss, w, jnp.arange(RIDGE.d), **args)
  with pytest.raises(ValueError, match="inner_loss.*scalar"):
    ih.hypergrad(lambda w, lam, x, y: w * lam, RIDGE.outer_loss, w, RIDGE.lam, **args)
  with pytest.raises(ValueError, match="outer_loss.*scalar"):
    ih.hypergrad(RIDGE.inner_loss, lambda w, lam, x, y: x @ w, w, RIDGE.lam, **args)


def test_returned_cg_state_warm_starts_the_next_call_at_the_adjoint():
  w = RIDGE.argmin(RIDGE.lam)
  args = dict(inner_args=(RIDGE.x, RIDGE.y), outer_args=(RIDGE.x_val, RIDGE.y_val))
  solver = ih.CG(steps=50, tol=1e-8)
  first, _, state = ih.hypergrad_with_info(
    RIDGE.inner_loss, RIDGE.outer_loss, w, RIDGE.lam, solver=solver, **args
  )
  again, info, _ = ih.hypergrad_with_info(
    RIDGE.inner_loss, RIDGE.outer_loss, w, RIDGE.lam, solver=solver, solver_state=state, **args
  )
  assert int(info.num_steps) == 0
  np.testing.assert_array_equal(again, first)


DIVERGING = ih.Neumann(steps=50, alpha=100.0)


def test_diverging_solve_warns_by_default_raises_when_asked_and_is_reported_with_info():
  w = RIDGE.argmin(RIDGE.lam)
  args = dict(inner_args=(RIDGE.x, RIDGE.y), outer_args=(RIDGE.x_val, RIDGE.y_val))
  with pytest.warns(ih.HypergradientWarning, match="diverged"):
    ih.hypergrad(RIDGE.inner_loss, RIDGE.outer_loss, w, RIDGE.lam, solver=DIVERGING, **args)
  with pytest.raises(ih.HypergradientError, match="diverged"):
    ih.hypergrad(
      RIDGE.inner_loss,
      RIDGE.outer_loss,
      w,
      RIDGE.lam,
      solver=DIVERGING,
      on_failure="raise",
      **args,
    )
  _, info, _ = ih.hypergrad_with_info(
    RIDGE.inner_loss, RIDGE.outer_loss, w, RIDGE.lam, solver=DIVERGING, **args
  )
  assert bool(info.diverged)


def _ridge_info(inner, outer, w, **kwargs):
  return ih.hypergrad_with_info(
    inner,
    outer,
    w,
    RIDGE.lam,
    inner_args=(RIDGE.x, RIDGE.y),
    outer_args=(RIDGE.x_val, RIDGE.y_val),
    solver=ih.Direct(),
    **kwargs,
  )[1]


def test_stationarity_is_the_relative_residual_of_the_normal_equations_on_ridge():
  rhs = RIDGE.x.T @ RIDGE.y / RIDGE.x.shape[0]
  for w in (RIDGE.argmin(RIDGE.lam), 0.5 * RIDGE.argmin(RIDGE.lam), jnp.zeros(RIDGE.d)):
    expected = jnp.linalg.norm(RIDGE.hessian(RIDGE.lam) @ w - rhs) / jnp.linalg.norm(rhs)
    got = _ridge_info(RIDGE.inner_loss, RIDGE.outer_loss, w).stationarity
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-14)


def test_swapped_losses_show_in_stationarity_and_are_flagged_only_when_asked():
  """`hypergrad(outer, inner, ...)` at the argmin of the real inner loss: far from stationary."""
  w = RIDGE.argmin(RIDGE.lam)
  assert float(_ridge_info(RIDGE.inner_loss, RIDGE.outer_loss, w).stationarity) < 1e-12
  assert float(_ridge_info(RIDGE.outer_loss, RIDGE.inner_loss, w).stationarity) > 0.1
  swapped = lambda **kw: ih.hypergrad(
    RIDGE.outer_loss,
    RIDGE.inner_loss,
    w,
    RIDGE.lam,
    inner_args=(RIDGE.x, RIDGE.y),
    outer_args=(RIDGE.x_val, RIDGE.y_val),
    solver=ih.Direct(),
    **kw,
  )
  swapped()  # an iterate of training by design: reported, not flagged (warnings are errors)
  with pytest.warns(ih.HypergradientWarning, match="relative stationarity"):
    swapped(stationarity_tol=1e-2)
  with pytest.raises(ValueError, match=r"`hypergrad\(stationarity_tol=...\)`"):
    swapped(stationarity_tol=-1.0)
