"""Smoke tests: each core-engine example runs with --quick and shows what it claims.

Every script runs in a fresh subprocess, as a user would run it, with its output in a
temporary folder; the tests read back metrics.json and check that the figures exist.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TIMEOUT_S = 300  # guards against a hang; --quick runs take well under a minute


def run_quick(script: str, out: Path, *extra: str) -> dict:
  """Run `examples/<script> --quick --out <out>` and return its metrics.json."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # as a user runs it
  result = subprocess.run(
    [sys.executable, str(EXAMPLES / script), "--quick", "--out", str(out), *extra],
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
    env=env,
    check=False,
  )
  assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr[-4000:]}"
  assert "HypergradientWarning" not in result.stderr, result.stderr[-4000:]  # healthy runs
  assert "metrics.json" in result.stdout  # the last line, after the summary table
  return json.loads((out / "metrics.json").read_text())


def assert_pngs(out: Path, *names: str) -> None:
  for name in names:
    path = out / name
    assert path.is_file(), f"missing figure {path}"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"


@pytest.fixture(scope="module")
def distillation(tmp_path_factory):
  out = tmp_path_factory.mktemp("dataset_distillation")
  return run_quick("dataset_distillation.py", out), out


@pytest.fixture(scope="module")
def inverse_comparison(tmp_path_factory):
  out = tmp_path_factory.mktemp("inverse_comparison")
  return run_quick("inverse_comparison.py", out), out


@pytest.fixture(scope="module")
def imaml(tmp_path_factory):
  out = tmp_path_factory.mktemp("imaml_sinusoid")
  return run_quick("imaml_sinusoid.py", out), out


def test_distillation_writes_metrics_and_image_grid(distillation):
  metrics, out = distillation
  for key in ("distilled_test_acc", "class_mean_test_acc", "random_real_test_acc"):
    assert 0.0 <= metrics[key] <= 1.0, key
  assert metrics["num_hyperparams"] == 10 * 8 * 8
  assert_pngs(out, "distilled_images.png", "outer_loss.png")


def test_distilled_images_beat_class_means_and_random_real_images(distillation):
  metrics, _ = distillation
  assert metrics["distilled_test_acc"] > metrics["class_mean_test_acc"]
  assert metrics["class_mean_test_acc"] > metrics["random_real_test_acc"] + 0.1
  assert metrics["distilled_test_acc"] >= 0.90


def test_distillation_trains_logistic_regression_to_its_optimum(distillation):
  metrics, _ = distillation
  assert metrics["inner_gradient_norm"] < 1e-4


def test_inverse_comparison_writes_cosine_and_error_of_each_solver(inverse_comparison):
  metrics, out = inverse_comparison
  names = ["identity"] + [f"{family}_{k}" for family in ("neumann", "cg") for k in (1, 5, 20)]
  for name in names:
    assert -1.0 - 1e-12 <= metrics[f"{name}_cosine"] <= 1.0 + 1e-12, name
    assert math.isfinite(metrics[f"{name}_rel_error"]) and metrics[f"{name}_rel_error"] >= 0
  assert metrics["num_hyperparams"] == 10
  assert_pngs(out, "inverse_comparison.png")


def test_cg_with_more_steps_than_unknowns_is_exact(inverse_comparison):
  metrics, _ = inverse_comparison
  # 11 unknowns (10 weights and a bias): CG is exact after 11 steps up to round-off.
  assert metrics["cg_20_rel_error"] < 1e-9
  assert metrics["cg_20_cosine"] > 1.0 - 1e-12


def test_one_step_approximations_are_all_parallel_to_the_identity(inverse_comparison):
  metrics, _ = inverse_comparison
  # Identity, one Neumann term and one CG step all return a multiple of dL_V/dtheta.
  for name in ("neumann_1", "cg_1"):
    assert metrics[f"{name}_cosine"] == pytest.approx(metrics["identity_cosine"], abs=1e-10)


def test_more_neumann_terms_approximate_better(inverse_comparison):
  metrics, _ = inverse_comparison
  assert metrics["neumann_20_rel_error"] < metrics["neumann_5_rel_error"]
  assert metrics["neumann_5_rel_error"] < metrics["neumann_1_rel_error"]
  assert metrics["neumann_20_cosine"] > metrics["identity_cosine"]


def test_imaml_writes_metrics_and_task_figure(imaml):
  metrics, out = imaml
  for key in ("imaml_mse", "pretrain_mse"):
    assert math.isfinite(metrics[key]) and metrics[key] > 0, key
  assert_pngs(out, "imaml_sinusoid.png", "meta_training.png")


def test_imaml_meta_gradient_lowers_the_adapted_query_loss(imaml):
  metrics, _ = imaml
  # 300 meta steps are too few for the held-out comparison to be safe from chance
  # (the default run's is); the meta-training loss must still fall clearly.
  assert metrics["imaml_meta_loss_last_100"] < 0.9 * metrics["imaml_meta_loss_first_100"]
