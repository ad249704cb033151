"""The results pipeline: every script is registered, its committed results hold their keys, a
--quick run writes them, and every page's rendered blocks are what the committed results render.

The --quick end-to-end run covers the scripts no other smoke test runs (bilevel_quickstart,
data_parallel, rule_speed; about 20 s on 2 cores); tests/test_examples_*.py and
tests/test_benchmarks.py already run the others with --quick and check their values, and
`test_committed_results_have_every_file_and_key` checks every run's files against the registry.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools import render_results
from tools import reproduce

ROOT = Path(__file__).resolve().parents[1]
QUICK = ("bilevel_quickstart", "data_parallel", "rule_speed")
RUN_KEYS = {"command", "implicit_hyper", "git_commit", "machine", "jax", "wall_seconds"}
COMMITTED = subprocess.run(
  ["git", "ls-files", "examples", "benchmarks"],
  cwd=ROOT,
  capture_output=True,
  text=True,
  check=False,
).stdout.split()
# A script still being written (untracked), or whose results the registry marks as not yet
# published, has no committed result to check.
PRESENT = [
  run for run in reproduce.RUNS if run.published and (run.script in COMMITTED or not COMMITTED)
]


def test_every_example_and_benchmark_script_has_a_run():
  scripts = {
    p.relative_to(ROOT).as_posix()
    for d in ("examples", "benchmarks")
    for p in (ROOT / d).glob("[!_]*.py")
  }
  assert scripts <= {run.script for run in reproduce.RUNS}
  names = [run.name for run in reproduce.RUNS]
  assert len(names) == len(set(names))


@pytest.mark.parametrize("run", PRESENT, ids=[run.name for run in PRESENT])
def test_committed_results_have_every_file_and_key(run):
  folder = reproduce.RESULTS / run.name
  assert reproduce.check_files(run, folder) == []
  record = json.loads((folder / "run.json").read_text())
  assert RUN_KEYS <= record.keys() and record["returncode"] == 0
  assert {"cpu", "cores"} <= record["machine"].keys()


def test_a_missing_key_and_a_missing_file_are_reported(tmp_path):
  run = reproduce.Run("x", "x.py", files={"a.json": ("k", "m"), "b.png": ()})
  (tmp_path / "a.json").write_text(json.dumps([{"k": 1}, {"k": 2, "m": 3}, {"k": 4}]))
  assert reproduce.check_files(run, tmp_path) == ["x: a.json lacks m", "x: missing b.png"]


def test_quick_runs_write_every_result_file_with_its_keys():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(
    [sys.executable, "-m", "tools.reproduce", "--quick", "--only", *QUICK],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode == 0, result.stdout + result.stderr[-4000:]
  assert result.stdout.count(", ok") == len(QUICK)


def test_every_page_block_is_rendered_from_the_committed_results():
  stale = [str(path.relative_to(ROOT)) for path in render_results.stale()]
  assert stale == [], "run: python -m tools.render_results"


def test_every_block_on_every_page_has_a_rendering_function():
  pages = render_results.pages_with_blocks()
  assert ROOT / "README.md" in pages and ROOT / "benchmarks" / "README.md" in pages
  assert len(pages) >= 8
  assert render_results.unregistered() == []


def test_a_block_that_differs_from_its_rendering_is_stale(tmp_path):
  page = "intro\n<!-- x:begin -->\nold number 1.23\n<!-- x:end -->\noutro\n"
  rendered = render_results.render(page, {"x": lambda: "new number 4.56"})
  assert rendered == "intro\n<!-- x:begin -->\nnew number 4.56\n<!-- x:end -->\noutro\n"
  with pytest.raises(ValueError, match="no <!-- y:begin -->"):
    render_results.render(page, {"y": lambda: ""})


def test_benchmarks_do_not_write_into_the_repository_by_default():
  sys.path.insert(0, str(ROOT / "benchmarks"))
  try:
    import _common
  finally:
    sys.path.remove(str(ROOT / "benchmarks"))
  assert _common.DEFAULT_OUT == ROOT / "out" / "benchmarks"
  assert not (ROOT / "benchmarks" / "results").exists()
