"""Tests of unrolled hypergradients: `ih.unrolled_hypergrad` and `ih.bilevel`'s unrolled modes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import implicit_hyper as ih

DIM, STEPS = 5, 8


def quadratic_problem():
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
  a = q @ np.diag(np.linspace(0.5, 2.0, DIM)) @ q.T
  return a, rng.normal(size=(STEPS, DIM)), rng.normal(size=DIM), rng.normal(size=DIM)


def inner_quadratic(a):
  def inner(w, decay, b):  # a different linear term b at every step, like minibatches
    return 0.5 * w @ (a + decay * np.eye(DIM)) @ w - b @ w

  return inner


def outer_quadratic(w, decay, c):
  return 0.5 * jnp.sum((w - c) ** 2) + 0.5 * decay**2


def unrolled_objective(a, bs, w0, c, learning_rate, decay, momentum):
  """The outer loss after len(bs) steps of heavy-ball gradient descent, in numpy (as optax.sgd)."""
  w, trace = w0.copy(), np.zeros_like(w0)
  for b in bs:
    trace = (a + decay * np.eye(DIM)) @ w - b + momentum * trace
    w = w - learning_rate * trace
  return 0.5 * np.sum((w - c) ** 2) + 0.5 * decay**2


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_unrolled_hypergradient_matches_finite_differences_of_unrolled_objective(momentum):
  a, bs, w0, c = quadratic_problem()
  lr, decay = 0.3, 0.2
  optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=lr, momentum=momentum)
  grads = jax.jit(
    lambda w0, decay, lr: ih.unrolled_hypergrad(
      inner_quadratic(a),
      outer_quadratic,
      optimizer,
      w0,
      decay,
      inner_args=(bs,),
      outer_args=(c,),
      opt_hparams={"learning_rate": lr},
    )
  )
  d_decay, d_opt = grads(w0, decay, lr)

  eps = 1e-6
  objective = lambda lr, decay: unrolled_objective(a, bs, w0, c, lr, decay, momentum)
  fd_lr = (objective(lr + eps, decay) - objective(lr - eps, decay)) / (2 * eps)
  fd_decay = (objective(lr, decay + eps) - objective(lr, decay - eps)) / (2 * eps)
  np.testing.assert_allclose(d_opt["learning_rate"], fd_lr, rtol=1e-8)
  np.testing.assert_allclose(d_decay, fd_decay, rtol=1e-8)


def test_unrolled_steps_are_rematerialised():
  a, bs, w0, c = quadratic_problem()
  jaxpr = jax.make_jaxpr(
    lambda lr: ih.unrolled_hypergrad(
      inner_quadratic(a),
      outer_quadratic,
      optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
      w0,
      0.0,
      inner_args=(bs,),
      outer_args=(c,),
      opt_hparams={"learning_rate": lr},
    )
  )(0.1)
  assert "checkpoint" in str(jaxpr) or "remat" in str(jaxpr)


def mixed_loop(method, unroll_steps):
  a, _, _, _ = quadratic_problem()
  return ih.bilevel(
    lambda w, h, b: inner_quadratic(a)(w, h["decay"], b),
    lambda w, h, c: outer_quadratic(w, h["decay"], c),
    optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.5),
    optax.sgd(1.0),  # so the raw update is minus the hypergradient
    inner_steps=STEPS,
    solver=ih.Direct(),
    method=method,
    hparam_transform="exp",
    optimizer_hparams=("learning_rate",),
    unroll_steps=unroll_steps,
  )


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_loop_combines_unrolled_learning_rate_and_loss_hypergradients(method):
  """With T = 3 of 8 steps unrolled, the learning rate's hypergradient is the truncated
  unrolled one from the state after 5 steps; the decay's is the implicit one at the final
  weights (method="implicit") or the truncated unrolled one (method="unrolled")."""
  a, bs, w0, c = quadratic_problem()
  loop = mixed_loop(method, unroll_steps=3)
  raw = {"learning_rate": jnp.log(0.1), "decay": jnp.log(0.2)}
  state = loop.init(w0, raw)
  new_state, metrics = jax.jit(loop.step)(state, (bs,), (c,))

  optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.5)
  inner = inner_quadratic(a)

  @jax.jit
  def reference(w, final_params):
    opt_state = optimizer.init(w)
    for b in bs[:5]:
      updates, opt_state = optimizer.update(jax.grad(inner)(w, 0.2, b), opt_state, w)
      w = optax.apply_updates(w, updates)
    d_decay_unrolled, d_opt = ih.unrolled_hypergrad(
      inner,
      outer_quadratic,
      optimizer,
      w,
      0.2,
      inner_args=(bs[5:],),
      outer_args=(c,),
      opt_state=opt_state,
      opt_hparams={"learning_rate": 0.1},
    )
    d_decay_implicit = ih.hypergrad(
      inner,
      outer_quadratic,
      final_params,
      0.2,
      inner_args=(bs[-1],),
      outer_args=(c,),
      solver=ih.Direct(),
    )
    return d_opt, d_decay_implicit if method == "implicit" else d_decay_unrolled

  d_opt, d_decay = reference(w0, new_state.params)
  np.testing.assert_allclose(
    raw["learning_rate"] - new_state.hparams["learning_rate"],
    0.1 * d_opt["learning_rate"],
    rtol=1e-10,
  )
  np.testing.assert_allclose(raw["decay"] - new_state.hparams["decay"], 0.2 * d_decay, rtol=1e-10)
  np.testing.assert_allclose(
    metrics.outer_loss, outer_quadratic(new_state.params, 0.2, c), rtol=1e-12
  )


def test_unrolled_learning_rate_and_implicit_decay_tune_a_small_regression_in_one_run():
  rng = np.random.default_rng(0)
  d, inner_steps = 10, 10
  w_true = rng.normal(size=d)

  def sample(n):
    x = rng.normal(size=(n, d))
    return x, x @ w_true + 0.5 * rng.normal(size=n)

  train, valid = sample(100), sample(200)

  def squared_error(w, x, y):
    return 0.5 * jnp.mean((x @ w - y) ** 2)

  loop = ih.bilevel(
    lambda w, h, x, y: squared_error(w, x, y) + 0.5 * h["decay"] * w @ w,
    lambda w, h, x, y: squared_error(w, x, y),
    optax.inject_hyperparams(optax.sgd)(learning_rate=0.003),
    optax.adam(0.1),
    inner_steps=inner_steps,
    solver=ih.CG(steps=10),
    hparam_transform="exp",
    optimizer_hparams=("learning_rate",),
  )
  step = jax.jit(loop.step)
  state = loop.init(jnp.zeros(d), {"learning_rate": jnp.log(0.003), "decay": jnp.log(0.01)})
  inner_args = tuple(np.broadcast_to(a, (inner_steps, *a.shape)) for a in train)
  for _ in range(40):
    state, metrics = step(state, inner_args, valid)

  x, y = train
  w = np.zeros(d)
  for _ in range(40 * inner_steps):  # the same run without tuning
    w -= 0.003 * (x.T @ (x @ w - y) / len(x) + 0.01 * w)
  untuned = float(squared_error(w, *valid))
  grid = [
    float(
      squared_error(np.linalg.solve(x.T @ x / len(x) + c * np.eye(d), x.T @ y / len(x)), *valid)
    )
    for c in np.logspace(-4, 1, 51)
  ]
  tuned = float(squared_error(state.params, *valid))
  hparams = loop.constrain(state.hparams)
  assert float(hparams["learning_rate"]) > 5 * 0.003
  assert float(hparams["decay"]) < 0.01
  assert tuned < 0.5 * untuned
  assert tuned < 1.05 * min(grid)
  assert int(state.num_skipped) == 0


def test_optimizer_hparams_must_be_numeric_inject_hyperparams():
  sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=optax.linear_schedule(0.1, 0.0, 10))
  loop = ih.bilevel(
    lambda w, h, b: jnp.sum(w**2),
    lambda w, h, b: jnp.sum(w**2),
    sgd,
    optax.sgd(0.1),
    optimizer_hparams=("learning_rate",),
  )
  with pytest.raises(ValueError, match="'learning_rate' is not a numeric hyperparameter"):
    loop.init(jnp.zeros(2), {"learning_rate": jnp.array(0.1)})
  with pytest.raises(ValueError, match="must be a dict holding these keys"):
    loop.init(jnp.zeros(2), jnp.array(0.1))


def test_unrolled_hypergrad_takes_the_losses_extra_arguments_as_tuples():
  a, bs, w0, c = quadratic_problem()
  with pytest.raises(TypeError, match=r"unrolled_hypergrad\(inner_args=...\)` must be a tuple"):
    ih.unrolled_hypergrad(
      inner_quadratic(a), outer_quadratic, optax.sgd(0.1), w0, 0.0, inner_args=bs
    )
