"""`ih.hypergrad` against closed forms, finite differences and exact solves, in float64."""

import _problems
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import implicit_hyper as ih

RIDGE = _problems.Ridge()


def _ridge_hypergrad(solver, problem=RIDGE, **kwargs):
  w = problem.argmin(problem.lam)
  return ih.hypergrad(
    problem.outer_loss,
    problem.inner_loss,
    w,
    problem.lam,
    inner_args=(problem.x, problem.y),
    outer_args=(problem.x_val, problem.y_val),
    solver=solver,
    **kwargs,
  )


def test_direct_matches_closed_form_ridge_hypergradient_to_1e10():
  exact = RIDGE.exact_hypergrad(RIDGE.lam)
  assert _problems.relative_error(_ridge_hypergrad(ih.Direct()), exact) < 1e-10


def test_cg_with_as_many_steps_as_features_matches_closed_form_to_1e8():
  exact = RIDGE.exact_hypergrad(RIDGE.lam)
  got, info = _ridge_hypergrad(ih.CG(steps=RIDGE.d, tol=0.0), return_info=True)
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
    RIDGE.outer_loss,
    RIDGE.inner_loss,
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
    outer,
    RIDGE.inner_loss,
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
    outer, inner, w, log_decay, inner_args=train, outer_args=val, solver=ih.Direct()
  )
  return inner, outer, w, log_decay, train, val, exact


def test_digits_logistic_cg_matches_direct(digits):
  inner, outer, w, log_decay, train, val, exact = digits
  got = _problems.jit_hypergrad(
    outer, inner, w, log_decay, inner_args=train, outer_args=val, solver=ih.CG(steps=300)
  )
  assert _problems.relative_error(got, exact) < 1e-8


def test_digits_logistic_neumann_converges_to_direct(digits):
  inner, outer, w, log_decay, train, val, exact = digits

  def error(steps):
    solver = ih.Neumann(steps=steps)
    got, info = _problems.jit_hypergrad(
      outer,
      inner,
      w,
      log_decay,
      inner_args=train,
      outer_args=val,
      solver=solver,
      return_info=True,
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

  g, info = ih.hypergrad(
    outer,
    inner_tree,
    w,
    hparams,
    inner_args=train,
    outer_args=val,
    solver=ih.CG(steps=5),
    return_info=True,
  )
  assert jax.tree.structure(g) == jax.tree.structure(hparams)
  assert info.residual_norm.shape == () and int(info.num_steps) == 5


def test_hypergrad_rejects_integer_hparams_and_nonscalar_losses():
  w = RIDGE.argmin(RIDGE.lam)
  args = dict(inner_args=(RIDGE.x, RIDGE.y), outer_args=(RIDGE.x_val, RIDGE.y_val))
  with pytest.raises(TypeError, match="hparams"):
    ih.hypergrad(RIDGE.outer_loss, RIDGE.inner_loss, w, jnp.arange(RIDGE.d), **args)
  with pytest.raises(ValueError, match="inner_loss.*scalar"):
    ih.hypergrad(RIDGE.outer_loss, lambda w, lam, x, y: w * lam, w, RIDGE.lam, **args)
  with pytest.raises(ValueError, match="outer_loss.*scalar"):
    ih.hypergrad(lambda w, lam, x, y: x @ w, RIDGE.inner_loss, w, RIDGE.lam, **args)
