"""`jax.export` of a hypergradient: exact under on_failure="ignore", refused by name otherwise.

A decorated solver's default policy checks every solve on the host (`jax.debug.callback`),
which `jax.export` cannot serialise: exporting it raises an error that names
`on_failure` and what each choice keeps; with ``on_failure="ignore"`` the exported
function returns what the direct call returns.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import implicit_hyper as ih


def train_loss(w, lam, x, y):
  return jnp.mean((x @ w - y) ** 2) + lam * jnp.sum(w**2)


def validation_gradient(on_failure):
  @ih.implicit_argmin(train_loss, solver=ih.CG(steps=4, tol=0.0), on_failure=on_failure)
  def ridge(w0, lam, x, y):
    n = x.shape[0]
    return jnp.linalg.solve(x.T @ x / n + lam * jnp.eye(x.shape[1]), x.T @ y / n)

  def validation_loss(lam, x, y):
    return jnp.sum(ridge(jnp.zeros(x.shape[1]), lam, x, y) ** 2)

  return jax.jit(jax.grad(validation_loss))


def data():
  x = jax.random.normal(jax.random.key(0), (12, 4))
  return jnp.asarray(0.3), x, x @ jnp.arange(1.0, 5.0)


def test_exported_hypergradient_round_trips_to_the_direct_value_under_ignore():
  args = data()
  exported = jax.export.export(validation_gradient("ignore"))(*args)
  # `Exported.call` runs the exported StableHLO module (`serialize` also needs the
  # optional `flatbuffers` package, which is not a dependency).
  assert exported.mlir_module_serialized

  direct = validation_gradient("ignore")(*args)
  np.testing.assert_allclose(exported.call(*args), direct, rtol=1e-14, atol=0)
  assert abs(float(direct)) > 1e-3


@pytest.mark.parametrize("policy", ["warn", "raise"])
def test_export_under_a_checking_policy_names_on_failure_and_the_choices(policy):
  with pytest.raises(ValueError, match=rf"implicit_argmin\(on_failure='{policy}'\)") as e:
    jax.export.export(validation_gradient(policy))(*data())
  assert 'on_failure="ignore"' in str(e.value) and "keeps the warnings" in str(e.value)


def test_hypergrad_export_names_on_failure():
  def outer(w, lam):
    return jnp.sum(w**2)

  def hypergradient(w, lam):
    inner = lambda w, lam: jnp.sum((w - 1.0) ** 2) + lam * jnp.sum(w**2)
    return ih.hypergrad(inner, outer, w, lam, solver=ih.CG(steps=3))

  with pytest.raises(ValueError, match=r"hypergrad\(on_failure='warn'\)"):
    jax.export.export(jax.jit(hypergradient))(jnp.ones(3), jnp.asarray(1.0))
