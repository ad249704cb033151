"""Smoke tests: the bilevel examples run with --quick and write what they promise."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_example(name, out):
  """Runs ``examples/<name>.py --quick --out <out>`` in a fresh process; returns its metrics."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # run on one host device, as a user would
  result = subprocess.run(
    [sys.executable, str(EXAMPLES / f"{name}.py"), "--quick", "--out", str(out)],
    cwd=EXAMPLES,
    env=env,
    timeout=300,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr[-4000:]}"
  assert "HypergradientWarning" not in result.stderr, result.stderr[-4000:]  # healthy runs
  return json.loads((out / "metrics.json").read_text())


def assert_png(path):
  assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"


def test_overfit_validation_fits_the_validation_set_better_than_the_test_set(tmp_path):
  metrics = run_example("overfit_validation", tmp_path)
  for key in (
    "num_hyperparams",
    "train_acc",
    "val_acc",
    "test_acc",
    "seconds_per_hyper_step",
    "untuned_test_acc",
  ):
    assert key in metrics
  # --quick: an MLP 64-32-32-10, one decay per weight and per bias.
  assert metrics["num_hyperparams"] == 64 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10
  assert metrics["seconds_per_hyper_step"] > 0
  history = metrics["history"]
  assert history["step"][0] == 1 and history["step"][-1] == metrics["hyper_steps"]
  assert metrics["train_acc"] >= 0.98
  assert metrics["val_acc"] > history["val_acc"][0]
  assert metrics["val_acc"] > metrics["test_acc"]
  assert_png(tmp_path / "overfit_validation.png")


def test_learned_augmentation_reports_paired_seeds_and_a_noisy_augmenter(tmp_path):
  metrics = run_example("learned_augmentation", tmp_path)
  for key in (
    "aug_test_acc_mean",
    "aug_test_acc_std",
    "noaug_test_acc_mean",
    "noaug_test_acc_std",
    "noise_test_acc_mean",
    "frozen_test_acc_mean",
    "vs_noise_gain_mean",
    "num_hyperparams",
  ):
    assert key in metrics
  # The log stds of the warp's six parameters and of each of the 8x8 pixels' noise.
  assert metrics["num_hyperparams"] == 6 + 8 * 8
  runs = metrics["runs"]
  assert len(runs) >= 3
  for method in ("aug", "noaug", "noise", "frozen"):
    accuracies = np.array([run[f"{method}_test_acc"] for run in runs])
    np.testing.assert_allclose(metrics[f"{method}_test_acc_mean"], accuracies.mean())
    np.testing.assert_allclose(metrics[f"{method}_test_acc_std"], accuracies.std(ddof=1))
    assert accuracies.min() > 0.5  # well above chance (0.1) after 200 Adam steps
  # The paired gains are those of the runs.
  gains = np.array([run["aug_test_acc"] - run["noise_test_acc"] for run in runs])
  np.testing.assert_allclose(metrics["vs_noise_gain_mean"], gains.mean())
  # The augmenter changes the images, and differently for different noise.
  assert metrics["augmentation_mean_abs_change"] > 1e-3
  assert metrics["augmentation_sample_std"] > 1e-4
  assert_png(tmp_path / "learned_augmentation.png")
