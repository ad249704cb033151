"""Tests of `ih.fit`: resumable training with checkpoints, metric files and a progress bar.

Most tests drive a loop written by hand (`toy_loop`): `fit` needs nothing of a loop but
``step``, ``constrain``, ``state.step``, ``state.hparams`` and a NamedTuple of metrics.
"""

import csv
import functools
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import implicit_hyper as ih
from implicit_hyper._src.checkpoint import latest_checkpoint
from implicit_hyper._src.checkpoint import load_checkpoint

INNER_STEPS, DIM = 4, 6
ROOT = Path(__file__).resolve().parent.parent


class Interrupted(Exception):
  pass


def squared_error(w, x, y):
  return 0.5 * jnp.mean((x @ w - y) ** 2)


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


class ToyState(NamedTuple):
  params: jax.Array
  hparams: jax.Array
  step: jax.Array
  num_skipped: jax.Array


class ToyMetrics(NamedTuple):
  outer_loss: jax.Array
  skipped: jax.Array
  num_skipped: jax.Array


class ToyLoop(NamedTuple):
  init: Callable
  step: Callable
  constrain: Callable
  config: dict | None


@functools.cache
def toy_loop(rate=0.1, *, skip=False, configured=True):
  """Ridge regression: `INNER_STEPS` gradient steps, a log-decay step through them."""

  def train(w, log_decay, inner_args):
    def update(w, args):
      grad = jax.grad(lambda w: squared_error(w, *args) + 0.5 * jnp.exp(log_decay) * w @ w)(w)
      return w - rate * grad, None

    return jax.lax.scan(update, w, inner_args)[0]

  def step(state, inner_args, outer_args):
    def outer_loss(log_decay):
      return squared_error(train(state.params, log_decay, inner_args), *outer_args)

    loss, grad = jax.value_and_grad(outer_loss)(state.hparams)
    skipped = jnp.asarray(skip)
    num_skipped = state.num_skipped + skipped
    hparams = jnp.where(skipped, state.hparams, state.hparams - 0.5 * grad)
    params = train(state.params, state.hparams, inner_args)
    return ToyState(params, hparams, state.step + 1, num_skipped), ToyMetrics(
      loss, skipped, num_skipped
    )

  init = lambda params, hparams: ToyState(params, hparams, jnp.asarray(0), jnp.asarray(0))
  return ToyLoop(init, step, jnp.exp, {"rate": rate} if configured else None)


def toy_state():
  return toy_loop().init(jnp.zeros(DIM), jnp.asarray(0.0))


@functools.cache
def ridge_loop():
  return ih.bilevel(
    lambda w, decay, x, y: squared_error(w, x, y) + 0.5 * decay * w @ w,
    squared_error_of_params,
    optax.sgd(0.1, momentum=0.9),
    optax.adam(0.05),
    inner_steps=INNER_STEPS,
    solver=ih.CG(steps=6),
    hparam_transform="exp",
  )


def squared_error_of_params(w, decay, x, y):
  return squared_error(w, x, y)


def initial_state():
  return ridge_loop().init(jnp.zeros(DIM), jnp.log(1.0))


def assert_bit_identical(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(leaves_a, leaves_b, strict=True):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def names(directory):
  return sorted(p.name for p in Path(directory).iterdir() if p.name != ".lock")


# With `ih.bilevel`.


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
  assert latest_checkpoint(tmp_path / "ckpt").name == "ckpt_00000006.msgpack"
  requested.clear()
  state, history = ih.fit(loop, initial_state(), batches(), **run)
  # A callable is asked only for the steps after the checkpoint; an iterable is replayed.
  assert requested == ([6, 7, 8, 9] if source == "callable" else list(range(10)))

  assert int(state.step) == 10
  assert_bit_identical(state, reference)
  np.testing.assert_equal(history, reference_history)  # NaN (unmeasured) metrics compare equal
  assert [r["step"] for r in history] == list(range(10))
  assert names(tmp_path / "ckpt") == ["ckpt_00000009.msgpack", "ckpt_00000010.msgpack"]
  restored, restored_history = load_checkpoint(
    latest_checkpoint(tmp_path / "ckpt"), initial_state()
  )
  assert_bit_identical(restored, reference)
  np.testing.assert_equal(
    restored_history, reference_history
  )  # NaN (unmeasured) metrics compare equal


@chex.dataclass
class Decays:
  log_decay: jax.Array
  log_scale: jax.Array


def test_nnx_state_params_and_chex_dataclass_hparams_resume_bit_identically(tmp_path):
  def predict(params, x):
    return x @ params["kernel"][...][:, 0] + params["bias"][...][0]

  def inner_loss(params, hparams, x, y):
    decay = jnp.exp(hparams.log_decay) * jnp.exp(hparams.log_scale)
    return 0.5 * jnp.mean((predict(params, x) - y) ** 2) + 0.5 * decay * jnp.sum(
      params["kernel"][...] ** 2
    )

  def outer_loss(params, hparams, x, y):
    return 0.5 * jnp.mean((predict(params, x) - y) ** 2)

  loop = ih.bilevel(
    inner_loss, outer_loss, optax.sgd(0.1), optax.adam(0.05), inner_steps=INNER_STEPS
  )

  def start():
    params = nnx.state(nnx.Linear(DIM, 1, rngs=nnx.Rngs(0)))
    return loop.init(params, Decays(log_decay=jnp.asarray(0.0), log_scale=jnp.zeros(())))

  reference, reference_history = ih.fit(loop, start(), data, num_steps=6, progress=False)
  run = dict(num_steps=6, checkpoint_dir=tmp_path, checkpoint_every=2, progress=False)
  with pytest.raises(Interrupted):
    ih.fit(loop, start(), functools.partial(data, stop_at=3), **run)
  state, history = ih.fit(loop, start(), data, **run)
  assert_bit_identical(state, reference)
  np.testing.assert_equal(history, reference_history)  # NaN (unmeasured) metrics compare equal
  assert "hparams/log_decay" in history[0]


def test_callback_values_join_the_history_and_survive_resumption(tmp_path):
  def callback(step, state):
    if step % 4 == 0:
      return {"validation_error": squared_error(state.params, *data(step)[1])}
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
  np.testing.assert_equal(history, reference)  # NaN (unmeasured) metrics compare equal
  with (tmp_path / "m.csv").open() as f:
    rows = list(csv.DictReader(f))
  assert [row["validation_error"] != "" for row in rows] == [k % 4 == 0 for k in range(10)]


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_metric_history_is_written_with_every_step(tmp_path, suffix):
  path = tmp_path / f"metrics{suffix}"
  state, history = ih.fit(
    ridge_loop(), initial_state(), data, num_steps=5, metrics_path=path, progress=False
  )
  if suffix == ".json":
    written = json.loads(path.read_text())
    assert written == [{k: None if v != v else v for k, v in r.items()} for r in history]
  else:
    with path.open() as f:
      rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(5))
    for row, record in zip(rows, history, strict=True):
      assert float(row["outer_loss"]) == record["outer_loss"]
      assert float(row["hparams"]) == record["hparams"]
  fields = set(ih.BilevelMetrics._fields) - {"inner_aux", "outer_aux"} | {"step", "hparams"}
  assert set(history[0]) == fields
  assert history[-1]["hparams"] == float(jnp.exp(state.hparams))
  assert history[0]["hparams"] != history[-1]["hparams"]


def test_progress_bar_shows_live_metrics(capsys):
  ih.fit(ridge_loop(), initial_state(), data, num_steps=3, progress=True)
  err = capsys.readouterr().err
  assert "3/3" in err and "outer_loss=" in err and "num_skipped=0" in err


def test_bilevel_batches_stacks_argument_tuples_and_fast_forwards_on_resume():
  train = ((np.full(2, k), np.full(2, -k)) for k in range(100))
  valid = ((np.full(3, 10 * k),) for k in range(100))
  pairs = ih.bilevel_batches(train, valid, inner_steps=4)
  inner, outer = next(pairs)
  assert isinstance(inner, tuple) and len(inner) == 2
  assert inner[0].shape == (4, 2) and inner[0][:, 0].tolist() == [0, 1, 2, 3]
  assert outer[0].tolist() == [0, 0, 0]
  inner, outer = next(pairs)
  assert inner[1][:, 0].tolist() == [-4, -5, -6, -7] and outer[0][0] == 10
  assert len(list(pairs)) == 23  # 100 training batches make 25 hyper steps
  with pytest.raises(TypeError, match=r"`bilevel_batches\(train=...\)` must yield tuples"):
    next(ih.bilevel_batches(iter(np.ones((4, 2))), iter([(1,)]), inner_steps=2))
  with pytest.raises(ValueError, match=r"`bilevel_batches\(inner_steps=...\)` must be an int"):
    next(ih.bilevel_batches([], [], inner_steps=0))


def test_a_bilevel_loop_with_another_solver_is_refused_unless_resume_is_forced(tmp_path):
  run = dict(num_steps=2, checkpoint_dir=tmp_path, progress=False)
  ih.fit(ridge_loop(), initial_state(), data, **run)
  other = ridge_loop()._replace(config={**ridge_loop().config, "solver": "CG(steps=7)"})
  with pytest.raises(ValueError, match=r"ckpt_00000002\.msgpack was saved with other settings: "):
    ih.fit(other, initial_state(), data, **{**run, "num_steps": 3})
  state, _ = ih.fit(other, initial_state(), data, resume="force", **{**run, "num_steps": 3})
  assert int(state.step) == 3


def test_quickstart_example_runs(tmp_path):
  spec = importlib.util.spec_from_file_location(
    "bilevel_quickstart", ROOT / "examples" / "bilevel_quickstart.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.main(["--quick", "--out", str(tmp_path)])
  history = json.loads((tmp_path / "metrics.json").read_text())
  assert history[-1]["outer_loss"] < history[0]["outer_loss"]


# With a loop written by hand.


def reference_run(num_steps=8):
  return ih.fit(toy_loop(), toy_state(), data, num_steps=num_steps, progress=False)


def test_a_corrupt_latest_checkpoint_resumes_from_the_previous_one_with_a_warning(tmp_path):
  reference, reference_history = reference_run()
  run = dict(checkpoint_dir=tmp_path, checkpoint_every=2, progress=False)
  ih.fit(toy_loop(), toy_state(), data, num_steps=6, keep_checkpoints=2, **run)
  newest = tmp_path / "ckpt_00000006.msgpack"
  damaged = bytearray(newest.read_bytes())
  damaged[len(damaged) // 2] ^= 1
  newest.write_bytes(bytes(damaged))

  with pytest.warns(UserWarning, match=r"ckpt_00000006\.msgpack is corrupt.*resuming from"):
    state, history = ih.fit(toy_loop(), toy_state(), data, num_steps=8, keep_checkpoints=1, **run)
  assert_bit_identical(state, reference)
  np.testing.assert_equal(history, reference_history)  # NaN (unmeasured) metrics compare equal
  # Renamed aside, the damaged file cannot outlive the good ones under `keep_checkpoints`.
  assert names(tmp_path) == ["ckpt_00000006.msgpack.corrupt", "ckpt_00000008.msgpack"]


def test_a_lone_corrupt_checkpoint_raises_naming_the_file_and_writes_nothing(tmp_path):
  ih.fit(toy_loop(), toy_state(), data, num_steps=2, checkpoint_dir=tmp_path, progress=False)
  path = tmp_path / "ckpt_00000002.msgpack"
  path.write_bytes(path.read_bytes()[:-20])
  metrics = tmp_path / "metrics" / "m.json"
  before = {p: p.read_bytes() for p in tmp_path.iterdir()}
  with pytest.raises(ValueError, match=r"ckpt_00000002\.msgpack is corrupt: its checksum"):
    ih.fit(
      toy_loop(),
      toy_state(),
      data,
      num_steps=4,
      checkpoint_dir=tmp_path,
      metrics_path=metrics,
      progress=False,
    )
  assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
  assert not metrics.exists()


def test_fifos_directories_and_leftover_temporary_files_are_ignored_or_cleaned(tmp_path):
  reference, reference_history = reference_run()
  ih.fit(toy_loop(), toy_state(), data, num_steps=3, checkpoint_dir=tmp_path, progress=False)
  os.mkfifo(tmp_path / "ckpt_00000007.msgpack")  # reading it would block
  (tmp_path / "ckpt_00000006.msgpack").mkdir()
  (tmp_path / ".ckpt_00000005.msgpack.abc123.tmp").write_bytes(b"half a checkpoint")
  state, history = ih.fit(
    toy_loop(), toy_state(), data, num_steps=8, checkpoint_dir=tmp_path, progress=False
  )
  assert_bit_identical(state, reference)
  np.testing.assert_equal(history, reference_history)  # NaN (unmeasured) metrics compare equal
  assert names(tmp_path) == [
    "ckpt_00000003.msgpack",
    "ckpt_00000006.msgpack",
    "ckpt_00000007.msgpack",
    "ckpt_00000008.msgpack",
  ]


def test_a_second_run_on_the_same_directory_is_refused_naming_it(tmp_path):
  refused = []

  def callback(step, state):
    with pytest.raises(RuntimeError, match=rf"`fit\(checkpoint_dir=...\)`: {tmp_path} is in use"):
      ih.fit(toy_loop(), toy_state(), data, num_steps=4, checkpoint_dir=tmp_path, progress=False)
    refused.append(step)

  run = dict(num_steps=2, checkpoint_dir=tmp_path, progress=False)
  ih.fit(toy_loop(), toy_state(), data, callback=callback, **run)
  assert refused == [0, 1]
  ih.fit(toy_loop(), toy_state(), data, **{**run, "num_steps": 3})  # the lock was released


def test_other_settings_are_refused_unless_resume_is_forced(tmp_path):
  run = dict(num_steps=3, checkpoint_dir=tmp_path, progress=False)
  ih.fit(toy_loop(0.1), toy_state(), data, **run)
  with pytest.raises(ValueError, match=r"saved with other settings: rate: 0\.1 -> 0\.05\."):
    ih.fit(toy_loop(0.05), toy_state(), data, **{**run, "num_steps": 4})
  state, _ = ih.fit(toy_loop(0.05), toy_state(), data, resume="force", **{**run, "num_steps": 4})
  assert int(state.step) == 4
  # The new settings are recorded; a loop without `config` is never refused.
  ih.fit(toy_loop(0.05), toy_state(), data, **{**run, "num_steps": 5})
  ih.fit(toy_loop(0.1, configured=False), toy_state(), data, **{**run, "num_steps": 6})


def test_a_checkpoint_of_a_different_model_raises_naming_the_file(tmp_path):
  ih.fit(toy_loop(), toy_state(), data, num_steps=1, checkpoint_dir=tmp_path, progress=False)
  other = toy_loop().init(jnp.zeros(DIM + 1), jnp.asarray(0.0))
  with pytest.raises(ValueError, match=r"ckpt_00000001\.msgpack does not match.*shape \(6,\)"):
    ih.fit(toy_loop(), other, data, num_steps=2, checkpoint_dir=tmp_path, progress=False)


def test_num_steps_below_the_checkpoint_and_a_short_iterable_say_so(tmp_path):
  run = dict(checkpoint_dir=tmp_path, progress=False)
  ih.fit(toy_loop(), toy_state(), data, num_steps=5, **run)
  with pytest.raises(ValueError, match=r"`fit\(num_steps=3\)` is below step 5 of the checkpoint"):
    ih.fit(toy_loop(), toy_state(), data, num_steps=3, **run)
  short = (data(k) for k in range(2))
  with pytest.raises(ValueError, match=r"`fit\(data=...\)` ran out after 2 items.*skipping the 5"):
    ih.fit(toy_loop(), toy_state(), short, num_steps=8, **run)
  state, history = ih.fit(toy_loop(), toy_state(), data, num_steps=5, **run)  # nothing to do
  assert int(state.step) == 5 and len(history) == 5


def test_metric_json_is_strict_with_non_finite_numbers_as_null(tmp_path):
  def callback(step, state):
    return {"nan": float("nan"), "inf": np.inf, "x": 1.5}

  path = tmp_path / "m.json"
  _, history = ih.fit(
    toy_loop(), toy_state(), data, num_steps=2, metrics_path=path, callback=callback, progress=False
  )
  assert np.isnan(history[0]["nan"])  # the history itself keeps the values
  written = json.loads(path.read_text(), parse_constant=pytest.fail)
  assert [(r["nan"], r["inf"], r["x"]) for r in written] == [(None, None, 1.5)] * 2


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    ({"num_steps": -1}, ValueError, r"`fit\(num_steps=...\)` must be an int >= 0, got -1"),
    ({"num_steps": 2.0}, ValueError, r"`fit\(num_steps=...\)` must be an int >= 0, got 2\.0"),
    ({"num_steps": True}, ValueError, r"`fit\(num_steps=...\)` must be an int"),
    ({"checkpoint_every": 0}, ValueError, r"`fit\(checkpoint_every=...\)` must be an int >= 1"),
    ({"keep_checkpoints": 0}, ValueError, r"`fit\(keep_checkpoints=...\)` must be an int >= 1"),
    ({"warn_after_skips": 0}, ValueError, r"`fit\(warn_after_skips=...\)` must be an int >= 1"),
    (
      {"checkpoint_dir": "FILE"},
      ValueError,
      r"`fit\(checkpoint_dir=...\)`: .*file exists and is not",
    ),
    ({"checkpoint_dir": "FILE/sub"}, ValueError, r"`fit\(checkpoint_dir=...\)`: cannot create"),
    ({"metrics_path": "m.txt"}, ValueError, r"`fit\(metrics_path=...\)` must be a \.json or \.csv"),
    ({"metrics_path": "FILE/m.json"}, ValueError, r"`fit\(metrics_path=...\)`: .*file exists"),
    ({"metrics_path": "FILE/a/m.json"}, ValueError, r"`fit\(metrics_path=...\)`: cannot create"),
    ({"callback": 3}, TypeError, r"`fit\(callback=...\)` must be callable or None, got 3"),
    ({"resume": "yes"}, ValueError, r"`fit\(resume=...\)` must be one of \('auto', 'force'\)"),
    ({"data": 3}, TypeError, r"`fit\(data=...\)` must be a callable `data\(step\)`"),
    ({"loop": (1, 2)}, TypeError, r"`fit\(loop=...\)` must be an `ih.bilevel` loop"),
  ],
)
def test_arguments_are_checked_before_any_work(tmp_path, kwargs, error, match):
  (tmp_path / "file").write_text("")
  kwargs = {
    k: str(tmp_path / v.replace("FILE", "file")) if isinstance(v, str) and k != "resume" else v
    for k, v in kwargs.items()
  }
  args = {"loop": toy_loop(), "data": functools.partial(data, stop_at=0), **kwargs}
  with pytest.raises(error, match=match):
    ih.fit(
      args.pop("loop"),
      toy_state(),
      args.pop("data"),
      **{"num_steps": 3, "progress": False, **args},
    )
  assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_callback_must_return_a_dict_of_scalars():
  with pytest.raises(TypeError, match=r"`fit\(callback=...\)` must return a dict or None, got 1"):
    ih.fit(toy_loop(), toy_state(), data, num_steps=1, progress=False, callback=lambda s, t: 1)
  with pytest.raises(TypeError, match=r"must return scalars; 'w' has shape \(6,\)"):
    ih.fit(
      toy_loop(),
      toy_state(),
      data,
      num_steps=1,
      progress=False,
      callback=lambda s, t: {"w": t.params},
    )


def test_a_loop_that_skips_every_step_warns_that_the_hparams_are_frozen(tmp_path, capsys):
  loop = toy_loop(skip=True)
  run = dict(num_steps=12, checkpoint_dir=tmp_path, checkpoint_every=3, warn_after_skips=5)
  with pytest.warns(ih.HypergradientWarning, match=r"last 5 hyper steps \(to step 4\).*frozen"):
    state, history = ih.fit(loop, toy_state(), data, progress=True, **run)
  assert int(state.num_skipped) == 12 and float(state.hparams) == 0.0
  assert "hparams frozen: 12 skipped" in capsys.readouterr().err
  assert [r["skipped"] for r in history] == [True] * 12
  # Resumed, the streak goes on: the next skipped step warns again (once).
  with pytest.warns(ih.HypergradientWarning, match=r"last 13 hyper steps \(to step 12\)"):
    ih.fit(loop, toy_state(), data, progress=False, **{**run, "num_steps": 14})


def test_a_healthy_loop_and_a_loop_that_skips_a_few_steps_do_not_warn():
  _, history = reference_run(num_steps=12)  # pytest turns any warning into an error
  assert not any(r["skipped"] for r in history)
  ih.fit(toy_loop(skip=True), toy_state(), data, num_steps=9, progress=False)
  ih.fit(
    toy_loop(skip=True), toy_state(), data, num_steps=30, progress=False, warn_after_skips=None
  )
