"""Readers of dataset files: MNIST's IDX files and CIFAR-10's python batches, checked.

Each reader names the file and what it expected when a file is missing or malformed.
MNIST's IDX format: http://yann.lecun.com/exdb/mnist/; CIFAR-10's python version:
https://www.cs.toronto.edu/~kriz/cifar.html.
"""

import gzip
import math
import pickle
import zlib
from pathlib import Path

import numpy as np

MNIST_FILES = (
  "train-images-idx3-ubyte",
  "train-labels-idx1-ubyte",
  "t10k-images-idx3-ubyte",
  "t10k-labels-idx1-ubyte",
)
CIFAR10_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
CIFAR10_SUBDIR = "cifar-10-batches-py"


def check_regular_file(path: Path, what: str, expected: str) -> None:
  """Raise unless `path` exists and is a regular file."""
  if not path.exists():
    raise FileNotFoundError(f"{what} file {path} not found; expected {expected}")
  if not path.is_file():
    raise ValueError(f"{what} file {path} is not a regular file; expected {expected}")


def check_labels(labels: np.ndarray, count: int, num_classes: int, path: Path) -> None:
  """Raise unless `labels` holds `count` integers in [0, num_classes)."""
  if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
      f"labels in {path} should be {count} integers, got a {labels.dtype} array "
      f"of shape {labels.shape}"
    )
  if count and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
      f"labels in {path} should lie in [0, {num_classes}), "
      f"found values {labels.min()}..{labels.max()}"
    )


def _mnist_path(data_dir: Path, stem: str) -> Path:
  """Return the gzipped or plain path of the MNIST file `stem` in `data_dir`."""
  gz_path, plain_path = data_dir / f"{stem}.gz", data_dir / stem
  path = plain_path if plain_path.exists() and not gz_path.exists() else gz_path
  expected = (
    f"the standard IDX files {', '.join(s + '.gz' for s in MNIST_FILES)} "
    "(or the same names without .gz) in --data-dir"
  )
  check_regular_file(path, "MNIST", expected)
  return path


def _read_bytes(path: Path) -> bytes:
  """Read a file, decompressing it if its name ends in .gz."""
  if path.suffix != ".gz":
    return path.read_bytes()
  try:
    with gzip.open(path, "rb") as f:
      return f.read()
  except (gzip.BadGzipFile, EOFError, zlib.error) as err:
    raise ValueError(f"could not decompress gzip file {path}: {err}") from err


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
  """Read an IDX file of unsigned bytes with `ndim` dimensions (gzipped if *.gz).

  The format is a 4-byte magic number 0x0000 08 <ndim>, then `ndim` big-endian
  uint32 sizes, then the data in C order.
  """
  path = Path(path)
  raw = _read_bytes(path)
  header_size = 4 + 4 * ndim
  if len(raw) < header_size:
    raise ValueError(
      f"IDX file {path} is truncated: {len(raw)} bytes, shorter than its {header_size}-byte header"
    )
  magic, expected_magic = int.from_bytes(raw[:4], "big"), 0x0800 + ndim
  if magic != expected_magic:
    raise ValueError(
      f"IDX file {path} has magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
      f"(unsigned bytes, {ndim} dimensions)"
    )
  shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  size, found = math.prod(shape), len(raw) - header_size
  if found != size:
    problem = "truncated" if found < size else "too long"
    raise ValueError(
      f"IDX file {path} is {problem}: its header gives shape {shape}, "
      f"which needs {size} data bytes, but it holds {found}"
    )
  return np.frombuffer(raw, np.uint8, offset=header_size).reshape(shape)


def read_mnist_part(
  data_dir: Path, images_stem: str, labels_stem: str
) -> tuple[np.ndarray, np.ndarray]:
  """Read one MNIST image file and its label file; return (uint8 images, labels)."""
  images_path = _mnist_path(data_dir, images_stem)
  labels_path = _mnist_path(data_dir, labels_stem)
  images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
  if images.shape[1:] != (28, 28):
    raise ValueError(
      f"MNIST file {images_path} holds images of size {images.shape[1:]}, expected (28, 28)"
    )
  if len(labels) != len(images):
    raise ValueError(
      f"MNIST file {labels_path} holds {len(labels)} labels but {images_path} "
      f"holds {len(images)} images"
    )
  check_labels(labels, len(images), 10, labels_path)
  return images, labels


def read_mnist_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
  """Read MNIST images from a gzipped CSV file of 784 pixels (0-255) and a label per row.

  Returns:
    (uint8 images of shape N x 28 x 28, labels).
  """
  try:
    with gzip.open(path, "rt") as f:
      rows = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
  except (OSError, EOFError, zlib.error, ValueError) as err:
    raise ValueError(f"could not read MNIST CSV file {path}: {err}") from err
  if rows.shape[1] != 28 * 28 + 1:
    raise ValueError(
      f"MNIST CSV file {path} has {rows.shape[1]} columns, expected 785 (784 pixels, a label)"
    )
  pixels, labels = rows[:, :-1], rows[:, -1]
  if rows.size and (pixels.min() < 0 or pixels.max() > 255):
    raise ValueError(f"pixels in {path} should lie in 0..255, found {pixels.min()}..{pixels.max()}")
  check_labels(labels, len(rows), 10, path)
  return pixels.astype(np.uint8).reshape(-1, 28, 28), labels


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
  """Read one pickled CIFAR-10 batch; return (N x 3072 uint8 data, labels)."""
  check_regular_file(
    path,
    "CIFAR-10",
    f"the python-version batches {', '.join(CIFAR10_BATCHES)} in --data-dir "
    f"or in its {CIFAR10_SUBDIR} subfolder",
  )
  try:
    with path.open("rb") as f:
      batch = pickle.load(f, encoding="bytes")
  except Exception as err:  # a damaged pickle can fail in many ways
    raise ValueError(f"could not unpickle CIFAR-10 batch {path}: {err!r}") from err
  if not isinstance(batch, dict) or not {b"data", b"labels"} <= batch.keys():
    found = (
      f"keys {sorted(batch, key=repr)}" if isinstance(batch, dict) else f"a {type(batch).__name__}"
    )
    raise ValueError(
      f"CIFAR-10 batch {path} should be a dict with keys b'data' and b'labels'; found {found}"
    )
  data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
    raise ValueError(
      f"CIFAR-10 batch {path}: b'data' should be an N x 3072 uint8 array, "
      f"got a {data.dtype} array of shape {data.shape}"
    )
  check_labels(labels, len(data), 10, path)
  return data, labels
