"""The README's Python code blocks run as written (the README stays true to the code)."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_python_examples():
  assert BLOCKS


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs(code, tmp_path):
  # A diverged hypergradient warns; as an error it makes the block fail.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"PYTHONWARNINGS": "error"}
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
  )
  assert result.returncode == 0, result.stderr[-3000:]
