"""The truncated Neumann series: its rate, Lorraine's unrolling theorem, divergence."""

import _problems
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import implicit_hyper as ih


def _orthogonal_ridge(eigenvalues, seed=0):
  """Ridge with an orthogonal design, so that H = diag(eigenvalues) exactly."""
  d = len(eigenvalues)
  problem = _problems.Ridge(n=d, d=d, seed=seed)
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
  problem.x = jnp.asarray(q * np.sqrt(d))  # X^T X / n = I
  problem.lam = jnp.log(jnp.asarray(eigenvalues) - 1.0)
  return problem


def test_neumann_error_decays_geometrically_on_ridge():
  """With alpha = 1 / lambda_max, the error contracts by exactly 1 - 1/kappa per term."""
  eigenvalues = np.array([2.0, 6.0, 10.0, 14.0, 20.0])  # kappa = 10
  problem = _orthogonal_ridge(eigenvalues)
  exact = problem.exact_hypergrad(problem.lam)
  w = problem.argmin(problem.lam)

  def error(steps):
    got = _problems.jit_hypergrad(
      problem.inner_loss,
      problem.outer_loss,
      w,
      problem.lam,
      inner_args=(problem.x, problem.y),
      outer_args=(problem.x_val, problem.y_val),
      solver=ih.Neumann(steps=steps, alpha=1.0 / 20.0),
    )
    return float(jnp.linalg.norm(got - exact))

  steps = np.arange(0, 60, 5)
  errors = np.array([error(int(k)) for k in steps])
  rate = 1.0 - 2.0 / 20.0
  # Every term contracts each eigencomponent by at least `rate`...
  assert np.all(errors <= errors[0] * rate**steps * (1 + 1e-9))
  # ...and the slowest one (lambda_min) sets the observed rate.
  observed = (errors[-1] / errors[-2]) ** (1.0 / 5)
  assert abs(observed - rate) < 1e-3


def test_neumann_with_k_terms_equals_differentiating_k_unrolled_gd_steps_from_optimum():
  """Lorraine et al. (2020), Theorem 1, on a non-quadratic inner problem (logistic)."""
  inner, outer, w0, train, val = _problems.digits_logistic(num_samples=100)
  log_decay = jnp.linspace(-3.0, -1.0, 64)
  w_star = _problems.newton_argmin(inner, w0, log_decay, *train)
  alpha, steps = 0.5, 15

  def unrolled_objective(log_decay):
    grad = jax.grad(inner)
    w = jax.lax.fori_loop(
      0,
      steps,
      lambda _, w: jax.tree.map(lambda p, g: p - alpha * g, w, grad(w, log_decay, *train)),
      w_star,
    )
    return outer(w, log_decay, *val)

  unrolled = jax.jit(jax.grad(unrolled_objective))(log_decay)
  neumann = _problems.jit_hypergrad(
    inner,
    outer,
    w_star,
    log_decay,
    inner_args=train,
    outer_args=val,
    solver=ih.Neumann(steps=steps, alpha=alpha),
  )
  assert _problems.relative_error(neumann, unrolled) < 1e-8


def test_automatic_alpha_converges_on_positive_definite_hessian():
  problem = _problems.Ridge(d=10, seed=3)
  exact = problem.exact_hypergrad(problem.lam)
  got, info, _ = _problems.jit_hypergrad_with_info(
    problem.inner_loss,
    problem.outer_loss,
    problem.argmin(problem.lam),
    problem.lam,
    inner_args=(problem.x, problem.y),
    outer_args=(problem.x_val, problem.y_val),
    solver=ih.Neumann(steps=2000),
  )
  assert _problems.relative_error(got, exact) < 1e-8
  assert not bool(info.diverged) and float(info.residual_norm) < 1e-8


def test_automatic_alpha_uses_inverse_of_largest_eigenvalue():
  a = jnp.diag(jnp.array([1.0, 3.0, 50.0]))
  alpha, state = ih.Neumann(estimate_steps=200).step_size(lambda v: a @ v, jnp.ones(3), None)
  assert abs(float(alpha) - 1.0 / 50.0) < 1e-10
  assert float(state.alpha) == float(alpha)  # kept for the next solves


@pytest.mark.parametrize(
  "eigenvalues", [[1.0, 2.0, 30.0], [-1.0, 2.0, 3.0]], ids=["alpha_too_large", "indefinite"]
)
def test_divergent_series_is_reported(eigenvalues):
  a = jnp.diag(jnp.array(eigenvalues))
  _, info, _ = ih.Neumann(steps=50, alpha=0.1).solve(lambda v: a @ v, jnp.ones(3))
  assert bool(info.diverged) and float(info.residual_norm) > 1.0


def test_zero_steps_gives_zero_and_one_step_gives_alpha_times_rhs():
  b = jnp.arange(1.0, 4.0)
  x0, info0, _ = ih.Neumann(steps=0, alpha=0.3).solve(lambda v: 2.0 * v, b)
  x1, _, _ = ih.Neumann(steps=1, alpha=0.3).solve(lambda v: 2.0 * v, b)
  np.testing.assert_array_equal(x0, jnp.zeros(3))
  assert float(info0.residual_norm) == 1.0
  np.testing.assert_allclose(x1, 0.3 * b, rtol=1e-15)


def test_traced_alpha_is_accepted_under_jit():
  a = jnp.diag(jnp.array([1.0, 2.0]))

  @jax.jit
  def solve(alpha):
    return ih.Neumann(steps=200, alpha=alpha).solve(lambda v: a @ v, jnp.ones(2))[0]

  np.testing.assert_allclose(solve(0.4), jnp.array([1.0, 0.5]), rtol=1e-12)


def test_fixed_alpha_keeps_no_state():
  solver = ih.Neumann(steps=3, alpha=0.5)
  assert solver.init(jnp.ones(3)) is None
  assert solver.solve(lambda v: 2.0 * v, jnp.ones(3))[2] is None
