"""Hypergradients under `jax.jit` with arrays sharded over a mesh of 8 CPU devices.

The root conftest gives this process 8 host devices. Sharding changes where the
computation runs, never what it computes, so every sharded result must equal the
single-device one to float64 round-off.
"""

import json
import sys
from pathlib import Path

import _problems
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import implicit_hyper as ih

NUM_DEVICES = 8
ROWS, FEATURES, CLASSES = 64, 6, 8
INNER_STEPS = 3


cross_entropy = _problems.cross_entropy
train_loss = _problems.decayed_cross_entropy
val_loss = _problems.validation_cross_entropy


def make_problem(seed=0):
  """Weights, log decays, and a training and a validation batch (float64 numpy)."""
  return _problems.softmax_problem(ROWS, FEATURES, CLASSES, seed)


def mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


@jax.jit
def neumann_hypergrad(weights, log_decay, train, val):
  return ih.hypergrad_with_info(
    train_loss,
    val_loss,
    weights,
    log_decay,
    inner_args=train,
    outer_args=val,
    solver=ih.Neumann(steps=10),
  )


@jax.jit
def cg_hypergrad(weights, log_decay, train, val):
  return ih.hypergrad_with_info(
    train_loss, val_loss, weights, log_decay, inner_args=train, outer_args=val, solver=ih.CG()
  )


@ih.implicit_argmin(train_loss, solver=ih.CG(steps=48))
def train(init_weights, log_decay, x, labels):
  """Gradient descent to the (strongly convex) training optimum."""

  def step(_, weights):
    return weights - 0.5 * jax.grad(train_loss)(weights, log_decay, x, labels)

  return jax.lax.fori_loop(0, 300, step, init_weights)


@jax.jit
def validation_gradient(init_weights, log_decay, train_batch, val_batch):
  def objective(log_decay):
    return val_loss(train(init_weights, log_decay, *train_batch), log_decay, *val_batch)

  return jax.value_and_grad(objective)(log_decay)


def bilevel_loop():
  def train_with_decay(weights, decay, x, labels):
    return cross_entropy(weights, x, labels) + 0.5 * jnp.sum(decay * weights**2)

  def validation(weights, decay, x, labels):
    return cross_entropy(weights, x, labels)

  return ih.bilevel(
    train_with_decay,
    validation,
    optax.sgd(0.5),
    optax.adam(0.05),
    inner_steps=INNER_STEPS,
    solver=ih.Neumann(steps=10, alpha=0.5),
    hparam_transform="exp",
  )


def assert_same(sharded, single):
  """Equal up to float64 round-off, which a different summation order changes."""
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single), strict=True):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9 * np.max(np.abs(b)))


def test_neumann_hypergrad_with_batches_sharded_over_8_devices_equals_single_device():
  weights, log_decay, train_batch, val_batch = make_problem()
  data_mesh = mesh((NUM_DEVICES,), ("batch",))
  by_rows = NamedSharding(data_mesh, P("batch"))
  replicated = NamedSharding(data_mesh, P())

  single = neumann_hypergrad(weights, log_decay, train_batch, val_batch)
  sharded = neumann_hypergrad(
    jax.device_put(weights, replicated),
    jax.device_put(log_decay, replicated),
    jax.device_put(train_batch, by_rows),
    jax.device_put(val_batch, by_rows),
  )

  assert_same(sharded, single)
  grads = sharded[0]
  assert grads.sharding.is_fully_replicated
  assert len(grads.sharding.device_set) == NUM_DEVICES
  assert not bool(sharded[1].diverged)


def test_implicit_argmin_gradient_with_batches_sharded_over_8_devices_equals_single_device():
  _, log_decay, train_batch, val_batch = make_problem()
  init = np.zeros((FEATURES, CLASSES))
  data_mesh = mesh((NUM_DEVICES,), ("batch",))
  by_rows = NamedSharding(data_mesh, P("batch"))
  replicated = NamedSharding(data_mesh, P())

  single = validation_gradient(init, log_decay, train_batch, val_batch)
  sharded = validation_gradient(
    jax.device_put(init, replicated),
    jax.device_put(log_decay, replicated),
    jax.device_put(train_batch, by_rows),
    jax.device_put(val_batch, by_rows),
  )

  assert_same(sharded, single)
  assert sharded[1].sharding.is_fully_replicated
  assert float(jnp.linalg.norm(single[1])) > 1e-3  # a non-trivial gradient was compared


def test_per_weight_decay_cg_hypergrad_keeps_weights_sharded_over_model_axis():
  weights, log_decay, train_batch, val_batch = make_problem()
  grid = mesh((2, 4), ("data", "model"))
  by_column = NamedSharding(grid, P(None, "model"))  # each device holds CLASSES / 4 columns
  by_rows = NamedSharding(grid, P("data"))

  single = cg_hypergrad(weights, log_decay, train_batch, val_batch)
  grads, info, adjoint = cg_hypergrad(  # CG's state is the adjoint, its last solution
    jax.device_put(weights, by_column),
    jax.device_put(log_decay, by_column),
    jax.device_put(train_batch, by_rows),
    jax.device_put(val_batch, by_rows),
  )

  assert_same((grads, info, adjoint), single)
  assert grads.sharding.is_equivalent_to(by_column, grads.ndim)
  assert adjoint.sharding.is_equivalent_to(by_column, adjoint.ndim)
  assert {shard.data.shape for shard in grads.addressable_shards} == {(FEATURES, CLASSES // 4)}


def test_bilevel_steps_with_batches_sharded_over_8_devices_equal_single_device():
  weights, log_decay, train_batch, val_batch = make_problem()
  loop = bilevel_loop()
  step = jax.jit(loop.step)
  inner_args = tuple(np.stack([a] * INNER_STEPS) for a in train_batch)
  data_mesh = mesh((NUM_DEVICES,), ("batch",))
  replicated = NamedSharding(data_mesh, P())

  def run(state, inner_args, val_batch):
    history = []
    for _ in range(2):
      state, metrics = step(state, inner_args, val_batch)
      history.append(metrics)
    return state, history

  single = run(loop.init(weights, log_decay), inner_args, val_batch)
  sharded = run(
    jax.device_put(loop.init(weights, log_decay), replicated),
    jax.device_put(inner_args, NamedSharding(data_mesh, P(None, "batch"))),
    jax.device_put(val_batch, NamedSharding(data_mesh, P("batch"))),
  )

  assert_same(sharded, single)
  state, history = sharded
  assert state.hparams.sharding.is_fully_replicated
  assert not any(bool(metrics.skipped) for metrics in history)
  assert np.max(np.abs(state.hparams - log_decay)) > 1e-3  # the hyperparameters moved


def test_data_parallel_example_quick_run_uses_all_8_devices(tmp_path, capsys):
  sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
  import data_parallel  # noqa: PLC0415

  data_parallel.main(["--quick", "--out", str(tmp_path)])

  metrics = json.loads((tmp_path / "metrics.json").read_text())
  assert metrics["devices"] == NUM_DEVICES
  assert f"devices: {NUM_DEVICES}" in capsys.readouterr().out
  assert metrics["skipped_hyper_steps"] == 0
  assert np.isfinite(metrics["train_examples_per_second"]) and metrics["seconds"] > 0
  assert metrics["final_val_loss"] < metrics["initial_val_loss"]
