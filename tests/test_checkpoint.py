"""Tests of `_src/checkpoint.py`: atomic, checksummed checkpoint files of any pytree."""

import os
from pathlib import Path
from typing import NamedTuple

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax import struct

from implicit_hyper._src import checkpoint
from implicit_hyper._src.checkpoint import latest_checkpoint
from implicit_hyper._src.checkpoint import load_checkpoint
from implicit_hyper._src.checkpoint import save_checkpoint


class State(NamedTuple):
  params: dict
  hparams: jax.Array
  opt_state: optax.OptState
  step: jax.Array


@chex.dataclass
class ChexHparams:
  decay: jax.Array
  rates: jax.Array


@struct.dataclass
class StructState:
  params: jax.Array
  step: int
  name: str = struct.field(pytree_node=False, default="static fields live in the treedef")


def tree_of(kind, seed):
  """A pytree of the given kind whose values depend on `seed`."""
  rng = np.random.default_rng(seed)
  w = jnp.asarray(rng.normal(size=(3, 2)))
  if kind == "dict":
    return {"w": w, "b": {"x": jnp.arange(4, dtype=jnp.int32) + seed}, "step": seed}
  if kind == "namedtuple":
    return State({"w": w}, jnp.float32(seed), optax.adam(0.1).init({"w": w}), jnp.asarray(seed))
  if kind == "chex":
    return {"hparams": ChexHparams(decay=w[0, 0], rates=w[1]), "step": np.int64(seed)}
  if kind == "flax.struct":
    return StructState(params=w, step=seed)
  if kind == "nnx":
    model = nnx.Linear(2, 3, rngs=nnx.Rngs(seed))
    return {"model": nnx.state(model), "rngs": nnx.state(nnx.Rngs(seed)), "step": seed}
  if kind == "equinox":  # an activation function among the leaves
    return {"model": eqx.nn.MLP(2, 3, 4, 1, key=jax.random.key(seed)), "step": seed}
  if kind == "dtypes":
    return {
      "bf16": jnp.asarray(w, jnp.bfloat16),
      "c64": jnp.asarray(w + 1j * seed, jnp.complex64),
      "bool": jnp.asarray(w > 0),
      "u8": np.full((2,), seed, np.uint8),
      "scalars": (float(seed) + 0.5, seed > 0),
      "empty": jnp.zeros((0, 3)),
      "none": None,
      "step": seed,
    }
  raise ValueError(kind)


def assert_bit_identical(a, b):
  flat_a, tree_a = jax.tree_util.tree_flatten(a)
  flat_b, tree_b = jax.tree_util.tree_flatten(b)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b, strict=True):
    assert type(x) is type(y)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert np.asarray(x).dtype == np.asarray(y).dtype
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


@pytest.mark.parametrize(
  "kind", ["dict", "namedtuple", "chex", "flax.struct", "nnx", "equinox", "dtypes"]
)
def test_round_trip_restores_every_leaf_bit_for_bit_with_its_type(tmp_path, kind):
  saved, like = tree_of(kind, 3), tree_of(kind, 0)
  path = save_checkpoint(tmp_path, saved, [{"loss": float("nan"), "step": 3}])
  assert path == tmp_path / "ckpt_00000003.msgpack"
  restored, history = load_checkpoint(path, like)
  assert_bit_identical(restored, saved)
  assert np.isnan(history[0]["loss"]) and history[0]["step"] == 3


def test_an_equinox_model_takes_its_functions_from_the_template(tmp_path):
  saved = eqx.nn.MLP(2, 1, 3, 1, activation=jnp.tanh, key=jax.random.key(1))
  like = eqx.nn.MLP(2, 1, 3, 1, activation=jax.nn.softplus, key=jax.random.key(0))
  path = save_checkpoint(tmp_path, {"model": saved, "step": 1})
  restored, _ = load_checkpoint(path, {"model": like, "step": 0})
  assert restored["model"].activation is jax.nn.softplus
  x = jnp.array([0.3, -1.2])
  np.testing.assert_array_equal(restored["model"].layers[0](x), saved.layers[0](x))


def test_multi_device_leaves_keep_the_sharding_of_the_template(tmp_path):
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
  like = {"w": jax.device_put(jnp.zeros(16), sharding), "step": 0}
  path = save_checkpoint(tmp_path, {"w": jnp.arange(16.0), "step": 1})
  restored, _ = load_checkpoint(path, like)
  assert restored["w"].sharding == sharding
  assert restored["w"].tolist() == list(range(16))


def saved_file(tmp_path):
  return save_checkpoint(tmp_path, tree_of("namedtuple", 2), [{"loss": 1.0}])


@pytest.mark.parametrize("where", [0, 10, 40, 60, 200, -1])
def test_a_flipped_byte_anywhere_is_detected_by_the_checksum(tmp_path, where):
  path = saved_file(tmp_path)
  data = bytearray(path.read_bytes())
  data[where] ^= 0x10
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match=r"ckpt_00000002\.msgpack (is corrupt|is not an impl)"):
    load_checkpoint(path, tree_of("namedtuple", 0))


@pytest.mark.parametrize("keep_bytes", [0, 5, 60, -1])
def test_a_truncated_file_is_detected(tmp_path, keep_bytes):
  path = saved_file(tmp_path)
  path.write_bytes(path.read_bytes()[:keep_bytes])
  with pytest.raises(checkpoint._CorruptCheckpointError, match=r"ckpt_00000002\.msgpack"):
    load_checkpoint(path, tree_of("namedtuple", 0))


def test_a_checkpoint_of_other_shapes_dtypes_or_leaves_raises_naming_the_leaf(tmp_path):
  path = save_checkpoint(tmp_path, {"w": jnp.zeros(3), "b": jnp.zeros(2), "step": 1})
  with pytest.raises(ValueError, match=r"leaf \['w'\] has shape \(3,\).*shape \(4,\)"):
    load_checkpoint(path, {"w": jnp.zeros(4), "b": jnp.zeros(2), "step": 0})
  with pytest.raises(ValueError, match=r"leaf \['b'\].*dtype float64.*dtype int64"):
    load_checkpoint(path, {"w": jnp.zeros(3), "b": jnp.zeros(2, int), "step": 0})
  with pytest.raises(ValueError, match=r"missing from the checkpoint \[\"\['c'\]\"\]"):
    load_checkpoint(path, {"w": jnp.zeros(3), "b": jnp.zeros(2), "c": 1.0, "step": 0})


def test_a_leaf_that_is_not_numbers_is_refused_naming_it(tmp_path):
  with pytest.raises(TypeError, match=r"leaf \['name'\] is a str"):
    save_checkpoint(tmp_path, {"name": "adam", "step": 0})
  with pytest.raises(TypeError, match=r"`save_checkpoint\(state=...\)` must have a scalar `step`"):
    save_checkpoint(tmp_path, {"w": jnp.zeros(2)})


def test_settings_that_differ_are_refused_naming_them(tmp_path):
  config = {"inner": {"learning_rate": 0.1, "name": "sgd"}, "inner_steps": 5}
  path = save_checkpoint(tmp_path, {"step": 1}, config=config)
  assert load_checkpoint(path, {"step": 0}, config=dict(reversed(config.items())))[0] == {"step": 1}
  assert load_checkpoint(path, {"step": 0})[0] == {"step": 1}  # no settings given: no check
  other = {"inner": {"learning_rate": 0.2, "name": "sgd"}, "inner_steps": 5}
  with pytest.raises(ValueError, match=r"other settings: inner\.learning_rate: 0\.1 -> 0\.2\."):
    load_checkpoint(path, {"step": 0}, config=other)
  unconfigured = save_checkpoint(tmp_path, {"step": 2})
  assert load_checkpoint(unconfigured, {"step": 0}, config=other)[0] == {"step": 2}
  with pytest.raises(TypeError, match=r"`config` must be a JSON-able dict"):
    save_checkpoint(tmp_path, {"step": 3}, config={"optimizer": optax.sgd(0.1)})


def test_latest_ignores_directories_fifos_and_other_names(tmp_path):
  save_checkpoint(tmp_path, {"step": 5})
  (tmp_path / "ckpt_00000009.msgpack").mkdir()
  os.mkfifo(tmp_path / "ckpt_00000010.msgpack")
  (tmp_path / "ckpt_00000011.msgpack.bak").write_bytes(b"")
  (tmp_path / "ckpt_12.json").write_bytes(b"")
  assert latest_checkpoint(tmp_path) == tmp_path / "ckpt_00000005.msgpack"
  assert latest_checkpoint(tmp_path / "absent") is None
  with pytest.raises(ValueError, match="is not a regular file"):  # and does not block
    load_checkpoint(tmp_path / "ckpt_00000010.msgpack", {"step": 0})


def test_keep_deletes_the_oldest_checkpoints_only(tmp_path):
  (tmp_path / "ckpt_00000001.msgpack").mkdir()
  for step in (2, 3, 4, 5):
    save_checkpoint(tmp_path, {"step": step}, keep=2)
  assert sorted(p.name for p in tmp_path.iterdir()) == [
    "ckpt_00000001.msgpack",  # a directory: never deleted
    "ckpt_00000004.msgpack",
    "ckpt_00000005.msgpack",
  ]
  with pytest.raises(ValueError, match=r"`save_checkpoint\(keep=...\)` must be an int >= 1"):
    save_checkpoint(tmp_path, {"step": 6}, keep=0)


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
  path = save_checkpoint(tmp_path, {"w": jnp.ones(2), "step": 1})
  before = path.read_bytes()

  def crash(src, dst):
    raise OSError("disk full")

  monkeypatch.setattr(checkpoint.os, "replace", crash)
  with pytest.raises(OSError, match="disk full"):
    save_checkpoint(tmp_path, {"w": jnp.zeros(2), "step": 1})
  assert [p.name for p in tmp_path.iterdir()] == [path.name]
  assert path.read_bytes() == before


def test_the_lock_refuses_a_second_holder_naming_the_directory_and_cleans_leftovers(tmp_path):
  leftover = tmp_path / ".ckpt_00000004.msgpack.x1y2.tmp"
  leftover.write_bytes(b"partial")
  with checkpoint._exclusive(tmp_path, "fit"):
    assert not leftover.exists()
    with pytest.raises(
      RuntimeError, match=rf"{tmp_path}.* in use by another run \(process {os.getpid()}"
    ):
      with checkpoint._exclusive(tmp_path, "fit"):
        pass
  with checkpoint._exclusive(tmp_path, "fit"):  # released on exit
    pass
  assert Path(tmp_path / ".lock").is_file()
