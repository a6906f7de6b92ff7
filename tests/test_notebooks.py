"""The notebooks are committed without outputs; the documentation build
(``tests/test_docs.py``) executes each top to bottom and renders it with its
outputs, from a folder of its own (as Jupyter opens it), with nothing added to
the import path."""

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_three_notebooks():
  assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:
    assert not cell.get("outputs"), f"{path.name} is committed with outputs"
