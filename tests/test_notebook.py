"""examples/quickstart.ipynb executes top to bottom, on 8 CPU devices, with small sizes."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


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
  assert "backend: CPU, 8 x cpu" in text
  assert "quick run: True" in text
  assert "on 8 device(s)" in text
  assert "HypergradientWarning" not in text
  figures = outputs(notebook, lambda out: "image/png" in out.get("data", {}))
  assert len(figures) == 2
