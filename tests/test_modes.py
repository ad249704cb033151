"""Every mode of differentiation through the implicit rule, against closed forms (float64).

Per-feature ridge regression: theta*(lam) = (X^T X / n + diag(lam))^{-1} X^T y / n, so the
Jacobian, Hessians of a validation loss and data derivatives are all known exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import implicit_hyper as ih
from implicit_hyper._src.solvers import _base

N, D = 40, 10
RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(N, D)))
Y = jnp.asarray(RNG.normal(size=N))
XV = jnp.asarray(RNG.normal(size=(N, D)))
YV = jnp.asarray(RNG.normal(size=N))
LAM = jnp.linspace(0.2, 2.0, D)


def ridge_loss(w, lam, x, y):
  return 0.5 * jnp.mean((x @ w - y) ** 2) + 0.5 * jnp.sum(lam * w**2)


def ridge_exact(lam, x, y):
  n = x.shape[0]
  return jnp.linalg.solve(x.T @ x / n + jnp.diag(lam), x.T @ y / n)


def validation(w):
  return 0.5 * jnp.mean((XV @ w - YV) ** 2)


# Exact solvers to 1e-8; the Neumann series at its documented accuracy: with step
# 1/lambda_max and K terms its error is about (1 - 1/kappa)^K.
SOLVERS = {
  "direct": (lambda: ih.Direct(), 1e-10),
  "cg": (lambda: ih.CG(steps=D), 1e-8),
  "neumann": (lambda: ih.Neumann(steps=400), 1e-6),
  "bicgstab": (lambda: ih.BiCGStab(steps=2 * D), 1e-8),
  "function": (lambda: lambda matvec, b: ih.CG(steps=D).solve(matvec, b)[0], 1e-8),
}


def decorated(solver, *, inner=None):
  """A ridge solver that is not differentiable (stop_gradient), decorated."""

  @ih.implicit_argmin(ridge_loss, solver=solver)
  def solve(w0, lam, x, y):
    del w0
    return jax.lax.stop_gradient(ridge_exact(lam, x, y) if inner is None else inner(lam, x, y))

  return solve


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_forward_and_reverse_jacobians_equal_the_closed_form(name):
  factory, tol = SOLVERS[name]
  solve = decorated(factory())
  exact = jax.jacfwd(ridge_exact)(LAM, X, Y)
  scale = jnp.max(jnp.abs(exact))
  for jac in (jax.jacfwd, jax.jacrev):
    got = jax.jit(jac(solve, argnums=1))(jnp.zeros(D), LAM, X, Y)
    assert jnp.max(jnp.abs(got - exact)) <= tol * scale
  tangent = jnp.arange(1.0, D + 1)
  _, jvp = jax.jvp(lambda lam: solve(jnp.zeros(D), lam, X, Y), (LAM,), (tangent,))
  assert jnp.max(jnp.abs(jvp - exact @ tangent)) <= tol * jnp.max(jnp.abs(exact @ tangent))


@pytest.mark.parametrize("name", ["direct", "cg", "neumann"])
def test_hessian_of_validation_loss_equals_the_closed_form(name):
  factory, tol = SOLVERS[name]
  solve = decorated(factory())
  objective = lambda lam: validation(solve(jnp.zeros(D), lam, X, Y))
  exact = jax.hessian(lambda lam: validation(ridge_exact(lam, X, Y)))(LAM)
  scale = jnp.max(jnp.abs(exact))
  assert jnp.max(jnp.abs(jax.jit(jax.hessian(objective))(LAM) - exact)) <= max(tol, 1e-6) * scale
  grad_grad = jax.jit(jax.jacrev(jax.grad(objective)))(LAM)
  assert jnp.max(jnp.abs(grad_grad - exact)) <= max(tol, 1e-6) * scale
  if name == "direct":  # forward-over-forward as well, under jit
    jacfwd2 = jax.jit(jax.jacfwd(jax.jacfwd(objective)))(LAM)
    assert jnp.max(jnp.abs(jacfwd2 - exact)) <= max(tol, 1e-6) * scale


def test_hessian_ignores_the_inner_solvers_own_derivative():
  """A differentiable but wrong-derivative inner solver: only the theorem counts."""

  def inner(lam, x, y):  # the right value, with a derivative through lam**3 that is wrong
    w = ridge_exact(lam, x, y)
    return w + (lam**3 - jax.lax.stop_gradient(lam**3))

  solve = ih.implicit_argmin(ridge_loss, solver=ih.Direct())(lambda w0, lam, x, y: inner(lam, x, y))
  objective = lambda lam: validation(solve(jnp.zeros(D), lam, X, Y))
  exact = jax.hessian(lambda lam: validation(ridge_exact(lam, X, Y)))(LAM)
  assert jnp.allclose(jax.hessian(objective)(LAM), exact, rtol=1e-9, atol=1e-12)


def test_hessian_matches_central_differences_of_the_exact_hypergradient():
  solve = decorated(ih.CG(steps=D))
  objective = lambda lam: validation(solve(jnp.zeros(D), lam, X, Y))
  exact_grad = jax.grad(lambda lam: validation(ridge_exact(lam, X, Y)))
  eps = 1e-5
  columns = [
    (exact_grad(LAM + eps * e) - exact_grad(LAM - eps * e)) / (2 * eps) for e in jnp.eye(D)
  ]
  finite_differences = jnp.stack(columns, axis=1)
  hessian = jax.hessian(objective)(LAM)
  assert jnp.max(jnp.abs(hessian - finite_differences)) <= 1e-6 * jnp.max(jnp.abs(hessian))


def test_derivative_with_respect_to_data_equals_the_closed_form():
  solve = decorated(ih.Direct())
  got = jax.grad(lambda x: jnp.sum(solve(jnp.zeros(D), LAM, x, Y)))(X)
  exact = jax.grad(lambda x: jnp.sum(ridge_exact(LAM, x, Y)))(X)
  assert jnp.allclose(got, exact, rtol=1e-10, atol=1e-13)


def test_keyword_arrays_get_the_same_gradients_as_positional_ones():
  solve = decorated(ih.CG(steps=D))
  positional = jax.grad(lambda lam, x: jnp.sum(solve(jnp.zeros(D), lam, x, Y)), (0, 1))(LAM, X)
  keyword = jax.grad(lambda lam, x: jnp.sum(solve(jnp.zeros(D), lam, x=x, y=Y)), (0, 1))(LAM, X)
  for a, b in zip(positional, keyword, strict=True):
    assert jnp.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_non_array_keyword_arguments_are_static():
  def loss(w, lam, x, y, *, mode, power):
    assert mode == "ridge" and power == 2  # Python values, never traced
    return 0.5 * jnp.mean((x @ w - y) ** 2) + 0.5 * jnp.sum(lam * w**power)

  @ih.implicit_argmin(loss, solver=ih.Direct())
  def solve(w0, lam, x, y, *, mode, power):
    assert isinstance(mode, str) and isinstance(power, int)
    return ridge_exact(lam, x, y)

  got = jax.jit(
    jax.grad(lambda lam: jnp.sum(solve(jnp.zeros(D), lam, X, Y, mode="ridge", power=2)))
  )(LAM)
  exact = jax.grad(lambda lam: jnp.sum(ridge_exact(lam, X, Y)))(LAM)
  assert jnp.allclose(got, exact, rtol=1e-10)


def test_vmap_of_jvp_and_of_grad_over_tasks():
  solve = decorated(ih.CG(steps=D))
  lams = jnp.stack([LAM, 2 * LAM, 0.5 * LAM])
  grads = jax.vmap(jax.grad(lambda lam: validation(solve(jnp.zeros(D), lam, X, Y))))(lams)
  exact = jax.vmap(jax.grad(lambda lam: validation(ridge_exact(lam, X, Y))))(lams)
  assert jnp.allclose(grads, exact, rtol=1e-8, atol=1e-12)
  jvps = jax.vmap(lambda lam: jax.jvp(lambda v: solve(jnp.zeros(D), v, X, Y), (lam,), (lam,))[1])(
    lams
  )
  exact_jvps = jax.vmap(lambda lam: jax.jvp(lambda v: ridge_exact(v, X, Y), (lam,), (lam,))[1])(
    lams
  )
  assert jnp.allclose(jvps, exact_jvps, rtol=1e-8, atol=1e-12)


def test_linearize_gives_the_closed_form_tangent():
  solve = decorated(ih.Direct())
  _, linear = jax.linearize(lambda lam: solve(jnp.zeros(D), lam, X, Y), LAM)
  _, exact = jax.jvp(lambda lam: ridge_exact(lam, X, Y), (LAM,), (jnp.ones(D),))
  assert jnp.allclose(linear(jnp.ones(D)), exact, rtol=1e-10)


# Fixed points.


def test_scalar_fixed_point_derivative_every_mode():
  t = lambda x, a: 0.5 * jnp.cos(x) + a

  for solver in (ih.Neumann(steps=80), ih.BiCGStab(steps=4), ih.Direct(), ih.NormalCG(steps=4)):

    @ih.implicit_fixed_point(t, solver=solver)
    def iterate(x0, a):
      return jax.lax.fori_loop(0, 200, lambda _, z: t(z, a), x0)

    x = iterate(0.0, 1.0)
    exact = 1.0 / (1.0 + 0.5 * jnp.sin(x))  # dx/da = 1 / (1 - T'(x))
    assert abs(x - t(x, 1.0)) < 1e-14
    assert jnp.isclose(jax.grad(lambda a: iterate(0.0, a))(1.0), exact, rtol=1e-12)
    assert jnp.isclose(jax.jvp(lambda a: iterate(0.0, a), (1.0,), (1.0,))[1], exact, rtol=1e-12)


def test_vector_fixed_point_jacobian():
  rng = np.random.default_rng(1)
  m = jnp.asarray(rng.normal(size=(6, 6)))
  m = 0.6 * m / jnp.linalg.norm(m, 2)  # a contraction: ||M|| = 0.6
  t = lambda x, b: jnp.tanh(m @ x) + b

  @ih.implicit_fixed_point(t, solver=ih.Neumann(steps=120))
  def iterate(x0, b):
    return jax.lax.fori_loop(0, 300, lambda _, x: t(x, b), x0)

  b = jnp.linspace(-1, 1, 6)
  x = iterate(jnp.zeros(6), b)
  jt = jax.jacfwd(lambda x: t(x, b))(x)
  exact = jnp.linalg.inv(jnp.eye(6) - jt)
  for jac in (jax.jacfwd, jax.jacrev):
    assert jnp.allclose(jac(iterate, argnums=1)(jnp.zeros(6), b), exact, rtol=1e-10, atol=1e-12)


def test_fixed_point_of_a_non_contraction_is_flagged_with_neumann():
  t = lambda x, a: 1.5 * x - a  # fixed point x = 2a, but |T'| = 1.5 > 1

  @ih.implicit_fixed_point(t, solver=ih.Neumann(steps=20))
  def solve(x0, a):
    return 2.0 * a

  with pytest.warns(ih.HypergradientWarning, match="diverged"):
    jax.grad(lambda a: solve(0.0, a))(1.0)
  exact = ih.implicit_fixed_point(t, solver=ih.Direct())(solve)
  assert jnp.isclose(jax.grad(lambda a: exact(0.0, a))(1.0), 2.0, rtol=1e-12)


# The solver protocol.


@ih.solver_pytree(data=("ridge", "scale"))
class CountingJacobi(ih.LinearSolver):
  """A user-defined stateful solver: Jacobi-preconditioned Richardson, counting its solves."""

  steps: int = 50
  scale: float = 1.0

  def init(self, like):
    return jnp.zeros((), jnp.int32)

  def compute(self, matvec, b, state):
    def step(_, x):
      return jax.tree.map(
        lambda xi, ri: xi + self.scale * ri, x, jax.tree.map(jnp.subtract, b, matvec(x))
      )

    x = jax.lax.fori_loop(0, self.steps, step, jax.tree.map(jnp.zeros_like, b))
    residual = jax.tree.map(jnp.subtract, b, matvec(x))
    return x, _base.make_info(x, residual, b, self.steps), state + 1


def test_user_defined_solver_threads_its_state_through_hypergrad_and_bilevel():
  import optax

  solver = CountingJacobi(steps=200, scale=0.5)
  inner = lambda w, lam, x, y: ridge_loss(w, lam, x, y)
  outer = lambda w, lam, x, y: 0.5 * jnp.mean((x @ w - y) ** 2)
  w = ridge_exact(LAM, X, Y)
  exact = ih.hypergrad(
    inner, outer, w, LAM, inner_args=(X, Y), outer_args=(XV, YV), solver=ih.Direct()
  )
  # Richardson with step 0.5 converges here: the Hessian's eigenvalues lie in (0, 4).
  assert jnp.max(jnp.linalg.eigvalsh(X.T @ X / N + jnp.diag(LAM))) < 4
  grads, info, state = ih.hypergrad_with_info(
    inner,
    outer,
    w,
    LAM,
    inner_args=(X, Y),
    outer_args=(XV, YV),
    solver=solver,
    solver_state=jnp.array(41),
  )
  assert int(state) == 42 and not bool(info.diverged)
  assert jnp.allclose(grads, exact, rtol=1e-6)

  loop = ih.bilevel(inner, outer, optax.sgd(0.3), optax.sgd(0.0), inner_steps=2, solver=solver)
  st = loop.init(jnp.zeros(D), LAM)
  step = jax.jit(loop.step)
  inner_args = (jnp.stack([X, X]), jnp.stack([Y, Y]))
  for _ in range(3):
    st, metrics = step(st, inner_args, (XV, YV))
  assert int(st.method_state.solver) == 3 and int(metrics.num_skipped) == 0


def test_neumann_state_caches_its_step_for_refresh_every_solves():
  d = jnp.array([1.0, 2.0, 4.0])
  solver = ih.Neumann(steps=5, refresh_every=3)
  state = solver.init(jnp.zeros(3))
  alphas = []
  solve = jax.jit(lambda b, state, scale: solver.solve(lambda v: scale * d * v, b, state))
  for scale in (1.0, 2.0, 2.0, 2.0):  # the step is re-estimated at the 1st and 4th solve
    _, _, state = solve(jnp.ones(3), state, scale)
    alphas.append(float(state.alpha))
  assert alphas[0] == alphas[1] == alphas[2] and alphas[3] != alphas[0]
  assert np.isclose(alphas[3], 1 / 8.0, rtol=1e-3)


def test_solvers_cross_jit_boundaries_as_pytrees():
  solver = ih.Neumann(steps=30, alpha=0.3)
  leaves, treedef = jax.tree.flatten(solver)
  assert len(leaves) == 2  # ridge and alpha are data; steps and the rest are static

  @jax.jit
  def solve(solver, b):
    return solver.solve(lambda v: 2.0 * v, b)[0]

  assert jnp.allclose(
    solve(solver, jnp.ones(2)), solve(jax.tree.unflatten(treedef, leaves), jnp.ones(2))
  )
  traced_alpha = jax.jit(
    lambda a: ih.Neumann(steps=60, alpha=a).solve(lambda v: 2.0 * v, jnp.ones(2))[0]
  )
  assert jnp.allclose(traced_alpha(0.25), 0.5, rtol=1e-12)


def test_jaxopt_style_function_is_accepted_as_solver():
  def solve_richardson(matvec, b):
    return jax.lax.fori_loop(0, 300, lambda _, x: x + 0.5 * (b - matvec(x)), jnp.zeros_like(b))

  solve = decorated(solve_richardson)
  got = jax.grad(lambda lam: validation(solve(jnp.zeros(D), lam, X, Y)))(LAM)
  exact = jax.grad(lambda lam: validation(ridge_exact(lam, X, Y)))(LAM)
  assert jnp.allclose(got, exact, rtol=1e-8)


@pytest.mark.parametrize(
  "decorator", [ih.implicit_argmin, ih.implicit_root, ih.implicit_fixed_point]
)
def test_decorators_are_jit_compatible_with_one_compilation(decorator):
  fn = jax.grad(ridge_loss) if decorator is ih.implicit_root else ridge_loss
  if decorator is ih.implicit_fixed_point:
    fn = lambda w, lam, x, y: w - 0.5 * jax.grad(ridge_loss)(w, lam, x, y)
  solve = decorator(fn, solver=ih.Direct())(lambda w0, lam, x, y: ridge_exact(lam, x, y))
  grad = jax.jit(jax.grad(lambda lam: validation(solve(jnp.zeros(D), lam, X, Y))))
  exact = jax.grad(lambda lam: validation(ridge_exact(lam, X, Y)))
  for scale in (1.0, 2.0):
    assert jnp.allclose(grad(scale * LAM), exact(scale * LAM), rtol=1e-9)
  assert grad._cache_size() == 1
