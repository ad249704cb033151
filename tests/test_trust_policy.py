"""The convergence policy (issue 17): which solves are flagged, refused or exact by default.

Each case states its exact answer (a closed form or `ih.Direct()`) or the flag it must
raise; the cases that were silently wrong before the policy are marked in the name.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import implicit_hyper as ih


def hypergradient_warnings(fn, *args):
  """``(fn(*args), [messages of the HypergradientWarnings it issued])``."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = fn(*args)
    jax.effects_barrier()  # the checks' callbacks of compiled code run with it, asynchronously
  return out, [str(w.message) for w in caught if issubclass(w.category, ih.HypergradientWarning)]


def graded_ridge():
  """Ridge with columns scaled logspace(0, -3): n = 200, d = 150, a closed-form inner solver."""
  rng = np.random.default_rng(0)
  scale = np.logspace(0, -3, 150)
  x, y = jnp.asarray(rng.normal(size=(200, 150)) * scale), jnp.asarray(rng.normal(size=200))
  x_val = jnp.asarray(rng.normal(size=(100, 150)) * scale)
  y_val = jnp.asarray(rng.normal(size=100))
  loss = lambda w, lam, x, y: 0.5 * jnp.mean((x @ w - y) ** 2) + 0.5 * jnp.exp(lam) * w @ w
  gram = lambda lam, x: x.T @ x / x.shape[0] + jnp.exp(lam) * jnp.eye(x.shape[1])
  closed_form = lambda w0, lam, x, y: jnp.linalg.solve(gram(lam, x), x.T @ y / x.shape[0])

  def hypergradient(solver):
    solve = ih.implicit_argmin(loss, solver=solver)(closed_form)
    val = lambda lam: jnp.mean((x_val @ solve(jnp.zeros(150), lam, x, y) - y_val) ** 2)
    return jax.grad(val)(jnp.log(1e-3))

  # the same derivative by differentiating the closed form itself
  exact = jax.grad(lambda lam: jnp.mean((x_val @ closed_form(None, lam, x, y) - y_val) ** 2))
  return hypergradient, float(exact(jnp.log(1e-3)))


def test_short_bicgstab_is_flagged_where_it_was_silently_79_percent_off():
  hypergradient, exact = graded_ridge()
  g, messages = hypergradient_warnings(hypergradient, ih.BiCGStab(steps=5))
  assert abs(float(g) - exact) / abs(exact) > 0.5  # the answer is still wrong ...
  assert len(messages) == 1 and "did not converge" in messages[0]  # ... but now flagged
  assert "after 5 steps" in messages[0]


def test_converged_bicgstab_is_exact_and_silent():
  hypergradient, exact = graded_ridge()
  g, messages = hypergradient_warnings(hypergradient, ih.BiCGStab(steps=300))
  assert messages == []
  assert abs(float(g) - exact) <= 1e-8 * abs(exact)


def quickstart_hypergradient(solver):
  """The README quickstart's hypergradient (diabetes, one decay per feature), float64."""
  from sklearn.datasets import load_diabetes

  x, y = load_diabetes(return_X_y=True)
  x, y = jnp.asarray((x - x.mean(0)) / x.std(0)), jnp.asarray((y - y.mean()) / y.std())
  (x_train, y_train), (x_val, y_val) = (x[:200], y[:200]), (x[200:300], y[200:300])
  loss = lambda w, ld, x, y: jnp.mean((x @ w - y) ** 2) + jnp.sum(jnp.exp(ld) * w**2)

  @ih.implicit_argmin(loss, solver=solver)
  def train(w0, ld, x, y):
    return jnp.linalg.solve(x.T @ x / len(x) + jnp.diag(jnp.exp(ld)), x.T @ y / len(x))

  val = lambda ld: jnp.mean((x_val @ train(jnp.zeros(10), ld, x_train, y_train) - y_val) ** 2)
  return jax.grad(val)(jnp.full(10, -2.0))


@pytest.mark.parametrize(
  "solver", [ih.CG(steps=2, tol=1e-6), ih.Neumann(steps=0)], ids=["cg_2_steps", "neumann_0"]
)
def test_unconverged_solve_on_the_quickstart_is_flagged(solver):
  exact = quickstart_hypergradient(ih.Direct())
  g, messages = hypergradient_warnings(quickstart_hypergradient, solver)
  assert float(jnp.linalg.norm(g - exact) / jnp.linalg.norm(exact)) > 0.2  # 27% and 100% off
  assert len(messages) == 1 and "did not converge" in messages[0]


def test_neumann_with_zero_terms_is_not_converged():
  _, info, _ = ih.Neumann(steps=0, alpha=0.5).solve(lambda v: 2.0 * v, jnp.ones(3))
  assert not bool(info.converged) and not bool(info.diverged)
  _, info, _ = ih.Neumann(steps=0, alpha=0.5).solve(lambda v: 2.0 * v, jnp.zeros(3))
  assert bool(info.converged)  # b = 0: x = 0 is the solution


def test_default_solver_is_exact_on_the_quickstart():
  exact = quickstart_hypergradient(ih.Direct())
  g, messages = hypergradient_warnings(quickstart_hypergradient, None)
  assert messages == []
  np.testing.assert_allclose(g, exact, rtol=1e-10, atol=1e-14)


def singular_fixed_point(solver):
  """``z = W tanh(z) + a u`` with W symmetric, eigenvalue exactly 1: z* = 0 at a = 0."""
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.normal(size=(20, 20)))
  w = jnp.asarray(q @ np.diag(np.concatenate([[1.0], np.linspace(-0.5, 0.5, 19)])) @ q.T)
  u, c = jnp.asarray(rng.normal(size=20)), jnp.asarray(rng.normal(size=20))
  step = lambda z, a: w @ jnp.tanh(z) + a * u
  solve = ih.implicit_fixed_point(step, solver=solver)(lambda z0, a: jnp.zeros_like(z0))
  return jax.grad(lambda a: c @ solve(jnp.zeros(20), a))(0.0)


@pytest.mark.parametrize("solver", [None, ih.Direct(), ih.GMRES(steps=40)])
def test_singular_jacobian_of_a_fixed_point_is_flagged(solver):
  g, messages = hypergradient_warnings(singular_fixed_point, solver)
  assert len(messages) == 1 and "singular" in messages[0]
  with ih.record_solves() as records:
    hypergradient_warnings(singular_fixed_point, solver)
  assert float(records[0].info.residual_norm) > 1e-3 and not bool(records[0].info.converged)


def test_direct_above_its_size_is_refused_at_trace_time():
  n = ih.Direct().max_size + 1
  solve = lambda b: ih.Direct().solve(lambda v: 2.0 * v, b)[0]
  with pytest.raises(ValueError, match=r"10,001 x 10,001.*ih\.CG\(\).*ih\.Neumann\(\)"):
    jax.eval_shape(solve, jax.ShapeDtypeStruct((n,), jnp.float32))
  with pytest.raises(ValueError, match=r"max_size"):
    jax.jit(solve).trace(jax.ShapeDtypeStruct((n,), jnp.float32))
  at_limit = jax.eval_shape(solve, jax.ShapeDtypeStruct((n - 1,), jnp.float32))
  assert at_limit.shape == (n - 1,)  # the limit itself is allowed (traced, never run)
  raised = lambda b: ih.Direct(max_size=None).solve(lambda v: 2.0 * v, b)[0]
  assert jax.eval_shape(raised, jax.ShapeDtypeStruct((n,), jnp.float32)).shape == (n,)


def test_direct_rejects_a_bad_max_size():
  with pytest.raises(ValueError, match=r"`Direct\(max_size=...\)` must be an int >= 1"):
    ih.Direct(max_size=0)


def test_swapped_loss_arguments_are_named_in_the_warning():
  loss = lambda lam, w: 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * jnp.sum(lam * w**2)  # swapped
  solve = ih.implicit_argmin(loss, solver=ih.Direct())(lambda w0, lam: 1.0 / (1.0 + lam))
  _, messages = hypergradient_warnings(
    jax.grad(lambda lam: jnp.sum(solve(jnp.zeros(3), lam))), jnp.ones(3)
  )
  assert len(messages) == 1
  assert "not a solution" in messages[0] and "loss(params, hparams, ...)" in messages[0]


def logistic_regression(solver):
  """200 features scaled logspace(0, -1.2), 2,000 samples, decay 3e-3: H has condition 56."""
  rng = np.random.default_rng(0)
  scale = np.logspace(0, -1.2, 200)
  x = rng.normal(size=(2000, 200)) * scale
  y = (rng.uniform(size=2000) < 1 / (1 + np.exp(-x @ rng.normal(size=200) * 3 / 14))) * 1.0
  x_val = jnp.asarray(rng.normal(size=(500, 200)) * scale)
  y_val = jnp.asarray((rng.uniform(size=500) < 0.5) * 1.0)
  x, y = jnp.asarray(x), jnp.asarray(y)

  def loss(w, log_decay, x, y):
    z = x @ w
    return jnp.mean(jnp.logaddexp(0, z) - y * z) + 0.5 * jnp.exp(log_decay) * w @ w

  def newton(w0, log_decay, x, y):
    hess, grad = jax.hessian(loss), jax.grad(loss)
    step = lambda _, w: w - jnp.linalg.solve(hess(w, log_decay, x, y), grad(w, log_decay, x, y))
    return jax.lax.fori_loop(0, 25, step, w0)

  solve = ih.implicit_argmin(loss, solver=solver)(newton)
  val = lambda ld: jnp.mean(jnp.logaddexp(0, x_val @ solve(jnp.zeros(200), ld, x, y)) * y_val)
  return float(jax.grad(val)(jnp.log(3e-3)))


def quadratic(solver):
  """``0.5 w^T A w - (b + h)^T w`` with eigenvalues of A 1..60 (50 weights, condition 60)."""
  rng = np.random.default_rng(1)
  q, _ = np.linalg.qr(rng.normal(size=(50, 50)))
  a = jnp.asarray(q @ np.diag(np.linspace(1.0, 60.0, 50)) @ q.T)
  b, t = jnp.asarray(rng.normal(size=50)), jnp.asarray(rng.normal(size=50))
  loss = lambda w, h: 0.5 * w @ a @ w - (b + h) @ w
  solve = ih.implicit_argmin(loss, solver=solver)(lambda w0, h: jnp.linalg.solve(a, b + h))
  return float(jax.grad(lambda h: jnp.sum(jnp.sin(t * solve(jnp.zeros(50), h))))(jnp.zeros(50)) @ t)


@pytest.mark.parametrize("problem", [logistic_regression, quadratic], ids=["logistic", "quadratic"])
def test_default_solver_is_exact_where_the_default_series_was_silently_off(problem):
  exact = problem(ih.Direct())
  default, messages = hypergradient_warnings(problem, None)
  assert messages == []
  assert abs(default - exact) <= 1e-8 * abs(exact)
  series, messages = hypergradient_warnings(problem, ih.Neumann())  # the paper's method
  assert messages == [] and abs(series - exact) > 0.05 * abs(exact)  # inexact by design


def test_neumann_with_a_tol_stops_there_and_claims_it():
  a = jnp.diag(jnp.array([1.0, 2.0, 4.0]))
  x, info, _ = ih.Neumann(steps=1000, alpha=0.25, tol=1e-9).solve(lambda v: a @ v, jnp.ones(3))
  assert bool(info.converged) and float(info.residual_norm) <= 1e-9
  assert int(info.num_steps) < 1000  # stopped early: (3/4)^k <= 1e-9 at k = 73
  np.testing.assert_allclose(x, jnp.array([1.0, 0.5, 0.25]), rtol=1e-8)
  _, info, _ = ih.Neumann(steps=10, alpha=0.25, tol=1e-9).solve(lambda v: a @ v, jnp.ones(3))
  assert not bool(info.converged) and not bool(info.diverged) and int(info.num_steps) == 10


def test_richardson_with_a_tol_claims_it():
  matvec = lambda v: 2.0 * v
  _, info, _ = ih.Richardson(step_size=0.25, steps=3, tol=1e-3).solve(matvec, jnp.ones(2))
  assert not bool(info.converged)  # residual (1/2)^2 = 0.25 before the last step
  _, info, _ = ih.Richardson(step_size=0.25, steps=3).solve(matvec, jnp.ones(2))
  assert bool(info.converged)  # no tol: inexact by design


def test_krylov_default_tol_follows_the_dtype():
  assert ih.CG().residual_target(jnp.float64) == 1e-10
  assert ih.CG().residual_target(jnp.float32) == pytest.approx(np.finfo(np.float32).eps ** (2 / 3))
  assert ih.CG(tol=1e-3).residual_target(jnp.float32) == 1e-3
  assert ih.Neumann().residual_target(jnp.float64) is None  # claims only not to diverge


def test_hypergrad_reports_but_does_not_flag_a_truncated_krylov_solve():
  inner = lambda w, lam: 0.5 * w @ jnp.diag(jnp.arange(1.0, 31.0)) @ w - lam * jnp.sum(w)
  outer = lambda w, lam: jnp.sin(jnp.arange(30.0)) @ w
  w_star = 1.0 / jnp.arange(1.0, 31.0)
  g, messages = hypergradient_warnings(
    lambda: ih.hypergrad(inner, outer, w_star, 1.0, solver=ih.CG(steps=3))
  )
  assert messages == []  # the online setting: a truncated solve is the method
  _, info, _ = ih.hypergrad_with_info(inner, outer, w_star, 1.0, solver=ih.CG(steps=3))
  assert not bool(info.converged) and float(info.residual_norm) > 1e-3
  exact = jnp.sin(jnp.arange(30.0)) @ w_star  # d/dlam of sin(k)^T (lam / a) at lam = 1
  assert abs(float(g) - float(exact)) > 1e-6  # the truncated answer differs, unflagged
