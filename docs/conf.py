"""Sphinx configuration: MyST pages, notebooks executed at build time (myst-nb),
the API reference from the docstrings (autodoc + napoleon), and a results page
generated from the committed benchmark JSON. Built by ``tests/test_docs.py``
with warnings as errors:

    sphinx-build -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from results import write_results_page  # noqa: E402

project = "lpkernel"
author = "the lpkernel authors"
extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
myst_enable_extensions = ["colon_fence"]
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
html_theme = "furo"
html_title = "lpkernel"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # Attributes sections: no second description of NamedTuple fields

# Notebooks: executed when the site is built; a failing cell fails the build.
nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_timeout = 600

# What the build generates (ignored by git): the notebooks' copies, the results
# page with its plots, the changelog page.
(HERE / "notebooks").mkdir(exist_ok=True)
for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
  shutil.copy(notebook, HERE / "notebooks" / notebook.name)
write_results_page(ROOT, HERE)
(HERE / "changelog.md").write_text("```{include} ../CHANGELOG.md\n:relative-docs: docs/\n```\n")
