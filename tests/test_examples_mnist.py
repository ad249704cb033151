"""Smoke tests: the MNIST examples run with --quick and write what they promise."""

import json
import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_quick(name: str, out: Path, *args: str, warnings_as_errors: bool = False) -> dict:
  """Run ``examples/<name>.py --quick --out <out> [args]`` as a user would; return its metrics.

  With `warnings_as_errors`, a RuntimeWarning (`ih.HypergradientWarning` among them) fails it.
  """
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  flags = ["-W", "error::RuntimeWarning"] if warnings_as_errors else []
  command = [sys.executable, *flags, str(EXAMPLES / f"{name}.py")]
  result = subprocess.run(
    [*command, "--quick", "--out", str(out), *args],
    capture_output=True,
    text=True,
    timeout=300,
    env=env,
    check=False,
  )
  assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr[-4000:]}"
  assert "HypergradientWarning" not in result.stderr, result.stderr[-4000:]  # healthy runs
  return json.loads((out / "metrics.json").read_text())


def test_hyper_cleaning_weights_flag_wrong_labels_and_beat_training_on_them(tmp_path):
  metrics = run_quick("hyper_cleaning", tmp_path)
  models = {"hyper_cleaning", "noisy_labels", "validation_only", "clean_half_oracle"}
  assert models <= metrics["test_acc"].keys()
  assert {"auc", "precision", "recall"} <= metrics["detection"].keys()
  for key in ("gap_to_oracle", "seconds_per_hyper_step", "solves", "history"):
    assert key in metrics
  assert metrics["sizes"] == {"train": 500, "validation": 250, "test": 500}
  assert 0.4 < metrics["wrong_label_fraction"] < 0.5  # half replaced, a tenth by the same label
  assert metrics["history"]["step"][-1] == metrics["hyper_steps"]
  assert metrics["detection"]["auc"] > 0.7
  assert metrics["solves"]["flagged_hypergradients"] == 0  # CG converged to tol every step
  assert metrics["test_acc"]["hyper_cleaning"] > metrics["test_acc"]["noisy_labels"]
  assert (tmp_path / "hyper_cleaning.png").read_bytes()[:8] == PNG_SIGNATURE


def test_distilled_mnist_images_train_a_better_classifier_than_random_real_images(tmp_path):
  metrics = run_quick(
    "dataset_distillation", tmp_path, "--dataset", "mnist", warnings_as_errors=True
  )
  assert metrics["num_hyperparams"] == 10 * 28 * 28
  assert (metrics["num_train"], metrics["num_test"]) == (3000, 2000)
  solves = metrics["hypergradient_solves"]
  assert solves["flagged"] == 0 and solves["max_stationarity"] < 1e-2
  assert metrics["distilled_test_acc"] > metrics["random_real_test_acc"]
  # Trained from scratch to a small gradient, the baselines included.
  assert metrics["class_mean_inner_gradient_norm"] < 1e-4
  assert (tmp_path / "distilled_images.png").read_bytes()[:8] == PNG_SIGNATURE


def test_overfit_validation_on_mnist_has_one_hidden_layer_and_counts_skipped_steps(tmp_path):
  metrics = run_quick("overfit_validation", tmp_path, "--dataset", "mnist")
  width = metrics["width"]
  assert metrics["depth"] == 1
  assert metrics["num_hyperparams"] == 784 * width + width + width * 10 + 10
  assert 0 <= metrics["skipped_hyper_steps"] < metrics["hyper_steps"]
  assert metrics["seconds_per_hyper_step"] > 0
  assert (tmp_path / "overfit_validation.png").read_bytes()[:8] == PNG_SIGNATURE
