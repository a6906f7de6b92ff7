"""The documentation: the README's two commands and links, every Python example
in the README and the guides runs as written, and the site builds with warnings
as errors (the notebooks executed, the API reference from the docstrings)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [
  README,
  *sorted((ROOT / "docs").glob("*.md")),
  *sorted((ROOT / "docs" / "guides").glob("*.md")),
]
GENERATED = {"results.md", "changelog.md"}  # written by docs/conf.py at build time
PAGES = [p for p in PAGES if p.name not in GENERATED or p.parent != ROOT / "docs"]

BLOCKS = [
  pytest.param(block, id=f"{page.relative_to(ROOT)}-{i}")
  for page in PAGES
  for i, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))
]


def test_the_readme_and_the_guides_have_examples():
  readme = [b for b in BLOCKS if b.id.startswith("README.md")]
  assert len(readme) >= 1 and len(BLOCKS) >= 5


@pytest.mark.parametrize("block", BLOCKS)
def test_each_python_example_runs_on_its_own(block):
  lines = block.splitlines()
  indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
  code = "\n".join(line[indent:] for line in lines)
  exec(compile(code, "example", "exec"), {})  # noqa: S102  a fresh namespace


def test_readme_states_the_two_commands():
  text = README.read_text()
  assert 'pip install -e ".[bench]" && python -m benchmarks' in text
  assert 'pip install -e ".[test]" && python -m pytest' in text


def test_readme_is_short_and_every_link_resolves():
  text = README.read_text()
  assert len(text.splitlines()) <= 250
  links = re.findall(r"\]\(([^)#]+)\)", text)
  assert links
  for link in links:
    assert (ROOT / link).exists(), f"README links to {link}, which does not exist"


@pytest.mark.long
def test_the_documentation_builds_with_warnings_as_errors(tmp_path):
  """Sphinx with MyST, myst-nb (executing the notebooks: a failing cell fails the
  build), autodoc of the public modules and the generated results page."""
  result = subprocess.run(
    [sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-q", "-b", "html", "docs",
     str(tmp_path / "html")],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=900,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-4000:]
  html = tmp_path / "html"
  for page in ["index", "api", "results", "guides/scoring", "notebooks/01_chain_rule"]:
    assert (html / f"{page}.html").exists(), page
  api = (html / "api.html").read_text()
  assert "lpkernel.score" in api and "LogitsImplementation" in api
  notebook = (html / "notebooks" / "02_response_only_sft.html").read_text()
  assert "cell_output" in notebook  # rendered with its outputs
