"""An equinox MLP as the inner model: `eqx.partition` once, decays shaped like its arrays."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

import implicit_hyper as ih

MODEL = eqx.nn.MLP(3, "scalar", 8, 1, activation=jnp.tanh, key=jax.random.key(0), dtype=jnp.float64)
PARAMS, STATIC = eqx.partition(MODEL, eqx.is_inexact_array)


def batch(seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(40, 3))
  return jnp.asarray(x), jnp.asarray(
    np.sin(x @ np.array([1.0, -2.0, 0.5])) + 0.1 * rng.normal(size=40)
  )


def squared_error(params, x, y):
  model = eqx.combine(params, STATIC)
  return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def train_loss(params, log_decay, x, y):
  penalty = sum(
    jnp.sum(jnp.exp(d) * p**2)
    for d, p in zip(jax.tree.leaves(log_decay), jax.tree.leaves(params), strict=True)
  )
  return squared_error(params, x, y) + penalty


def val_loss(params, log_decay, x, y):
  return squared_error(params, x, y)


@eqx.filter_jit
def adam_steps(params, log_decay, x, y, steps=300):
  """A warm start near one minimum of the non-convex loss."""
  optimizer = optax.adam(0.05)

  def step(carry, _):
    params, state = carry
    updates, state = optimizer.update(jax.grad(train_loss)(params, log_decay, x, y), state)
    return (optax.apply_updates(params, updates), state), None

  return jax.lax.scan(step, (params, optimizer.init(params)), length=steps)[0][0]


@eqx.filter_jit
def newton_step(params, log_decay, x, y):
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  value = lambda f: train_loss(unravel(f), log_decay, x, y)
  return unravel(flat - jnp.linalg.solve(jax.hessian(value)(flat), jax.grad(value)(flat)))


@ih.implicit_argmin(train_loss, solver=ih.CG(steps=200, tol=1e-13))
def train(params, log_decay, x, y):
  """The user's own loop: Newton's method on the partitioned arrays, to machine precision."""
  for _ in range(15):
    params = newton_step(params, log_decay, x, y)
  return params


def test_hypergradient_of_per_tensor_decays_through_an_equinox_loop_matches_finite_differences():
  log_decay = jax.tree.map(lambda p: jnp.asarray(-3.0), PARAMS)  # one decay per tensor
  train_batch, val_batch = batch(0), batch(1)
  start = adam_steps(PARAMS, log_decay, *train_batch)
  objective = lambda ld: val_loss(train(start, ld, *train_batch), ld, *val_batch)
  got, _ = jax.flatten_util.ravel_pytree(jax.grad(objective)(log_decay))
  flat, unravel = jax.flatten_util.ravel_pytree(log_decay)
  eps = 1e-5
  fd = jnp.array(
    [
      (objective(unravel(flat + e)) - objective(unravel(flat - e))) / (2 * eps)
      for e in eps * jnp.eye(flat.size)
    ]
  )
  assert jnp.min(jnp.abs(fd)) > 1e-5  # every decay matters
  np.testing.assert_allclose(got, fd, rtol=1e-6)


def bilevel_data(step):
  """The training batch for each of the two inner steps (stacked), and the validation batch."""
  del step
  return tuple(jnp.stack([a, a]) for a in batch(0)), batch(1)


def test_fit_of_per_weight_decays_of_an_equinox_mlp_resumes_bit_identically(tmp_path):
  loop = ih.bilevel(
    train_loss, val_loss, optax.sgd(0.02), optax.adam(0.05), inner_steps=2, solver=ih.CG(steps=30)
  )
  log_decay = jax.tree.map(lambda p: jnp.full_like(p, -3.0), PARAMS)  # one decay per weight
  per_tensor = jax.tree.map(lambda p: jnp.asarray(-3.0), PARAMS)
  params = train(adam_steps(PARAMS, per_tensor, *batch(0)), per_tensor, *batch(0))  # a minimum
  start = lambda: loop.init(params, log_decay)
  reference, reference_history = ih.fit(loop, start(), bilevel_data, num_steps=4, progress=False)
  run = {"checkpoint_dir": tmp_path, "checkpoint_every": 2, "progress": False}
  ih.fit(loop, start(), bilevel_data, num_steps=2, **run)
  state, history = ih.fit(loop, start(), bilevel_data, num_steps=4, **run)
  assert int(state.step) == 4 and isinstance(state.params, eqx.nn.MLP)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(reference), strict=True):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  np.testing.assert_equal(history, reference_history)
  assert not any(record["skipped"] for record in history)
  assert not jnp.array_equal(state.hparams.layers[0].weight, log_decay.layers[0].weight)


class Hparams(eqx.Module):
  raw_decay: jax.Array
  positive: Callable = jax.nn.softplus  # a function field, not static: a pytree leaf


def test_module_hparams_with_a_function_field_differentiate_only_their_arrays():
  def loss(w, h, t):
    return 0.5 * jnp.sum((w - t) ** 2) + 0.5 * h.positive(h.raw_decay) * jnp.sum(w**2)

  solve = ih.implicit_argmin(loss, solver=ih.CG(steps=3))(
    lambda w0, h, t: t / (1.0 + h.positive(h.raw_decay))
  )
  t = jnp.array([1.0, 2.0, -0.5])
  value = lambda h: jnp.sum(solve(jnp.zeros(3), h, t))
  decay = jax.nn.softplus(0.3)  # d/draw sum(t / (1 + softplus(raw))) in closed form:
  expected = -jnp.sum(t) / (1.0 + decay) ** 2 * jax.nn.sigmoid(0.3)
  for grad in (eqx.filter_grad(value), eqx.filter_jit(eqx.filter_grad(value))):
    got = grad(Hparams(jnp.asarray(0.3)))
    assert got.positive is None
    np.testing.assert_allclose(got.raw_decay, expected, rtol=1e-12)
