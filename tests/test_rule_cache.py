"""Tests of `_src/rule_cache.py`: eager calls reuse one compiled rule, never stale values."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import implicit_hyper as ih
from implicit_hyper._src import rule_cache

DIAG = jnp.array([1.0, 2.0, 4.0])
TARGET = jnp.ones(3)
SCALE = 1.0


def loss(w, lam, t):
  return 0.5 * jnp.sum(DIAG * (w - t) ** 2) + 0.5 * SCALE * lam * jnp.sum(w**2)


def exact(w0, lam, t):
  return DIAG * t / (DIAG + SCALE * lam)


def expected_gradient(lam, t):
  """d/dlam sum(w*(lam)) = -sum(SCALE * DIAG t / (DIAG + SCALE lam)^2)."""
  return -jnp.sum(SCALE * DIAG * t / (DIAG + SCALE * lam) ** 2)


@pytest.fixture(autouse=True)
def empty_cache():
  """Entry counts below are exact only below `MAX_ENTRIES`: earlier tests fill the cache."""
  rule_cache._ENTRIES.clear()


def global_loss(w, lam):
  return loss(w, lam, TARGET)


def test_eager_calls_with_new_module_level_arrays_reuse_one_compiled_rule():
  global TARGET

  @ih.implicit_argmin(global_loss, solver=ih.CG(steps=3))
  def solve(w0, lam):
    return exact(w0, lam, TARGET)

  grad = jax.grad(lambda lam: jnp.sum(solve(jnp.zeros(3), lam)))
  before = len(rule_cache._ENTRIES)
  for value in (1.0, 3.0, -2.0):
    TARGET = jnp.full(3, value)
    assert jnp.isclose(grad(0.5), expected_gradient(0.5, TARGET), rtol=1e-12, atol=0), value
  assert len(rule_cache._ENTRIES) == before + 1  # the arrays are inputs of one program
  TARGET = jnp.ones(3)


def test_a_changed_python_constant_is_a_new_computation_with_its_own_value():
  global SCALE
  solve = ih.implicit_argmin(loss, solver=ih.CG(steps=3))(exact)
  grad = jax.grad(lambda lam: jnp.sum(solve(jnp.zeros(3), lam, TARGET)))
  before = len(rule_cache._ENTRIES)
  for scale in (1.0, 2.5):
    SCALE = scale
    assert jnp.isclose(grad(0.5), expected_gradient(0.5, TARGET), rtol=1e-12, atol=0), scale
  assert len(rule_cache._ENTRIES) == before + 2  # the float is inlined in the jaxpr: a new key
  SCALE = 1.0


def test_eager_forward_and_reverse_equal_jit_and_vmap_which_add_no_entry():
  solve = ih.implicit_argmin(loss, solver=ih.Direct())(exact)
  value = lambda lam, t: jnp.sum(solve(jnp.zeros(3), lam, t))
  t = jnp.array([1.0, -2.0, 0.5])
  eager = jax.grad(value)(0.3, t), jax.jvp(lambda lam: value(lam, t), (0.3,), (1.0,))[1]
  before = len(rule_cache._ENTRIES)
  jitted = jax.jit(jax.grad(value))(0.3, t)
  batched = jax.vmap(jax.grad(value), in_axes=(0, None))(jnp.array([0.3, 0.3]), t)
  assert len(rule_cache._ENTRIES) == before
  for got in (*eager, jitted, *batched):
    np.testing.assert_allclose(got, expected_gradient(0.3, t), rtol=1e-12)


def test_warnings_name_the_line_of_each_eager_call():
  solve = ih.implicit_argmin(loss, solver=ih.Neumann(steps=40, alpha=1.0))(exact)
  with pytest.warns(ih.HypergradientWarning, match="diverged") as caught:
    for _ in range(2):
      jax.grad(lambda lam: jnp.sum(solve(jnp.zeros(3), lam, TARGET)))(1.0)
      jax.grad(lambda lam: jnp.sum(solve(jnp.zeros(3), lam, TARGET)))(1.0)
  lines = [w.lineno for w in caught]
  assert len(lines) == 4 and lines[0] == lines[2] and lines[1] == lines[3] == lines[0] + 1
  assert all(w.filename == __file__ for w in caught)


def test_eager_benchmark_quick_run_matches_plain_jax(tmp_path):
  script = Path(__file__).resolve().parents[1] / "benchmarks" / "eager.py"
  run = subprocess.run(
    [sys.executable, str(script), "--quick", "--out", str(tmp_path)],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert run.returncode == 0, run.stdout + run.stderr
  (result,) = json.loads((tmp_path / "eager.json").read_text())["results"]
  assert set(result["seconds"]) == {
    "plain eager",
    "decorated eager",
    "decorated eager, new globals",
    "decorated jit",
  }
  assert max(result["abs_error_to_plain"].values()) < 1e-10
