"""`implicit_argmin` / `implicit_root`: gradients, transformations, policies, errors.

Forward mode, Hessians, keyword arguments and `implicit_fixed_point` are in test_modes.py;
the "raise" policy, stationarity checks and inner solvers with Python state in test_trust.py.
"""

import warnings

import _problems
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import implicit_hyper as ih

RIDGE = _problems.Ridge()


def _exact_solver(w0, lam, x, y):
  """An inner 'solver' that returns the exact ridge optimum."""
  del w0
  return RIDGE.argmin(lam, x, y)


def _validation(solve):
  return lambda lam: RIDGE.outer_loss(
    solve(jnp.zeros(RIDGE.d), lam, RIDGE.x, RIDGE.y), lam, RIDGE.x_val, RIDGE.y_val
  )


SOLVE = ih.implicit_argmin(RIDGE.inner_loss, solver=ih.Direct())(_exact_solver)
EXACT = RIDGE.exact_hypergrad(RIDGE.lam)


def test_gradient_matches_closed_form():
  assert _problems.relative_error(jax.grad(_validation(SOLVE))(RIDGE.lam), EXACT) < 1e-10


def test_gradient_under_jit_matches_closed_form():
  got = jax.jit(jax.grad(_validation(SOLVE)))(RIDGE.lam)
  assert _problems.relative_error(got, EXACT) < 1e-10


def test_iterative_inner_solver_with_default_neumann_solver():
  @ih.implicit_argmin(RIDGE.inner_loss, solver=ih.Neumann(steps=3000))
  def gradient_descent(w0, lam, x, y):
    grad = jax.grad(RIDGE.inner_loss)
    return jax.lax.fori_loop(0, 3000, lambda _, w: w - 0.2 * grad(w, lam, x, y), w0)

  got = jax.jit(jax.grad(_validation(gradient_descent)))(RIDGE.lam)
  assert _problems.relative_error(got, EXACT) < 1e-8


def test_eager_inner_solver_with_python_control_flow_on_values():
  """An existing solver that stops early on a concrete residual runs as it is."""
  grad = jax.jit(jax.grad(RIDGE.inner_loss))

  @ih.implicit_argmin(RIDGE.inner_loss, solver=ih.Direct())
  def gradient_descent_until_converged(w, lam, x, y):
    while float(jnp.linalg.norm(g := grad(w, lam, x, y))) > 1e-13:
      w = w - 0.2 * g
    return w

  got = jax.grad(_validation(gradient_descent_until_converged))(RIDGE.lam)
  assert _problems.relative_error(got, EXACT) < 1e-10


def test_gradient_with_respect_to_data_arguments_matches_differentiating_closed_form():
  def val(x, y):
    return RIDGE.outer_loss(
      SOLVE(jnp.zeros(RIDGE.d), RIDGE.lam, x, y), None, RIDGE.x_val, RIDGE.y_val
    )

  def val_closed(x, y):
    return RIDGE.outer_loss(RIDGE.argmin(RIDGE.lam, x, y), None, RIDGE.x_val, RIDGE.y_val)

  got = jax.grad(val, argnums=(0, 1))(RIDGE.x, RIDGE.y)
  expected = jax.grad(val_closed, argnums=(0, 1))(RIDGE.x, RIDGE.y)
  assert _problems.relative_error(got, expected) < 1e-10


def test_init_params_get_zero_cotangent():
  g = jax.grad(lambda w0: jnp.sum(SOLVE(w0, RIDGE.lam, RIDGE.x, RIDGE.y)))(jnp.ones(RIDGE.d))
  np.testing.assert_array_equal(g, jnp.zeros(RIDGE.d))


def test_vmap_over_independent_inner_problems():
  lams = jnp.stack([RIDGE.lam, RIDGE.lam + 0.3, RIDGE.lam - 0.2])
  got = jax.vmap(jax.grad(_validation(SOLVE)))(lams)
  for lam, g in zip(lams, got, strict=True):
    assert _problems.relative_error(g, RIDGE.exact_hypergrad(lam)) < 1e-10


def test_vmap_over_tasks_with_cg_and_batched_data():
  xs = jnp.stack([RIDGE.x, RIDGE.x[::-1] * 1.5])

  @ih.implicit_argmin(RIDGE.inner_loss, solver=ih.CG(steps=RIDGE.d, tol=0.0))
  def solve(w0, lam, x, y):
    return _exact_solver(w0, lam, x, y)

  def val(lam, x):
    return RIDGE.outer_loss(
      solve(jnp.zeros(RIDGE.d), lam, x, RIDGE.y), lam, RIDGE.x_val, RIDGE.y_val
    )

  def val_closed(lam, x):
    w = RIDGE.argmin(lam, x, RIDGE.y)
    return RIDGE.outer_loss(w, lam, RIDGE.x_val, RIDGE.y_val)

  got = jax.jit(jax.vmap(jax.grad(val), in_axes=(None, 0)))(RIDGE.lam, xs)
  expected = jax.vmap(jax.grad(val_closed), in_axes=(None, 0))(RIDGE.lam, xs)
  assert _problems.relative_error(got, expected) < 1e-8


def test_pmap_over_eight_devices():
  assert jax.device_count() == 8
  lams = RIDGE.lam + jnp.linspace(-0.5, 0.5, 8)[:, None]
  got = jax.pmap(jax.grad(_validation(SOLVE)))(lams)
  for lam, g in zip(lams, got, strict=True):
    assert _problems.relative_error(g, RIDGE.exact_hypergrad(lam)) < 1e-10


def test_grad_of_function_calling_solver_twice_adds_both_contributions():
  def twice(lam):
    return _validation(SOLVE)(lam) + 3.0 * _validation(SOLVE)(2.0 * lam)

  expected = EXACT + 6.0 * RIDGE.exact_hypergrad(2.0 * RIDGE.lam)
  assert _problems.relative_error(jax.grad(twice)(RIDGE.lam), expected) < 1e-10


def test_reverse_mode_through_a_params_leaf_that_does_not_depend_on_hparams():
  """theta* = {"a": 1 / (1 + lam), "b": 2}: d sum(a) / d lam = -2 / (1 + lam)^2; the leaf
  "b" contributes a right-hand side that is constant in lam (a bias with a fixed decay)."""

  def loss(p, lam):
    return (
      0.5 * (1 + lam) * jnp.sum(p["a"] ** 2) - jnp.sum(p["a"]) + 0.5 * jnp.sum((p["b"] - 2) ** 2)
    )

  solve = ih.implicit_argmin(loss, solver=ih.Direct())(
    lambda p0, lam: {"a": jnp.full(2, 1 / (1 + lam)), "b": jnp.full(2, 2.0)}
  )
  zeros = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
  got = jax.grad(lambda lam: jnp.sum(solve(zeros, lam)["a"]))(1.0)
  np.testing.assert_allclose(got, -0.5, rtol=1e-12)


def test_nested_dict_params_and_hparams():
  def loss(p, h, x, y):
    w = jnp.concatenate([p["a"], p["b"]["c"]])
    lam = jnp.concatenate([h["first"], h["rest"]])
    return RIDGE.inner_loss(w, lam, x, y)

  @ih.implicit_argmin(loss, solver=ih.CG(steps=RIDGE.d, tol=0.0))
  def solve(p0, h, x, y):
    w = RIDGE.argmin(jnp.concatenate([h["first"], h["rest"]]), x, y)
    return {"a": w[:2], "b": {"c": w[2:]}}

  def val(h):
    p = solve({"a": jnp.zeros(2), "b": {"c": jnp.zeros(RIDGE.d - 2)}}, h, RIDGE.x, RIDGE.y)
    w = jnp.concatenate([p["a"], p["b"]["c"]])
    return RIDGE.outer_loss(w, None, RIDGE.x_val, RIDGE.y_val)

  g = jax.grad(val)({"first": RIDGE.lam[:1], "rest": RIDGE.lam[1:]})
  assert _problems.relative_error(jnp.concatenate([g["first"], g["rest"]]), EXACT) < 1e-8


def test_flax_parameter_tree_with_integer_labels():
  """A flax classifier, class labels as int arrays, one log weight decay per kernel entry."""
  model = nn.Dense(3, param_dtype=jnp.float64)
  x = jax.random.normal(jax.random.PRNGKey(0), (40, 4))
  labels = jnp.arange(40) % 3
  params0 = model.init(jax.random.PRNGKey(1), x)

  def loss(params, log_decay, x, labels):
    logp = jax.nn.log_softmax(model.apply(params, x))
    nll = -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))
    reg = jnp.sum(jnp.exp(log_decay) * params["params"]["kernel"] ** 2)
    return nll + 0.5 * reg + 0.5e-2 * jnp.sum(params["params"]["bias"] ** 2)

  solve = ih.implicit_argmin(loss, solver=ih.Direct())(
    lambda p0, h, x, labels: _problems.newton_argmin(loss, p0, h, x, labels)
  )

  def val(h):
    return jnp.sum(solve(params0, h, x, labels)["params"]["kernel"][0])

  log_decay = jnp.full((4, 3), -1.0)
  got = jax.grad(val)(log_decay)
  eps = 1e-5
  fd = [
    (val(log_decay.at[i, j].add(eps)) - val(log_decay.at[i, j].add(-eps))) / (2 * eps)
    for i in range(4)
    for j in range(3)
  ]
  assert _problems.relative_error(got.ravel(), jnp.array(fd)) < 1e-7


def test_closure_over_traced_arrays_is_converted_and_differentiated():
  """A loss and solver that close over `x` (a traced argument) still get d/dx right."""

  def val(lam, x):
    def loss(w, lam):
      return RIDGE.inner_loss(w, lam, x, RIDGE.y)

    solve = ih.implicit_argmin(loss, solver=ih.Direct())(
      lambda w0, lam: RIDGE.argmin(lam, x, RIDGE.y)
    )
    return RIDGE.outer_loss(solve(jnp.zeros(RIDGE.d), lam), lam, RIDGE.x_val, RIDGE.y_val)

  def val_closed(lam, x):
    return RIDGE.outer_loss(RIDGE.argmin(lam, x, RIDGE.y), lam, RIDGE.x_val, RIDGE.y_val)

  for transform in (lambda f: f, jax.jit):
    got = transform(jax.grad(val, argnums=(0, 1)))(RIDGE.lam, RIDGE.x)
    expected = jax.grad(val_closed, argnums=(0, 1))(RIDGE.lam, RIDGE.x)
    assert _problems.relative_error(got, expected) < 1e-10


def test_has_aux_returns_aux_and_differentiates_params():
  solve = ih.implicit_argmin(RIDGE.inner_loss, solver=ih.Direct(), has_aux=True)(
    lambda w0, lam, x, y: (_exact_solver(w0, lam, x, y), {"iterations": jnp.array(7)})
  )
  params, aux = solve(jnp.zeros(RIDGE.d), RIDGE.lam, RIDGE.x, RIDGE.y)
  assert int(aux["iterations"]) == 7

  def val(lam):
    w, _ = solve(jnp.zeros(RIDGE.d), lam, RIDGE.x, RIDGE.y)
    return RIDGE.outer_loss(w, lam, RIDGE.x_val, RIDGE.y_val)

  assert _problems.relative_error(jax.grad(val)(RIDGE.lam), EXACT) < 1e-10


def _fixed_point(x, a):
  """F(x, a) = x - T(x, a) with the contraction T(x) = 0.5 tanh(W x) + a (non-symmetric W)."""
  w = jnp.array([[0.3, 0.8, -0.2], [-0.5, 0.1, 0.4], [0.2, -0.7, 0.6]])
  return x - 0.5 * jnp.tanh(w @ x) - a


def _iterate(x0, a):
  return jax.lax.fori_loop(0, 200, lambda _, x: x - _fixed_point(x, a), x0)


@pytest.mark.parametrize(
  "solver",
  [None, ih.NormalCG(steps=30), ih.Direct(), ih.Neumann(steps=200, alpha=1.0)],
  ids=["bicgstab", "normal_cg", "direct", "neumann_fixed_alpha"],
)
def test_implicit_root_matches_jacobian_of_fixed_point(solver):
  solve = ih.implicit_root(_fixed_point, solver=solver)(_iterate)
  a = jnp.array([0.1, -0.2, 0.3])
  got = jax.jacrev(lambda a: solve(jnp.zeros(3), a))(a)
  # Differentiating x = T(x, a): dx/da = (I - dT/dx)^{-1}.
  x = _iterate(jnp.zeros(3), a)
  jac_t = jax.jacfwd(lambda x: x - _fixed_point(x, a))(x)
  expected = jnp.linalg.inv(jnp.eye(3) - jac_t)
  assert _problems.relative_error(got, expected) < 1e-9


@pytest.mark.parametrize("solver", [ih.CG(), ih.Neumann()], ids=["cg", "neumann_auto"])
def test_implicit_root_rejects_symmetric_only_solver(solver):
  with pytest.raises(ValueError, match="symmetric"):
    ih.implicit_root(_fixed_point, solver=solver)


def test_implicit_root_accepts_cg_when_jacobian_declared_symmetric():
  def optimality(w, lam, x, y):  # the gradient of the ridge loss: a symmetric Jacobian
    return jax.grad(RIDGE.inner_loss)(w, lam, x, y)

  solve = ih.implicit_root(optimality, solver=ih.CG(steps=RIDGE.d, tol=0.0), symmetric=True)(
    _exact_solver
  )
  assert _problems.relative_error(jax.grad(_validation(solve))(RIDGE.lam), EXACT) < 1e-8


DIVERGING = ih.Neumann(steps=50, alpha=100.0)


def test_divergence_warns_by_default():
  solve = ih.implicit_argmin(RIDGE.inner_loss, solver=DIVERGING)(_exact_solver)
  with pytest.warns(ih.HypergradientWarning, match="diverged"):
    jax.grad(_validation(solve))(RIDGE.lam)


def test_divergence_ignored_when_asked():
  solve = ih.implicit_argmin(RIDGE.inner_loss, solver=DIVERGING, on_failure="ignore")(_exact_solver)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jax.grad(_validation(solve))(RIDGE.lam)


def test_inner_solver_output_with_wrong_structure_is_rejected():
  solve = ih.implicit_argmin(RIDGE.inner_loss)(lambda w0, lam, x, y: {"w": w0})
  with pytest.raises(ValueError, match="inner solver's output.*init_params"):
    solve(jnp.zeros(RIDGE.d), RIDGE.lam, RIDGE.x, RIDGE.y)


def test_inner_solver_output_with_wrong_shape_is_rejected():
  solve = ih.implicit_argmin(RIDGE.inner_loss)(lambda w0, lam, x, y: jnp.zeros(RIDGE.d + 1))
  with pytest.raises(ValueError, match="shape"):
    solve(jnp.zeros(RIDGE.d), RIDGE.lam, RIDGE.x, RIDGE.y)


def test_integer_hparams_are_rejected():
  with pytest.raises(TypeError, match="hparams"):
    SOLVE(jnp.zeros(RIDGE.d), jnp.arange(RIDGE.d), RIDGE.x, RIDGE.y)


def test_nonscalar_loss_is_rejected():
  solve = ih.implicit_argmin(lambda w, lam, x, y: x @ w)(_exact_solver)
  with pytest.raises(ValueError, match="inner_loss.*scalar"):
    solve(jnp.zeros(RIDGE.d), RIDGE.lam, RIDGE.x, RIDGE.y)


def test_bad_decorator_arguments_are_rejected():
  with pytest.raises(TypeError, match="inner_loss"):
    ih.implicit_argmin(3.0)
  with pytest.raises(TypeError, match="solver"):
    ih.implicit_argmin(RIDGE.inner_loss, solver="cg")
  with pytest.raises(ValueError, match=r"on_failure=...\)` must be one of"):
    ih.implicit_argmin(RIDGE.inner_loss, on_failure="explode")


class TemporalDifference:
  """Linear TD(0) with a ridge: the loss stops the gradient through its bootstrapped target.

  Semi-gradient descent on ``L(w) = |X w - stop_gradient(r + gamma X' w)|^2 / (2n) +
  lam |w|^2 / 2`` converges to the root of ``F(w) = X^T (X w - r - gamma X' w) / n + lam w``,
  ``w* = (X^T (X - gamma X') / n + lam I)^{-1} X^T r / n``, but the derivative of
  ``grad L`` misses the target's dependence on w: the theorem needs dF/dw.
  """

  def __init__(self, n=50, d=5, gamma=0.9, seed=1):
    rng = np.random.default_rng(seed)
    self.x = jnp.asarray(rng.normal(size=(n, d)))
    self.x_next = jnp.asarray(rng.normal(size=(n, d)))
    self.r = jnp.asarray(rng.normal(size=n))
    self.gamma, self.d, self.lam = gamma, d, jnp.asarray(0.3)

  def loss(self, w, lam):
    target = jax.lax.stop_gradient(self.r + self.gamma * self.x_next @ w)
    return 0.5 * jnp.mean((self.x @ w - target) ** 2) + 0.5 * lam * jnp.sum(w**2)

  def condition(self, w, lam):
    n = self.x.shape[0]
    return self.x.T @ (self.x @ w - self.r - self.gamma * self.x_next @ w) / n + lam * w

  def solution(self, w0, lam):
    n = self.x.shape[0]
    a = self.x.T @ (self.x - self.gamma * self.x_next) / n + lam * jnp.eye(self.d)
    return jnp.linalg.solve(a, self.x.T @ self.r / n)


TD = TemporalDifference()


def _td_value(solve):
  return jax.grad(lambda lam: jnp.sum(solve(jnp.zeros(TD.d), lam) ** 2))(TD.lam)


def test_stop_gradient_target_is_exact_through_implicit_root_with_the_condition_written_out():
  exact = _td_value(TD.solution)
  np.testing.assert_allclose(
    jnp.linalg.norm(TD.condition(TD.solution(None, TD.lam), TD.lam)), 0.0, atol=1e-12
  )
  got = _td_value(ih.implicit_root(TD.condition, solver=ih.Direct())(TD.solution))
  np.testing.assert_allclose(got, exact, rtol=1e-10)


def test_stop_gradient_target_through_implicit_argmin_is_wrong_as_documented():
  """The documented limit: the stopped expression's derivative is not the condition's."""
  exact = _td_value(TD.solution)
  got = _td_value(ih.implicit_argmin(TD.loss, solver=ih.Direct())(TD.solution))
  assert abs(float(got - exact)) > 0.02 * abs(float(exact))  # 5.0% off here
