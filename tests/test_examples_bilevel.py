"""Smoke tests: the bilevel examples run with --quick and write what they promise."""

import json
import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_example(name, out):
  """Runs ``examples/<name>.py --quick --out <out>`` in a fresh process; returns its metrics."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # run on one host device, as a user would
  subprocess.run(
    [sys.executable, str(EXAMPLES / f"{name}.py"), "--quick", "--out", str(out)],
    check=True,
    cwd=EXAMPLES,
    env=env,
    timeout=300,
  )
  return json.loads((out / "metrics.json").read_text())


def assert_png(path):
  assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"


def test_overfit_validation_fits_the_validation_set_better_than_the_test_set(tmp_path):
  metrics = run_example("overfit_validation", tmp_path)
  for key in ("num_hyperparams", "train_acc", "val_acc", "test_acc", "seconds_per_hyper_step"):
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
