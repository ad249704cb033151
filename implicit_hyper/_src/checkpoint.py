"""Checkpoint files: any pytree of arrays, a metric history and a settings fingerprint."""

import contextlib
import hashlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MAGIC = b"implicit_hyper checkpoint 2\n"
CHECKPOINT_NAME = re.compile(r"^ckpt_(\d+)\.msgpack$")
TEMPORARY_NAME = re.compile(r"^\.ckpt_\d+\.msgpack\..*\.tmp$")
LOCK_NAME = ".lock"
_HINT = "Delete it or pass another `checkpoint_dir` to start afresh."


class _CorruptCheckpointError(ValueError):
  """A checkpoint file that cannot be trusted: damaged, truncated or of another format."""


def save_checkpoint(
  directory: str | os.PathLike[str],
  state: Any,
  history: Iterable[Any] = (),
  *,
  config: dict[str, Any] | None = None,
  keep: int = 2,
) -> Path:
  """Writes `state` atomically to ``directory/ckpt_<state.step>.msgpack``.

  The file is written to a temporary file beside it, synced and renamed, so a crash
  never leaves a partial checkpoint. It holds every leaf of `state` by its key path
  (msgpack through `flax.serialization`: no pickle, loading never runs code), the
  history (exact JSON, NaN included), `config`, and a SHA-256 checksum of all of it.
  Any pytree of arrays is accepted: dicts, NamedTuples, `chex.dataclass`,
  `flax.struct.dataclass`, `flax.nnx.State`, typed PRNG keys, and `equinox.Module`
  models, whose function leaves (activations) are not saved: `load_checkpoint` takes
  them from its `like`, as `equinox.tree_deserialise_leaves` does.

  Args:
    directory: where to write (created if needed).
    state: a pytree with an integer ``step`` attribute, which names the file.
    history: a list of JSON-able records (`ih.fit`'s metric history).
    config: a JSON-able dict of the settings that produced `state`; `load_checkpoint`
      can refuse to resume under other settings. None stores none.
    keep: how many of the newest checkpoints to keep; older ones are deleted.

  Returns:
    The path written.

  Example:
    >>> import tempfile, jax.numpy as jnp
    >>> state = {"w": jnp.arange(3.0), "step": 7}
    >>> with tempfile.TemporaryDirectory() as directory:
    ...   path = save_checkpoint(directory, state, [{"loss": 0.5}], config={"lr": 0.1})
    ...   restored, history = load_checkpoint(path, state, config={"lr": 0.1})
    >>> path.name, restored["w"].tolist(), history
    ('ckpt_00000007.msgpack', [0.0, 1.0, 2.0], [{'loss': 0.5}])
  """
  if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
    raise ValueError(f"`save_checkpoint(keep=...)` must be an int >= 1, got {keep!r}.")
  step = state.get("step") if isinstance(state, Mapping) else getattr(state, "step", None)
  if step is None or np.ndim(step) != 0:
    raise TypeError("`save_checkpoint(state=...)` must have a scalar `step` entry or attribute.")
  leaves = {}
  for key_path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(state)):
    if not _is_function(leaf):
      leaves[jax.tree_util.keystr(key_path)] = _to_numpy("save_checkpoint", key_path, leaf)
  payload = {
    "leaves": leaves,
    "history": json.dumps(list(history)),  # Python's JSON round-trips floats and NaN exactly.
    "config": None if config is None else _canonical_config(config),
  }
  body = _serialization().msgpack_serialize(payload)
  folder = Path(directory)
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / f"ckpt_{int(step):08d}.msgpack"
  _atomic_write(path, MAGIC + hashlib.sha256(body).digest() + body)
  for old in _checkpoints(folder)[keep:]:
    old.unlink(missing_ok=True)
  return path


def load_checkpoint(
  path: str | os.PathLike[str], like: Any, *, config: dict[str, Any] | None = None
) -> tuple[Any, list[Any]]:
  """Reads a checkpoint written by `save_checkpoint`; returns ``(state, history)``.

  Args:
    path: the checkpoint file.
    like: a pytree of the structure, shapes and dtypes saved (e.g. a fresh state); its
      leaves' types (jax, numpy, Python scalars) and multi-device shardings are kept.
    config: when given, the settings the checkpoint must have been saved with; one
      saved without settings is accepted.

  Returns:
    ``(state, history)``: `like` filled with the saved leaves, and the saved history.

  Raises:
    ValueError: naming `path`, when the file is damaged, truncated or not a checkpoint
      (its checksum or format is wrong), holds other leaves than `like`, or was saved
      with settings other than `config` (naming the settings that differ).
  """
  path = Path(path)
  payload = _read_payload(path)
  saved = payload["config"]
  if config is not None and saved is not None and saved != _canonical_config(config):
    raise ValueError(
      f"Checkpoint {path} was saved with other settings: {_config_diff(saved, config)}. "
      "Resume with the settings it was saved with, pass `fit(..., resume='force')` to "
      "continue under the new ones, or use another `checkpoint_dir`."
    )
  flat, treedef = jax.tree_util.tree_flatten_with_path(like)
  names, leaves = [jax.tree_util.keystr(p) for p, _ in flat], [leaf for _, leaf in flat]
  arrays = {name for name, leaf in zip(names, leaves, strict=True) if not _is_function(leaf)}
  stored = payload["leaves"]
  missing, extra = sorted(arrays - set(stored)), sorted(set(stored) - arrays)
  if missing or extra:
    raise ValueError(
      f"Checkpoint {path} does not match the given state: leaves missing from the "
      f"checkpoint {missing[:5]}, leaves only in the checkpoint {extra[:5]}. {_HINT}"
    )
  restored = [
    leaf if name not in arrays else _from_numpy(path, name, stored[name], leaf)
    for name, leaf in zip(names, leaves, strict=True)
  ]
  return jax.tree.unflatten(treedef, restored), json.loads(payload["history"])


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
  """The path of the highest-step ``ckpt_<step>.msgpack`` regular file in `directory`, or None.

  Directories, FIFOs and other non-regular files named like checkpoints are ignored; the
  file is not read (`load_checkpoint` checks it).

  Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as directory:
    ...   for step in (1, 12, 3):
    ...     _ = save_checkpoint(directory, {"step": step}, keep=3)
    ...   latest_checkpoint(directory).name
    'ckpt_00000012.msgpack'
  """
  found = _checkpoints(Path(directory))
  return found[0] if found else None


def _checkpoints(directory: Path) -> list[Path]:
  """The regular checkpoint files in `directory`, newest (highest step) first."""
  if not directory.is_dir():
    return []
  found = [(int(m[1]), p) for p in directory.iterdir() if (m := CHECKPOINT_NAME.match(p.name))]
  return [p for _, p in sorted(found, reverse=True) if p.is_file()]


def _read_payload(path: Path) -> dict[str, Any]:
  """The checked payload of a checkpoint; `_CorruptCheckpointError` if it cannot be trusted."""
  # O_NONBLOCK: opening a FIFO for reading must not wait for a writer.
  fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
  with os.fdopen(fd, "rb") as f:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
      raise ValueError(f"Checkpoint {path} is not a regular file.")
    data = f.read()
  digest, body = data[len(MAGIC) : len(MAGIC) + 32], data[len(MAGIC) + 32 :]
  if not data.startswith(MAGIC):
    raise _CorruptCheckpointError(
      f"{path} is not an implicit_hyper checkpoint of this version, or is truncated. {_HINT}"
    )
  if hashlib.sha256(body).digest() != digest:
    raise _CorruptCheckpointError(
      f"Checkpoint {path} is corrupt: its checksum does not match (truncated or damaged). {_HINT}"
    )
  try:
    payload = _serialization().msgpack_restore(body)
    if isinstance(payload, dict) and set(payload) == {"leaves", "history", "config"}:
      json.loads(payload["history"])
      return payload
  except Exception as err:  # msgpack reports damage with many exception types
    raise _CorruptCheckpointError(f"Checkpoint {path} is corrupt ({err!r}). {_HINT}") from err
  raise _CorruptCheckpointError(f"Checkpoint {path} has an unknown layout. {_HINT}")


def _is_function(leaf: Any) -> bool:
  """A function leaf (an equinox model's activation): not saved, taken from `like` on load."""
  return callable(leaf) and not isinstance(leaf, jax.Array | np.ndarray | np.generic)


def _to_numpy(call: str, path: tuple[Any, ...], leaf: Any) -> np.ndarray:
  """A leaf as a numpy array that msgpack can store; typed PRNG keys as their key data."""
  if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.device_get(jax.random.key_data(leaf))
  array = np.asarray(leaf)
  if array.dtype.kind not in "biufc" and array.dtype.name != "bfloat16":
    raise TypeError(
      f"`{call}`: leaf {jax.tree_util.keystr(path)} is a {type(leaf).__name__}, not an array "
      "of numbers; mark it static (`flax.struct.field(pytree_node=False)`) or remove it."
    )
  return array


def _from_numpy(path: Path, name: str, value: Any, like: Any) -> Any:
  """`value` checked against the leaf `like` and given its type (and sharding)."""
  expected = _spec(like)
  value = np.asarray(value)
  if value.shape != expected.shape or value.dtype != expected.dtype:
    raise ValueError(
      f"Checkpoint {path} does not match the given state: leaf {name} has shape "
      f"{value.shape} and dtype {value.dtype} in the checkpoint, but shape "
      f"{expected.shape} and dtype {expected.dtype} in the state. {_HINT}"
    )
  if isinstance(like, jax.Array):
    if jax.dtypes.issubdtype(like.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(value, impl=jax.random.key_impl(like))
    if like.is_fully_addressable and len(like.sharding.device_set) > 1:
      return jax.device_put(value, like.sharding)
    return jnp.asarray(value)
  if isinstance(like, np.ndarray | np.generic):
    return value if isinstance(like, np.ndarray) else value[()]
  return value.item()  # a Python scalar


def _spec(leaf: Any) -> jax.ShapeDtypeStruct:
  """The shape and dtype `_to_numpy` gives `leaf`, without copying it to the host."""
  if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    return jax.eval_shape(jax.random.key_data, leaf)
  dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
  return jax.ShapeDtypeStruct(np.shape(leaf), dtype)


def _canonical_config(config: object) -> str:
  """`config` as canonical JSON text: equal settings give equal text."""
  try:
    return json.dumps(config, sort_keys=True, separators=(",", ":"))
  except (TypeError, ValueError) as err:
    raise TypeError(
      f"The loop's `config` must be a JSON-able dict, got {config!r} ({err})."
    ) from err


def _config_diff(saved: str, config: object) -> str:
  """The settings that differ, as ``key: saved -> now`` (a few of them)."""
  old, new = (
    _flat_settings(json.loads(saved)),
    _flat_settings(json.loads(_canonical_config(config))),
  )
  keys = [
    k for k in dict.fromkeys([*old, *new]) if json.dumps(old.get(k)) != json.dumps(new.get(k))
  ]
  return ", ".join(f"{k or '(config)'}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:5])


def _flat_settings(config: object, prefix: str = "") -> dict[str, Any]:
  if isinstance(config, dict) and config:
    return {
      k: v for key in config for k, v in _flat_settings(config[key], f"{prefix}{key}.").items()
    }
  return {prefix.rstrip("."): config}


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
  with contextlib.suppress(OSError):  # Make the rename durable where directories can be synced.
    fd = os.open(path.parent, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


@contextlib.contextmanager
def _exclusive(directory: Path, call: str) -> Iterator[None]:
  """Holds an exclusive lock on `directory` (created if needed), cleaning crash leftovers."""
  try:
    import fcntl
  except ImportError:  # No flock (Windows): run unlocked.
    fcntl = None  # type: ignore[assignment]
  fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    if fcntl is not None:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        owner = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        raise RuntimeError(
          f"`{call}(checkpoint_dir=...)`: {directory} is in use by another run (process "
          f"{owner} holds {directory / LOCK_NAME}). Wait for it to finish, or give this "
          "run its own `checkpoint_dir`."
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    for leftover in directory.iterdir():
      if TEMPORARY_NAME.match(leftover.name) and leftover.is_file():
        leftover.unlink(missing_ok=True)
    yield
  finally:
    os.close(fd)  # Closing releases the lock.


def _serialization() -> ModuleType:
  try:
    from flax import serialization
  except ImportError as err:
    raise ImportError("Checkpoints need flax: `pip install flax`.") from err
  return serialization
