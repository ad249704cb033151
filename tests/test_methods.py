"""SABA, SRBA, FSLA and StocBiO reach the known solution of a finite-sum quadratic bilevel problem.

Inner: the mean over 16 samples of ``theta^T A_i theta / 2 - theta^T (B_i lam + c_i)``;
outer: the mean over 8 samples of ``|theta - t_j|^2 / 2 + mu |lam|^2 / 2``. Then
``theta*(lam) = A^{-1} (B lam + c)`` with the means A, B, c, and the outer problem is a ridge
regression in lam, solved in closed form.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import implicit_hyper as ih

RNG = np.random.default_rng(0)
D, P, N, M, BATCH = 5, 3, 16, 8, 2
_Q = np.linalg.qr(RNG.normal(size=(D, D)))[0]
_NOISE = RNG.normal(size=(N, D, D)) * 0.3
_NOISE = _NOISE + _NOISE.transpose(0, 2, 1)
A = jnp.asarray(_Q @ np.diag([1.0, 1.5, 2.0, 3.0, 4.0]) @ _Q.T + _NOISE - _NOISE.mean(0))
B = jnp.asarray(RNG.normal(size=(N, D, P)))
C = jnp.asarray(RNG.normal(size=(N, D)))
T = jnp.asarray(RNG.normal(size=(M, D)))
MU = 0.1
NUM_INNER, NUM_OUTER = N // BATCH, M // BATCH


def inner(theta, lam, a, b, c):
  per_sample = 0.5 * jnp.einsum("i,kij,j->k", theta, a, theta)
  return jnp.mean(per_sample - jnp.einsum("i,kij,j->k", theta, b, lam) - c @ theta)


def outer(theta, lam, t):
  return 0.5 * jnp.mean(jnp.sum((theta - t) ** 2, -1)) + 0.5 * MU * jnp.sum(lam**2)


def closed_form():
  a, b, c, t = A.mean(0), B.mean(0), C.mean(0), T.mean(0)
  m = jnp.linalg.solve(a, b)
  return jnp.linalg.solve(m.T @ m + MU * jnp.eye(P), m.T @ (t - jnp.linalg.solve(a, c)))


def train_batch(i):
  s = slice(i * BATCH, (i + 1) * BATCH)
  return A[s], B[s], C[s]


def indexed_batches(step):
  """A batch index and its batch for each level; every batch is visited in turn."""
  i, j = (step * 5 + 3) % NUM_INNER, (step * 3 + 1) % NUM_OUTER
  return (np.int32(i), *train_batch(i)), (np.int32(j), T[j * BATCH : (j + 1) * BATCH])


def srba_batches(step, period=8):
  if step % period == 0:  # SRBA's restart takes the full data
    return (A, B, C), (T,)
  (_, *train), (_, *valid) = indexed_batches(step)
  return tuple(train), tuple(valid)


STOCBIO_STEPS = (5, 100)  # T SGD steps, Q series terms


def full_batches(step):
  """StocBiO with every batch the full data: deterministic, so it converges exactly."""
  del step
  length = sum(STOCBIO_STEPS) + 1
  return tuple(jnp.broadcast_to(x, (length, *x.shape)) for x in (A, B, C)), (T,)


METHODS = {
  "saba": (
    lambda: ih.saba(
      inner,
      outer,
      num_inner_batches=NUM_INNER,
      num_outer_batches=NUM_OUTER,
      inner_lr=0.1,
      outer_lr=0.1,
    ),
    indexed_batches,
    3000,
  ),
  "srba": (
    lambda: ih.srba(inner, outer, period=8, inner_lr=0.1, outer_lr=0.1),
    srba_batches,
    3000,
  ),
  "fsla": (  # deterministic (the full data every step): its momentum is then exact
    lambda: ih.fsla(inner, outer, inner_lr=0.1, outer_lr=0.1, momentum=0.5),
    lambda step: ((A, B, C), (T,)),
    3000,
  ),
  "stocbio": (
    lambda: ih.stocbio(
      inner,
      outer,
      inner_lr=0.2,
      outer_lr=0.5,
      inner_steps=STOCBIO_STEPS[0],
      neumann_steps=STOCBIO_STEPS[1],
    ),
    full_batches,
    300,
  ),
}


def run(loop, data, steps):
  state = loop.init(jnp.zeros(D), jnp.zeros(P))
  step = jax.jit(loop.step)

  def body(state, k):
    return step(state, *data(k))

  for k in range(steps):
    state, metrics = body(state, k)
  return state, metrics


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_reaches_the_closed_form_hyperparameters(name):
  make, data, steps = METHODS[name]
  loop = make()
  assert loop.config["method"] == name
  state, metrics = run(loop, data, steps)
  expected = closed_form()
  assert jnp.linalg.norm(state.hparams - expected) <= 1e-8 * jnp.linalg.norm(expected)
  theta_star = jnp.linalg.solve(A.mean(0), B.mean(0) @ expected + C.mean(0))
  assert jnp.linalg.norm(state.params - theta_star) <= 1e-7 * jnp.linalg.norm(theta_star)
  assert int(metrics.num_skipped) == 0 and not bool(metrics.non_finite)


def test_variance_reduction_is_what_makes_saba_converge():
  """The same batches and steps without the tables (SOBA) stall at the noise level."""
  loop = ih.soba(inner, outer, inner_lr=0.1, outer_lr=0.1)
  state, _ = run(loop, soba_batches, 3000)
  expected = closed_form()
  assert jnp.linalg.norm(state.hparams - expected) > 1e-4 * jnp.linalg.norm(expected)


def soba_batches(step):
  (_, *train), (_, *valid) = indexed_batches(step)
  return tuple(x[None] for x in train), tuple(valid)


RESUMED = {
  **{name: METHODS[name][:2] for name in METHODS},
  "soba": (lambda: ih.soba(inner, outer, inner_lr=0.1, outer_lr=0.1), soba_batches),
  "amigo": (
    lambda: ih.amigo(
      inner,
      outer,
      optax.sgd(0.1),
      optax.sgd(0.1),
      inner_steps=1,
      adjoint_steps=3,
      adjoint_lr=0.1,
    ),
    soba_batches,
  ),
  "ttsa": (  # its state is the key of the truncations: resumed, it draws the same ones
    lambda: ih.ttsa(inner, outer, inner_lr=0.1, outer_lr=0.05, neumann_steps=4),
    lambda step: (tuple(jnp.broadcast_to(x, (6, *x.shape)) for x in (A, B, C)), (T,)),
  ),
}


@pytest.mark.parametrize("name", sorted(RESUMED))
def test_method_resumes_bit_identically_through_fit(name, tmp_path):
  make, data = RESUMED[name]
  loop = make()
  start = loop.init(jnp.zeros(D), jnp.zeros(P))
  reference, reference_history = ih.fit(loop, start, data, num_steps=10, progress=False)
  ih.fit(
    loop, start, data, num_steps=5, checkpoint_dir=tmp_path, checkpoint_every=2, progress=False
  )
  state, history = ih.fit(
    loop, start, data, num_steps=10, checkpoint_dir=tmp_path, checkpoint_every=2, progress=False
  )
  np.testing.assert_equal(history, reference_history)
  for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(reference), strict=True):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_saba_needs_integer_batch_indices_and_skips_one_out_of_range():
  loop = METHODS["saba"][0]()
  state = loop.init(jnp.zeros(D), jnp.zeros(P))
  (i, *train), valid = indexed_batches(0)
  with pytest.raises(TypeError, match="`saba` step: `inner_args` must start with the batch's"):
    loop.step(state, tuple(train), valid)
  _, metrics = loop.step(state, (np.int32(NUM_INNER), *train), valid)
  assert bool(metrics.skipped)
  with pytest.raises(ValueError, match="num_inner_batches"):
    ih.saba(inner, outer, num_inner_batches=0, num_outer_batches=1, inner_lr=0.1, outer_lr=0.1)


def test_bad_settings_name_the_call_and_argument():
  with pytest.raises(ValueError, match=r"`srba\(period=...\)`"):
    ih.srba(inner, outer, period=0, inner_lr=0.1, outer_lr=0.1)
  with pytest.raises(ValueError, match=r"`stocbio\(neumann_lr=...\)`"):
    ih.stocbio(inner, outer, inner_lr=0.1, outer_lr=0.1, neumann_lr=-1.0)
  loop = METHODS["stocbio"][0]()
  with pytest.raises(ValueError, match="inner_steps \\+ neumann_steps \\+ 1=106"):
    loop.step(loop.init(jnp.zeros(D), jnp.zeros(P)), (A, B, C), (T,))


def test_fsla_momentum_must_be_in_the_unit_interval():
  with pytest.raises(ValueError, match=r"`fsla\(momentum=...\)` must be in \(0, 1\]"):
    ih.fsla(inner, outer, inner_lr=0.1, outer_lr=0.1, momentum=0.0)
