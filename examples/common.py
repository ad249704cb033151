"""Shared helpers for the example scripts.

The top section holds data loading, splitting and batching (numpy only) and the
command-line arguments every example shares. Below them: small flax models, plotting,
and reporting (metrics.json, the summary table, the progress bar).
"""

import argparse
import gzip
import itertools
import json
import math
import numbers
import pickle
import sys
import zlib
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import flax.linen as nn
import matplotlib
import numpy as np
from sklearn.datasets import load_diabetes
from sklearn.datasets import load_digits
from tqdm.auto import tqdm

matplotlib.use("Agg")  # The examples write PNG files; they never open a window.
import matplotlib.pyplot as plt  # noqa: E402

# =====================================================================================
# Data
# =====================================================================================


class Dataset(NamedTuple):
  """A whole dataset held in memory as numpy arrays.

  Attributes:
    x: float32 inputs; images are N x H x W x C in [0, 1].
    y: int32 class labels, or float32 targets for regression.
    num_classes: number of classes, or None for regression.
    name: the dataset's name as given to `load_dataset`.
    image_shape: (H, W, C) for image sets, else None.
    num_train: for sets with an official split, rows [:num_train] are the official
      training set and the rest the official test set; None otherwise.
  """

  x: np.ndarray
  y: np.ndarray
  num_classes: int | None
  name: str
  image_shape: tuple[int, int, int] | None
  num_train: int | None = None


MNIST_FILES = (
  "train-images-idx3-ubyte",
  "train-labels-idx1-ubyte",
  "t10k-images-idx3-ubyte",
  "t10k-labels-idx1-ubyte",
)
CIFAR10_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
CIFAR10_SUBDIR = "cifar-10-batches-py"


def load_dataset(name: str, *, data_dir: str | Path | None = None, seed: int | None = 0) -> Dataset:
  """Load a dataset by name; see DATASET_NAMES.

  "digits" and "diabetes" come with scikit-learn. "mnist" and "cifar10" are read from
  files in `data_dir` that the user downloads from the official sources:
    mnist: the four IDX files (MNIST_FILES), gzipped (".gz") or not.
    cifar10: the python-version batches (CIFAR10_BATCHES) from
      https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, extracted, either
      directly in `data_dir` or in its "cifar-10-batches-py" subfolder. These files are
      pickles, and unpickling runs code, so only use files from the official source.
  Their official train and test sets are concatenated; see `Dataset.num_train`.

  "diabetes" is a regression set: each of its 10 features and its target are
  standardised to zero mean and unit variance over all 442 rows.

  Args:
    name: one of DATASET_NAMES.
    data_dir: directory holding the files for "mnist" and "cifar10"; ignored otherwise.
    seed: seed of a shuffle of the rows (within the official train and test parts
      separately, so `num_train` stays valid); None keeps the source order.
  """
  if name in _BUILTIN_LOADERS:
    dataset = _BUILTIN_LOADERS[name]()
  elif name in _FILE_LOADERS:
    dataset = _FILE_LOADERS[name](_require_dir(name, data_dir))
  else:
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
  return dataset if seed is None else _shuffle(dataset, seed)


def _require_dir(name: str, data_dir: str | Path | None) -> Path:
  """Return `data_dir` as a Path after checking it is an existing directory."""
  if data_dir is None:
    raise ValueError(
      f"dataset {name!r} is read from local files: pass --data-dir (data_dir=...) "
      "naming the directory that holds them"
    )
  path = Path(data_dir).expanduser()
  if not path.exists():
    raise FileNotFoundError(f"data directory {path} for dataset {name!r} does not exist")
  if not path.is_dir():
    raise NotADirectoryError(f"data directory {path} for dataset {name!r} is not a directory")
  return path


def _shuffle(dataset: Dataset, seed: int) -> Dataset:
  """Permute the rows, keeping the official train and test parts apart."""
  rng = np.random.default_rng(seed)
  n = len(dataset.x)
  n_train = n if dataset.num_train is None else dataset.num_train
  perm = np.concatenate([rng.permutation(n_train), n_train + rng.permutation(n - n_train)])
  return dataset._replace(x=dataset.x[perm], y=dataset.y[perm])


def _to_unit_float(pixels: np.ndarray) -> np.ndarray:
  """Scale uint8 pixel values to a C-contiguous float32 array in [0, 1]."""
  return pixels.astype(np.float32, order="C") / 255.0


def _standardise(a: np.ndarray) -> np.ndarray:
  """Shift and scale each column (axis 0) to zero mean and unit variance, as float32."""
  a = np.asarray(a, dtype=np.float64)
  return ((a - a.mean(axis=0)) / a.std(axis=0)).astype(np.float32)


def _load_digits() -> Dataset:
  """scikit-learn's 1797 8x8 digit images, pixel values 0..16 scaled to [0, 1]."""
  bunch = load_digits()
  x = (bunch.images / 16.0).astype(np.float32)[..., None]
  return Dataset(x, bunch.target.astype(np.int32), 10, "digits", (8, 8, 1))


def _load_diabetes() -> Dataset:
  """scikit-learn's diabetes regression set, features and target standardised."""
  x, y = load_diabetes(return_X_y=True, scaled=False)
  return Dataset(_standardise(x), _standardise(y), None, "diabetes", None)


def _check_regular_file(path: Path, what: str, expected: str) -> None:
  """Raise unless `path` exists and is a regular file."""
  if not path.exists():
    raise FileNotFoundError(f"{what} file {path} not found; expected {expected}")
  if not path.is_file():
    raise ValueError(f"{what} file {path} is not a regular file; expected {expected}")


def _check_labels(labels: np.ndarray, count: int, num_classes: int, path: Path) -> None:
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


# MNIST: http://yann.lecun.com/exdb/mnist/ describes the IDX format.


def _mnist_path(data_dir: Path, stem: str) -> Path:
  """Return the gzipped or plain path of the MNIST file `stem` in `data_dir`."""
  gz_path, plain_path = data_dir / f"{stem}.gz", data_dir / stem
  path = plain_path if plain_path.exists() and not gz_path.exists() else gz_path
  expected = (
    f"the standard IDX files {', '.join(s + '.gz' for s in MNIST_FILES)} "
    "(or the same names without .gz) in --data-dir"
  )
  _check_regular_file(path, "MNIST", expected)
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


def _read_mnist_part(
  data_dir: Path, images_stem: str, labels_stem: str
) -> tuple[np.ndarray, np.ndarray]:
  """Read one image file and its label file; return (uint8 images, labels)."""
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
  _check_labels(labels, len(images), 10, labels_path)
  return images, labels


def _load_mnist(data_dir: Path) -> Dataset:
  """MNIST from IDX files: the official 60000 training then 10000 test images."""
  train_images, train_labels = _read_mnist_part(data_dir, *MNIST_FILES[:2])
  test_images, test_labels = _read_mnist_part(data_dir, *MNIST_FILES[2:])
  x = _to_unit_float(np.concatenate([train_images, test_images]))[..., None]
  y = np.concatenate([train_labels, test_labels]).astype(np.int32)
  return Dataset(x, y, 10, "mnist", (28, 28, 1), num_train=len(train_images))


# CIFAR-10: https://www.cs.toronto.edu/~kriz/cifar.html describes the python version.


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
  """Read one pickled CIFAR-10 batch; return (N x 3072 uint8 data, labels)."""
  _check_regular_file(
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
  _check_labels(labels, len(data), 10, path)
  return data, labels


def _load_cifar10(data_dir: Path) -> Dataset:
  """CIFAR-10 from the python batches: the official 50000 training then 10000 test images."""
  if (data_dir / CIFAR10_SUBDIR).is_dir():
    data_dir = data_dir / CIFAR10_SUBDIR
  parts = [_read_cifar_batch(data_dir / name) for name in CIFAR10_BATCHES]
  data = np.concatenate([d for d, _ in parts])
  # Each row holds the R, G and B planes of a 32x32 image, each in row-major order.
  x = _to_unit_float(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
  y = np.concatenate([labels for _, labels in parts]).astype(np.int32)
  return Dataset(x, y, 10, "cifar10", (32, 32, 3), num_train=len(data) - len(parts[-1][0]))


_BUILTIN_LOADERS = {"digits": _load_digits, "diabetes": _load_diabetes}
_FILE_LOADERS = {"mnist": _load_mnist, "cifar10": _load_cifar10}
DATASET_NAMES = (*_BUILTIN_LOADERS, *_FILE_LOADERS)


def _split_counts(sizes: Sequence[int | None], n: int) -> list[int]:
  """Check split sizes against `n` examples and replace a None by the remainder."""
  if any(s is not None and (not isinstance(s, int | np.integer) or s < 0) for s in sizes):
    raise ValueError(f"split sizes must be non-negative ints or None, got {tuple(sizes)}")
  if list(sizes).count(None) > 1:
    raise ValueError(f"at most one split size may be None (the rest), got {tuple(sizes)}")
  fixed = sum(s for s in sizes if s is not None)
  if fixed > n:
    raise ValueError(f"split sizes {tuple(sizes)} need {fixed} examples but only {n} exist")
  return [n - fixed if s is None else int(s) for s in sizes]


def split(data, sizes: Sequence[int | None], *, seed: int) -> tuple:
  """Shuffle the rows deterministically and cut them into consecutive parts.

  Examples beyond the sum of `sizes` are left out when no size is None.

  Args:
    data: a Dataset, an array, or a sequence of arrays with the same number of rows.
    sizes: rows in each part; one entry may be None for all remaining rows,
      e.g. (50, 50, None) for 50 training, 50 validation and the rest test rows.
    seed: seed for numpy's default_rng.

  Returns:
    One entry per size: an (x, y) tuple for a Dataset, an array for an array,
    otherwise a tuple of arrays.
  """
  single = isinstance(data, np.ndarray)
  if isinstance(data, Dataset):
    arrays = (data.x, data.y)
  else:
    arrays = (data,) if single else tuple(np.asarray(a) for a in data)
  n = len(arrays[0])
  if any(len(a) != n for a in arrays):
    raise ValueError(f"arrays to split differ in length: {[len(a) for a in arrays]}")
  bounds = np.cumsum([0, *_split_counts(sizes, n)])
  perm = np.random.default_rng(seed).permutation(n)
  parts = tuple(tuple(a[perm[lo:hi]] for a in arrays) for lo, hi in itertools.pairwise(bounds))
  return tuple(p[0] for p in parts) if single else parts


def one_hot(y, num_classes: int) -> np.ndarray:
  """Return float32 one-hot encodings of integer labels, with a trailing class axis."""
  y = np.asarray(y)
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"one_hot needs integer labels, got dtype {y.dtype}")
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}), found {y.min()}..{y.max()}")
  return np.eye(num_classes, dtype=np.float32)[y]


def batches(x, y, batch_size: int, *, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yield (x, y) minibatches forever, reshuffling every epoch.

  Each epoch is one permutation of the rows cut into len(x) // batch_size batches of
  exactly `batch_size` rows (the remainder is dropped), so shapes stay fixed for jit.

  Args:
    x, y: arrays with the same number of rows.
    batch_size: rows per batch, at most len(x).
    seed: seed for numpy's default_rng; equal seeds give equal batch sequences.
  """
  x, y = np.asarray(x), np.asarray(y)
  if len(x) != len(y):
    raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
  if not 1 <= batch_size <= len(x):
    raise ValueError(f"batch_size must be in [1, {len(x)}], got {batch_size}")
  rng = np.random.default_rng(seed)
  while True:
    perm = rng.permutation(len(x))
    for start in range(0, len(x) - batch_size + 1, batch_size):
      idx = perm[start : start + batch_size]
      yield x[idx], y[idx]


# =====================================================================================
# Command-line arguments
# =====================================================================================


def add_data_args(
  parser: argparse.ArgumentParser,
  *,
  default: str = "digits",
  choices: Sequence[str] = DATASET_NAMES,
) -> argparse.ArgumentParser:
  """Add --dataset and --data-dir to `parser` and return it."""
  parser.add_argument(
    "--dataset", default=default, choices=choices, help="dataset (default: %(default)s)"
  )
  parser.add_argument(
    "--data-dir",
    type=Path,
    default=None,
    help="directory with the mnist IDX files or the cifar10 python batches",
  )
  return parser


def common_args(
  description: str, *, default_dataset: str = "digits", datasets: Sequence[str] = DATASET_NAMES
) -> argparse.ArgumentParser:
  """Return a parser with --quick, --out, --seed and the data arguments."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument(
    "--quick", action="store_true", help="run a tiny configuration, e.g. for smoke tests"
  )
  parser.add_argument(
    "--out",
    type=Path,
    default=Path("out") / Path(sys.argv[0]).stem,
    help="output directory (default: %(default)s)",
  )
  parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
  return add_data_args(parser, default=default_dataset, choices=datasets)


# =====================================================================================
# Models
# =====================================================================================


class MLP(nn.Module):
  """A fully connected network on flattened inputs.

  Each width in `hidden` adds a Dense layer followed by `activation`; a linear Dense
  layer with `outputs` units comes last. With ``hidden=()`` it is a linear model
  (multinomial logistic regression when its outputs are read as logits).

  Attributes:
    hidden: widths of the hidden layers.
    outputs: number of outputs.
    activation: the nonlinearity after each hidden layer.

  Inputs carry a leading batch axis: (N, ...) -> (N, outputs).
  """

  hidden: Sequence[int]
  outputs: int
  activation: Callable = nn.relu

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      x = self.activation(nn.Dense(width)(x))
    return nn.Dense(self.outputs)(x)


# =====================================================================================
# Plotting
# =====================================================================================


def save_figure(fig, path: str | Path, *, dpi: int = 100) -> Path:
  """Save `fig` as a PNG at `path` (creating its folder), close it, and return the path."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=dpi, bbox_inches="tight")
  plt.close(fig)
  return path


def image_grid(
  images,
  path: str | Path,
  *,
  titles: Sequence[str] | None = None,
  ncols: int = 10,
  suptitle: str | None = None,
  scale: float = 1.2,
) -> Path:
  """Save a grid of images (N x H x W x C, C in {1, 3}) as a PNG at `path`.

  Each image is shown min-max scaled to its own range, so images whose pixels left
  [0, 1] (learned ones) stay readable.
  """
  images = np.asarray(images, dtype=np.float64)
  nrows = max(1, math.ceil(len(images) / ncols))
  fig, axes = plt.subplots(
    nrows, ncols, figsize=(scale * ncols, scale * nrows + (0.4 if suptitle else 0)), squeeze=False
  )
  for i, ax in enumerate(axes.flat):
    ax.axis("off")
    if i >= len(images):
      continue
    image = images[i]
    image = (image - image.min()) / max(image.max() - image.min(), 1e-12)
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
    if titles is not None:
      ax.set_title(titles[i], fontsize=9)
  if suptitle:
    fig.suptitle(suptitle)
  return save_figure(fig, path)


# =====================================================================================
# Reporting
# =====================================================================================


def _plain(value):
  """Convert numpy / JAX scalars and arrays inside `value` to JSON-ready Python values."""
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, str | bool) or value is None:
    return value
  if isinstance(value, numbers.Integral):
    return int(value)
  if isinstance(value, numbers.Real):
    return float(value)
  if isinstance(value, Sequence):
    return [_plain(v) for v in value]
  array = np.asarray(value)
  return _plain(array.item() if array.ndim == 0 else array.tolist())


def save_metrics(out: str | Path, metrics: Mapping) -> Path:
  """Write `metrics` as indented JSON to `out`/metrics.json (creating `out`); return the path."""
  path = Path(out) / "metrics.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(_plain(metrics), indent=2) + "\n")
  return path


def format_table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
  """Format rows as a plain-text table; floats get 4 significant digits."""

  def cell(value):
    value = _plain(value)
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
      return f"{value:.4g}"
    return str(value)

  table = [[str(h) for h in headers]] + [[cell(v) for v in row] for row in rows]
  widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in table]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(line.rstrip() for line in lines)


def print_summary(title: str, headers: Sequence[str], rows: Iterable[Sequence]) -> None:
  """Print `title` and the table of `rows` under `headers` to stdout."""
  print(f"\n{title}\n{format_table(headers, rows)}", flush=True)


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = ""):
  """A tqdm progress bar on stderr, refreshed at most once a second."""
  return tqdm(iterable, total=total, desc=desc, mininterval=1.0, dynamic_ncols=True)


# =====================================================================================
# Splits for the bilevel examples
# =====================================================================================


def train_validation_test(data: Dataset, num_train: int, num_validation: int, *, seed: int):
  """Cut `data` into training, validation and test (x, y) pairs.

  For a dataset with an official split (`Dataset.num_train`), the training and
  validation rows are drawn from its official training part and the test set is its
  official test part; otherwise the test set is every row left over.
  """
  if data.num_train is None:
    return split(data, (num_train, num_validation, None), seed=seed)
  official_train = (data.x[: data.num_train], data.y[: data.num_train])
  train, validation = split(official_train, (num_train, num_validation), seed=seed)
  return train, validation, (data.x[data.num_train :], data.y[data.num_train :])
