"""Smoke tests of the benchmark scripts: each runs with --quick and writes its JSON.

The four scripts run at once, each in its own subprocess, once per test session.
Nothing here asserts a timing.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = ("speed", "memory", "accuracy", "scale")


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


def test_speed_times_every_method_and_neumann_matches_the_handwritten_floor(results):
  payload = load(results, "speed")
  (width,) = payload["results"]
  expected = {"ih Neumann(alpha)", "ih Neumann(auto)", "ih CG", "floor", "one gradient"}
  assert expected <= set(width["seconds"])
  assert any(name.startswith("unrolled") for name in width["seconds"])
  assert all(seconds > 0 for seconds in width["seconds"].values())
  assert width["ratio_to_floor"]["floor"] == 1.0
  assert width["library_solver_steps"]["ih Neumann(alpha)"] == payload["steps"]
  assert width["cosine_neumann_to_floor"] == pytest.approx(1.0, abs=1e-5)
  costs = width["product_costs"]
  assert {"gradient", "forward-over-reverse", "reverse-over-reverse"} == set(costs)
  assert all(c["flops"] > 0 and c["seconds"] > 0 for c in costs.values())


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


def test_scale_reports_time_and_memory_per_size(results):
  payload = load(results, "scale")
  sizes = [r["hyperparameters"] for r in payload["results"]]
  assert sizes == sorted(sizes) and len(sizes) >= 2
  for r in payload["results"]:
    assert r["seconds"] > 0 and r["gradient_seconds"] > 0 and r["peak_bytes"] > 0
  totals = [r["xla_total_bytes"] for r in payload["results"]]
  assert totals[-1] > totals[0]
  assert (results / "scale.png").stat().st_size > 0
