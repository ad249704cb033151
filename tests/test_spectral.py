"""Power iteration for the largest eigenvalue."""

import jax.numpy as jnp
import numpy as np
import pytest

import implicit_hyper as ih


def test_power_iteration_finds_largest_eigenvalue_of_spd_matrix():
  q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(20, 20)))
  eigenvalues = np.linspace(0.1, 5.0, 20)
  a = jnp.asarray(q @ np.diag(eigenvalues) @ q.T)
  estimate = ih.max_eigenvalue(lambda v: a @ v, jnp.zeros(20), steps=300)
  assert abs(float(estimate) - 5.0) < 1e-6
  assert float(estimate) <= 5.0 + 1e-12  # a Rayleigh quotient never overshoots


def test_power_iteration_returns_magnitude_of_dominant_negative_eigenvalue():
  a = jnp.diag(jnp.array([-4.0, 1.0, 2.0]))
  assert abs(float(ih.max_eigenvalue(lambda v: a @ v, jnp.zeros(3), steps=200)) - 4.0) < 1e-9


def test_power_iteration_on_pytrees():
  def matvec(t):
    return {"a": 3.0 * t["a"], "b": 7.0 * t["b"]}

  like = {"a": jnp.zeros(2), "b": jnp.zeros((2, 2))}
  assert abs(float(ih.max_eigenvalue(matvec, like, steps=50)) - 7.0) < 1e-9


def test_power_iteration_rejects_negative_iterations():
  with pytest.raises(ValueError, match=r"max_eigenvalue\(steps=...\)"):
    ih.max_eigenvalue(lambda v: v, jnp.zeros(2), steps=-1)
