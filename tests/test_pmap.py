"""Hypergradients inside `jax.pmap` and `jax.shard_map`, with losses averaged by `lax.pmean`.

Each of the 8 CPU devices holds one slice of the training and validation batches and
a copy of the weights and hyperparameters. The Hessian-vector products become global
through the user's losses: under `jax.shard_map` a `lax.pmean` in the loss is enough;
under `jax.pmap` the gradient must be averaged as well (`ih.pmean_gradient`).
"""

import functools

import _problems
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

import implicit_hyper as ih

AXIS = "batch"
NUM_DEVICES = 8
ROWS, FEATURES, CLASSES = 64, 6, 4


train_loss = _problems.decayed_cross_entropy
val_loss = _problems.validation_cross_entropy


def pmap_loss(loss):
  """`loss` on this device's slice, differentiated as the mean over all slices (pmap)."""

  @functools.wraps(loss)
  def averaged(weights, log_decay, *batch):
    weights, log_decay = ih.pmean_gradient((weights, log_decay), AXIS)
    return loss(weights, log_decay, *batch)

  return averaged


def shard_map_loss(loss):
  """`loss` on this device's slice, averaged over all slices with `lax.pmean`."""

  @functools.wraps(loss)
  def averaged(weights, log_decay, *batch):
    return lax.pmean(loss(weights, log_decay, *batch), AXIS)

  return averaged


def make_problem(seed=0):
  return _problems.softmax_problem(ROWS, FEATURES, CLASSES, seed)


def per_device(batch):
  """Splits the leading axis of every array into (NUM_DEVICES, rows per device)."""
  return jax.tree.map(lambda a: a.reshape(NUM_DEVICES, -1, *a.shape[1:]), batch)


def hypergrad(train_loss, val_loss, weights, log_decay, train, val):
  return ih.hypergrad(
    train_loss,
    val_loss,
    weights,
    log_decay,
    inner_args=train,
    outer_args=val,
    solver=ih.Neumann(steps=10),
  )


def validation_gradient(train_loss, val_loss, log_decay, train, val):
  """The gradient of the validation loss at the training optimum, through `implicit_argmin`."""

  @ih.implicit_argmin(train_loss, solver=ih.CG(steps=24))
  def fit(init_weights, log_decay, *train):
    def step(_, weights):
      return weights - 0.5 * jax.grad(train_loss)(weights, log_decay, *train)

    return lax.fori_loop(0, 300, step, init_weights)

  def objective(log_decay):
    weights = fit(jnp.zeros((FEATURES, CLASSES)), log_decay, *train)
    return val_loss(weights, log_decay, *val)

  return jax.grad(objective)(log_decay)


def assert_same(actual, expected):
  """Equal up to float64 round-off, which a different summation order changes."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-9 * np.max(np.abs(expected)))


def test_pmap_hypergrad_with_pmean_gradient_losses_equals_single_device():
  weights, log_decay, train, val = make_problem()
  single = jax.jit(functools.partial(hypergrad, train_loss, val_loss))(
    weights, log_decay, train, val
  )
  parallel = jax.pmap(
    functools.partial(hypergrad, pmap_loss(train_loss), pmap_loss(val_loss)),
    axis_name=AXIS,
    in_axes=(None, None, 0, 0),
  )(weights, log_decay, per_device(train), per_device(val))

  assert parallel.shape == (NUM_DEVICES, FEATURES, CLASSES)
  for device_result in parallel:
    assert_same(device_result, single)


def test_pmap_implicit_argmin_gradient_with_pmean_gradient_losses_equals_single_device():
  _, log_decay, train, val = make_problem()
  single = jax.jit(functools.partial(validation_gradient, train_loss, val_loss))(
    log_decay, train, val
  )
  parallel = jax.pmap(
    functools.partial(validation_gradient, pmap_loss(train_loss), pmap_loss(val_loss)),
    axis_name=AXIS,
    in_axes=(None, 0, 0),
  )(log_decay, per_device(train), per_device(val))

  assert float(jnp.linalg.norm(single)) > 1e-3  # a non-trivial gradient is compared
  for device_result in parallel:
    assert_same(device_result, single)


def test_shard_map_hypergrad_with_pmean_losses_equals_single_device():
  weights, log_decay, train, val = make_problem()
  single = jax.jit(functools.partial(hypergrad, train_loss, val_loss))(
    weights, log_decay, train, val
  )
  mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
  parallel = jax.jit(
    jax.shard_map(
      functools.partial(hypergrad, shard_map_loss(train_loss), shard_map_loss(val_loss)),
      mesh=mesh,
      in_specs=(P(), P(), P(AXIS), P(AXIS)),
      out_specs=P(),
    )
  )(weights, log_decay, train, val)

  assert_same(parallel, single)


def test_pmap_gradient_of_a_pmean_loss_is_the_local_gradient():
  """Why `ih.pmean_gradient` is needed: under `jax.pmap`, differentiating ``pmean(loss)``
  gives each device the gradient of its own slice's loss, not of the global mean."""
  weights, log_decay, train, _ = make_problem()
  x, labels = per_device(train)
  grads = jax.pmap(
    jax.grad(shard_map_loss(train_loss)), axis_name=AXIS, in_axes=(None, None, 0, 0)
  )(weights, log_decay, x, labels)
  local = jax.jit(jax.vmap(jax.grad(train_loss), in_axes=(None, None, 0, 0)))(
    weights, log_decay, x, labels
  )
  global_ = jax.jit(jax.grad(train_loss))(weights, log_decay, *train)

  assert_same(grads, local)
  assert np.max(np.abs(grads[0] - global_)) > 1e-3
