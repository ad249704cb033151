"""The docs site: every Python block runs, the API reference is complete, the build is strict.

Each page's ```python blocks run in order in one fresh process (a page reads like a
notebook: later blocks use what earlier ones defined). A ```text block right after a
Python block is that block's printed output, compared exactly. `mkdocs build --strict`
then fails on a broken link, a missing page or an unresolvable API name; CI installs the
``docs`` extra, so a missing mkdocs is a failure here, not a skip.
"""

import importlib.util
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import textwrap
import types

import pytest

import implicit_hyper

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(
  r"^(?P<indent>[ \t]*)```(?P<lang>\w*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S
)
API_ENTRY = re.compile(r"^:::[ \t]+implicit_hyper\.(\w+)[ \t]*$", re.M)

RUNNER = """
import contextlib, io, json, sys
with open(sys.argv[1]) as f:
  blocks = json.load(f)
namespace, outputs = {"__name__": "__main__"}, []
for block in blocks:
  buffer = io.StringIO()
  with contextlib.redirect_stdout(buffer):
    exec(compile(block["code"], block["name"], "exec"), namespace)
  outputs.append(buffer.getvalue())
  with open(sys.argv[2], "w") as f:
    json.dump(outputs, f)
"""


def python_blocks(page: pathlib.Path) -> list[dict]:
  """The page's Python blocks in order, each with the output block that follows it (or None)."""
  text, blocks = page.read_text(), []
  fences = list(FENCE.finditer(text))
  for i, fence in enumerate(fences):
    if fence["lang"] != "python":
      continue
    following = fences[i + 1] if i + 1 < len(fences) else None
    expected = None
    if (
      following
      and following["lang"] == "text"
      and not text[fence.end() : following.start()].strip()
    ):
      expected = textwrap.dedent(following["body"])
    line = text[: fence.start()].count("\n") + 1
    name = f"{page.relative_to(ROOT)}, block {len(blocks)} (line {line})"
    blocks.append({"code": textwrap.dedent(fence["body"]), "expected": expected, "name": name})
  return blocks


PAGES = [p for p in sorted(DOCS.rglob("*.md")) if python_blocks(p)]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _normalise(output: str) -> str:
  return "\n".join(line.rstrip() for line in output.strip("\n").splitlines())


def test_the_docs_have_python_examples_and_mark_all_python_as_python():
  assert len(PAGES) >= 10
  for page in DOCS.rglob("*.md"):
    other = [f["lang"] for f in FENCE.finditer(page.read_text()) if f["lang"] in ("py", "python3")]
    assert not other, f"{page}: mark Python blocks ```python so that they are run"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_page_python_blocks_run_and_print_what_the_page_shows(page, tmp_path):
  blocks = python_blocks(page)
  (tmp_path / "blocks.json").write_text(json.dumps(blocks))
  (tmp_path / "runner.py").write_text(RUNNER)
  # Warnings are errors (an untrusted hypergradient fails the page unless the page
  # catches it); the page chooses its own devices; a multi-host page gets a free port.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env |= {"PYTHONWARNINGS": "error", "COORDINATOR_ADDRESS": f"127.0.0.1:{_free_port()}"}
  result = subprocess.run(
    [sys.executable, str(tmp_path / "runner.py"), "blocks.json", "outputs.json"],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  outputs = json.loads((tmp_path / "outputs.json").read_text())
  for block, output in zip(blocks, outputs, strict=True):
    if block["expected"] is not None:
      assert _normalise(output) == _normalise(block["expected"]), block["name"]


def public_names() -> set[str]:
  names = getattr(implicit_hyper, "__all__", None) or dir(implicit_hyper)
  return {
    name
    for name in names
    if not name.startswith("_") and not isinstance(getattr(implicit_hyper, name), types.ModuleType)
  }


def test_api_reference_documents_every_public_name():
  documented = set()
  for page in (DOCS / "api").glob("*.md"):
    documented |= set(API_ENTRY.findall(page.read_text()))
  missing = sorted(public_names() - documented)
  assert not missing, f"add `::: implicit_hyper.NAME` to a page of docs/api/ for: {missing}"
  assert not sorted(documented - public_names()), "docs/api/ documents names that are not public"


def test_mkdocs_builds_strictly(tmp_path):
  for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
    if importlib.util.find_spec(module) is None:
      pytest.fail(f"{module} is not installed: pip install -e '.[docs]' (CI installs it)")
  env = os.environ | {"NO_MKDOCS_2_WARNING": "1"}
  result = subprocess.run(
    [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  assert (tmp_path / "site" / "api" / "solvers" / "index.html").exists()


def test_changelog_has_a_section_for_this_version():
  changelog = (ROOT / "CHANGELOG.md").read_text()
  assert re.search(rf"^## {re.escape(implicit_hyper.__version__)}\b", changelog, re.M)


def test_citation_file_cites_every_paper_of_the_references_page():
  citation = (ROOT / "CITATION.cff").read_text()
  arxiv = set(re.findall(r"arxiv\.org/abs/([\d.]+)", (DOCS / "references.md").read_text()))
  assert arxiv and not sorted(arxiv - set(re.findall(r"arxiv\.org/abs/([\d.]+)", citation)))


JAXOPT_SYMBOLS = {
  "implicit_diff": ("custom_root", "custom_fixed_point", "root_vjp", "root_jvp"),
  "linear_solve": (
    "solve_cg",
    "solve_normal_cg",
    "solve_gmres",
    "solve_bicgstab",
    "solve_lu",
    "solve_cholesky",
    "solve_inv",
    "solve_iterative_refinement",
  ),
}


def test_migration_page_maps_every_jaxopt_symbol_in_its_table():
  page = (DOCS / "migrating-from-jaxopt.md").read_text()
  rows = {m for m in re.findall(r"^\| `(\w+)\(", page, re.M)}
  missing = [name for names in JAXOPT_SYMBOLS.values() for name in names if name not in rows]
  assert not missing, f"docs/migrating-from-jaxopt.md has no table row for {missing}"
