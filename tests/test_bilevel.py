"""Tests of `ih.bilevel`: the alternating loop of Lorraine et al. (2020), Algorithm 1."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import implicit_hyper as ih

RIDGE_INNER_STEPS = 20
NEUMANN = ih.Neumann(steps=20, estimate_steps=100)  # refresh_every=10
CG = ih.CG(steps=20, tol=1e-4)  # warm_start=True


def squared_error(w, x, y):
  return 0.5 * ((x @ w - y) ** 2).mean()


def ridge_loss(w, decay, x, y):
  return squared_error(w, x, y) + 0.5 * decay * w @ w


def validation_loss(w, decay, x, y):
  del decay
  return squared_error(w, x, y)


def repeat(batch, times):
  """The same (full) batch for every inner step: a tuple of arrays with a leading axis."""
  return tuple(np.broadcast_to(a, (times, *a.shape)) for a in batch)


@functools.cache
def ridge_data(d=20, n_train=30, n_val=200):
  rng = np.random.default_rng(0)
  w_true = rng.normal(size=d)

  def sample(n):
    x = rng.normal(size=(n, d))
    return x, x @ w_true + 2.0 * rng.normal(size=n)

  return sample(n_train), sample(n_val)


def ridge_solution(decay, train):
  x, y = train
  n, d = x.shape
  return np.linalg.solve(x.T @ x / n + decay * np.eye(d), x.T @ y / n)


@functools.cache
def ridge_loop(solver):
  loop = ih.bilevel(
    ridge_loss,
    validation_loss,
    optax.sgd(0.2),
    optax.adam(0.05),
    inner_steps=RIDGE_INNER_STEPS,
    solver=solver,
    hparam_transform="exp",
  )
  return loop, jax.jit(loop.step)


def run_ridge(solver, num_steps, *, decay=3.0, outer_batches=None):
  train, valid = ridge_data()
  loop, step = ridge_loop(solver)
  state = loop.init(jnp.zeros(train[0].shape[1]), jnp.log(decay))
  inner_args = repeat(train, RIDGE_INNER_STEPS)
  states, metrics = [state], []
  for k in range(num_steps):
    state, m = step(state, inner_args, valid if outer_batches is None else outer_batches[k])
    states.append(state)
    metrics.append(m)
  return states, metrics


@pytest.mark.parametrize("solver", [NEUMANN, CG], ids=["neumann", "cg"])
def test_ridge_weight_decay_reaches_best_validation_loss_of_closed_form_grid(solver):
  train, valid = ridge_data()
  grid = np.logspace(-4, 2, 3001)
  grid_losses = [float(squared_error(ridge_solution(c, train), *valid)) for c in grid]
  best = min(grid_losses)
  start = squared_error(ridge_solution(3.0, train), *valid)
  assert start > 1.2 * best  # the untuned decay is clearly worse

  states, metrics = run_ridge(solver, 120, decay=3.0)

  final = validation_loss(states[-1].params, None, *valid)
  assert final <= 1.01 * best
  decay = float(jnp.exp(states[-1].hparams))
  assert abs(np.log(decay / grid[np.argmin(grid_losses)])) < 0.1
  assert int(states[-1].num_skipped) == 0


def test_nan_in_hypergradient_is_skipped_and_counted():
  train, valid = ridge_data()
  poisoned = (valid[0], valid[1].copy())
  poisoned[1][3] = np.nan
  outer_batches = [valid, valid, poisoned, valid, valid]
  states, metrics = run_ridge(NEUMANN, 5, outer_batches=outer_batches)

  skipped = [bool(m.skipped) for m in metrics]
  assert skipped == [False, False, True, False, False]
  assert [int(m.num_skipped) for m in metrics] == [0, 0, 1, 1, 1]
  assert not np.isfinite(float(metrics[2].hypergrad_norm))
  before, after = states[2], states[3]
  assert np.array_equal(after.hparams, before.hparams)
  for a, b in zip(
    jax.tree.leaves(after.outer_opt_state), jax.tree.leaves(before.outer_opt_state), strict=True
  ):
    assert np.array_equal(a, b)
  assert not np.array_equal(states[4].hparams, states[3].hparams)  # training goes on
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(states[-1].outer_opt_state))
  # The skipped step resets the solver state (the cached Neumann step) to `solver.init`;
  # the next one estimates the step afresh.
  assert np.isnan(float(states[3].method_state.solver.alpha))
  x = train[0]
  hessian = x.T @ x / len(x) + float(jnp.exp(states[3].hparams)) * np.eye(x.shape[1])
  np.testing.assert_allclose(
    float(states[4].method_state.solver.alpha), 1 / np.linalg.eigvalsh(hessian)[-1], rtol=1e-4
  )


def test_neumann_step_is_cached_and_refreshed_every_m_steps():
  train, _ = ridge_data()
  x = train[0]
  states, _ = run_ridge(NEUMANN, 21)
  alphas = [float(s.method_state.solver.alpha) for s in states[1:]]  # after hyper steps 0..20
  assert len(set(alphas[0:10])) == 1 and len(set(alphas[10:20])) == 1
  assert alphas[9] != alphas[10] != alphas[20]
  for k in (0, 10, 20):
    decay = float(jnp.exp(states[k].hparams))
    hessian = x.T @ x / len(x) + decay * np.eye(x.shape[1])
    np.testing.assert_allclose(alphas[k], 1 / np.linalg.eigvalsh(hessian)[-1], rtol=1e-4)


def test_cg_warm_start_from_previous_adjoint_needs_fewer_iterations():
  train, valid = ridge_data()
  warm_states, warm = run_ridge(CG, 120)
  _, cold = run_ridge(dataclasses.replace(CG, warm_start=False), 120)

  state, x = warm_states[-1], train[0]
  hessian = x.T @ x / len(x) + float(jnp.exp(warm_states[-2].hparams)) * np.eye(x.shape[1])
  grad_params = jax.grad(validation_loss)(state.params, None, *valid)
  adjoint = state.method_state.solver  # CG's state: its last solution
  residual = np.linalg.norm(hessian @ adjoint - grad_params) / np.linalg.norm(grad_params)
  assert residual <= 1e-4  # the state holds the last solve's adjoint
  warm_iterations = sum(int(m.solver_steps) for m in warm[60:])
  cold_iterations = sum(int(m.solver_steps) for m in cold[60:])
  assert warm_iterations < 0.6 * cold_iterations
  assert all(float(m.residual_norm) <= 1e-4 for m in warm + cold)


def test_per_feature_weight_decay_lowers_digits_validation_loss():
  x, y = load_digits(return_X_y=True)
  perm = np.random.default_rng(0).permutation(len(x))
  x = x / 16.0
  (x_train, y_train), (x_val, y_val) = (
    (x[perm[:100]], y[perm[:100]]),
    (x[perm[100:600]], y[perm[100:600]]),
  )
  inner_steps = 10

  def cross_entropy(params, inputs, labels):
    w, b = params
    logits = inputs @ w + b
    return jnp.mean(
      jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[:, None], 1)[:, 0]
    )

  def train_loss(params, decay, inputs, labels):  # one decay per input feature
    return cross_entropy(params, inputs, labels) + 0.5 * jnp.sum(decay[:, None] * params[0] ** 2)

  def data(step):
    rng = np.random.default_rng([1, step])
    rows = np.stack([rng.choice(100, 50, replace=False) for _ in range(inner_steps)])
    val_rows = rng.choice(len(x_val), 100, replace=False)
    return (x_train[rows], y_train[rows]), (x_val[val_rows], y_val[val_rows])

  full_validation_loss = jax.jit(lambda params: cross_entropy(params, x_val, y_val))

  raw_decay = jnp.full(64, np.log(1e-3))

  @jax.jit
  def pretrain(params):  # full-batch gradient descent to the untuned optimum
    grad = jax.grad(train_loss)
    step = lambda _, p: optax.apply_updates(
      p, jax.tree.map(lambda g: -g, grad(p, jnp.exp(raw_decay), x_train, y_train))
    )
    return jax.lax.fori_loop(0, 500, step, params)

  pretrained = pretrain((jnp.zeros((64, 10)), jnp.zeros(10)))
  loop = ih.bilevel(
    train_loss,
    lambda params, decay, inputs, labels: cross_entropy(params, inputs, labels),
    optax.sgd(1.0),
    optax.adam(0.1),
    inner_steps=inner_steps,
    solver=ih.Neumann(steps=10),
    hparam_transform="exp",
  )
  step = jax.jit(loop.step)
  state = loop.init(pretrained, raw_decay)
  losses = [float(full_validation_loss(pretrained))]
  for k in range(100):
    state, metrics = step(state, *data(k))
    losses.append(float(full_validation_loss(state.params)))

  quarters = [np.mean(q) for q in np.array_split(losses[1:], 4)]
  assert all(later < earlier for earlier, later in zip(quarters, quarters[1:], strict=False))
  assert losses[-1] < 0.9 * losses[0]
  assert int(state.num_skipped) < 10


def test_jitted_step_traces_once_across_hyper_steps():
  traces = []

  def counted_loss(w, decay, x, y):
    traces.append(None)
    return ridge_loss(w, decay, x, y)

  loop = ih.bilevel(
    counted_loss, validation_loss, optax.sgd(0.1), optax.adam(0.1), inner_steps=3, solver=ih.CG()
  )
  step = jax.jit(loop.step)
  train, valid = ridge_data()
  state = loop.init(np.zeros(20), 1.0)  # Python and weakly typed inputs on purpose
  state, _ = step(state, repeat(train, 3), valid)
  traced = len(traces)
  for _ in range(4):
    state, _ = step(state, repeat(train, 3), valid)
  assert traced > 0 and len(traces) == traced
  assert step._cache_size() == 1


def test_hparam_transform_hypergradient_follows_chain_rule():
  train, valid = ridge_data()

  def outer(w, h, x, y):
    return h["scale"] * squared_error(w, x, y)

  def inner(w, h, x, y):
    return ridge_loss(w, h["decay"], x, y)

  loop = ih.bilevel(
    inner,
    outer,
    optax.set_to_zero(),  # the parameters stay where they are
    optax.sgd(1.0),  # so the raw update is minus the hypergradient
    inner_steps=1,
    solver=ih.Direct(),
    hparam_transform={"decay": "exp", "scale": "softplus"},
  )
  raw = {"decay": jnp.array(-1.0), "scale": jnp.array(0.3)}
  w = jnp.asarray(ridge_solution(0.5, train))
  state, _ = jax.jit(loop.step)(loop.init(w, raw), repeat(train, 1), valid)

  constrained = loop.constrain(raw)
  np.testing.assert_allclose(constrained["decay"], np.exp(-1.0))
  np.testing.assert_allclose(constrained["scale"], np.log1p(np.exp(0.3)))
  grads = jax.jit(
    lambda w, h: ih.hypergrad(
      inner, outer, w, h, inner_args=train, outer_args=valid, solver=ih.Direct()
    )
  )(w, constrained)
  expected = {
    "decay": raw["decay"] - grads["decay"] * np.exp(-1.0),
    "scale": raw["scale"] - grads["scale"] * jax.nn.sigmoid(0.3),
  }
  for key in raw:
    np.testing.assert_allclose(state.hparams[key], expected[key], rtol=1e-10)


def test_bad_settings_and_batches_are_rejected_with_named_arguments():
  sgd = optax.sgd(0.1)
  with pytest.raises(ValueError, match="inner_steps"):
    ih.bilevel(ridge_loss, validation_loss, sgd, sgd, inner_steps=0)
  with pytest.raises(ValueError, match="method"):
    ih.bilevel(ridge_loss, validation_loss, sgd, sgd, method="forward")
  with pytest.raises(ValueError, match="unroll_steps"):
    ih.bilevel(ridge_loss, validation_loss, sgd, sgd, unroll_steps=2)
  with pytest.raises(ValueError, match="unknown transform 'log'"):
    ih.bilevel(ridge_loss, validation_loss, sgd, sgd, hparam_transform="log")
  with pytest.raises(TypeError, match="outer_optimizer"):
    ih.bilevel(ridge_loss, validation_loss, sgd, optax.adam)
  with pytest.raises(ValueError, match="inject_hyperparams"):
    ih.bilevel(ridge_loss, validation_loss, sgd, sgd, optimizer_hparams=("learning_rate",)).init(
      jnp.zeros(3), {"learning_rate": jnp.array(0.1)}
    )
  loop = ih.bilevel(ridge_loss, validation_loss, sgd, sgd, inner_steps=4)
  train, valid = ridge_data()
  with pytest.raises(ValueError, match=r"inner_args\[0\] has shape \(3, 30, 20\)"):
    loop.step(loop.init(jnp.zeros(20), jnp.array(0.1)), repeat(train, 3), valid)


def test_config_holds_the_loop_settings_as_json():
  loop = ih.bilevel(
    ridge_loss, validation_loss, optax.sgd(0.1), optax.adam(0.1), inner_steps=3, solver=CG
  )
  config = json.loads(json.dumps(loop.config))
  assert config["inner_steps"] == 3 and config["method"] == "implicit"
  assert config["solver"] == repr(CG)
