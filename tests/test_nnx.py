"""A flax.nnx CNN as the inner model: split once, hyperparameters shaped like its `nnx.State`."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import implicit_hyper as ih

F64 = {"dtype": jnp.float64, "param_dtype": jnp.float64}


class CNN(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, 2, kernel_size=(3, 3), padding="VALID", rngs=rngs, **F64)
    self.linear = nnx.Linear(2 * 4 * 4, 2, rngs=rngs, **F64)

  def __call__(self, x):
    return self.linear(jnp.tanh(self.conv(x)).reshape(x.shape[0], -1))


GRAPHDEF, PARAMS = nnx.split(CNN(rngs=nnx.Rngs(0)), nnx.Param)


def batch(seed):
  """Images of 6 x 6 pixels labelled by the sign of their central 3 x 3 patch."""
  x = jnp.asarray(np.random.default_rng(seed).normal(size=(32, 6, 6, 1)))
  return x, (jnp.sum(x[:, 1:4, 1:4, 0], axis=(1, 2)) > 0).astype(jnp.int32)


def cross_entropy(params, x, y):
  logits = nnx.merge(GRAPHDEF, params)(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train_loss(params, log_decay, x, y):
  penalty = sum(
    jnp.sum(jnp.exp(d) * p**2)
    for d, p in zip(jax.tree.leaves(log_decay), jax.tree.leaves(params), strict=True)
  )
  return cross_entropy(params, x, y) + penalty


def val_loss(params, log_decay, x, y):
  return cross_entropy(params, x, y)


@nnx.jit
def adam_step(model, optimizer, log_decay, x, y):
  grads = jax.grad(train_loss)(nnx.state(model, nnx.Param), log_decay, x, y)
  optimizer.update(model, grads)


@nnx.jit
def newton_step(model, log_decay, x, y):
  flat, unravel = jax.flatten_util.ravel_pytree(nnx.state(model, nnx.Param))
  value = lambda f: train_loss(unravel(f), log_decay, x, y)
  nnx.update(
    model, unravel(flat - jnp.linalg.solve(jax.hessian(value)(flat), jax.grad(value)(flat)))
  )


@ih.implicit_argmin(train_loss, solver=ih.CG(steps=200, tol=1e-13))
def train(params, log_decay, x, y):
  """The user's own nnx loop: Newton's method on the model, to machine precision."""
  model = nnx.merge(GRAPHDEF, params)
  for _ in range(15):
    newton_step(model, log_decay, x, y)
  return nnx.state(model, nnx.Param)


def pretrained(log_decay, steps=200):
  """Weights trained by Adam near one minimum of the non-convex loss (a warm start)."""
  model = nnx.merge(GRAPHDEF, PARAMS)
  optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)
  for _ in range(steps):
    adam_step(model, optimizer, log_decay, *batch(0))
  return nnx.state(model, nnx.Param)


def test_hypergradient_of_per_tensor_decays_through_an_nnx_loop_matches_finite_differences():
  log_decay = jax.tree.map(lambda p: jnp.asarray(-3.0), PARAMS)  # one decay per tensor
  train_batch, val_batch = batch(0), batch(1)
  start = pretrained(log_decay)

  objective = lambda ld: val_loss(train(start, ld, *train_batch), ld, *val_batch)
  got, _ = jax.flatten_util.ravel_pytree(jax.grad(objective)(log_decay))
  flat, unravel = jax.flatten_util.ravel_pytree(log_decay)
  eps = 1e-5
  shifts = eps * jnp.eye(flat.size)
  fd = jnp.array(
    [(objective(unravel(flat + e)) - objective(unravel(flat - e))) / (2 * eps) for e in shifts]
  )
  assert jnp.min(jnp.abs(fd)) > 1e-5  # a non-trivial minimum: every decay matters
  np.testing.assert_allclose(got, fd, rtol=1e-6)


def bilevel_data(step):
  """The training batch for each of the two inner steps (stacked), and the validation batch."""
  del step
  return tuple(jnp.stack([a, a]) for a in batch(0)), batch(1)


def test_fit_of_per_weight_decays_of_an_nnx_cnn_resumes_bit_identically(tmp_path):
  loop = ih.bilevel(
    train_loss, val_loss, optax.sgd(0.1), optax.adam(0.05), inner_steps=2, solver=ih.CG(steps=30)
  )
  log_decay = jax.tree.map(lambda p: jnp.full_like(p, -3.0), PARAMS)  # one decay per weight
  params = pretrained(jax.tree.map(lambda p: jnp.asarray(-3.0), PARAMS))
  start = lambda: loop.init(params, log_decay)
  reference, reference_history = ih.fit(loop, start(), bilevel_data, num_steps=4, progress=False)
  run = {"checkpoint_dir": tmp_path, "checkpoint_every": 2, "progress": False}
  ih.fit(loop, start(), bilevel_data, num_steps=2, **run)
  state, history = ih.fit(loop, start(), bilevel_data, num_steps=4, **run)
  assert int(state.step) == 4
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(reference), strict=True):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  np.testing.assert_equal(history, reference_history)
  assert not any(record["skipped"] for record in history)
  assert not jnp.array_equal(
    state.hparams["linear"]["kernel"][...], start().hparams["linear"]["kernel"][...]
  )
