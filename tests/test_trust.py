"""The failure zoo: each way a hypergradient goes wrong is either exact or flagged (float64).

Healthy cases must raise no warning: the test configuration turns warnings into errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import implicit_hyper as ih

DIAG = jnp.array([1.0, 2.0, 4.0])


def quadratic(w, lam, target):
  """0.5 w^T diag(DIAG) w - target^T w + 0.5 lam |w|^2: w* = target / (DIAG + lam)."""
  return 0.5 * jnp.sum(DIAG * w**2) - jnp.dot(target, w) + 0.5 * lam * jnp.sum(w**2)


def exact_solution(lam, target):
  return target / (DIAG + lam)


# 1. Stale closed-over values.

TARGET = jnp.ones(3)


def global_loss(w, lam):
  return quadratic(w, lam, TARGET)


def test_module_level_arrays_are_read_afresh_at_every_call():
  global TARGET

  @ih.implicit_argmin(global_loss, solver=ih.Direct())
  def solve(w0, lam):
    return exact_solution(lam, TARGET)

  for value in (1.0, 3.0, -2.0):
    TARGET = jnp.full(3, value)
    for grad_fn in (jax.grad, lambda f: jax.jit(jax.grad(f))):  # eager and a fresh jit
      got = grad_fn(lambda lam: jnp.sum(solve(jnp.zeros(3), lam)))(0.5)
      expected = jnp.sum(-TARGET / (DIAG + 0.5) ** 2)
      assert jnp.isclose(got, expected, rtol=1e-12), value
  TARGET = jnp.ones(3)


def test_python_loop_solver_with_an_iterator_runs_once_per_call():
  consumed = []
  batches = iter(range(1000))

  def loss(w, lam):
    return quadratic(w, lam, jnp.ones(3))

  @ih.implicit_argmin(loss, solver=ih.CG(steps=3))
  def solve(w0, lam):
    w = w0
    for _ in range(5):  # early stopping on concrete values: cannot be traced
      consumed.append(next(batches))
      w = w - 0.2 * jax.grad(loss)(w, lam)
      if float(jnp.linalg.norm(jax.grad(loss)(w, lam))) < 1e-12:
        break
    return exact_solution(lam, jnp.ones(3))

  for _ in range(3):
    jax.grad(lambda lam: jnp.sum(solve(jnp.zeros(3), lam)))(1.0)
  assert len(consumed) == 15


# 2. The inner problem is not solved.


def test_early_stopped_inner_solver_is_flagged_as_not_stationary():
  @ih.implicit_argmin(quadratic, solver=ih.Direct())
  def three_steps(w0, lam, target):
    step = lambda _, w: w - 0.1 * jax.grad(quadratic)(w, lam, target)
    return jax.lax.fori_loop(0, 3, step, w0)

  with pytest.warns(ih.HypergradientWarning, match="not a solution"):
    jax.grad(lambda lam: jnp.sum(three_steps(jnp.zeros(3), lam, jnp.ones(3))))(1.0)


def test_converged_inner_solver_raises_no_warning_and_records_its_stationarity():
  @ih.implicit_argmin(quadratic, solver=ih.Direct())
  def converged(w0, lam, target):
    step = lambda _, w: w - 0.2 * jax.grad(quadratic)(w, lam, target)
    return jax.lax.fori_loop(0, 300, step, w0)

  with ih.record_solves() as records:
    g = jax.grad(lambda lam: jnp.sum(converged(jnp.zeros(3), lam, jnp.ones(3))))(1.0)
  assert jnp.isclose(g, jnp.sum(-1.0 / (DIAG + 1.0) ** 2), rtol=1e-10)
  assert len(records) == 1 and records[0].failures == ()
  assert records[0].info.stationarity < 1e-10


def lasso_objective(w, lam, x, y):
  return 0.5 * jnp.mean((x @ w - y) ** 2) + lam * jnp.sum(jnp.abs(w))


def lasso_data():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(50, 8)))
  w_true = jnp.array([2.0, -1.5, 0, 0, 1.0, 0, 0, 0])
  return x, x @ w_true + 0.1 * jnp.asarray(rng.normal(size=50))


def proximal_gradient_map(w, lam, x, y):
  """One ISTA step: soft-thresholding of a gradient step on the smooth part."""
  step = 1.0 / jnp.linalg.eigvalsh(x.T @ x / x.shape[0])[-1]
  z = w - step * x.T @ (x @ w - y) / x.shape[0]
  return jnp.sign(z) * jnp.maximum(jnp.abs(z) - step * lam, 0.0)


def ista(w0, lam, x, y):
  return jax.lax.fori_loop(0, 3000, lambda _, w: proximal_gradient_map(w, lam, x, y), w0)


def test_lasso_through_argmin_is_flagged_and_through_the_fixed_point_is_exact():
  x, y = lasso_data()
  validation = lambda w: jnp.sum((w - 1.0) ** 2)

  argmin = ih.implicit_argmin(lasso_objective, solver=ih.Direct())(ista)
  with pytest.warns(ih.HypergradientWarning, match="not a solution"):
    jax.grad(lambda lam: validation(argmin(jnp.zeros(8), lam, x, y)))(0.1)

  fixed_point = ih.implicit_fixed_point(proximal_gradient_map, solver=ih.Direct())(ista)
  g = jax.grad(lambda lam: validation(fixed_point(jnp.zeros(8), lam, x, y)))(0.1)
  eps = 1e-6
  fd = (
    validation(ista(jnp.zeros(8), 0.1 + eps, x, y))
    - validation(ista(jnp.zeros(8), 0.1 - eps, x, y))
  ) / (2 * eps)
  assert jnp.isclose(g, fd, rtol=1e-6)


# 3. The backward solve is far from converged, or the Hessian is indefinite.


def ill_conditioned(w, lam):
  d = jnp.logspace(0, 2, 4)  # condition number 100
  return 0.5 * jnp.sum(d * w**2) - jnp.sum(w) + 0.5 * lam * jnp.sum(w**2)


def test_truncated_neumann_is_silent_by_default_and_flagged_with_a_tol():
  exact = lambda w0, lam: 1.0 / (jnp.logspace(0, 2, 4) + lam)
  target = lambda solve: jax.grad(lambda lam: jnp.sum(solve(jnp.zeros(4), lam)))(0.0)
  quiet = ih.implicit_argmin(ill_conditioned, solver=ih.Neumann(steps=5))(exact)
  with ih.record_solves() as records:
    target(quiet)  # inexact by design: no warning
  assert records[0].info.residual_norm > 0.5
  strict = ih.implicit_argmin(ill_conditioned, solver=ih.Neumann(steps=5), tol=1e-3)(exact)
  with pytest.warns(ih.HypergradientWarning, match="did not converge"):
    target(strict)


def test_bicgstab_stopping_early_is_flagged_with_a_tol():
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.normal(size=(60, 60))) / 8 + 3 * jnp.eye(60)
  b = jnp.asarray(rng.normal(size=60))
  optimality = lambda w, lam: a @ w - lam * b

  solve = ih.implicit_root(optimality, solver=ih.BiCGStab(steps=2), tol=1e-8)(
    lambda w0, lam: jnp.linalg.solve(a, lam * b)
  )
  with pytest.warns(ih.HypergradientWarning, match="did not converge"):
    jax.grad(lambda lam: jnp.sum(solve(jnp.zeros(60), lam)))(1.0)


def test_indefinite_hessian_is_flagged_as_negative_curvature_by_cg():
  d = jnp.array([1.0, -0.01, 0.5])
  saddle = lambda w, lam: 0.5 * jnp.sum(d * w**2) - lam * jnp.sum(w)
  solve = ih.implicit_argmin(saddle, solver=ih.CG(steps=3))(lambda w0, lam: lam / d)
  with pytest.warns(ih.HypergradientWarning, match="negative curvature"):
    jax.grad(lambda lam: jnp.sum(solve(jnp.zeros(3), lam)))(1.0)


# 4. Invalid settings are refused where they are made.


@pytest.mark.parametrize(
  "make, match",
  [
    (lambda: ih.CG(tol=float("nan")), "tol"),
    (lambda: ih.CG(steps=True), "steps"),
    (lambda: ih.Neumann(steps=-1), "steps"),
    (lambda: ih.Neumann(alpha=0.0), "alpha"),
    (lambda: ih.BiCGStab(tol=-1.0), "tol"),
    (lambda: ih.CG(ridge=float("nan")), "ridge"),
  ],
)
def test_invalid_solver_settings_raise_naming_the_argument(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_numpy_integers_are_valid_step_counts():
  assert ih.Neumann(steps=np.int64(5)).steps == 5
  assert ih.CG(steps=np.int32(3)).steps == 3


def test_solver_class_instead_of_instance_is_refused_at_decoration():
  with pytest.raises(TypeError, match="solver=CG\\(\\)"):
    ih.implicit_argmin(quadratic, solver=ih.CG)


def test_decorator_without_parentheses_says_how_to_use_it():
  @ih.implicit_argmin
  def solve(w0, lam, target):
    return w0

  with pytest.raises(TypeError, match="without arguments"):
    solve(jnp.zeros(3), 1.0, jnp.ones(3))


def test_args_that_are_not_a_tuple_are_refused():
  with pytest.raises(TypeError, match="inner_args"):
    ih.hypergrad(quadratic, quadratic, jnp.zeros(3), 1.0, inner_args=jnp.ones(3))


# 5. dtypes.


def test_complex_parameters_are_refused_up_front():
  solve = ih.implicit_argmin(quadratic)(lambda w0, lam, t: w0)
  with pytest.raises(TypeError, match="Complex"):
    solve(jnp.zeros(3, jnp.complex128), 1.0, jnp.ones(3))
  with pytest.raises(TypeError, match="real floating"):
    ih.hypergrad(quadratic, quadratic, jnp.zeros(3), 1.0 + 0j, inner_args=(jnp.ones(3),))


def mixed_loss(w, lam):
  return (
    0.5 * jnp.sum(DIAG * w["a"].astype(jnp.float64) ** 2)
    + 0.5 * jnp.sum((w["b"].astype(jnp.float64) - 1.0) ** 2)
    + 0.5 * lam * (jnp.sum(w["a"].astype(jnp.float64) ** 2) + jnp.sum(w["b"] ** 2))
    - jnp.sum(w["a"].astype(jnp.float64))
  )


@pytest.mark.parametrize(
  "solver",
  [ih.Neumann(steps=200), ih.BiCGStab(steps=10), ih.Direct()],
  ids=lambda s: type(s).__name__,
)
def test_mixed_float32_float64_parameters(solver):
  params = {"a": jnp.zeros(3, jnp.float32), "b": jnp.zeros(2, jnp.float64)}
  outer = lambda w, lam: jnp.sum(w["a"].astype(jnp.float64)) + jnp.sum(w["b"])
  w = {"a": (1.0 / (DIAG + 0.5)).astype(jnp.float32), "b": jnp.full(2, 1.0 / 1.5)}
  g = ih.hypergrad(mixed_loss, outer, w, jnp.asarray(0.5), solver=solver)
  exact = jnp.sum(-1.0 / (DIAG + 0.5) ** 2) + 2 * (-1.0 / 1.5**2)
  assert jnp.isclose(g, exact, rtol=1e-5)  # float32 leaves: float32 accuracy
  loop = ih.bilevel(mixed_loss, outer, optax.sgd(0.1), optax.sgd(0.01), solver=solver)
  state, metrics = jax.jit(loop.step)(loop.init(params, jnp.asarray(0.5)), (), ())
  assert jax.tree.map(lambda x: x.dtype, state.params) == {"a": jnp.float32, "b": jnp.float64}
  assert not bool(metrics.skipped)


def test_direct_solves_bfloat16_operators_in_float32():
  x, info, _ = ih.Direct().solve(lambda v: DIAG.astype(jnp.bfloat16) * v, jnp.ones(3, jnp.bfloat16))
  assert x.dtype == jnp.bfloat16 and not bool(info.diverged)
  assert jnp.allclose(x.astype(jnp.float32), 1.0 / DIAG, rtol=1e-2)


# 6. A parameter the training loss does not use.


def test_unused_parameter_leaf_gives_the_exact_hypergradient_without_a_flag():
  loss = lambda w, lam: quadratic(w["used"], lam, jnp.ones(3))
  outer = lambda w, lam: jnp.sum(w["used"])
  w = {"used": exact_solution(1.0, jnp.ones(3)), "unused": jnp.zeros(2)}
  grads, info, _ = ih.hypergrad_with_info(loss, outer, w, jnp.asarray(1.0), solver=ih.Direct())
  assert not bool(info.diverged)
  assert jnp.isclose(grads, jnp.sum(-1.0 / (DIAG + 1.0) ** 2), rtol=1e-12)


# 7. Warnings and errors that reach the user.


def diverging_solve():
  return ih.implicit_argmin(quadratic, solver=ih.Neumann(steps=40, alpha=1.0))(
    lambda w0, lam, t: exact_solution(lam, t)
  )


def test_every_failure_warns_at_the_users_line():
  solve = diverging_solve()
  with pytest.warns(ih.HypergradientWarning) as caught:
    for _ in range(10):
      jax.grad(lambda lam: jnp.sum(solve(jnp.zeros(3), lam, jnp.ones(3))))(1.0)
  assert len(caught) == 10
  assert all(w.filename == __file__ for w in caught)


def test_raise_policy_raises_eagerly_under_jit_and_vmap():
  solve = ih.implicit_argmin(quadratic, solver=ih.Neumann(steps=40, alpha=1.0), on_failure="raise")(
    lambda w0, lam, t: exact_solution(lam, t)
  )
  objective = lambda lam: jnp.sum(solve(jnp.zeros(3), lam, jnp.ones(3)))
  with pytest.raises(ih.HypergradientError, match="diverged"):
    jax.grad(objective)(1.0)
  with pytest.raises(Exception, match="HypergradientError"):
    jax.block_until_ready(jax.jit(jax.grad(objective))(1.0))
  with pytest.raises(ih.HypergradientError):
    jax.vmap(jax.grad(objective))(jnp.ones(2))
  healthy = ih.implicit_argmin(quadratic, solver=ih.Direct(), on_failure="raise")(
    lambda w0, lam, t: exact_solution(lam, t)
  )
  assert jnp.isfinite(
    jax.jit(jax.grad(lambda lam: jnp.sum(healthy(jnp.zeros(3), lam, jnp.ones(3)))))(1.0)
  )


def test_record_solves_under_jit_and_the_ignore_policy():
  make = lambda policy: ih.implicit_argmin(
    quadratic, solver=ih.Neumann(steps=40, alpha=1.0), on_failure=policy
  )(lambda w0, lam, t: exact_solution(lam, t))
  grad = lambda solve: jax.jit(jax.grad(lambda lam: jnp.sum(solve(jnp.zeros(3), lam, jnp.ones(3)))))
  warned, ignored = grad(make("warn")), grad(make("ignore"))
  with ih.record_solves() as records, pytest.warns(ih.HypergradientWarning) as caught:
    warned(1.0)
    warned(2.0)
  assert len(records) == 2 and len(caught) == 2
  assert all(bool(r.info.diverged) and "diverged" in r.failures[0] for r in records)
  with ih.record_solves() as records:
    ignored(1.0)  # applied as it is, and not recorded
  assert records == []


def test_invalid_policy_is_refused():
  with pytest.raises(ValueError, match="on_failure"):
    ih.implicit_argmin(quadratic, on_failure="panic")


def test_neumann_reports_negative_curvature_flagged_by_decorators_not_by_hypergrad():
  d = jnp.array([1.0, -0.01, 0.5])
  saddle = lambda w, lam: 0.5 * jnp.sum(d * w**2) - lam * jnp.sum(w)
  solve = ih.implicit_argmin(saddle, solver=ih.Neumann(steps=5))(lambda w0, lam: lam / d)
  with pytest.warns(ih.HypergradientWarning, match="negative curvature"):
    jax.grad(lambda lam: jnp.sum(solve(jnp.zeros(3), lam)))(1.0)
  # At an iterate of training (the online loop) it is reported, not flagged.
  outer = lambda w, lam: jnp.sum(w)
  _, info, _ = ih.hypergrad_with_info(
    saddle, outer, 1.0 / d, jnp.asarray(1.0), solver=ih.Neumann(steps=5)
  )
  assert bool(info.negative_curvature)
  ih.hypergrad(saddle, outer, 1.0 / d, jnp.asarray(1.0), solver=ih.Neumann(steps=5))
