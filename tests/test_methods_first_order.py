"""F2SA, BOME and SAMA: Hessian-free bilevel methods on quadratics with closed-form solutions."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _problems import Ridge

import implicit_hyper as ih

RNG = np.random.default_rng(0)
Q = jnp.asarray(np.linalg.qr(RNG.normal(size=(5, 5)))[0])
A = Q @ jnp.diag(jnp.array([1.0, 1.5, 2.0, 3.0, 4.0])) @ Q.T
B = jnp.asarray(RNG.normal(size=(5, 3)))
C = jnp.asarray(RNG.normal(size=5))
TARGET = jnp.asarray(RNG.normal(size=5))
MU = 0.1


def inner(theta, lam):
  return 0.5 * theta @ A @ theta - theta @ (B @ lam + C)


def outer(theta, lam):
  return 0.5 * jnp.sum((theta - TARGET) ** 2) + 0.5 * MU * jnp.sum(lam**2)


def closed_form(a=A):
  """theta*(lam) = a^{-1}(B lam + C); the outer problem is then a ridge in lam."""
  m = jnp.linalg.solve(a, B)
  return jnp.linalg.solve(m.T @ m + MU * jnp.eye(3), m.T @ (TARGET - jnp.linalg.solve(a, C)))


def run(loop, steps):
  state = loop.init(jnp.zeros(5), jnp.zeros(3))
  step = jax.jit(loop.step)
  for _ in range(steps):
    state, metrics = step(state, (), ())
  assert int(metrics.num_skipped) == 0
  return state


def distance(state, expected):
  return float(jnp.linalg.norm(state.hparams - expected) / jnp.linalg.norm(expected))


def test_f2sa_reaches_the_solution_as_its_penalty_grows():
  loop = ih.f2sa(inner, outer, inner_lr=0.3, outer_lr=0.3, penalty_growth=1000.0, penalty_max=1e6)
  state = run(loop, 2000)
  assert float(state.method_state.penalty) == 1e6
  assert distance(state, closed_form()) <= 1e-6
  theta_star = jnp.linalg.solve(A, B @ closed_form() + C)
  assert jnp.linalg.norm(state.params - theta_star) <= 1e-6 * jnp.linalg.norm(theta_star)


def test_f2sa_bias_at_a_fixed_penalty_falls_as_one_over_the_penalty():
  errors = []
  for penalty in (1e2, 1e3):
    loop = ih.f2sa(
      inner, outer, inner_lr=0.3, outer_lr=0.3, penalty_init=penalty, penalty_growth=0.0
    )
    errors.append(distance(run(loop, 1500), closed_form()))
  assert 1e-4 < errors[1] < 1e-3
  assert 8.0 < errors[0] / errors[1] < 12.0


def test_bome_settles_within_a_distance_proportional_to_its_step():
  errors = []
  for lr in (0.02, 0.01):
    loop = ih.bome(inner, outer, inner_lr=0.2, outer_lr=lr, inner_steps=50)
    errors.append(distance(run(loop, 20000), closed_form()))
  assert errors[1] < 0.01
  assert 1.8 < errors[0] / errors[1] < 2.2


def isotropic(theta, lam):
  return 1.0 * jnp.sum((theta - B @ lam - C) ** 2)  # Hessian 2 I


def test_sama_with_sgd_step_one_over_the_curvature_is_the_exact_hypergradient():
  loop = ih.sama(isotropic, outer, optax.sgd(0.5), optax.sgd(0.05), inner_steps=2)
  state = run(loop, 2000)
  assert distance(state, closed_form(jnp.eye(5))) <= 1e-8


def test_sama_central_difference_matches_the_mixed_product_with_adams_jacobian():
  problem = Ridge()
  x, y, xv, yv = problem.x, problem.y, problem.x_val, problem.y_val
  adam = optax.adam(0.05)
  loop = ih.sama(problem.inner_loss, problem.outer_loss, adam, optax.sgd(1.0), inner_steps=3)
  state = loop.init(jnp.zeros(problem.d), problem.lam)
  state, _ = jax.jit(loop.step)(state, (jnp.stack([x] * 3), jnp.stack([y] * 3)), (xv, yv))
  # The reference: three Adam steps by hand, the last update's Jacobian (at the third
  # step; Adam's first is sign(g), whose Jacobian is ~0) and the exact mixed VJP.
  params, opt_state = jnp.zeros(problem.d), adam.init(jnp.zeros(problem.d))
  for _ in range(3):
    grad = jax.grad(problem.inner_loss)(params, problem.lam, x, y)
    update = lambda g, s=opt_state, p=params: adam.update(g, s, p)[0]
    jacobian_vjp = jax.vjp(update, grad)[1]
    updates, opt_state = adam.update(grad, opt_state, params)
    params = params + updates
  assert jnp.allclose(state.params, params, rtol=1e-12, atol=1e-15)
  v = -jacobian_vjp(jax.grad(problem.outer_loss)(params, problem.lam, xv, yv))[0]
  mixed = jax.grad(lambda lam: jax.grad(problem.inner_loss)(params, lam, x, y) @ v)(problem.lam)
  assert jnp.linalg.norm(mixed) > 1e-3
  # L_V has no direct term, so the hypergradient is -mixed and one SGD(1) step adds it.
  assert jnp.linalg.norm(state.hparams - problem.lam - mixed) <= 1e-9 * jnp.linalg.norm(mixed)


@pytest.mark.parametrize("name", ["f2sa", "bome", "sama"])
def test_first_order_methods_resume_bit_identically_under_fit(tmp_path, name):
  problem = Ridge()
  make = {
    "f2sa": lambda: ih.f2sa(
      problem.inner_loss, problem.outer_loss, inner_lr=0.3, outer_lr=0.1, inner_steps=2
    ),
    "bome": lambda: ih.bome(
      problem.inner_loss, problem.outer_loss, inner_lr=0.3, outer_lr=0.1, inner_steps=2
    ),
    "sama": lambda: ih.sama(
      problem.inner_loss, problem.outer_loss, optax.adam(0.05), optax.adam(0.05), inner_steps=2
    ),
  }[name]

  def data(step):
    rows = np.random.default_rng([7, step]).integers(0, 40, (2, 8))
    return (problem.x[rows], problem.y[rows]), (problem.x_val, problem.y_val)

  loop = make()
  assert loop.config["method"] == name
  start = lambda: loop.init(jnp.zeros(problem.d), problem.lam)
  reference, history = ih.fit(loop, start(), data, num_steps=6, progress=False)
  run = dict(checkpoint_dir=tmp_path / "ckpt", checkpoint_every=3, progress=False)
  ih.fit(loop, start(), data, num_steps=3, **run)
  state, resumed = ih.fit(make(), start(), data, num_steps=6, **run)
  assert [r["step"] for r in resumed] == list(range(6))
  assert repr(resumed) == repr(history)  # repr: stationarity is NaN here
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(reference), strict=True):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  assert int(reference.step) == 6 and int(reference.num_skipped) == 0


@pytest.mark.parametrize(
  "make, message",
  [
    (lambda: ih.f2sa(inner, outer, inner_lr=-1.0, outer_lr=0.1), r"`f2sa\(inner_lr=...\)`"),
    (
      lambda: ih.f2sa(inner, outer, inner_lr=0.1, outer_lr=0.1, penalty_init=0.0),
      r"`f2sa\(penalty_init=...\)` must be positive",
    ),
    (lambda: ih.bome(inner, outer, inner_lr=0.1, outer_lr=0.1, eta=0.0), r"`bome\(eta=...\)`"),
    (
      lambda: ih.sama(inner, outer, optax.sgd(0.1), optax.sgd(0.1), radius=-1.0),
      r"`sama\(radius=...\)` must be positive, got -1.0",
    ),
    (lambda: ih.sama(inner, outer, "sgd", optax.sgd(0.1)), r"`sama\(inner_optimizer=...\)`"),
  ],
)
def test_bad_settings_are_refused_naming_the_call_and_argument(make, message):
  with pytest.raises((ValueError, TypeError), match=message):
    make()
