"""equinox Modules with function fields as `ih.bilevel`'s hyperparameters and weights.

The arrays are trained and differentiated, the functions carried unchanged (the rule of
``eqx.partition(tree, eqx.is_inexact_array)``), under ``eqx.filter_jit`` and `ih.fit`.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import implicit_hyper as ih
from implicit_hyper._src.methods import _static

RNG = np.random.default_rng(0)
N, D, T = 30, 4, 3
X = jnp.asarray(RNG.normal(size=(N, D)))
Y = X @ jnp.asarray(RNG.normal(size=D)) + 0.3 * jnp.asarray(RNG.normal(size=N))
XV = jnp.asarray(RNG.normal(size=(N, D)))
YV = XV @ jnp.asarray(RNG.normal(size=D))
INNER_ARGS = (jnp.stack([X] * T), jnp.stack([Y] * T))


class Hparams(eqx.Module):
  raw_decay: jax.Array
  positive: Callable = jax.nn.softplus  # a function field, not static: a pytree leaf


class Model(eqx.Module):
  weight: jax.Array
  activation: Callable = jnp.tanh


def fit_loss(w, decay, x, y):
  return 0.5 * jnp.mean((jnp.tanh(x @ w) - y) ** 2) + 0.5 * decay * jnp.sum(w**2)


def module_losses():
  """The losses of `Hparams` and `Model`, equal to `fit_loss` of the plain arrays."""
  train = lambda m, h, x, y: fit_loss(m.weight, h.positive(h.raw_decay), x, y)
  valid = lambda m, h, x, y: fit_loss(m.weight, 0.0, x, y)
  return train, valid


def plain_losses():
  train = lambda w, raw, x, y: fit_loss(w, jax.nn.softplus(raw), x, y)
  valid = lambda w, raw, x, y: fit_loss(w, 0.0, x, y)
  return train, valid


def make(losses):
  return ih.bilevel(*losses, optax.sgd(0.3), optax.adam(0.05), inner_steps=T, solver=ih.CG(steps=D))


W0 = jnp.asarray(RNG.normal(size=D))


def test_hypergradient_of_the_array_field_equals_the_one_of_the_plain_array():
  module_loop, plain_loop = make(module_losses()), make(plain_losses())
  module_state = module_loop.init(Model(W0), Hparams(jnp.asarray(-1.0)))
  plain_state = plain_loop.init(W0, jnp.asarray(-1.0))
  module_step, plain_step = eqx.filter_jit(module_loop.step), jax.jit(plain_loop.step)
  for _ in range(5):
    module_state, module_metrics = module_step(module_state, INNER_ARGS, (XV, YV))
    plain_state, plain_metrics = plain_step(plain_state, INNER_ARGS, (XV, YV))
    assert module_state.hparams.positive is jax.nn.softplus
    assert module_state.params.activation is jnp.tanh
    np.testing.assert_allclose(
      module_metrics.hypergrad_norm, plain_metrics.hypergrad_norm, rtol=1e-12
    )
    np.testing.assert_allclose(module_state.hparams.raw_decay, plain_state.hparams, rtol=1e-12)
    np.testing.assert_allclose(module_state.params.weight, plain_state.params, rtol=1e-12)
  assert abs(float(plain_metrics.hypergrad_norm)) > 1e-3  # the decay matters
  constrained = module_loop.constrain(module_state.hparams)
  assert constrained.positive is jax.nn.softplus


def test_fit_saves_the_arrays_and_resumes_bit_identically(tmp_path):
  loop = make(module_losses())
  start = lambda: loop.init(Model(W0), Hparams(jnp.asarray(-1.0)))
  data = lambda step: (INNER_ARGS, (XV, YV))
  reference, reference_history = ih.fit(loop, start(), data, num_steps=4, progress=False)
  run = {"checkpoint_dir": tmp_path, "checkpoint_every": 2, "progress": False}
  ih.fit(loop, start(), data, num_steps=2, **run)
  state, history = ih.fit(loop, start(), data, num_steps=4, **run)
  assert int(state.step) == 4 and state.hparams.positive is jax.nn.softplus
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(reference), strict=True):
    if isinstance(a, jax.Array):
      assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    else:
      assert a is b
  assert history == reference_history
  assert set(history[-1]) >= {"hparams/raw_decay", "stationarity"}


def test_plain_jax_jit_of_a_state_with_function_leaves_fails_naming_the_leaf():
  loop = make(module_losses())
  state = loop.init(Model(W0), Hparams(jnp.asarray(-1.0)))
  with pytest.raises(TypeError, match=r"state\.params\.activation"):
    jax.jit(loop.step)(state, INNER_ARGS, (XV, YV))


def test_other_methods_take_function_fields_through_the_shared_wrapper():
  # ih.sama does not carry static leaves yet; the one-line fix is this decorator on its factory.
  sama = _static.carries_static(ih.sama)
  module_loop = sama(*module_losses(), optax.sgd(0.3), optax.adam(0.05), inner_steps=T)
  plain_loop = ih.sama(*plain_losses(), optax.sgd(0.3), optax.adam(0.05), inner_steps=T)
  module_state = module_loop.init(Model(W0), Hparams(jnp.asarray(-1.0)))
  plain_state = plain_loop.init(W0, jnp.asarray(-1.0))
  for _ in range(3):
    module_state, _ = eqx.filter_jit(module_loop.step)(module_state, INNER_ARGS, (XV, YV))
    plain_state, _ = jax.jit(plain_loop.step)(plain_state, INNER_ARGS, (XV, YV))
  assert module_state.hparams.positive is jax.nn.softplus
  np.testing.assert_allclose(module_state.hparams.raw_decay, plain_state.hparams, rtol=1e-12)
  np.testing.assert_allclose(module_state.params.weight, plain_state.params, rtol=1e-12)
  assert not np.allclose(plain_state.hparams, -1.0)


FACTORIES = {
  "saba": lambda i, o: ih.saba(
    i, o, num_inner_batches=2, num_outer_batches=2, inner_lr=0.1, outer_lr=0.1
  ),
  "srba": lambda i, o: ih.srba(i, o, period=4, inner_lr=0.1, outer_lr=0.1),
  "stocbio": lambda i, o: ih.stocbio(i, o, inner_lr=0.1, outer_lr=0.1),
  "fsla": lambda i, o: ih.fsla(i, o, inner_lr=0.1, outer_lr=0.1),
  "f2sa": lambda i, o: ih.f2sa(i, o, inner_lr=0.1, outer_lr=0.1),
  "bome": lambda i, o: ih.bome(i, o, inner_lr=0.1, outer_lr=0.1),
  "sama": lambda i, o: ih.sama(i, o, optax.sgd(0.1), optax.sgd(0.1)),
  "soba": lambda i, o: ih.soba(i, o, inner_lr=0.1, outer_lr=0.1),
  "ttsa": lambda i, o: ih.ttsa(i, o, inner_lr=0.1, outer_lr=0.1),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_every_method_starts_on_a_module_with_a_function_field_and_carries_it(name):
  loop = FACTORIES[name](*module_losses())
  state = loop.init(Model(W0), Hparams(jnp.asarray(-1.0)))
  assert state.hparams.positive is jax.nn.softplus and state.params.activation is jnp.tanh
  plain = FACTORIES[name](*plain_losses()).init(W0, jnp.asarray(-1.0))
  np.testing.assert_array_equal(state.params.weight, plain.params)
  np.testing.assert_array_equal(state.hparams.raw_decay, plain.hparams)
