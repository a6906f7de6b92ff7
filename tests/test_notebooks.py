"""Every notebook runs top to bottom (nbclient), within a time limit."""

import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_three_notebooks():
  assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch):
  """As a user opens it after the README's install: from its own folder (Jupyter's
  working directory), with nothing added to the import path."""
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:
    assert not cell.get("outputs"), f"{path.name} is committed with outputs"
  monkeypatch.delenv("PYTHONPATH", raising=False)
  client = NotebookClient(
    nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
  )
  start = time.perf_counter()
  client.execute()
  print(f"{path.name}: {time.perf_counter() - start:.1f} s")
