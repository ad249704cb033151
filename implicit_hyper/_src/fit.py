"""`fit`: runs a `bilevel` loop over data with a progress bar, a metric history and checkpoints."""

import contextlib
import csv
import functools
import io
import json
import math
import os
import warnings
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from typing import TypeGuard

import jax
import numpy as np

from implicit_hyper._src import checkpoint
from implicit_hyper._src import trust
from implicit_hyper._src.checkpoint import load_checkpoint
from implicit_hyper._src.checkpoint import save_checkpoint
from implicit_hyper._src.methods import _static
from implicit_hyper._src.trust import HypergradientError
from implicit_hyper._src.trust import HypergradientWarning

METRICS_SUFFIXES = (".json", ".csv")
RESUME_MODES = ("auto", "force")


def fit(
  loop: Any,
  state: Any,
  data: Callable[[int], tuple[Sequence[Any], Sequence[Any]]]
  | Iterable[tuple[Sequence[Any], Sequence[Any]]],
  *,
  num_steps: int,
  checkpoint_dir: str | os.PathLike[str] | None = None,
  checkpoint_every: int = 100,
  keep_checkpoints: int = 2,
  metrics_path: str | os.PathLike[str] | None = None,
  progress: bool = True,
  callback: Callable[[int, Any], dict[str, Any] | None] | None = None,
  resume: str = "auto",
  warn_after_skips: int | None = 10,
  on_non_finite: str = "warn",
) -> tuple[Any, list[dict[str, Any]]]:
  """Runs ``loop.step`` (jit-compiled) until ``state.step == num_steps``, resumably.

  On start, the newest good checkpoint in `checkpoint_dir` (if any) replaces `state` and
  the run continues from its step, so a run stopped at any point (even killed while
  writing) and started again with the same arguments reaches bit-identical parameters,
  hyperparameters and history. Checkpoints are written by `ih.save_checkpoint`. A damaged
  newest checkpoint (its checksum fails) is renamed ``*.corrupt`` and the run resumes from
  the one before, with a warning. While it runs, `fit` holds a lock on `checkpoint_dir`:
  a second run on the same directory is refused with a `RuntimeError`. Every argument is
  checked before any work.

  Data must be replayable for resumption to be exact. `data` is either
    * a callable ``data(step) -> (inner_args, outer_args)`` that returns the same
      arguments for the same hyper step (derive randomness from `step`, e.g.
      ``np.random.default_rng([seed, step])``): the recommended form; or
    * a fresh iterable of ``(inner_args, outer_args)`` pairs (see `bilevel_batches`)
      that yields the same sequence every time it is created (seeded): on resumption
      its first ``state.step`` items are drawn and discarded.
  Training stops early when the data run out.

  Args:
    loop: a `Bilevel` (`ih.bilevel`, `ih.soba`, `ih.saba`, ... any method), or any
      ``(init, step, constrain)`` loop whose
      state has ``step`` and ``hparams`` and whose metrics are a NamedTuple of scalars.
    state: the starting state (``loop.init(...)``); also the template that checkpoints
      must match.
    data: the loss arguments, as above.
    num_steps: total hyper steps to reach (counted by ``state.step``).
    checkpoint_dir: directory for checkpoints (created if needed); None for none.
    checkpoint_every: save every this many hyper steps, and at the end.
    keep_checkpoints: how many of the newest checkpoints to keep.
    metrics_path: a ``.json`` (a list of records; strict JSON, non-finite numbers as
      null) or ``.csv`` file, rewritten with the history at every checkpoint and at the
      end; None for none.
    progress: show a tqdm progress bar with the latest metrics and the skip count.
    callback: ``callback(step, state) -> dict | None``, called after every hyper step
      with the new state (e.g. to evaluate test accuracy every few steps); the scalars
      it returns join that step's history record and are checkpointed with it.
    resume: "auto" refuses a checkpoint saved with other loop settings (``loop.config``,
      when the loop has one); "force" resumes from it under the new settings, which the
      next checkpoints record.
    warn_after_skips: issue a `HypergradientWarning` once this many consecutive hyper
      steps were skipped (``metrics.skipped``): the hyperparameters are frozen. None
      never warns.
    on_non_finite: "warn" (a `HypergradientWarning`, once), "raise" (a
      `HypergradientError`, before the step's state is checkpointed) or "ignore" when a
      step's metrics report ``non_finite`` (the weights or hyperparameters hold a NaN or
      an infinity: the run cannot recover). The progress bar says so in every case.

  Returns:
    ``(state, history)``: the final state and one dict per hyper step holding its index
    ``step``, the metrics' fields, every scalar constrained hyperparameter (``hparams``
    or ``hparams/<key>``) and what `callback` returned.

  Example:
    >>> import tempfile, jax.numpy as jnp, optax
    >>> import implicit_hyper as ih
    >>> train = lambda w, decay, b: jnp.sum((w - b) ** 2) + decay * jnp.sum(w**2)
    >>> valid = lambda w, decay, b: jnp.sum((w - 0.5 * b) ** 2)
    >>> loop = ih.bilevel(train, valid, optax.sgd(0.2), optax.adam(0.1), inner_steps=5)
    >>> data = lambda step: ((jnp.ones((5, 3)),), (jnp.ones(3),))  # (inner_args, outer_args)
    >>> with tempfile.TemporaryDirectory() as directory:
    ...   state, history = ih.fit(loop, loop.init(jnp.zeros(3), 0.5), data, num_steps=100,
    ...                           checkpoint_dir=directory, progress=False)
    >>> int(state.step), round(history[-1]["hparams"], 2)  # the best decay is 1
    (100, 1.0)
  """
  _check_arguments(loop, data, num_steps, checkpoint_every, keep_checkpoints, warn_after_skips)
  if callback is not None and not callable(callback):
    raise TypeError(f"`fit(callback=...)` must be callable or None, got {callback!r}.")
  if resume not in RESUME_MODES:
    raise ValueError(f"`fit(resume=...)` must be one of {RESUME_MODES}, got {resume!r}.")
  if on_non_finite not in trust.POLICIES:
    raise ValueError(
      f"`fit(on_non_finite=...)` must be one of {trust.POLICIES}, got {on_non_finite!r}."
    )
  if metrics_path is not None:
    metrics_path = Path(metrics_path)
    if metrics_path.suffix not in METRICS_SUFFIXES or metrics_path.is_dir():
      raise ValueError(f"`fit(metrics_path=...)` must be a .json or .csv file, got {metrics_path}.")
    _make_directory("metrics_path", metrics_path.parent)
  config = getattr(loop, "config", None)
  if config is not None:
    checkpoint._canonical_config(config)  # Refuse settings that cannot be saved, now.
  history: list[dict[str, Any]] = []
  source, directory = "the `state` given", None
  if checkpoint_dir is not None:
    directory = _make_directory("checkpoint_dir", Path(checkpoint_dir))
  with checkpoint._exclusive(directory, "fit") if directory else contextlib.nullcontext():
    if directory is not None:
      state, history, source = _resume(directory, state, config if resume == "auto" else None)
      for leftover in (
        metrics_path.parent.glob(f".{metrics_path.name}.*.tmp") if metrics_path else ()
      ):
        leftover.unlink(missing_ok=True)  # from a crash; the lock keeps this run alone
    start = int(state.step)
    if num_steps < start:
      raise ValueError(
        f"`fit(num_steps={num_steps})` is below step {start} of {source}: pass "
        f"`num_steps >= {start}`, or another `checkpoint_dir` to start afresh."
      )
    next_args = _replay(data, start, source)
    step_fn = _compiled_step(loop.step, loop.constrain)
    # Consecutive skipped hyper steps at the end of the history; warned once per streak.
    streak = next(
      (n for n, r in enumerate(reversed(history)) if not r.get("skipped")), len(history)
    )
    warned = False
    non_finite = _NonFinite(on_non_finite)
    bar = _progress_bar(progress, start, num_steps)

    def flush(pending: tuple[Any, ...]) -> None:
      nonlocal streak, warned
      history.append(_record(*pending))
      non_finite.check(history[-1])
      streak, warned = (streak + 1, warned) if history[-1].get("skipped") else (0, False)
      if warn_after_skips is not None and streak >= warn_after_skips and not warned:
        warned = True
        warnings.warn(
          f"`fit`: the last {streak} hyper steps (to step {history[-1]['step']}) were all "
          "skipped, so the hyperparameters are frozen: every hypergradient was flagged "
          "(diverged or not finite). Look at the metrics (`residual_norm`) and try another "
          "`solver=` or a smaller outer learning rate.",
          HypergradientWarning,
          stacklevel=3,
        )
      _show(bar, history[-1], streak, warn_after_skips, non_finite.seen)

    def save() -> None:
      if directory is not None:
        save_checkpoint(directory, state, history, config=config, keep=keep_checkpoints)
      if metrics_path is not None:
        _write_metrics(metrics_path, history)

    pending, saved = None, True
    try:
      for step in range(start, num_steps):
        try:
          inner_args, outer_args = next_args(step)
        except StopIteration:
          break
        state, *outputs = step_fn(state, inner_args, outer_args)
        if pending is not None:  # Read the previous metrics while this step runs.
          flush(pending)
        extra = callback(step, state) if callback is not None else None
        pending, saved = (step, *outputs, extra), False
        if (step + 1) % checkpoint_every == 0:
          flush(pending)
          pending, saved = None, True
          save()
      if pending is not None:
        flush(pending)
      if not saved:
        save()
    finally:
      if bar is not None:
        bar.close()
  return state, history


def bilevel_batches(
  train: Iterable[Sequence[Any]], valid: Iterable[Sequence[Any]], *, inner_steps: int
) -> Iterator[tuple[Any, Sequence[Any]]]:
  """Pairs two iterables of argument tuples into `fit`'s ``(inner_args, outer_args)`` items.

  Each item stacks the next `inner_steps` training tuples leaf by leaf along a new
  leading axis (`np.stack`) and takes the next validation tuple; it ends when either
  runs out.

  Example:
    >>> import numpy as np
    >>> train = ((np.full(2, k), k) for k in range(6))
    >>> valid = iter([("v0",), ("v1",), ("v2",)])
    >>> [(x.tolist(), k.tolist(), v) for (x, k), v in bilevel_batches(train, valid, inner_steps=3)]
    [([[0, 0], [1, 1], [2, 2]], [0, 1, 2], ('v0',)), ([[3, 3], [4, 4], [5, 5]], [3, 4, 5], ('v1',))]
  """
  if not _is_int(inner_steps) or inner_steps < 1:
    raise ValueError(
      f"`bilevel_batches(inner_steps=...)` must be an int >= 1, got {inner_steps!r}."
    )
  train, valid = iter(train), iter(valid)
  while True:
    try:
      inner = [next(train) for _ in range(inner_steps)]
      outer = next(valid)
    except StopIteration:
      return
    for name, args in (("train", inner[0]), ("valid", outer)):
      if not isinstance(args, tuple | list):
        raise TypeError(
          f"`bilevel_batches({name}=...)` must yield tuples of loss arguments such as "
          f"`(x, y)`, got a {type(args).__name__}; wrap a single array as `(x,)`."
        )
    yield jax.tree.map(lambda *leaves: np.stack(leaves), *inner), outer


def _check_arguments(
  loop: object,
  data: object,
  num_steps: object,
  checkpoint_every: object,
  keep_checkpoints: object,
  warn_after_skips: object,
) -> None:
  if not all(callable(getattr(loop, name, None)) for name in ("step", "constrain")):
    raise TypeError(f"`fit(loop=...)` must be an `ih.bilevel` loop, got {loop!r}.")
  if not callable(data) and not hasattr(data, "__iter__"):
    raise TypeError(
      f"`fit(data=...)` must be a callable `data(step)` or an iterable, got {data!r}."
    )
  for name, value, least in (
    ("num_steps", num_steps, 0),
    ("checkpoint_every", checkpoint_every, 1),
    ("keep_checkpoints", keep_checkpoints, 1),
    ("warn_after_skips", 1 if warn_after_skips is None else warn_after_skips, 1),
  ):
    if not _is_int(value) or value < least:
      raise ValueError(f"`fit({name}=...)` must be an int >= {least}, got {value!r}.")


def _is_int(value: object) -> TypeGuard[int | np.integer]:
  return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _make_directory(argument: str, directory: Path) -> Path:
  if directory.exists() and not directory.is_dir():
    raise ValueError(f"`fit({argument}=...)`: {directory} exists and is not a directory.")
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except OSError as err:
    raise ValueError(f"`fit({argument}=...)`: cannot create {directory} ({err}).") from err
  return directory


def _resume(
  directory: Path, like: Any, config: dict[str, Any] | None
) -> tuple[Any, list[dict[str, Any]], str]:
  """The newest good checkpoint's ``(state, history, description)``, else `like`'s."""
  corrupt = []
  for path in checkpoint._checkpoints(directory):
    try:
      state, history = load_checkpoint(path, like, config=config)
    except checkpoint._CorruptCheckpointError as err:
      corrupt.append((path, err))
      continue
    for bad, reason in corrupt:
      aside = bad.replace(bad.with_name(bad.name + ".corrupt"))
      warnings.warn(
        f"`fit`: {reason} Renamed it {aside.name}; resuming from {path.name}.", stacklevel=3
      )
    return state, history, f"the checkpoint {path}"
  if corrupt:
    raise corrupt[0][1]
  return like, [], "the `state` given"


def _replay(
  data: Callable[[int], tuple[Sequence[Any], Sequence[Any]]]
  | Iterable[tuple[Sequence[Any], Sequence[Any]]],
  start: int,
  source: str,
) -> Callable[[int], tuple[Sequence[Any], Sequence[Any]]]:
  """`data` as a function of the hyper step, fast-forwarding an iterable to `start`."""
  if callable(data):
    return data
  iterator = iter(data)
  for drawn in range(start):
    try:
      next(iterator)
    except StopIteration:
      raise ValueError(
        f"`fit(data=...)` ran out after {drawn} items while skipping the {start} hyper steps "
        f"already taken in {source}. Resuming needs the data of the run that saved it: "
        "a seeded iterable created afresh, or a callable `data(step)`."
      ) from None
  return lambda step: next(iterator)


@functools.lru_cache(maxsize=8)
def _compiled_step(
  step: Callable[..., tuple[Any, Any]], constrain: Callable[[Any], Any]
) -> Callable[..., tuple[Any, Any, Any]]:
  """``step`` that also returns the constrained hparams, jitted once per loop."""

  def step_and_hparams(
    state: Any, inner_args: Sequence[Any], outer_args: Sequence[Any]
  ) -> tuple[Any, Any, Any]:
    state, metrics = step(state, inner_args, outer_args)
    return state, metrics, constrain(state.hparams)

  return _static.filter_jit(step_and_hparams)  # equinox functions in the state are static


def _record(step: int, metrics: Any, hparams: Any, extra: dict[str, Any] | None) -> dict[str, Any]:
  """One history entry of Python scalars (exactly representable, so resumption is exact)."""
  if extra is not None and not isinstance(extra, dict):
    raise TypeError(f"`fit(callback=...)` must return a dict or None, got {extra!r:.80}.")
  metrics, hparams, extra = jax.device_get((metrics, hparams, extra or {}))
  record: dict[str, Any] = {"step": step}
  for field, value in metrics._asdict().items():
    record.update(_scalars(field, value))
  record.update(_scalars("hparams", hparams))
  for key, value in extra.items():
    if np.size(value) != 1:
      raise TypeError(
        f"`fit(callback=...)` must return scalars; {key!r} has shape {np.shape(value)}."
      )
    record[key] = np.asarray(value).item()
  return record


def _scalars(prefix: str, tree: Any) -> dict[str, Any]:
  """The scalar leaves of `tree` named ``prefix`` or ``prefix/<path>`` (a None tree has none)."""
  scalars = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if not _static.is_static(leaf) and np.size(leaf) == 1:
      name = "/".join(
        str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path
      )
      scalars[prefix + "/" + name if name else prefix] = np.asarray(leaf).item()
  return scalars


def _progress_bar(progress: bool, start: int, num_steps: int) -> Any:
  if not progress:
    return None
  from tqdm.auto import tqdm

  return tqdm(total=num_steps, initial=start, desc="bilevel", unit="step")


def _show(
  bar: Any, record: dict[str, Any], streak: int, warn_after_skips: int | None, non_finite: bool
) -> None:
  if bar is None:
    return
  shown = ("inner_loss", "outer_loss", "hypergrad_norm", "num_skipped")
  bar.set_postfix({k: record[k] for k in shown if k in record}, refresh=False)
  frozen = warn_after_skips is not None and streak >= warn_after_skips
  notes = ["NON-FINITE weights or hparams"] * non_finite
  notes += [f"hparams frozen: {streak} skipped"] * frozen
  bar.set_description("bilevel" + (f" ({'; '.join(notes)})" if notes else ""), False)
  bar.update(1)


class _NonFinite:
  """Acts once, by `fit(on_non_finite=...)`, on the first record flagged ``non_finite``."""

  def __init__(self, policy: str) -> None:
    self.policy, self.seen = policy, False

  def check(self, record: dict[str, Any]) -> None:
    if not record.get("non_finite") or self.seen:
      return
    self.seen = True
    message = (
      f"`fit`: after hyper step {record['step']} the weights or the hyperparameters are "
      "not finite (NaN or infinity); the run cannot recover from here. Lower the "
      "learning rates, bound the hyperparameters (`hparam_transform=`), or pick another "
      "outer optimiser; `fit(on_non_finite=...)` sets what happens."
    )
    if self.policy == "raise":
      raise HypergradientError(message)
    if self.policy == "warn":
      warnings.warn(message, HypergradientWarning, stacklevel=4)


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
  """Writes the history atomically as strict JSON (a list of records) or CSV, by suffix."""
  if path.suffix == ".json":
    finite = [{k: _finite_or_none(v) for k, v in record.items()} for record in history]
    text = json.dumps(finite, indent=1, allow_nan=False)
  else:
    lines = io.StringIO()
    fields = list(dict.fromkeys(k for record in history for k in record)) or ["step"]
    writer = csv.DictWriter(lines, fieldnames=fields)
    writer.writeheader()
    writer.writerows(history)
    text = lines.getvalue()
  checkpoint._atomic_write(path, text.encode())


def _finite_or_none(value: Any) -> Any:
  return None if isinstance(value, float) and not math.isfinite(value) else value
