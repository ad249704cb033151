"""Cutting a dataset into training, validation and test parts, minibatches and one-hot labels."""

import itertools
from collections.abc import Iterator
from collections.abc import Sequence

import numpy as np

from ih_examples.datasets import Dataset


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
