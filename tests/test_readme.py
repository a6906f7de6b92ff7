"""The README's Python examples run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_blocks():
  assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_each_readme_python_block_runs_on_its_own(index):
  lines = BLOCKS[index].splitlines()
  indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
  code = "\n".join(line[indent:] for line in lines)
  exec(compile(code, f"README block {index}", "exec"), {})  # noqa: S102  a fresh namespace


def test_readme_states_the_two_commands():
  text = README.read_text()
  assert 'pip install -e ".[bench]" && python -m benchmarks' in text
  assert 'pip install -e ".[test]" && python -m pytest' in text
