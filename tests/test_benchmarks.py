"""Smoke tests of benchmarks/memory.py and benchmarks/accuracy.py: each runs with --quick.

The two scripts run at once, each in its own subprocess, once per module. speed.py and
scale.py run with --quick inside `device_check.sh --quick`, so their smoke tests read that
run's output (tests/test_benchmarks_overhead_search.py) instead of running them twice.
Nothing here asserts a timing.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = ("memory", "accuracy")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  out = tmp_path_factory.mktemp("benchmarks")
  runs = {
    name: subprocess.Popen(
      [sys.executable, str(BENCHMARKS / f"{name}.py"), "--quick", "--out", str(out)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for name in SCRIPTS
  }
  for name, run in runs.items():
    stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, f"{name}.py --quick failed:\n{stdout}\n{stderr}"
  return out


def load(out: Path, name: str) -> dict:
  payload = json.loads((out / f"{name}.json").read_text())
  assert {"machine", "results"} <= set(payload)
  assert {"jax", "backend", "device"} <= set(payload["machine"])
  return payload


def test_memory_of_implicit_hypergradient_is_flat_in_training_steps(results):
  payload = load(results, "memory")
  by_method = {}
  for r in payload["results"]:
    assert r["finite"] and r["peak_bytes"] > 0
    by_method.setdefault(r["method"], []).append(r)
  implicit, unrolled = by_method["implicit"], by_method["unrolled"]
  assert len({r["xla_temp_bytes"] for r in implicit}) == 1
  assert unrolled[-1]["xla_temp_bytes"] > unrolled[0]["xla_temp_bytes"]


def test_accuracy_direct_solve_equals_the_closed_form_ridge_hypergradient(results):
  payload = load(results, "accuracy")
  problems = {r["problem"]: r for r in payload["results"]}
  assert set(problems) == {"ridge", "logistic"}
  for result in problems.values():
    assert {"Neumann(alpha=1/lambda_max)", "Neumann(alpha=None)", "CG", "Direct"} <= set(
      result["curves"]
    )
    assert result["inner_gradient_norm_at_solution"] < 1e-10
  assert problems["ridge"]["curves"]["Direct"]["relative_error"][0] < 1e-10
  assert (results / "accuracy.png").stat().st_size > 0
