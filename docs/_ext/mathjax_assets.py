"""MkDocs hook: publish MathJax with the site, so the formulas render offline.

The MathJax files come from the `django-static-mathjax` wheel (MathJax 3.2.2's browser build as
package data, no Django needed), which the ``docs`` extra installs. The site gets the combined
TeX/MathML-to-HTML component and the pieces it loads on demand (TeX extensions, the CHTML
fonts, the accessibility menu) under ``javascripts/mathjax/``; no page loads anything from a CDN.
"""

import importlib.util
from pathlib import Path

from mkdocs.structure.files import File
from mkdocs.structure.files import Files

TARGET = "javascripts/mathjax"
# Paths under MathJax's es5/ folder: the bundle the pages load and what it loads lazily.
SHIPPED = ("tex-mml-chtml.js", "input/tex", "input/mml", "output/chtml", "ui", "a11y")


def mathjax_root() -> Path:
  spec = importlib.util.find_spec("mathjax")
  root = Path(spec.origin).parent / "static" / "mathjax" / "es5" if spec and spec.origin else None
  if root is None or not (root / "tex-mml-chtml.js").is_file():
    raise RuntimeError(
      "MathJax's files are missing: pip install -e '.[docs]' (it installs django-static-mathjax)"
    )
  return root


def on_files(files: Files, config) -> Files:
  root = mathjax_root()
  for shipped in SHIPPED:
    path = root / shipped
    for source in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
      relative = source.relative_to(root).as_posix()
      files.append(File.generated(config, f"{TARGET}/{relative}", abs_src_path=str(source)))
  return files
