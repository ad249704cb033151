"""`ih.fit` killed with SIGKILL at several moments, then resumed: bit-identical to one run.

The file is also the worker: ``python tests/test_resume_kill.py DIRECTORY`` runs `fit`
with a checkpoint every other hyper step and a short sleep per step, so that a kill lands
at a random point of training or of writing a checkpoint.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import implicit_hyper as ih

NUM_STEPS, INNER_STEPS, DIM = 200, 3, 4
TIMEOUT_S = 60  # per worker: a hung run fails the test instead of blocking the suite


def squared_error(w, decay, x, y):
  return 0.5 * jnp.mean((x @ w - y) ** 2)


def make_loop():
  return ih.bilevel(
    lambda w, decay, x, y: squared_error(w, decay, x, y) + 0.5 * decay * w @ w,
    squared_error,
    optax.sgd(0.1, momentum=0.9),
    optax.adam(0.05),
    inner_steps=INNER_STEPS,
    solver=ih.Neumann(steps=5),
    hparam_transform="exp",
  )


def data(step):
  rng = np.random.default_rng([3, step])
  x = rng.normal(size=(INNER_STEPS + 1, 8, DIM))
  y = x @ np.linspace(-1.0, 1.0, DIM) + 0.1 * rng.normal(size=(INNER_STEPS + 1, 8))
  return (x[:-1], y[:-1]), (x[-1], y[-1])


def initial_state(loop):
  return loop.init(jnp.zeros(DIM), jnp.log(0.5))


def run(directory, callback=None):
  loop = make_loop()
  return ih.fit(
    loop,
    initial_state(loop),
    data,
    num_steps=NUM_STEPS,
    checkpoint_dir=directory,
    checkpoint_every=2,
    metrics_path=None if directory is None else Path(directory) / "metrics.json",
    progress=False,
    callback=callback,
  )


def steps_saved(directory):
  return [int(p.name[5:13]) for p in directory.glob("ckpt_*.msgpack")]


def test_runs_killed_at_random_moments_resume_bit_identically(tmp_path):
  reference, reference_history = run(None)
  rng = random.Random(0)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  command = [sys.executable, __file__, str(tmp_path)]
  resumed_from = []
  for _ in range(3):
    before = max(steps_saved(tmp_path), default=0)
    resumed_from.append(before)
    worker = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + TIMEOUT_S
    while max(steps_saved(tmp_path), default=0) <= before and worker.poll() is None:
      assert time.monotonic() < deadline, "the worker wrote no checkpoint in time"
      time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.1))  # into the training, or the middle of a write
    worker.send_signal(signal.SIGKILL)
    output = worker.communicate(timeout=TIMEOUT_S)[0].decode()
    assert worker.returncode == -signal.SIGKILL, output
  finished = subprocess.run(command, env=env, capture_output=True, timeout=TIMEOUT_S)
  assert finished.returncode == 0, finished.stderr.decode()

  assert resumed_from == sorted(set(resumed_from))  # every run got further
  loop = make_loop()
  state, history = ih.load_checkpoint(ih.latest_checkpoint(tmp_path), initial_state(loop))
  assert int(state.step) == NUM_STEPS
  assert jax.tree.structure(state) == jax.tree.structure(reference)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(reference), strict=True):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  assert history == reference_history
  assert not list(tmp_path.glob(".*.tmp"))


if __name__ == "__main__":
  jax.config.update("jax_enable_x64", True)
  run(sys.argv[1], callback=lambda step, state: time.sleep(0.002))
