"""The exploration notebook executes cell by cell without error."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "workflows" / "explore.ipynb"


def test_explore_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("H5DASK_WORKFLOWS", str(NOTEBOOK.parent))
    monkeypatch.setenv("MPLBACKEND", "agg")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=240, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("labels" in h and "images" in h for h in html)  # the file's table
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plot
    assert (tmp_path / "explore-data" / "dataset.h5").exists()
