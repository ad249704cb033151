"""Tests of `ih.fit`: resumable training with checkpoints, metric files and a progress bar."""

import csv
import functools
import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import implicit_hyper as ih

INNER_STEPS, DIM = 4, 6
ROOT = Path(__file__).resolve().parent.parent


class Interrupted(Exception):
  pass


def squared_error(w, batch):
  x, y = batch
  return 0.5 * jnp.mean((x @ w - y) ** 2)


@functools.cache
def ridge_loop():
  return ih.bilevel(
    lambda w, decay, batch: squared_error(w, batch) + 0.5 * decay * w @ w,
    lambda w, decay, batch: squared_error(w, batch),
    optax.sgd(0.1, momentum=0.9),
    optax.adam(0.05),
    inner_steps=INNER_STEPS,
    solver=ih.CG(steps=6),
    hparam_transform="exp",
  )


def data(step, stop_at=None, requested=None):
  """Fresh random minibatches for every hyper step, derived from the step alone."""
  if requested is not None:
    requested.append(step)
  if step == stop_at:
    raise Interrupted
  rng = np.random.default_rng([7, step])
  w_true = np.linspace(-1.0, 1.0, DIM)
  x = rng.normal(size=(INNER_STEPS + 1, 16, DIM))
  y = x @ w_true + rng.normal(size=(INNER_STEPS + 1, 16))
  return (x[:-1], y[:-1]), (x[-1], y[-1])


def initial_state():
  return ridge_loop().init(jnp.zeros(DIM), jnp.log(1.0))


def assert_bit_identical(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(leaves_a, leaves_b, strict=True):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


@pytest.mark.parametrize("source", ["callable", "iterable"])
def test_resumed_run_is_bit_identical_to_uninterrupted_run(tmp_path, source):
  requested = []

  def batches(stop_at=None):
    if source == "callable":
      return functools.partial(data, stop_at=stop_at, requested=requested)
    return (data(k, stop_at, requested) for k in range(10**6))

  loop = ridge_loop()
  reference, reference_history = ih.fit(
    loop, initial_state(), batches(), num_steps=10, progress=False
  )

  run = dict(num_steps=10, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=3, progress=False)
  with pytest.raises(Interrupted):
    ih.fit(loop, initial_state(), batches(stop_at=7), **run)
  assert ih.latest_checkpoint(tmp_path / "ckpt").name == "ckpt_00000006.msgpack"
  requested.clear()
  state, history = ih.fit(loop, initial_state(), batches(), **run)
  # A callable is asked only for the steps after the checkpoint; an iterable is replayed.
  assert requested == ([6, 7, 8, 9] if source == "callable" else list(range(10)))

  assert int(state.step) == 10
  assert_bit_identical(state, reference)
  assert history == reference_history
  assert [r["step"] for r in history] == list(range(10))
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
    "ckpt_00000009.msgpack",
    "ckpt_00000010.msgpack",
  ]
  restored, restored_history = ih.load_checkpoint(
    ih.latest_checkpoint(tmp_path / "ckpt"), initial_state()
  )
  assert_bit_identical(restored, reference)
  assert restored_history == reference_history


def test_callback_values_join_the_history_and_survive_resumption(tmp_path):
  def callback(step, state):
    if step % 4 == 0:
      return {"validation_error": squared_error(state.params, data(step)[1])}
    return None

  loop = ridge_loop()
  _, reference = ih.fit(
    loop,
    initial_state(),
    data,
    num_steps=10,
    progress=False,
    callback=callback,
    metrics_path=tmp_path / "m.csv",
  )
  evaluated = [r for r in reference if "validation_error" in r]
  assert [r["step"] for r in evaluated] == [0, 4, 8]
  assert all(isinstance(r["validation_error"], float) for r in evaluated)

  run = dict(num_steps=10, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=3, progress=False)
  with pytest.raises(Interrupted):
    ih.fit(loop, initial_state(), functools.partial(data, stop_at=7), callback=callback, **run)
  _, history = ih.fit(loop, initial_state(), data, callback=callback, **run)
  assert history == reference
  with (tmp_path / "m.csv").open() as f:
    rows = list(csv.DictReader(f))
  assert [row["validation_error"] != "" for row in rows] == [k % 4 == 0 for k in range(10)]


def test_corrupt_checkpoint_raises_naming_the_file_and_writes_nothing(tmp_path):
  directory = tmp_path / "ckpt"
  ih.fit(
    ridge_loop(),
    initial_state(),
    data,
    num_steps=2,
    checkpoint_dir=directory,
    checkpoint_every=2,
    progress=False,
  )
  path = directory / "ckpt_00000002.msgpack"
  path.write_bytes(path.read_bytes()[:-20])
  metrics = tmp_path / "metrics.json"
  before = {p: p.read_bytes() for p in directory.iterdir()}

  with pytest.raises(ValueError, match=r"ckpt_00000002\.msgpack is corrupt"):
    ih.fit(
      ridge_loop(),
      initial_state(),
      data,
      num_steps=4,
      checkpoint_dir=directory,
      metrics_path=metrics,
      progress=False,
    )
  assert {p: p.read_bytes() for p in directory.iterdir()} == before
  assert not metrics.exists()


def test_checkpoint_of_a_different_model_raises_naming_the_file(tmp_path):
  directory = tmp_path / "ckpt"
  ih.fit(ridge_loop(), initial_state(), data, num_steps=1, checkpoint_dir=directory, progress=False)
  other = ridge_loop().init(jnp.zeros(DIM + 1), jnp.log(1.0))
  with pytest.raises(ValueError, match=r"ckpt_00000001\.msgpack does not match the `state`.*shape"):
    ih.fit(ridge_loop(), other, data, num_steps=2, checkpoint_dir=directory, progress=False)
  (directory / "ckpt_00000005.msgpack").write_bytes(b"\x81\xa1a\x01")  # valid msgpack {"a": 1}
  with pytest.raises(ValueError, match=r"ckpt_00000005\.msgpack is not an implicit_hyper"):
    ih.fit(
      ridge_loop(), initial_state(), data, num_steps=6, checkpoint_dir=directory, progress=False
    )


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_metric_history_is_written_with_every_step(tmp_path, suffix):
  path = tmp_path / f"metrics{suffix}"
  state, history = ih.fit(
    ridge_loop(), initial_state(), data, num_steps=5, metrics_path=path, progress=False
  )
  if suffix == ".json":
    written = json.loads(path.read_text())
    assert written == history
  else:
    with path.open() as f:
      rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(5))
    for row, record in zip(rows, history, strict=True):
      assert float(row["outer_loss"]) == record["outer_loss"]
      assert float(row["hparams"]) == record["hparams"]
  fields = set(ih.BilevelMetrics._fields) | {"step", "hparams"}
  assert set(history[0]) == fields
  assert history[-1]["hparams"] == float(jnp.exp(state.hparams))
  assert history[0]["hparams"] != history[-1]["hparams"]


def test_progress_bar_shows_live_metrics(capsys):
  ih.fit(ridge_loop(), initial_state(), data, num_steps=3, progress=True)
  err = capsys.readouterr().err
  assert "3/3" in err and "outer_loss=" in err and "num_skipped=0" in err


def test_bilevel_batches_stacks_inner_batches_and_fast_forwards_on_resume():
  train = ((np.full(2, k), np.full(2, -k)) for k in range(100))
  valid = (np.full(3, 10 * k) for k in range(100))
  pairs = ih.bilevel_batches(train, valid, inner_steps=4)
  inner, outer = next(pairs)
  assert inner[0].shape == (4, 2) and inner[0][:, 0].tolist() == [0, 1, 2, 3]
  assert outer.tolist() == [0, 0, 0]
  inner, outer = next(pairs)
  assert inner[1][:, 0].tolist() == [-4, -5, -6, -7] and outer[0] == 10
  assert len(list(pairs)) == 23  # 100 training batches make 25 hyper steps


def test_quickstart_example_runs(tmp_path):
  spec = importlib.util.spec_from_file_location(
    "bilevel_quickstart", ROOT / "examples" / "bilevel_quickstart.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.main(["--quick", "--out", str(tmp_path)])
  history = json.loads((tmp_path / "metrics.json").read_text())
  assert history[-1]["outer_loss"] < history[0]["outer_loss"]
