"""The README's Quickstart as a script and its expected output, for a test in a bare environment.

    python -m tools.readme_quickstart DIR    # writes DIR/quickstart.py and DIR/expected.txt

The Quickstart is the README's first ```python block; the ```text block right after it is what
it prints. `.ci/run` writes both into a scratch folder and runs the script there with the
interpreter of a virtual environment that holds only the wheel and its core dependencies at their
lower bounds, so the Quickstart is checked against exactly what its install line gives;
tests/test_readme.py runs the same pair in the development environment.
"""

import argparse
import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
QUICKSTART = re.compile(
  r"^## Quickstart\n.*?```python\n(.*?)```\n(?:(?!```).)*```text\n(.*?)```", re.M | re.S
)


def quickstart(text: str | None = None) -> tuple[str, str]:
  """(code, expected output) of the README's Quickstart section."""
  match = QUICKSTART.search(README.read_text() if text is None else text)
  if match is None:
    raise ValueError("README.md: no ## Quickstart with a ```python block and its ```text output")
  return match[1], match[2]


def normalise(output: str) -> str:
  return "\n".join(line.rstrip() for line in output.strip("\n").splitlines())


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("out", type=Path, help="folder for quickstart.py and expected.txt")
  args = parser.parse_args(argv)
  code, expected = quickstart()
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "quickstart.py").write_text(code)
  (args.out / "expected.txt").write_text(normalise(expected) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
