"""Embed the sources of `implicit_hyper/` into examples/quickstart.ipynb, so the notebook installs
the package on its own (a fresh Colab runtime) while the package is not on PyPI.

    python tools/embed_package.py           # rewrite the notebook's first code cell
    python tools/embed_package.py --check   # exit 1 when the embedded sources are stale

The package's `.py` files and `py.typed` go into a zip archive (sorted names, fixed timestamps and
permissions, so the same sources always give the same bytes), base64-encoded into the notebook's
first code cell. That cell, when `implicit_hyper` cannot be imported, pip-installs the core
dependencies (`[project] dependencies` of pyproject.toml), unpacks the archive into a temporary
folder and puts that folder on `sys.path`; when it can be imported it does nothing. Rerun this
script whenever `implicit_hyper/` changes (tests/test_notebook.py fails until you do).
"""

import argparse
import ast
import base64
import io
import json
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "implicit_hyper"
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"
PYPROJECT = ROOT / "pyproject.toml"
MARKER = "# Installs implicit_hyper when it cannot be imported"
LINE = 96  # characters of base64 per line of the cell
_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can hold

CELL = """\
{marker} (a fresh Colab runtime): its
# sources are embedded below by tools/embed_package.py (do not edit this cell by hand). Once
# implicit_hyper is released, `%pip install implicit_hyper` replaces this cell.
import importlib.util

if importlib.util.find_spec("implicit_hyper") is None:
  import base64
  import io
  import subprocess
  import sys
  import tempfile
  import zipfile

  DEPENDENCIES = {dependencies!r}  # pyproject.toml's [project] dependencies
  ARCHIVE = (  # implicit_hyper {version}: its .py files and py.typed, zipped, base64
{archive}
  )
  subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *DEPENDENCIES])
  folder = tempfile.mkdtemp(prefix="implicit_hyper_")
  zipfile.ZipFile(io.BytesIO(base64.b64decode(ARCHIVE))).extractall(folder)
  sys.path.insert(0, folder)
  importlib.invalidate_caches()
import implicit_hyper

print(f"implicit_hyper {{implicit_hyper.__version__}} from {{implicit_hyper.__path__[0]}}")"""


def package_files(package: Path = PACKAGE) -> list[Path]:
  """The files the archive holds: every `.py` file and `py.typed`, sorted by path."""
  files = [
    p for p in package.rglob("*") if p.is_file() and (p.suffix == ".py" or p.name == "py.typed")
  ]
  return sorted(files, key=lambda p: p.relative_to(package.parent).as_posix())


def build_archive(package: Path = PACKAGE) -> bytes:
  """The package's sources as a deterministic zip archive (names relative to its parent)."""
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w") as archive:
    for path in package_files(package):
      info = zipfile.ZipInfo(path.relative_to(package.parent).as_posix(), date_time=_EPOCH)
      info.compress_type = zipfile.ZIP_DEFLATED
      info.external_attr = 0o644 << 16
      info.create_system = 3  # unix, whatever machine writes it
      archive.writestr(info, path.read_bytes(), compresslevel=9)
  return buffer.getvalue()


def dependencies(pyproject: Path = PYPROJECT) -> list[str]:
  return list(tomllib.loads(pyproject.read_text())["project"]["dependencies"])


def package_version(package: Path = PACKAGE) -> str:
  for node in ast.parse((package / "__init__.py").read_text()).body:
    if isinstance(node, ast.Assign) and any(
      isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets
    ):
      return ast.literal_eval(node.value)
  raise ValueError(f"no __version__ in {package / '__init__.py'}")


def cell_source(archive: bytes, deps: list[str], version: str) -> str:
  text = base64.b64encode(archive).decode("ascii")
  lines = [f'    "{text[i : i + LINE]}"' for i in range(0, len(text), LINE)]
  return CELL.format(marker=MARKER, dependencies=deps, version=version, archive="\n".join(lines))


def install_cell(notebook: dict) -> dict:
  """The notebook's first code cell, which must be the install cell."""
  cell = next(c for c in notebook["cells"] if c["cell_type"] == "code")
  source = "".join(cell["source"])
  if not source.startswith(MARKER):
    raise ValueError(f"the first code cell of {NOTEBOOK} is not the install cell: {source[:80]!r}")
  return cell


def _assigned(source: str, name: str):
  for node in ast.parse(source).body:
    for inner in ast.walk(node):
      if isinstance(inner, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id == name for t in inner.targets
      ):
        return ast.literal_eval(inner.value)
  raise ValueError(f"no {name} = ... in the install cell")


def embedded_archive(notebook_path: Path = NOTEBOOK) -> bytes:
  """The archive bytes embedded in the notebook's install cell."""
  source = "".join(install_cell(json.loads(notebook_path.read_text()))["source"])
  return base64.b64decode(_assigned(source, "ARCHIVE"))


def embedded_dependencies(notebook_path: Path = NOTEBOOK) -> list[str]:
  source = "".join(install_cell(json.loads(notebook_path.read_text()))["source"])
  return list(_assigned(source, "DEPENDENCIES"))


def expected_source() -> str:
  return cell_source(build_archive(), dependencies(), package_version())


def _lines(text: str) -> list[str]:
  lines = text.splitlines(keepends=True)
  return lines  # nbformat's storage: a list of lines, each but the last ending in "\n"


def embed(notebook_path: Path = NOTEBOOK) -> bool:
  """Rewrite the install cell; True when the notebook changed."""
  old = notebook_path.read_text()
  notebook = json.loads(old)
  install_cell(notebook)["source"] = _lines(expected_source())
  new = json.dumps(notebook, sort_keys=True, indent=1, ensure_ascii=False) + "\n"
  if new != old:
    notebook_path.write_text(new)
  return new != old


def is_current(notebook_path: Path = NOTEBOOK) -> bool:
  source = "".join(install_cell(json.loads(notebook_path.read_text()))["source"])
  return source == expected_source()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--check", action="store_true", help="exit 1 when the notebook is stale")
  args = parser.parse_args(argv)
  where = NOTEBOOK.relative_to(ROOT)
  if args.check:
    if is_current():
      print(f"{where}: embedded implicit_hyper is current")
      return 0
    print(f"{where}: embedded implicit_hyper is stale; run `python tools/embed_package.py`")
    return 1
  changed = embed()
  files = len(package_files())
  size = NOTEBOOK.stat().st_size
  state = "updated" if changed else "already current"
  print(f"{where}: {state} ({files} files, {len(build_archive())} B zipped, notebook {size} B)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
