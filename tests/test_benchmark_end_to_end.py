"""Smoke test of benchmarks/end_to_end.py: --quick runs and writes its JSON and PNG."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "end_to_end.py"


def test_end_to_end_quick(tmp_path):
  done = subprocess.run(
    [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
  payload = json.loads((tmp_path / "end_to_end.json").read_text())
  assert (tmp_path / "end_to_end.png").stat().st_size > 0
  results = payload["results"]
  assert "Neumann K=20" in results
  steps = payload["config"]["hyper_steps"]
  for name, result in results.items():
    assert len(result["validation_loss"]) == len(result["products"]) == steps, name
    assert result["products_per_hyper_step"] > 0, name
  # The reference reaches its own final loss by construction.
  assert results["Neumann K=20"]["hyper_steps_to_target"] is not None
  # Neumann: 20 terms, plus 4 Lanczos products at the first solve (and every 10th).
  assert results["Neumann K=20"]["products"][0] == 24
  assert results["Nystrom rank 20"]["products"][0] == 21
  assert "target" in done.stdout
