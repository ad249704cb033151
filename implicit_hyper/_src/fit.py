"""`fit`: runs a `bilevel` loop over data with a progress bar, a metric history and checkpoints."""

import csv
import functools
import json
import os
import re
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from implicit_hyper._src import validation

CHECKPOINT_FORMAT = "implicit_hyper.fit/1"
CHECKPOINT_NAME = re.compile(r"^ckpt_(\d+)\.msgpack$")
METRICS_SUFFIXES = (".json", ".csv")


def fit(
  loop,
  state,
  data,
  *,
  num_steps: int,
  checkpoint_dir=None,
  checkpoint_every: int = 100,
  keep_checkpoints: int = 2,
  metrics_path=None,
  progress: bool = True,
  callback=None,
):
  """Runs ``loop.step`` (jit-compiled) until ``state.step == num_steps``, resumably.

  On start, the latest checkpoint in `checkpoint_dir` (if any) replaces `state` and the
  run continues from its step, so a run stopped at any point and started again with the
  same arguments reaches bit-identical parameters, hyperparameters and history.
  Checkpoints are msgpack files (`flax.serialization`, no pickle) named
  ``ckpt_<step>.msgpack``, written to a temporary file and renamed, so a crash never
  leaves a partial one. A corrupt checkpoint, or one whose arrays do not match `state`,
  raises a `ValueError` naming the file before anything is written.

  Data must be replayable for resumption to be exact. `data` is either
    * a callable ``data(step) -> (inner_batches, outer_batch)`` that returns the same
      batches for the same hyper step (derive randomness from `step`, e.g.
      ``np.random.default_rng([seed, step])``): the recommended form; or
    * a fresh iterable of ``(inner_batches, outer_batch)`` pairs (see
      `bilevel_batches`) that yields the same sequence every time it is created
      (seeded): on resumption its first ``state.step`` items are drawn and discarded.
  Training stops early when the data run out.

  Args:
    loop: a `Bilevel` from `ih.bilevel`.
    state: the starting `BilevelState` (``loop.init(...)``); also the template that
      checkpoints must match.
    data: the batches, as above.
    num_steps: total hyper steps to reach (counted by ``state.step``).
    checkpoint_dir: directory for checkpoints (created if needed); None for none.
    checkpoint_every: save every this many hyper steps, and at the end.
    keep_checkpoints: how many of the newest checkpoints to keep.
    metrics_path: a ``.json`` (a list of records) or ``.csv`` file, rewritten with the
      history at every checkpoint and at the end; None for none.
    progress: show a tqdm progress bar with the latest metrics.
    callback: ``callback(step, state) -> dict | None``, called after every hyper step
      with the new state (e.g. to evaluate test accuracy every few steps); the scalars
      it returns join that step's history record and are checkpointed with it.

  Returns:
    ``(state, history)``: the final state and one dict per hyper step holding its index
    ``step``, the `BilevelMetrics` fields, every scalar constrained hyperparameter
    (``hparams`` or ``hparams/<key>``) and what `callback` returned.

  Example:
    >>> import tempfile, jax.numpy as jnp, optax
    >>> import implicit_hyper as ih
    >>> train = lambda w, decay, b: jnp.sum((w - b) ** 2) + decay * jnp.sum(w**2)
    >>> valid = lambda w, decay, b: jnp.sum((w - 0.5 * b) ** 2)
    >>> loop = ih.bilevel(train, valid, optax.sgd(0.2), optax.adam(0.1), inner_steps=5)
    >>> data = lambda step: (jnp.ones((5, 3)), jnp.ones(3))  # (inner_batches, outer_batch)
    >>> with tempfile.TemporaryDirectory() as directory:
    ...   state, history = ih.fit(loop, loop.init(jnp.zeros(3), 0.5), data, num_steps=100,
    ...                           checkpoint_dir=directory, progress=False)
    >>> int(state.step), round(history[-1]["hparams"], 2)  # the best decay is 1
    (100, 1.0)
  """
  for name, value in (
    ("checkpoint_every", checkpoint_every),
    ("keep_checkpoints", keep_checkpoints),
  ):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"`fit({name}=...)` must be an int >= 1, got {value!r}.")
  if callback is not None and not callable(callback):
    raise TypeError(f"`fit(callback=...)` must be callable or None, got {callback!r}.")
  if metrics_path is not None and Path(metrics_path).suffix not in METRICS_SUFFIXES:
    raise ValueError(f"`fit(metrics_path=...)` must end in .json or .csv, got {metrics_path!r}.")
  history = []
  if checkpoint_dir is not None:
    checkpoint_dir = Path(checkpoint_dir)
    latest = latest_checkpoint(checkpoint_dir)
    if latest is not None:
      state, history = load_checkpoint(latest, state)
  start = int(state.step)
  next_batches = _replay(data, start)
  step_fn = _compiled_step(loop)
  bar = _progress_bar(progress, start, num_steps)

  def save():
    if checkpoint_dir is not None:
      save_checkpoint(checkpoint_dir, state, history, keep=keep_checkpoints)
    if metrics_path is not None:
      write_metrics(metrics_path, history)

  pending, saved = None, True
  try:
    for step in range(start, num_steps):
      try:
        inner_batches, outer_batch = next_batches(step)
      except StopIteration:
        break
      state, *outputs = step_fn(state, inner_batches, outer_batch)
      if pending is not None:  # Read the previous metrics while this step runs.
        _append(history, bar, pending)
      extra = callback(step, state) if callback is not None else None
      pending, saved = (step, *outputs, extra), False
      if (step + 1) % checkpoint_every == 0:
        _append(history, bar, pending)
        pending, saved = None, True
        save()
    if pending is not None:
      _append(history, bar, pending)
    if not saved:
      save()
  finally:
    if bar is not None:
      bar.close()
  return state, history


def bilevel_batches(train, valid, *, inner_steps: int):
  """Pairs two iterables of batches into `fit`'s ``(inner_batches, outer_batch)`` items.

  Each item stacks the next `inner_steps` training batches along a new leading axis
  (`np.stack`) and takes the next validation batch; it ends when either runs out.

  Example:
    >>> import numpy as np
    >>> train, valid = (np.full(2, k) for k in range(6)), iter(["v0", "v1", "v2"])
    >>> [(inner.tolist(), outer) for inner, outer in bilevel_batches(train, valid, inner_steps=3)]
    [([[0, 0], [1, 1], [2, 2]], 'v0'), ([[3, 3], [4, 4], [5, 5]], 'v1')]
  """
  train, valid = iter(train), iter(valid)
  while True:
    try:
      inner = [next(train) for _ in range(inner_steps)]
      outer = next(valid)
    except StopIteration:
      return
    yield jax.tree.map(lambda *leaves: np.stack(leaves), *inner), outer


def latest_checkpoint(directory):
  """The path of the highest-step ``ckpt_<step>.msgpack`` in `directory`, or None."""
  directory = Path(directory)
  if not directory.is_dir():
    return None
  found = [(int(m[1]), p) for p in directory.iterdir() if (m := CHECKPOINT_NAME.match(p.name))]
  return max(found)[1] if found else None


def save_checkpoint(directory, state, history, *, keep: int = 2) -> Path:
  """Writes `state` and `history` atomically to ``directory/ckpt_<state.step>.msgpack``.

  Keeps the newest `keep` checkpoints and deletes older ones. Returns the path.
  """
  serialization = _flax_serialization()
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  payload = {
    "format": CHECKPOINT_FORMAT,
    "state": serialization.to_state_dict(jax.device_get(state)),
    # Python's JSON round-trips floats (and NaN) exactly, and records may differ in keys.
    "history": json.dumps(history),
  }
  path = directory / f"ckpt_{int(state.step):08d}.msgpack"
  _atomic_write(path, serialization.msgpack_serialize(payload))
  found = sorted(
    (int(m[1]), p) for p in directory.iterdir() if (m := CHECKPOINT_NAME.match(p.name))
  )
  for _, old in found[:-keep]:
    old.unlink()
  return path


def load_checkpoint(path, like):
  """Reads a checkpoint written by `save_checkpoint`; returns ``(state, history)``.

  Raises:
    ValueError: naming `path`, when the file is corrupt, is not a `fit` checkpoint, or
      holds arrays whose structure, shapes or dtypes differ from `like`.
  """
  serialization = _flax_serialization()
  path = Path(path)
  hint = "Delete it or pass another `checkpoint_dir` to start afresh."
  try:
    payload = serialization.msgpack_restore(path.read_bytes())
  except Exception as err:  # msgpack reports damage with many exception types
    raise ValueError(f"Checkpoint {path} is corrupt and cannot be read ({err}). {hint}") from err
  if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
    raise ValueError(f"{path} is not an implicit_hyper `fit` checkpoint. {hint}")
  try:
    restored = serialization.from_state_dict(like, payload["state"])
    validation.check_same_structure("fit", f"the checkpoint {path}", restored, like, "`state`")
  except (ValueError, KeyError, TypeError) as err:
    raise ValueError(f"Checkpoint {path} does not match the `state` given: {err} {hint}") from err
  state = jax.tree.map(lambda x, t: jnp.asarray(x, jnp.result_type(t)), restored, like)
  try:
    history = json.loads(payload.get("history", "[]"))
  except (TypeError, ValueError) as err:
    raise ValueError(f"Checkpoint {path} has an unreadable metric history ({err}). {hint}") from err
  return state, history


def write_metrics(path, history) -> None:
  """Writes the history atomically as JSON (a list of records) or CSV, by `path`'s suffix."""
  path = Path(path)
  if path.suffix == ".json":
    text = json.dumps(history, indent=1)
  else:
    lines = _CsvLines()
    fields = list(dict.fromkeys(k for record in history for k in record)) or ["step"]
    writer = csv.DictWriter(lines, fieldnames=fields)
    writer.writeheader()
    writer.writerows(history)
    text = "".join(lines)
  path.parent.mkdir(parents=True, exist_ok=True)
  _atomic_write(path, text.encode())


class _CsvLines(list):
  def write(self, line):
    self.append(line)


def _atomic_write(path: Path, data: bytes) -> None:
  """Writes `data` to a temporary file beside `path`, syncs it, and renames it to `path`."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def _replay(data, start):
  """`data` as a function of the hyper step, fast-forwarding an iterable to `start`."""
  if callable(data):
    return data
  iterator = iter(data)
  for _ in range(start):
    next(iterator)
  return lambda step: next(iterator)


@functools.lru_cache(maxsize=8)
def _compiled_step(loop):
  """``loop.step`` that also returns the constrained hparams, jitted once per loop."""

  def step(state, inner_batches, outer_batch):
    state, metrics = loop.step(state, inner_batches, outer_batch)
    return state, metrics, loop.constrain(state.hparams)

  return jax.jit(step)


def _record(step, metrics, hparams, extra):
  """One history entry of Python scalars (exactly representable, so resumption is exact)."""
  metrics, hparams, extra = jax.device_get((metrics, hparams, extra or {}))
  record = {"step": step, **{k: np.asarray(v).item() for k, v in metrics._asdict().items()}}
  for path, leaf in jax.tree_util.tree_leaves_with_path(hparams):
    if np.size(leaf) == 1:
      name = "/".join(
        str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path
      )
      record["hparams/" + name if name else "hparams"] = np.asarray(leaf).item()
  record.update({k: np.asarray(v).item() for k, v in extra.items()})
  return record


def _progress_bar(progress, start, num_steps):
  if not progress:
    return None
  from tqdm.auto import tqdm

  return tqdm(total=num_steps, initial=start, desc="bilevel", unit="step")


def _append(history, bar, pending):
  history.append(_record(*pending))
  if bar is not None:
    shown = ("inner_loss", "outer_loss", "hypergrad_norm", "num_skipped")
    bar.set_postfix({k: history[-1][k] for k in shown}, refresh=False)
    bar.update(1)


def _flax_serialization():
  try:
    from flax import serialization
  except ImportError as err:
    raise ImportError("`fit` checkpoints need flax: `pip install flax`.") from err
  return serialization
