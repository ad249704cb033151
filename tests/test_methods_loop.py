"""What the loop reports: non-finite states, stationarity, extra-args optimisers, losses' aux."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import implicit_hyper as ih

RNG = np.random.default_rng(0)
N, D, T = 40, 4, 10
X = jnp.asarray(RNG.normal(size=(N, D)))
W0 = jnp.asarray(RNG.normal(size=D))
Y = X @ W0 + 0.5 * jnp.asarray(RNG.normal(size=N))
XV = jnp.asarray(RNG.normal(size=(N, D)))
YV = XV @ W0 + 0.5 * jnp.asarray(RNG.normal(size=N))
INNER_ARGS = (jnp.stack([X] * T), jnp.stack([Y] * T))


def train(w, decay, x, y):
  return 0.5 * jnp.mean((x @ w - y) ** 2) + 0.5 * jnp.sum(decay * w**2)


def valid(w, decay, x, y):
  return 0.5 * jnp.mean((x @ w - y) ** 2)


def best_decay():
  """Newton's method on the validation loss of the closed-form ridge solution."""

  def value(lam):
    w = jnp.linalg.solve(X.T @ X / N + lam * jnp.eye(D), X.T @ Y / N)
    return valid(w, lam, XV, YV)

  lam = jnp.asarray(0.1)
  for _ in range(30):
    lam = lam - jax.grad(value)(lam) / jax.grad(jax.grad(value))(lam)
  return float(lam)


def run(loop, hparams, steps, outer_args=(XV, YV)):
  """`steps` hyper steps in one compiled scan; the last step's metrics."""
  state = loop.init(jnp.zeros(D), hparams)
  scan = lambda s: jax.lax.scan(lambda s, _: loop.step(s, INNER_ARGS, outer_args), s, length=steps)
  state, metrics = jax.jit(scan)(state)
  return state, jax.tree.map(lambda m: m[-1], metrics)


# Issue 17.8: prodigy as the outer optimiser, with validation targets whose best decays are
# infinite, grows the decays until the inner SGD diverges.
def diverging_loop():
  zero_target = lambda w, decay, x, y: 0.5 * jnp.mean((x @ w) ** 2)
  return ih.bilevel(
    train,
    zero_target,
    optax.sgd(0.1),
    optax.contrib.prodigy(),
    inner_steps=T,
    solver=ih.CG(steps=4),
  )


def diverging_data(step):
  del step
  return INNER_ARGS, (X, Y)


def test_a_loop_whose_weights_become_non_finite_says_so_in_metrics_bar_and_warning(capsys):
  loop = diverging_loop()
  start = loop.init(jnp.zeros(D), jnp.full(D, 0.1))
  with pytest.warns(ih.HypergradientWarning, match="weights or the hyperparameters are not finite"):
    state, history = ih.fit(loop, start, diverging_data, num_steps=100, warn_after_skips=None)
  first = next(r["step"] for r in history if r["non_finite"])
  assert 20 < first < 100 and not any(r["non_finite"] for r in history[:first])
  assert not bool(ih._src.solvers._base.tree_all_finite(state.params))
  assert bool(ih._src.solvers._base.tree_all_finite(state.hparams))  # the guard kept them
  assert "NON-FINITE" in capsys.readouterr().err
  with pytest.raises(ih.HypergradientError, match=f"after hyper step {first}"):
    ih.fit(loop, start, diverging_data, num_steps=100, progress=False, on_non_finite="raise")


def test_an_outer_update_that_overflows_on_finite_hypergradients_is_skipped():
  loop = diverging_loop()
  state = loop.init(jnp.zeros(D), jnp.full(D, 0.1))
  step = jax.jit(loop.step)
  for _ in range(100):
    state, metrics = step(state, *diverging_data(0))
    assert bool(jnp.all(jnp.isfinite(state.hparams)))
  assert int(metrics.num_skipped) > 0


def test_a_healthy_loop_is_finite_and_fit_does_not_warn():
  loop = ih.bilevel(train, valid, optax.sgd(0.3), optax.adam(0.05), inner_steps=T)
  state, history = ih.fit(
    loop,
    loop.init(jnp.zeros(D), jnp.asarray(0.5)),
    lambda s: (INNER_ARGS, (XV, YV)),
    num_steps=20,
    progress=False,
  )
  assert not any(r["non_finite"] for r in history)
  with pytest.raises(ValueError, match="on_non_finite"):
    ih.fit(loop, state, lambda s: (INNER_ARGS, (XV, YV)), num_steps=21, on_non_finite="stop")


# Issue 17.12: adamw's own weight decay moves its fixed point off the training argmin.
def test_stationarity_in_the_metrics_shows_adamw_is_not_at_the_training_argmin():
  measured = {}
  for name, optimizer in (
    ("adam", optax.adam(0.01)),
    ("adamw", optax.adamw(0.01, weight_decay=0.1)),
  ):
    loop = ih.bilevel(
      train,
      valid,
      optimizer,
      optax.adam(0.01),
      inner_steps=T,
      solver=ih.CG(steps=8),
      hparam_transform="exp",
    )
    _, metrics = run(loop, jnp.full(D, jnp.log(0.1)), 300)
    measured[name] = float(metrics.stationarity)
    assert not bool(metrics.negative_curvature)
  assert measured["adam"] < 1e-4 < 5e-4 < measured["adamw"]


# Issue 20: the denominator is taken once, at the first hyper step, and kept in the state.
def test_stationarity_is_the_gradient_relative_to_the_one_at_the_first_weights():
  w0 = jnp.asarray(RNG.normal(size=D))
  loop = ih.bilevel(train, valid, optax.sgd(0.01), optax.adam(0.01), inner_steps=T)
  state, step = loop.init(w0, jnp.asarray(0.1)), jax.jit(loop.step)
  assert np.isnan(float(state.method_state.stationarity_scale))
  gradient_norm = lambda w, decay: float(jnp.linalg.norm(jax.grad(train)(w, decay, X, Y)))
  scale = gradient_norm(w0, 0.1)
  for _ in range(3):
    hparams = state.hparams
    state, metrics = step(state, INNER_ARGS, (XV, YV))
    np.testing.assert_allclose(state.method_state.stationarity_scale, scale, rtol=1e-13)
    expected = gradient_norm(state.params, float(hparams)) / scale
    np.testing.assert_allclose(metrics.stationarity, expected, rtol=1e-12)
  assert 0.5 < float(metrics.stationarity) < 1.0  # 30 small SGD steps: far from the argmin


# Issue 20 section 6: optax's extra-args optimisers get value, grad and value_fn.
@pytest.mark.parametrize(
  "inner_optimizer, outer_optimizer",
  [
    (optax.lbfgs(), optax.adam(0.05)),
    (optax.contrib.momo(0.5), optax.adam(0.05)),
    (optax.sgd(0.3), optax.contrib.momo(0.5)),
  ],
  ids=["lbfgs-inner", "momo-inner", "momo-outer"],
)
def test_extra_args_optimisers_tune_the_decay_to_the_closed_form_best(
  inner_optimizer, outer_optimizer
):
  loop = ih.bilevel(
    train, valid, inner_optimizer, outer_optimizer, inner_steps=T, solver=ih.CG(steps=8)
  )
  state, metrics = run(loop, jnp.asarray(0.5), 300)
  assert float(state.hparams) == pytest.approx(best_decay(), rel=1e-4)
  assert int(metrics.num_skipped) == 0


def test_reduce_on_plateau_reads_the_validation_loss_and_lowers_the_outer_step():
  plateau = optax.contrib.reduce_on_plateau(patience=5, factor=0.5)
  loop = ih.bilevel(
    train,
    valid,
    optax.sgd(0.3),
    optax.chain(optax.sgd(1.0), plateau),
    inner_steps=T,
    solver=ih.CG(steps=8),
  )
  state, _ = run(loop, jnp.asarray(0.5), 100)
  assert float(state.outer_opt_state[-1].scale) < 1e-3
  assert float(state.hparams) == pytest.approx(best_decay(), rel=1e-4)


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_losses_with_aux_give_the_same_run_and_report_the_aux_in_fit_history(method):
  with_aux = lambda loss, name: lambda *a: (loss(*a), {name: loss(*a) * 2.0})
  plain = ih.bilevel(train, valid, optax.sgd(0.3), optax.adam(0.05), inner_steps=T, method=method)
  aux = ih.bilevel(
    with_aux(train, "twice"),
    with_aux(valid, "twice"),
    optax.sgd(0.3),
    optax.adam(0.05),
    inner_steps=T,
    method=method,
    loss_has_aux=True,
  )
  data = lambda step: (INNER_ARGS, (XV, YV))
  start = plain.init(jnp.zeros(D), jnp.asarray(0.5))
  state, history = ih.fit(plain, start, data, num_steps=5, progress=False)
  state_aux, history_aux = ih.fit(aux, start, data, num_steps=5, progress=False)
  assert np.asarray(state.hparams).tobytes() == np.asarray(state_aux.hparams).tobytes()
  for record, record_aux in zip(history, history_aux, strict=True):
    assert record_aux["outer_aux/twice"] == pytest.approx(2 * record["outer_loss"], rel=1e-12)
    assert "inner_aux/twice" in record_aux and "inner_aux/twice" not in record
