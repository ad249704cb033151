"""The README's Python code blocks run as written, and the Quickstart prints what the README shows.

.ci/run also runs the Quickstart (via tools/readme_quickstart.py) in a virtual environment with
only the wheel and its core dependencies at their lower bounds: what its install line gives.
"""

import os
import pathlib
import re
import subprocess
import sys

from tools import readme_quickstart

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
# A diverged hypergradient warns; as an error it makes the block fail.
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"PYTHONWARNINGS": "error"}


def run(code: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300, env=ENV
  )


def test_every_other_readme_python_block_runs(tmp_path):
  quickstart = readme_quickstart.quickstart()[0]
  assert quickstart in BLOCKS
  for code in BLOCKS:
    if code != quickstart:
      result = run(code, tmp_path)
      assert result.returncode == 0, result.stderr[-3000:]


def test_quickstart_prints_the_output_the_readme_shows(tmp_path):
  code, expected = readme_quickstart.quickstart()
  result = run(code, tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert readme_quickstart.normalise(result.stdout) == readme_quickstart.normalise(expected)


def test_quickstart_imports_only_core_dependencies():
  code, _ = readme_quickstart.quickstart()
  imported = set(re.findall(r"^(?:import|from) (\w+)", code, flags=re.M))
  assert imported <= {"jax", "optax", "numpy", "flax", "implicit_hyper"}, imported


def test_quickstart_extraction_writes_the_script_and_its_output(tmp_path):
  readme_quickstart.main([str(tmp_path)])
  code, expected = readme_quickstart.quickstart()
  assert (tmp_path / "quickstart.py").read_text() == code
  assert (tmp_path / "expected.txt").read_text() == readme_quickstart.normalise(expected) + "\n"
