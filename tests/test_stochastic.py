"""SOBA and AmIGO reach the solution of a quadratic bilevel problem known in closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

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


def closed_form():
  """theta*(lam) = A^{-1}(B lam + C); the outer problem is then a ridge in lam."""
  m = jnp.linalg.solve(A, B)
  return jnp.linalg.solve(m.T @ m + MU * jnp.eye(3), m.T @ (TARGET - jnp.linalg.solve(A, C)))


def run(loop, steps):
  state = loop.init(jnp.zeros(5), jnp.zeros(3))
  step = jax.jit(loop.step)
  for _ in range(steps):
    state, metrics = step(state, (), ())
  assert int(metrics.num_skipped) == 0
  return state


@pytest.mark.parametrize(
  "name, make, steps",
  [
    ("soba", lambda: ih.soba(inner, outer, inner_lr=0.3, outer_lr=0.3), 3000),
    (
      "amigo",
      lambda: ih.amigo(
        inner, outer, optax.sgd(0.3), optax.sgd(0.5), inner_steps=5, adjoint_steps=5, adjoint_lr=0.3
      ),
      600,
    ),
  ],
)
def test_single_loop_methods_reach_the_closed_form_solution(name, make, steps):
  loop = make()
  assert loop.config["method"] == name
  state = run(loop, steps)
  expected = closed_form()
  assert jnp.linalg.norm(state.hparams - expected) <= 1e-8 * jnp.linalg.norm(expected)
  theta_star = jnp.linalg.solve(A, B @ expected + C)
  assert jnp.linalg.norm(state.params - theta_star) <= 1e-8 * jnp.linalg.norm(theta_star)
  # The warm adjoint has converged to H^{-1} grad L_V at the solution.
  adjoint = jnp.linalg.solve(A, state.params - TARGET)
  assert jnp.linalg.norm(state.method_state.solver - adjoint) <= 1e-7 * jnp.linalg.norm(adjoint)


def test_richardson_from_zero_equals_the_neumann_series():
  b = jnp.arange(1.0, 6.0)
  matvec = lambda v: A @ v
  x_r, _, _ = ih.Richardson(step_size=0.2, steps=7).solve(matvec, b)
  x_n, _, _ = ih.Neumann(steps=7, alpha=0.2).solve(matvec, b)
  assert jnp.allclose(x_r, x_n, rtol=1e-12, atol=1e-14)


def test_soba_rejects_negative_rates():
  with pytest.raises(ValueError, match="inner_lr"):
    ih.soba(inner, outer, inner_lr=-1.0, outer_lr=0.1)
