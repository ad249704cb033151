"""examples/quickstart.ipynb executes top to bottom, on 8 CPU devices, with small sizes; the
sources its install cell embeds (tools/embed_package.py) are the checkout's and work alone."""

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from tools import embed_package

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"


def outputs(notebook, kind):
  return [out for cell in notebook.cells for out in cell.get("outputs", ()) if kind(out)]


def test_quickstart_notebook_executes_with_small_sizes_on_all_devices(tmp_path, monkeypatch):
  monkeypatch.setenv("IH_QUICK", "1")  # read by the notebook: tiny sizes
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")  # jupyter_core's paths, without a warning
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(
    notebook, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(tmp_path)}}
  )

  client.execute()  # raises CellExecutionError if a cell fails

  text = "".join(
    out.get("text", "") for out in outputs(notebook, lambda out: out.output_type == "stream")
  )
  assert f"from {ROOT / 'implicit_hyper'}" in text  # the installed package, not the embedded copy
  assert "backend: CPU, 8 x cpu" in text
  assert "quick run: True" in text
  assert "on 8 device(s)" in text
  assert "HypergradientWarning" not in text
  figures = outputs(notebook, lambda out: "image/png" in out.get("data", {}))
  assert len(figures) == 2


def test_embedded_package_is_the_checkout():
  """The notebook's install cell carries exactly the sources of `implicit_hyper/` (never stale)."""
  stale = "examples/quickstart.ipynb embeds stale implicit_hyper sources (or dependencies): "
  stale += "run `python tools/embed_package.py`"
  assert embed_package.embedded_archive() == embed_package.build_archive(), stale
  assert embed_package.embedded_dependencies() == embed_package.dependencies(), stale
  assert embed_package.is_current(), stale


def test_embedded_archive_is_deterministic():
  assert embed_package.build_archive() == embed_package.build_archive()
  names = zipfile.ZipFile(io.BytesIO(embed_package.build_archive())).namelist()
  assert names == sorted(names)
  assert "implicit_hyper/__init__.py" in names and "implicit_hyper/py.typed" in names
  assert all(name.endswith((".py", "py.typed")) for name in names)


# Runs the install cell in a fresh interpreter where implicit_hyper cannot be imported (the
# editable install's finder and the repository are off the import path), as on a fresh Colab
# runtime: the cell must unpack its archive and the package must work from there.
_FRESH_RUNTIME = """
import sys
sys.meta_path = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path = [p for p in sys.path if p not in ("", {root!r})]
import importlib.util
assert importlib.util.find_spec("implicit_hyper") is None, "implicit_hyper still importable"
exec(compile(open({cell!r}).read(), "install-cell", "exec"))
import jax.numpy as jnp
import implicit_hyper as ih
assert ih.__file__.startswith({tmp!r}), ih.__file__
assert not ih.__file__.startswith({root!r}), ih.__file__
inner = lambda w, h: 0.5 * jnp.sum((w - h) ** 2)  # w*(h) = h
outer = lambda w, h: 0.5 * jnp.sum((w - 1.0) ** 2)  # d outer(w*(h)) / dh = h - 1
h = jnp.array([0.5, 2.0])
g = ih.hypergrad(inner, outer, h, h, solver=ih.CG())
assert jnp.allclose(g, h - 1.0, atol=1e-5), g
print("fresh runtime ok:", ih.__version__, ih.__file__)
"""


def test_install_cell_unpacks_a_working_package_without_the_repository(tmp_path):
  source = "".join(embed_package.install_cell(nbformat.read(NOTEBOOK, as_version=4))["source"])
  cell = tmp_path / "install_cell.py"
  cell.write_text(source)
  script = _FRESH_RUNTIME.format(root=str(ROOT), cell=str(cell), tmp=str(tmp_path))
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  env.update(
    JAX_PLATFORMS="cpu",
    TMPDIR=str(tmp_path),  # where the cell unpacks the archive
    PIP_NO_INDEX="1",  # the dependencies are installed here: pip must not need the network
    PIP_DISABLE_PIP_VERSION_CHECK="1",
  )
  result = subprocess.run(
    [sys.executable, "-c", script],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert "fresh runtime ok" in result.stdout
  unpacked = list(tmp_path.glob("implicit_hyper_*/implicit_hyper/__init__.py"))
  assert len(unpacked) == 1, list(tmp_path.iterdir())
