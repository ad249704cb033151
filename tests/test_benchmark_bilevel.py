"""Smoke tests of benchmarks/bilevel.py: each problem runs with --quick and writes its results.

The three problems run at once, each in its own subprocess, once per test session.
Nothing here asserts a timing.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bilevel.py"
PROBLEMS = ("quadratic", "logreg", "cleaning")
METHODS = {"neumann", "cg", "cg_nystrom", "soba", "amigo", "unrolled"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  out = tmp_path_factory.mktemp("bilevel")
  runs = {
    name: subprocess.Popen(
      [sys.executable, str(SCRIPT), "--problem", name, "--quick", "--out", str(out)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for name in PROBLEMS
  }
  payloads = {}
  for name, run in runs.items():
    stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, f"bilevel.py --problem {name} --quick failed:\n{stdout}\n{stderr}"
    payloads[name] = json.loads((out / f"bilevel_{name}.json").read_text())
    assert (out / f"bilevel_{name}.png").read_bytes()[:4] == b"\x89PNG"
  return payloads


@pytest.mark.parametrize("name", PROBLEMS)
def test_every_method_runs_every_seed_on_the_same_budget(results, name):
  payload = results[name]
  assert set(payload["runs"]) == METHODS == set(payload["chosen_outer_lr"])
  budget = payload["settings"]["budget"]
  for method, seeds in payload["runs"].items():
    assert len(seeds) == len(payload["settings"]["seeds"])
    for records in seeds:
      evaluations = [r["evaluations"] for r in records]
      seconds = [r["seconds"] for r in records]
      assert evaluations[0] == 0 and evaluations == sorted(evaluations)
      assert seconds == sorted(seconds)
      assert 0.8 * budget <= evaluations[-1] <= 1.25 * budget, method
    assert payload["results"][method]["skipped_hyper_steps"] == [0] * len(seeds), method


def test_every_method_moves_towards_the_known_solution_of_the_quadratic_problem(results):
  payload = results["quadratic"]
  for method, seeds in payload["runs"].items():
    for records in seeds:
      assert records[0]["distance"] == pytest.approx(1.0)
      assert records[-1]["distance"] < 0.5, method
      assert records[-1]["hypergrad_norm"] < records[0]["hypergrad_norm"], method


@pytest.mark.parametrize("name", ("logreg", "cleaning"))
def test_softmax_problems_report_test_accuracy_and_a_reference(results, name):
  payload = results[name]
  label, value = payload["settings"]["reference"]
  assert label and value > 0
  for seeds in payload["runs"].values():
    for records in seeds:
      assert 0.0 < records[-1]["test_acc"] <= 1.0
      assert records[-1]["outer"] < records[0]["outer"]
