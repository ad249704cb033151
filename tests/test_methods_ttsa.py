"""TTSA: its randomly truncated adjoint averages to the Neumann series, and it reaches the solution.

The finite-sum quadratic of tests/test_methods.py, every batch the full data (so the only
randomness is the truncation): one step's update equals the hand-computed one for the
truncation its key draws, the mean of the adjoint over the truncations is the Q-term
Neumann series, and with decreasing outer steps TTSA reaches the closed-form solution.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import implicit_hyper as ih
from implicit_hyper._src.methods import ttsa as ttsa_module
from tests.test_methods import MU
from tests.test_methods import A
from tests.test_methods import B
from tests.test_methods import C
from tests.test_methods import T
from tests.test_methods import closed_form
from tests.test_methods import inner
from tests.test_methods import outer

Q, ETA = 40, 0.2
H = A.mean(0)


def full(length):
  return tuple(jnp.broadcast_to(x, (length, *x.shape)) for x in (A, B, C)), (T,)


def test_the_adjoint_averaged_over_truncations_is_the_neumann_series():
  b = jnp.asarray(np.random.default_rng(1).normal(size=H.shape[0]))
  hvp = lambda batch, v: H @ v
  factors = jnp.zeros((Q, 1))
  terms = [ttsa_module.truncated_product(hvp, b, factors, jnp.int32(p), ETA) for p in range(Q)]
  for p in (0, 1, 7):
    np.testing.assert_allclose(
      terms[p], np.linalg.matrix_power(np.eye(len(b)) - ETA * H, p) @ b, rtol=1e-12
    )
  series = ETA * sum(np.linalg.matrix_power(np.eye(len(b)) - ETA * H, q) for q in range(Q)) @ b
  np.testing.assert_allclose(Q * ETA * np.mean(terms, 0), series, rtol=1e-12)


def test_one_step_is_the_update_of_the_truncation_its_key_draws():
  loop = ih.ttsa(inner, outer, inner_lr=0.1, outer_lr=0.05, neumann_steps=Q, neumann_lr=ETA)
  state = loop.init(jnp.zeros(H.shape[0]), jnp.zeros(B.shape[-1]))
  new, metrics = jax.jit(loop.step)(state, *full(Q + 2))
  _, draw = jax.random.split(jax.random.wrap_key_data(state.method_state.key))
  depth = int(jax.random.randint(draw, (), 0, Q))
  theta = state.params - 0.1 * jax.grad(inner)(state.params, state.hparams, A, B, C)
  g_theta = theta - T.mean(0)
  u = Q * ETA * np.linalg.matrix_power(np.eye(len(theta)) - ETA * H, depth) @ g_theta
  grad = MU * state.hparams + B.mean(0).T @ u  # d L_V / d lam - (d^2 L_T / d lam d theta) u
  np.testing.assert_allclose(new.params, theta, rtol=1e-13)
  np.testing.assert_allclose(new.hparams, state.hparams - 0.05 * grad, rtol=1e-12, atol=1e-14)
  assert not bool(metrics.skipped)
  assert not np.array_equal(new.method_state.key, state.method_state.key)


def test_with_decreasing_outer_steps_it_reaches_the_closed_form_solution():
  # Q = 10 terms of step 0.3 leave a truncation bias well below the tolerance; the noise of
  # the random truncation is what the decreasing outer step averages out (3,000 steps: 8%).
  loop = ih.ttsa(
    inner,
    outer,
    inner_lr=0.2,
    outer_lr=lambda t: 0.1 / (1.0 + t / 100.0) ** 0.6,
    neumann_steps=10,
    neumann_lr=0.3,
  )
  state = loop.init(jnp.zeros(H.shape[0]), jnp.zeros(B.shape[-1]))
  args = full(12)

  def body(state, _):
    return loop.step(state, *args)[0], None

  state, _ = jax.jit(lambda s: jax.lax.scan(body, s, length=10_000))(state)
  best = closed_form()
  error = float(jnp.linalg.norm(state.hparams - best) / jnp.linalg.norm(best))
  assert error < 1e-2, error


def test_bad_settings_are_refused_by_name():
  with pytest.raises(ValueError, match=r"`ttsa\(neumann_steps=...\)`"):
    ih.ttsa(inner, outer, inner_lr=0.1, outer_lr=0.1, neumann_steps=0)
  loop = ih.ttsa(inner, outer, inner_lr=0.1, outer_lr=0.1, neumann_steps=3)
  state = loop.init(jnp.zeros(H.shape[0]), jnp.zeros(B.shape[-1]))
  with pytest.raises(ValueError, match="neumann_steps \\+ 2"):
    loop.step(state, *full(4))
