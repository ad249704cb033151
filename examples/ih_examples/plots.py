"""Figures of the examples, written as PNG files (matplotlib's Agg backend, no window)."""

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
