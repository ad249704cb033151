"""Render every page's results from docs/results/: the README, the docs pages, benchmarks/README.md.

    python -m tools.render_results            # rewrite the blocks between the markers
    python -m tools.render_results --check    # exit 1 if a page differs from the rendering

Each block sits between `<!-- NAME:begin -->` and `<!-- NAME:end -->`; everything outside the
markers is left as it is. `BLOCKS` maps each page to its blocks and the function that renders
each; tests/test_reproduce.py fails when any page's block differs from what this script renders,
or when a page has a block that `BLOCKS` does not know, so a number on a page cannot outlive the
run that produced it. The functions live by page: tools/results_examples.py (the README's
table), tools/results_gallery.py (docs/examples.md), tools/results_benchmarks.py (the README's
benchmarks, the bilevel tables), tools/results_benchmark_tables.py (benchmarks/README.md) and
tools/results_pages.py (concepts, the solver choice), tools/results_guides.py (the guides, the
migration page, the online loop) and tools/results_search.py (overhead, search, eager).
"""

import argparse
import json
import re
import sys
from pathlib import Path

from tools import results_benchmark_tables as tables
from tools import results_bilevel as bilevel
from tools import results_gallery as gallery
from tools import results_guides as guides
from tools import results_pages as pages
from tools import results_search as search_results
from tools._results import README
from tools._results import RESULTS
from tools._results import ROOT
from tools.results_benchmarks import benchmarks_block
from tools.results_examples import examples_table

MARKER = re.compile(r"<!-- ([\w-]+):begin -->")


def runs_table() -> str:
  """One row per run in docs/results/: its command, wall time, machine load, commit, date."""
  rows = [
    "| result | command | wall time | load average (1 min) before → after | commit | finished |",
    "|---|---|---|---|---|---|",
  ]
  for path in sorted(RESULTS.glob("*/run.json")):
    run = json.loads(path.read_text())
    load = run["machine"]
    edited = " (script with uncommitted edits)" if run["script_modified_since_commit"] else ""
    rows.append(
      f"| [{run['name']}]({run['name']}/run.json) | `{' '.join(run['command'])}`"
      f" | {run['wall_seconds']:.0f} s"
      f" | {load['load_average_before'][0]:.1f} → {load['load_average_1_5_15'][0]:.1f}"
      f" | {run['git_commit'][:7]}{edited} | {run['date'][:16]} |"
    )
  first = json.loads(next(RESULTS.glob("*/run.json")).read_text())
  total = sum(json.loads(p.read_text())["wall_seconds"] for p in RESULTS.glob("*/run.json"))
  return "\n".join(rows) + (
    f"\n\nTotal wall time {total / 60:.0f} min on {first['machine']['cpu']}"
    f" ({first['machine']['cores']} cores); implicit_hyper {first['implicit_hyper']},"
    f" jax {first['jax']}, jaxlib {first['jaxlib']}, Python {first['python']}."
  )


DOCS = ROOT / "docs"
BLOCKS = {
  README: {"results": examples_table, "benchmarks": benchmarks_block},
  RESULTS / "README.md": {"runs": runs_table},
  ROOT / "benchmarks" / "README.md": {
    "speed": tables.speed_tables,
    "product-costs": tables.product_costs_table,
    "memory": tables.memory_table,
    "accuracy": tables.accuracy_table,
    "scale": tables.scale_table,
    "end-to-end": tables.end_to_end_table,
    "bilevel": bilevel.bilevel_tables,
    "bilevel-logreg-diagnosis": bilevel.logreg_diagnosis,
    "overhead": search_results.overhead_table,
    "search": search_results.benchmarks_search_table,
    "eager": search_results.eager_table,
  },
  DOCS / "examples.md": {
    "overfit": gallery.gallery_overfit,
    "overfit-million": gallery.gallery_million,
    "overfit-mnist": gallery.gallery_mnist,
    "distillation": gallery.gallery_distillation,
    "distillation-mnist": gallery.gallery_distillation_mnist,
    "augmentation": gallery.gallery_augmentation,
    "inverse": gallery.gallery_inverse,
    "imaml": gallery.gallery_imaml,
    "cleaning": gallery.gallery_cleaning,
    "without-figures": gallery.gallery_without_figures,
  },
  DOCS / "hypergradients-or-search.md": {
    "search": search_results.search_table,
    "search-verdict": search_results.search_verdict,
    "overhead": search_results.overhead_table,
  },
  DOCS / "choosing-a-solver.md": {
    "solvers": pages.solver_table,
    "bilevel-choice": bilevel.bilevel_choice,
  },
  DOCS / "concepts" / "unrolled-vs-implicit.md": {
    "memory": pages.unrolled_memory,
    "speed": pages.unrolled_speed,
  },
  DOCS / "concepts" / "theorem.md": {"rule-speed": pages.rule_speed},
  DOCS / "concepts" / "first-order.md": {"bilevel-first-order": bilevel.first_order},
  DOCS / "guides" / "per-weight-decay.md": {
    "results": guides.guide_per_weight_decay,
    "scale": guides.guide_scale,
  },
  DOCS / "guides" / "dataset-distillation.md": {"results": guides.guide_distillation},
  DOCS / "guides" / "imaml.md": {"results": guides.guide_imaml},
  DOCS / "guides" / "learned-augmentation.md": {"results": guides.guide_augmentation},
  DOCS / "migrating-from-jaxopt.md": {"speed": guides.migration_speed},
  DOCS / "concepts" / "online-loop.md": {"quickstart-run": guides.online_loop_quickstart},
}


def render(text: str, blocks) -> str:
  """`text` with the block between the markers of each name in `blocks` rendered anew."""
  for name, make in blocks.items():
    pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
      raise ValueError(f"no <!-- {name}:begin --> ... <!-- {name}:end --> block")
    text = pattern.sub(lambda m, make=make: m[1] + make() + "\n" + m[2], text)
  return text


def pages_with_blocks() -> dict:
  """Every Markdown page of the repository (outside build folders) with a block, and its names."""
  found = {}
  for path in sorted(ROOT.glob("**/*.md")):
    parts = path.relative_to(ROOT).parts
    if parts[0] in (".venv", "site", "build", "dist", "out") or parts[0].startswith("."):
      continue
    names = MARKER.findall(path.read_text())
    if names:
      found[path] = names
  return found


def unregistered() -> list[str]:
  """`page: NAME` for each block on a page that `BLOCKS` has no rendering function for."""
  return [
    f"{path.relative_to(ROOT)}: {name}"
    for path, names in pages_with_blocks().items()
    for name in names
    if name not in BLOCKS.get(path, {})
  ]


def stale() -> list[Path]:
  """The pages whose blocks differ from what the committed results render."""
  return [
    path for path, blocks in BLOCKS.items() if render(path.read_text(), blocks) != path.read_text()
  ]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true", help="only report which pages differ")
  args = parser.parse_args(argv)
  if args.check:
    problems = [
      f"{p.relative_to(ROOT)} differs from python -m tools.render_results" for p in stale()
    ]
    problems += [f"{entry}: no rendering function in BLOCKS" for entry in unregistered()]
    for problem in problems:
      print(problem, file=sys.stderr)
    return 1 if problems else 0
  for path, blocks in BLOCKS.items():
    path.write_text(render(path.read_text(), blocks))
  return 0


if __name__ == "__main__":
  sys.exit(main())
