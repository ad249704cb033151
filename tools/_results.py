"""What every rendering function shares: where the results are, how to read and format them."""

import json
import re
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
README = ROOT / "README.md"


def load(name: str, file: str = "metrics.json"):
  return json.loads((RESULTS / name / file).read_text())


def wall(name: str) -> str:
  run = load(name, "run.json")
  seconds = run["wall_seconds"]
  text = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
  return text + (
    ", from a script with uncommitted edits" if run["script_modified_since_commit"] else ""
  )


def spread(values, digits: int = 3) -> str:
  """`mean ± sample std` of `values` (just the value if there is one)."""
  if len(values) == 1:
    return f"{values[0]:.{digits}f}"
  return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def per_step(values) -> str:
  """Seconds per hyper step over seeds: `mean ± std s`, 3 significant digits."""
  mean = statistics.mean(values)
  return f"{mean:.3g} ± {statistics.stdev(values):.2g} s" if len(values) > 1 else f"{mean:.3g} s"


def error(value: float) -> str:
  return f"{value:.2f}" if value >= 0.01 else f"{value:.1e}"


def seconds(value: float) -> str:
  if value < 1e-3:
    return f"{value * 1e6:.0f} µs"
  if value < 1:
    return f"{value * 1e3:.3g} ms"
  return f"{value:.3g} s"


def mebibytes(size: float) -> str:
  """Bytes in KiB below 1 MiB, in GiB from 1 GiB, in MiB between."""
  if size < 2**20:
    return f"{size / 2**10:.3g} KiB"
  return f"{size / 2**30:.3g} GiB" if size >= 2**30 else f"{size / 2**20:.3g} MiB"


def flops(count: float) -> str:
  """`1.26e7`: three significant digits, no exponent padding or plus sign."""
  mantissa, exponent = f"{count:.2e}".split("e")
  return f"{float(mantissa):g}e{int(exponent)}"


def seeds(prefix: str) -> list[dict]:
  """metrics.json of `prefix` and `prefix_seed1`, `prefix_seed2`, ... that exist."""
  names = [prefix] + sorted(p.name for p in RESULTS.glob(f"{prefix}_seed*"))
  return [load(name) for name in names if (RESULTS / name / "metrics.json").exists()]


def how_many(runs: list) -> str:
  return f"{len(runs)} seeds, mean ± std" if len(runs) > 1 else "one seed"


def exists(name: str, file: str = "metrics.json") -> bool:
  return (RESULTS / name / file).is_file()


def ratio_range(values, digits: int = 2) -> str:
  """`low–high` of `values` (one value if they agree at `digits`)."""
  low, high = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
  return low if low == high else f"{low}–{high}"


def stdout_table(name: str) -> list[list[str]]:
  """The rows (cells stripped) of the first markdown table a run printed, header excluded."""
  rows, lines = [], (RESULTS / name / "stdout.txt").read_text().splitlines()
  for line in lines:
    if not line.startswith("|"):
      if rows:
        break
    elif not re.match(r"^\|[-| ]+\|$", line):
      rows.append([cell.strip() for cell in line.strip("|").split("|")])
  return rows[1:]


def sci(value: float) -> str:
  """`1.0e-4` below 0.001 (no zero-padded exponent), two significant digits otherwise."""
  if value >= 1e-3:
    return f"{value:#.2g}".rstrip(".")
  return f"{value:.1e}".replace("e-0", "e-")
