"""The site's formulas render in a browser with no network: MathJax ships with the site.

The site is built (`mkdocs build --strict`), and each page with math is opened from disk in
headless Chromium, which runs the page's scripts before dumping the DOM. The text a reader sees
(the DOM's text outside scripts and styles) must hold no TeX source: no `\\[`, `\\(` or TeX
command such as `\\alpha` left unrendered, whether MathJax failed to load or the TeX sat in inline
code, where MathJax does not look. CI installs Chromium (Debian's `chromium`) in `.ci/run`, so a
missing browser is a failure here, not a skip.
"""

import html.parser
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Pages that must have formulas (every page with one is checked).
MATH_PAGES = ("api/solvers", "api/decorators", "api/hypergradients", "api/loop")
TEX = re.compile(r"\\(?:\[|\(|[A-Za-z]{2,})")


class _VisibleText(html.parser.HTMLParser):
  """The text of an HTML document outside <script> and <style>."""

  def __init__(self) -> None:
    super().__init__()
    self.hidden, self.parts = 0, []

  def handle_starttag(self, tag, attrs):
    self.hidden += tag in ("script", "style")

  def handle_endtag(self, tag):
    self.hidden -= tag in ("script", "style")

  def handle_data(self, data):
    if not self.hidden:
      self.parts.append(data)


def visible_text(document: str) -> str:
  parser = _VisibleText()
  parser.feed(document)
  return "".join(parser.parts)


def leftover_tex(text: str) -> list[str]:
  """Each piece of TeX source in `text`, with 40 characters of context."""
  return [text[max(0, m.start() - 40) : m.end() + 40] for m in TEX.finditer(text)]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("site")
  result = subprocess.run(
    [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env=os.environ | {"NO_MKDOCS_2_WARNING": "1"},
  )
  assert result.returncode == 0, result.stderr[-4000:]
  return out


def rendered_dom(page: pathlib.Path, profile: pathlib.Path) -> str:
  browser = shutil.which("chromium") or shutil.which("chromium-browser")
  if browser is None:
    pytest.fail("chromium is not installed: apt-get install -y chromium (.ci/run installs it)")
  result = subprocess.run(
    [
      browser,
      "--headless",
      "--no-sandbox",  # CI runs as root
      "--disable-gpu",
      f"--user-data-dir={profile}",
      "--virtual-time-budget=20000",  # ms of page time for the scripts to finish typesetting
      "--dump-dom",
      page.as_uri(),
    ],
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_the_tex_detector_flags_raw_tex_and_passes_prose():
  assert leftover_tex(r"iff \alpha \lambda_max < 2 and \[ A^{-1} b \]") != []
  assert leftover_tex("α λ_max < 2; a path C:\\ and a newline \\n") == []


def test_pages_load_no_script_from_the_network(site):
  for path in site.rglob("*.html"):
    document = path.read_text()
    sources = re.findall(r"<script[^>]*\ssrc=\"([^\"]+)\"", document)
    assert not [s for s in sources if re.match(r"(https?:)?//", s)], (path, sources)


def test_math_renders_offline_and_no_tex_source_shows(site, tmp_path):
  pages = sorted(
    path.parent.relative_to(site).as_posix()
    for path in site.rglob("index.html")
    if 'class="arithmatex"' in path.read_text()
  )
  assert set(MATH_PAGES) <= set(pages), pages
  for i, page in enumerate(pages):
    document = rendered_dom(site / page / "index.html", tmp_path / f"profile{i}")
    assert "<mjx-container" in document, f"{page}: MathJax typeset nothing"
    assert leftover_tex(visible_text(document)) == [], page
