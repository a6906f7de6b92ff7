"""Every notebook runs top to bottom (nbclient), within a time limit."""

import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
ROOT = Path(__file__).resolve().parents[1]


def test_there_are_three_notebooks():
  assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path):
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:
    assert not cell.get("outputs"), f"{path.name} is committed with outputs"
  env_path = os.environ.get("PYTHONPATH", "")
  os.environ["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env_path}" if env_path else str(ROOT)
  client = NotebookClient(
    nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
  )
  start = time.perf_counter()
  client.execute()
  print(f"{path.name}: {time.perf_counter() - start:.1f} s")
