"""Smoke tests of benchmarks/device_check.sh and the scripts it runs, and of benchmarks/search.py.

`device_check.sh --quick` runs `speed.py --quick`, `scale.py --quick` and `overhead.py --quick`
(each with `--out` its folder, as a user would run them), so the smoke tests of those three
scripts read that one run's output. It and `search.py --quick` run at once, each in its own
subprocess, once per module. Nothing here asserts a timing; the tests check what the numbers
must satisfy whatever the machine.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import search  # noqa: E402


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
  device, searched = tmp_path_factory.mktemp("device_check"), tmp_path_factory.mktemp("search")
  runs = {
    "device_check.sh": subprocess.Popen(
      ["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--quick", str(device)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=os.environ | {"PYTHON": sys.executable},
    ),
    "search.py": subprocess.Popen(
      [sys.executable, str(ROOT / "benchmarks" / "search.py"), "--quick", "--out", str(searched)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    ),
  }
  done = {name: run.communicate(timeout=1800) for name, run in runs.items()}
  for name, (stdout, stderr) in done.items():
    assert runs[name].returncode == 0, f"{name} --quick failed:\n{stdout}\n{stderr}"
  return device, searched


def load(out: Path, name: str) -> dict:
  payload = json.loads((out / f"{name}.json").read_text())
  assert {"machine", "results"} <= set(payload)
  assert {"jax", "backend", "device"} <= set(payload["machine"])
  return payload


def test_device_check_writes_every_table_and_a_summary_of_exit_codes(outputs):
  device, _ = outputs
  for name in ("speed", "scale", "overhead"):
    assert load(device, name)["results"]
    assert (device / f"{name}.txt").stat().st_size > 0
  summary = (device / "summary.txt").read_text().splitlines()
  assert [line.split()[0] for line in summary] == ["speed.py", "scale.py", "overhead.py"]
  assert all(": exit 0 in" in line for line in summary)


def test_device_check_refuses_an_unknown_option():
  done = subprocess.run(
    ["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--fast"],
    capture_output=True,
    text=True,
    check=False,
  )
  assert done.returncode == 2 and "unknown option --fast" in done.stderr


def test_speed_times_every_method_and_neumann_matches_the_handwritten_floor(outputs):
  payload = load(outputs[0], "speed")
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


def test_scale_reports_time_and_memory_per_size(outputs):
  payload = load(outputs[0], "scale")
  sizes = [r["hyperparameters"] for r in payload["results"]]
  assert sizes == sorted(sizes) and len(sizes) >= 2
  for r in payload["results"]:
    assert r["seconds"] > 0 and r["gradient_seconds"] > 0 and r["peak_bytes"] > 0
  totals = [r["xla_total_bytes"] for r in payload["results"]]
  assert totals[-1] > totals[0]
  assert (outputs[0] / "scale.png").stat().st_size > 0


def test_overhead_floor_is_t_plus_c_k_plus_two_over_t_and_the_step_compiles_once(outputs):
  payload = json.loads((outputs[0] / "overhead.json").read_text())
  assert {r["model"] for r in payload["results"]} == {"mlp", "cnn"}
  for result in payload["results"]:
    assert result["weights"] == result["hyperparameters"] > 0
    assert result["c"] > 0 and result["rounds"] == len(result["samples"]["HVP"])
    for point in result["points"]:
      t, k = point["inner_steps"], point["solver_steps"]
      assert point["floor"] == pytest.approx((t + result["c"] * k + 2) / t, rel=1e-12)
      assert point["measured_ratio"] > 0 and point["measured_over_floor"] > 0
    # Each jitted step, called with its own output state, compiled exactly once and holds
    # no host callback: no recompilation and no host round trip inside a hyper step.
    assert set(result["compilations_per_step"].values()) == {1}
    assert set(result["host_callbacks"].values()) == {0}


def test_search_curves_are_running_minima_of_the_recorded_validation_losses(outputs):
  payload = json.loads((outputs[1] / "search.json").read_text())
  assert (outputs[1] / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert {r["method"] for r in payload["runs"]} == set(payload["methods"])
  for run in payload["runs"]:
    assert run["evaluations"] >= len(run["best_val"]) >= 1
    assert all(b < a for a, b in zip(run["best_val"], run["best_val"][1:], strict=False))
    assert all(b > a for a, b in zip(run["times"], run["times"][1:], strict=False))
    assert run["final_best_val"] == run["best_val"][-1]
  for row in payload["results"]:
    medians = {m: v["median_best_val"] for m, v in row["methods"].items()}
    assert row["winner"] == min(medians, key=medians.get)


def test_best_so_far_keeps_the_test_metric_of_the_best_configuration():
  records = [(0.1, 3.0, 0.5), (0.2, 4.0, 0.9), (0.3, 1.0, 0.7), (0.4, 1.0, 0.8)]
  best = search.best_so_far(records)
  assert best == {"times": [0.1, 0.3], "best_val": [3.0, 1.0], "test_at_best": [0.5, 0.7]}
  grid = [0.05, 0.1, 0.25, 0.35]
  assert search.curve(best, grid).tolist() == [math.inf, 3.0, 3.0, 1.0]


def test_search_hypergradient_step_descends_the_ridge_validation_loss():
  import jax.numpy as jnp

  problem = search.diabetes_problem(1, seed=0)
  raw = jnp.asarray([-1.0], jnp.float32)
  state = problem.hyper_init(raw)
  state, value, _ = problem.hyper_step(state)
  assert value == pytest.approx(float(problem.evaluate(raw)[0]), rel=1e-5)
  # Adam's first step is lr * g / (|g| + eps): against the finite-difference slope, by lr = 0.1.
  eps = 1e-2
  slope = (problem.evaluate(raw + eps)[0] - problem.evaluate(raw - eps)[0]) / (2 * eps)
  assert float(jnp.sign(raw - state[0])[0]) == float(jnp.sign(slope))
  assert float(jnp.abs(raw - state[0])[0]) == pytest.approx(0.1, rel=1e-5)
