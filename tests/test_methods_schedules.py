"""Step sizes as optax schedules: evaluated at the iteration count, exactly the number there.

The finite-sum quadratic of `test_methods`; every method takes schedules for all its steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import test_methods as quadratic
from test_methods import inner
from test_methods import outer

import implicit_hyper as ih
from implicit_hyper._src import checkpoint

STEPS = 4
# One table of distinct steps per argument, so a schedule read at the wrong t, or in place of
# another argument, gives another update.
TABLES = {
  "inner_lr": jnp.asarray([0.11, 0.09, 0.07, 0.05]),
  "outer_lr": jnp.asarray([0.13, 0.12, 0.1, 0.08]),
  "adjoint_lr": jnp.asarray([0.1, 0.08, 0.06, 0.04]),
  "neumann_lr": jnp.asarray([0.12, 0.1, 0.09, 0.03]),
  "weights_lr": jnp.asarray([0.15, 0.1, 0.05, 0.02]),
}


def stacked(length):
  """`length` training batches in turn, stacked on a leading axis (one per inner update)."""
  batches = [quadratic.train_batch(k % quadratic.NUM_INNER) for k in range(length)]
  return tuple(jnp.stack(x) for x in zip(*batches, strict=True))


def plain(step):
  (_, *train), (_, *valid) = quadratic.indexed_batches(step)
  return tuple(train), tuple(valid)


METHODS = {  # factory of the rates given, data, the rate arguments
  "saba": (
    lambda **lr: ih.saba(
      inner,
      outer,
      num_inner_batches=quadratic.NUM_INNER,
      num_outer_batches=quadratic.NUM_OUTER,
      **lr,
    ),
    quadratic.indexed_batches,
    ("inner_lr", "outer_lr", "adjoint_lr"),
  ),
  "srba": (
    lambda **lr: ih.srba(inner, outer, period=2, **lr),
    lambda step: ((quadratic.A, quadratic.B, quadratic.C), (quadratic.T,)),  # one shape
    ("inner_lr", "outer_lr", "adjoint_lr"),
  ),
  "fsla": (lambda **lr: ih.fsla(inner, outer, **lr), plain, ("inner_lr", "outer_lr", "adjoint_lr")),
  "stocbio": (
    lambda **lr: ih.stocbio(inner, outer, inner_steps=2, neumann_steps=3, **lr),
    lambda step: (stacked(6), (quadratic.T,)),
    ("inner_lr", "outer_lr", "neumann_lr"),
  ),
  "f2sa": (
    lambda **lr: ih.f2sa(inner, outer, inner_steps=2, penalty_growth=1.0, **lr),
    lambda step: (stacked(2), (quadratic.T,)),
    ("inner_lr", "outer_lr"),
  ),
  "bome": (
    lambda **lr: ih.bome(inner, outer, inner_steps=2, **lr),
    lambda step: (stacked(2), (quadratic.T,)),
    ("inner_lr", "outer_lr", "weights_lr"),
  ),
  "soba": (  # its adjoint step is Richardson's, a number
    lambda **lr: ih.soba(inner, outer, adjoint_lr=0.1, **lr),
    quadratic.soba_batches,
    ("inner_lr", "outer_lr"),
  ),
}


def make(name, rates):
  factory, data, names = METHODS[name]
  loop = factory(**{n: rates(n) for n in names})
  step = jax.jit(loop.step)

  def run(steps, state=None, first=None):
    """`steps` steps from `state` (init), on the batches of iterations `first` (state.step) on."""
    state = loop.init(jnp.zeros(quadratic.D), jnp.zeros(quadratic.P)) if state is None else state
    first = int(state.step) if first is None else first
    for k in range(first, first + steps):
      state, metrics = step(state, *data(k))
    assert int(metrics.num_skipped) == 0 and not bool(metrics.non_finite)
    return state

  return loop, run


def number(t):
  return lambda name: float(TABLES[name][t])


def constant(t):
  return lambda name: lambda count, c=float(TABLES[name][t]): c


def decaying(name):
  return lambda count: TABLES[name][count]


def iterates(state):
  """What a step computes: `ih.soba`'s optax.sgd on a schedule also counts in its states."""
  return state.params, state.hparams, state.method_state, state.step, state.num_skipped


def assert_bit_identical(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def assert_close(a, b, rtol):
  for x, y in zip(jax.tree.leaves(iterates(a)), jax.tree.leaves(iterates(b)), strict=True):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=0)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_schedule_takes_the_step_of_the_iteration_count_and_a_constant_one_its_number(name):
  """A constant schedule is bit for bit its number; at t = 3 a decaying one takes lr(3)."""
  fixed, run_fixed = make(name, number(3))
  reference = run_fixed(STEPS)
  _, run_constant = make(name, constant(3))
  assert_close(run_constant(STEPS), reference, rtol=0)

  scheduled, run_scheduled = make(name, decaying)
  at_three = run_scheduled(3)
  assert int(at_three.step) == 3
  # The numbers' optax.sgd states are empty: `ih.soba`'s scheduled ones hold a count.
  fresh, empty = (
    loop.init(jnp.zeros(quadratic.D), jnp.zeros(quadratic.P)) for loop in (scheduled, fixed)
  )
  opt_states = lambda s: dict(inner_opt_state=s.inner_opt_state, outer_opt_state=s.outer_opt_state)
  by_hand = run_fixed(1, at_three._replace(**opt_states(empty)))
  assert_close(run_scheduled(1, at_three), by_hand, rtol=1e-15)
  # The same iterate and batches at t = 1 (counts included) take another step.
  counts = jax.tree.map(lambda c: jnp.ones_like(c), opt_states(fresh))
  at_one = run_scheduled(1, at_three._replace(step=jnp.ones((), jnp.int32), **counts), first=3)
  assert not np.allclose(at_one.hparams, by_hand.hparams, rtol=1e-10, atol=0)


@pytest.mark.parametrize(
  "name, argument", [(name, arg) for name in sorted(METHODS) for arg in METHODS[name][2]]
)
def test_a_step_size_that_is_neither_number_nor_schedule_is_refused_naming_it(name, argument):
  factory, _, names = METHODS[name]
  rates = {n: 0.1 for n in names} | {argument: "0.1"}
  with pytest.raises(TypeError, match=rf"`{name}\({argument}=...\)` must be a number, an array"):
    factory(**rates)


def test_soba_refuses_a_schedule_for_its_adjoint_step_and_says_to_pass_a_number():
  schedule = optax.polynomial_schedule(0.1, 0.01, 0.4, 100)
  with pytest.raises(ValueError, match=r"`soba\(adjoint_lr=...\)` must be a number.*inner_lr"):
    ih.soba(inner, outer, inner_lr=schedule, outer_lr=0.1)
  with pytest.raises(ValueError, match="pass a number `adjoint_lr=`"):
    ih.soba(inner, outer, inner_lr=0.1, outer_lr=0.1, adjoint_lr=schedule)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_config_of_a_method_on_schedules_is_json_and_tells_schedules_apart(name):
  factory, _, names = METHODS[name]
  configs = [
    checkpoint._canonical_config(factory(**{n: schedule for n in names}).config)
    for schedule in (
      optax.polynomial_schedule(0.1, 0.01, 0.4, 100),
      optax.polynomial_schedule(0.1, 0.01, 0.6, 100),
      lambda t: 0.1 / (t + 1) ** 0.4,
      lambda t: 0.1 / (t + 1) ** 0.6,
    )
  ]
  assert len(set(configs)) == len(configs)


def test_fit_resumes_a_run_on_schedules_bit_identically_and_refuses_another_schedule(tmp_path):
  factory, data, _ = METHODS["saba"]
  make_loop = lambda power: factory(
    inner_lr=optax.polynomial_schedule(0.1, 0.01, power, 100), outer_lr=0.1
  )
  loop = make_loop(0.4)
  start = loop.init(jnp.zeros(quadratic.D), jnp.zeros(quadratic.P))
  reference, history = ih.fit(loop, start, data, num_steps=6, progress=False)
  saved = dict(checkpoint_dir=tmp_path, checkpoint_every=3, progress=False)
  ih.fit(loop, start, data, num_steps=3, **saved)
  # A new process builds the loop again: its schedule must read as the same setting.
  state, resumed = ih.fit(make_loop(0.4), start, data, num_steps=6, **saved)
  np.testing.assert_equal(resumed, history)
  assert_bit_identical(state, reference)
  with pytest.raises(ValueError, match="saved with other settings: .*inner_lr"):
    ih.fit(make_loop(0.6), start, data, num_steps=9, **saved)
