"""Smoke tests: the MNIST examples run with --quick and write what they promise."""

import json
import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_quick(name: str, out: Path) -> dict:
  """Run ``examples/<name>.py --quick --out <out>`` as a user would; return its metrics."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(
    [sys.executable, str(EXAMPLES / f"{name}.py"), "--quick", "--out", str(out)],
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
  assert metrics["test_acc"]["hyper_cleaning"] > metrics["test_acc"]["noisy_labels"]
  assert (tmp_path / "hyper_cleaning.png").read_bytes()[:8] == PNG_SIGNATURE
