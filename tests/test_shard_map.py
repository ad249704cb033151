"""Hypergradients inside `jax.shard_map` on 8 CPU devices, with and without `check_vma`.

With its default ``check_vma=True``, `shard_map` types every value by the mesh axes it
varies along; the implicit rule and the solvers must keep those types. Two layouts: one
problem with its batch split over the devices (parameters replicated, losses averaged
with `lax.pmean`), which must equal the single-device result, and one independent task
per device (hyperparameters and data split), which must equal `jax.vmap` over the tasks.
Without replication checking (``check_vma=False``, as under `jax.pmap`), JAX's gradient
of a `pmean`'d loss is each device's local one: the library refuses such a loss.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

import implicit_hyper as ih

DEVICES, ROWS, FEATURES = 8, 32, 6
MESH = jax.make_mesh((DEVICES,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))


def train_loss(w, log_decay, x, y):
  return jnp.mean((x @ w - y) ** 2) + 0.5 * jnp.sum(jnp.exp(log_decay) * w**2)


def val_loss(w, log_decay, x, y):
  return jnp.mean((x @ w - y) ** 2)


def averaged(loss):
  return lambda w, h, *batch: lax.pmean(loss(w, h, *batch), "d")


def ridge(mean):
  """The exact argmin of `train_loss`, with the batch means taken by `mean`."""

  def solve(w0, log_decay, x, y):
    gram = mean(2.0 * x.T @ x / x.shape[0]) + jnp.diag(jnp.exp(log_decay))
    return jnp.linalg.solve(gram, mean(2.0 * x.T @ y / x.shape[0]))

  return solve


def local(v):
  return v


def pmean(v):
  return lax.pmean(v, "d")


def problem():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k1, (2 * ROWS, FEATURES))
  y = x @ jax.random.normal(k2, (FEATURES,)) + 0.1 * jax.random.normal(k3, (2 * ROWS,))
  return (x[:ROWS], y[:ROWS]), (x[ROWS:], y[ROWS:]), 0.3 * jnp.arange(FEATURES) - 1.0


def tasks():
  """One ridge problem per device: its own decays and its own rows."""
  (x, y), _, log_decay = problem()
  log_decays = jnp.stack([log_decay + 0.1 * i for i in range(DEVICES)])
  xs = jnp.stack([x * (1.0 + 0.05 * i) for i in range(DEVICES)])
  return log_decays, xs, jnp.stack([y] * DEVICES)


def decorated(kind, solver, mean, loss):
  """A decorated exact inner solver; its derivative comes from the rule alone."""
  if kind == "argmin":
    return ih.implicit_argmin(loss, solver=solver)(ridge(mean))
  gradient = jax.grad(loss)
  if kind == "root":
    return ih.implicit_root(gradient, solver=solver)(ridge(mean))
  step = lambda w, h, *batch: w - 0.2 * gradient(w, h, *batch)
  return ih.implicit_fixed_point(step, solver=solver)(ridge(mean))


def validation_gradient(kind, solver, mean, inner, outer):
  solve = decorated(kind, solver, mean, inner)
  return lambda w0, h, tb, vb: jax.grad(lambda h: outer(solve(w0, h, *tb), h, *vb))(h)


def assert_close(got, expected):
  scale = np.max(np.abs(expected))
  assert scale > 1e-3  # a non-trivial gradient is compared
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=0, atol=1e-12 * scale)


def global_map(fn):
  in_specs = (P(), P(), P("d"), P("d"))
  return jax.jit(jax.shard_map(fn, mesh=MESH, in_specs=in_specs, out_specs=P()))


def task_map(fn):
  def per_device(w0, h, x, y):
    return fn(w0, h[0], (x[0], y[0]), (x[0], y[0]))[None]

  in_specs = (P(), P("d"), P("d"), P("d"))
  return jax.jit(jax.shard_map(per_device, mesh=MESH, in_specs=in_specs, out_specs=P("d")))


def vmapped(fn):
  return jax.vmap(lambda w0, h, x, y: fn(w0, h, (x, y), (x, y)), in_axes=(None, 0, 0, 0))


DECORATORS = {
  "argmin": ih.CG(steps=FEATURES, tol=0.0),
  "root": ih.BiCGStab(steps=4 * FEATURES, tol=1e-14),
  "fixed_point": ih.GMRES(steps=FEATURES, tol=0.0),
}


@pytest.mark.parametrize("kind", DECORATORS)
def test_decorator_in_shard_map_with_pmean_loss_equals_one_device(kind):
  train, val, log_decay = problem()
  solver = DECORATORS[kind]
  single = validation_gradient(kind, solver, local, train_loss, val_loss)
  sharded = validation_gradient(kind, solver, pmean, averaged(train_loss), averaged(val_loss))
  w0 = jnp.zeros(FEATURES)

  assert_close(global_map(sharded)(w0, log_decay, train, val), single(w0, log_decay, train, val))


@pytest.mark.parametrize("kind", DECORATORS)
def test_decorator_in_shard_map_with_one_task_per_device_equals_vmap(kind):
  log_decays, xs, ys = tasks()
  fn = validation_gradient(kind, DECORATORS[kind], local, train_loss, val_loss)
  w0 = jnp.zeros(FEATURES)

  assert_close(task_map(fn)(w0, log_decays, xs, ys), vmapped(fn)(w0, log_decays, xs, ys))


SOLVERS = {
  "neumann": ih.Neumann(steps=20),  # the default's automatic step: Lanczos in a while_loop
  "minres": ih.MINRES(steps=FEATURES, tol=0.0),
  "nystrom": ih.Nystrom(rank=FEATURES),  # a random sketch in a lax.cond
}


def hypergradient(solver, inner, outer, mean):
  def fn(w0, h, tb, vb):
    w = ridge(mean)(w0, h, *tb)
    return ih.hypergrad(inner, outer, w, h, inner_args=tb, outer_args=vb, solver=solver)

  return fn


@pytest.mark.parametrize("name", SOLVERS)
def test_hypergrad_in_shard_map_equals_one_device_and_vmap(name):
  train, val, log_decay = problem()
  solver = SOLVERS[name]
  w0 = jnp.zeros(FEATURES)
  single = hypergradient(solver, train_loss, val_loss, local)(w0, log_decay, train, val)
  sharded = hypergradient(solver, averaged(train_loss), averaged(val_loss), pmean)
  assert_close(global_map(sharded)(w0, log_decay, train, val), single)

  log_decays, xs, ys = tasks()
  fn = hypergradient(solver, train_loss, val_loss, local)
  assert_close(task_map(fn)(w0, log_decays, xs, ys), vmapped(fn)(w0, log_decays, xs, ys))


def test_bilevel_step_in_shard_map_with_pmean_losses_equals_one_device():
  (x, y), val, log_decay = problem()
  inner_steps = 3

  def loop(inner, outer):
    return ih.bilevel(
      inner,
      outer,
      optax.sgd(0.1),
      optax.sgd(0.05),
      inner_steps=inner_steps,
      solver=ih.CG(steps=FEATURES, tol=0.0),
    )

  inner_args = (jnp.stack([x] * inner_steps), jnp.stack([y] * inner_steps))
  single_loop, sharded_loop = (
    loop(train_loss, val_loss),
    loop(averaged(train_loss), averaged(val_loss)),
  )
  state = single_loop.init(jnp.zeros(FEATURES), log_decay)
  single_state, single_metrics = jax.jit(single_loop.step)(state, inner_args, val)
  step = jax.jit(
    jax.shard_map(
      sharded_loop.step,
      mesh=MESH,
      in_specs=(P(), P(None, "d"), P("d")),
      out_specs=P(),
    )
  )
  sharded_state, sharded_metrics = step(state, inner_args, val)

  assert_close(sharded_state.hparams - log_decay, single_state.hparams - log_decay)
  assert_close(sharded_state.params, single_state.params)
  assert not bool(sharded_metrics.skipped)


def unchecked(fn):
  in_specs = (P(), P(), P("d"), P("d"))
  return jax.jit(jax.shard_map(fn, mesh=MESH, in_specs=in_specs, out_specs=P(), check_vma=False))


def test_hypergrad_of_pmean_loss_without_check_vma_is_refused_with_what_to_write():
  train, val, log_decay = problem()
  fn = hypergradient(ih.CG(steps=FEATURES), averaged(train_loss), averaged(val_loss), pmean)

  with pytest.raises(
    ValueError, match=r"hypergrad\(inner_loss=...\)` reduces over the mapped"
  ) as e:
    unchecked(fn)(jnp.zeros(FEATURES), log_decay, train, val)
  assert "check_vma=True" in str(e.value) and "ih.pmean_gradient((params, hparams), 'd')" in str(
    e.value
  )


def test_decorator_with_pmean_loss_without_check_vma_is_refused():
  train, val, log_decay = problem()
  fn = validation_gradient(
    "argmin", ih.CG(steps=FEATURES), pmean, averaged(train_loss), averaged(val_loss)
  )

  with pytest.raises(ValueError, match=r"`implicit_argmin\(<lambda>\)` reduces over the mapped"):
    unchecked(fn)(jnp.zeros(FEATURES), log_decay, train, val)


def gradient_averaged(loss):
  """The `jax.pmap` recipe: a per-device loss whose gradient `ih.pmean_gradient` averages."""

  def per_device(w, h, *batch):
    return loss(*ih.pmean_gradient((w, h), "d"), *batch)

  return per_device


@pytest.mark.parametrize("also_pmean", [False, True], ids=["local_loss", "pmean_loss"])
def test_pmean_gradient_recipe_without_check_vma_equals_one_device(also_pmean):
  train, val, log_decay = problem()
  wrap = (lambda f: averaged(gradient_averaged(f))) if also_pmean else gradient_averaged
  w0 = jnp.zeros(FEATURES)
  single = hypergradient(ih.CG(steps=FEATURES, tol=0.0), train_loss, val_loss, local)
  fn = hypergradient(ih.CG(steps=FEATURES, tol=0.0), wrap(train_loss), wrap(val_loss), pmean)

  assert_close(unchecked(fn)(w0, log_decay, train, val), single(w0, log_decay, train, val))
