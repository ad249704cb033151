"""Inputs as users write them: PRNG keys in params, (loss, aux) losses, wrong-shaped hparams."""

import _problems
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import implicit_hyper as ih

RIDGE = _problems.Ridge()
DATA = (RIDGE.x, RIDGE.y)
EXACT = RIDGE.exact_hypergrad(RIDGE.lam)
KEYS = {
  "typed key": jax.random.key(1),
  "uint32 key": jax.random.PRNGKey(1),
  "int step": jnp.asarray(7, jnp.int32),
}


def _state_loss(state, lam, x, y):
  return RIDGE.inner_loss(state["w"], lam, x, y)


def _validation(state):
  return RIDGE.outer_loss(state["w"], None, RIDGE.x_val, RIDGE.y_val)


@pytest.mark.parametrize("extra", list(KEYS.values()), ids=list(KEYS))
def test_non_floating_params_leaves_pass_through_argmin_exactly(extra):
  @ih.implicit_argmin(_state_loss, solver=ih.Direct())
  def train(state, lam, x, y):
    return {"w": RIDGE.argmin(lam, x, y), "rng": state["rng"]}

  init = {"w": jnp.zeros(RIDGE.d), "rng": extra}
  got = jax.grad(lambda lam: _validation(train(init, lam, *DATA)))(RIDGE.lam)
  assert _problems.relative_error(got, EXACT) < 1e-10
  out = train(init, RIDGE.lam, *DATA)["rng"]
  raw = lambda k: (
    jax.random.key_data(k) if jax.dtypes.issubdtype(k.dtype, jax.dtypes.prng_key) else k
  )
  assert out.dtype == extra.dtype and jnp.array_equal(raw(out), raw(extra))


@pytest.mark.parametrize("form", ["root", "fixed_point"])
def test_non_floating_params_leaves_pass_through_root_and_fixed_point_exactly(form):
  grad = jax.grad(RIDGE.inner_loss)
  if form == "root":
    decorate = ih.implicit_root(
      lambda s, lam, x, y: {"w": grad(s["w"], lam, x, y), "rng": s["rng"]}, solver=ih.Direct()
    )
  else:
    decorate = ih.implicit_fixed_point(
      lambda s, lam, x, y: {"w": s["w"] - 0.3 * grad(s["w"], lam, x, y), "rng": s["rng"]},
      solver=ih.Direct(),
    )
  train = decorate(lambda s, lam, x, y: {"w": RIDGE.argmin(lam, x, y), "rng": s["rng"]})
  init = {"w": jnp.zeros(RIDGE.d), "rng": jax.random.key(3)}
  got = jax.grad(lambda lam: _validation(train(init, lam, *DATA)))(RIDGE.lam)
  assert _problems.relative_error(got, EXACT) < 1e-10


@pytest.mark.parametrize("extra", list(KEYS.values()), ids=list(KEYS))
def test_non_floating_params_leaves_are_constants_in_hypergrad(extra):
  state = {"w": RIDGE.argmin(RIDGE.lam), "rng": extra}
  got, info, _ = ih.hypergrad_with_info(
    _state_loss,
    lambda s, lam, x, y: RIDGE.outer_loss(s["w"], lam, x, y),
    state,
    RIDGE.lam,
    inner_args=DATA,
    outer_args=(RIDGE.x_val, RIDGE.y_val),
    solver=ih.Direct(),
  )
  assert _problems.relative_error(got, EXACT) < 1e-10
  assert float(info.stationarity) < 1e-12


def _with_aux(w, lam, x, y):
  loss = RIDGE.inner_loss(w, lam, x, y)
  return loss, {"loss": loss, "norm": jnp.linalg.norm(w)}


def test_loss_returning_loss_and_aux_is_accepted_with_loss_has_aux():
  train = ih.implicit_argmin(_with_aux, loss_has_aux=True, solver=ih.Direct())(
    lambda w0, lam, x, y: RIDGE.argmin(lam, x, y)
  )
  val = lambda lam: RIDGE.outer_loss(train(jnp.zeros(RIDGE.d), lam, *DATA), lam, *DATA)
  expected = jax.grad(lambda lam: RIDGE.outer_loss(RIDGE.argmin(lam), lam, *DATA))(RIDGE.lam)
  assert _problems.relative_error(jax.grad(val)(RIDGE.lam), expected) < 1e-10
  got = ih.hypergrad(
    _with_aux,
    lambda w, lam, x, y: (RIDGE.outer_loss(w, lam, x, y), None),
    RIDGE.argmin(RIDGE.lam),
    RIDGE.lam,
    inner_args=DATA,
    outer_args=(RIDGE.x_val, RIDGE.y_val),
    solver=ih.Direct(),
    loss_has_aux=True,
  )
  assert _problems.relative_error(got, EXACT) < 1e-10


def test_aux_losses_without_the_switch_and_the_switch_without_aux_are_clear_errors():
  solve = lambda w0, lam, x, y: RIDGE.argmin(lam, x, y)
  with pytest.raises(ValueError, match=r"must return a real scalar.*loss_has_aux=True"):
    ih.implicit_argmin(_with_aux, solver=ih.Direct())(solve)(jnp.zeros(RIDGE.d), RIDGE.lam, *DATA)
  with pytest.raises(TypeError, match=r"loss_has_aux=True.*must return a pair"):
    ih.implicit_argmin(RIDGE.inner_loss, loss_has_aux=True)(solve)(
      jnp.zeros(RIDGE.d), RIDGE.lam, *DATA
    )


def _decay_loss(w, log_decay, x, y):
  return 0.5 * jnp.mean((x @ w - y) ** 2) + 0.5 * jnp.sum(jnp.exp(log_decay) * w**2)


WRONG = {
  "shape (5,) for 6 weights": (jnp.zeros(5), TypeError, r"hparams shaped float64\[5\]"),
  "a Python list": ([0.1] * 6, TypeError, r"Python list or tuple.*jnp\.asarray"),
}


@pytest.mark.parametrize("hparams, error, detail", list(WRONG.values()), ids=list(WRONG))
def test_wrong_hparams_are_a_clear_error_naming_hparams_and_the_shapes(hparams, error, detail):
  solve = ih.implicit_argmin(_decay_loss)(
    lambda w0, lam, x, y: jax.lax.fori_loop(
      0, 10, lambda _, w: w - 0.1 * jax.grad(_decay_loss)(w, lam, x, y), w0
    )
  )
  match = r"`implicit_argmin`: `inner_loss\(params, hparams, \.\.\.\)` fails.*params shaped "
  with pytest.raises(error, match=match + r"float64\[6\].*" + detail):
    solve(jnp.zeros(RIDGE.d), hparams, *DATA)
  with pytest.raises(error, match=r"`hypergrad`: `inner_loss\(params, hparams.*" + detail):
    ih.hypergrad(_decay_loss, _decay_loss, jnp.zeros(6), hparams, inner_args=DATA, outer_args=DATA)


def test_a_list_of_hparams_that_the_loss_accepts_still_works():
  loss = lambda w, lams, x, y: _decay_loss(w, jnp.log(lams[0]) + lams[1], x, y)
  got = ih.hypergrad(
    loss,
    RIDGE.outer_loss,
    RIDGE.argmin(jnp.log(0.5) + RIDGE.lam),
    [0.5, RIDGE.lam],
    inner_args=DATA,
    outer_args=(RIDGE.x_val, RIDGE.y_val),
    solver=ih.Direct(),
  )
  np.testing.assert_allclose(got[1], RIDGE.exact_hypergrad(jnp.log(0.5) + RIDGE.lam), rtol=1e-10)
  np.testing.assert_allclose(got[0], jnp.sum(got[1]) / 0.5, rtol=1e-10)
