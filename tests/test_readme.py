"""The README's Python examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  assert blocks
  namespace: dict = {}
  for block in blocks:
    code = "\n".join(line[2:] if line.startswith("  ") else line for line in block.splitlines())
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102


def test_readme_states_the_two_commands():
  text = README.read_text()
  assert 'pip install -e ".[bench]" && python -m benchmarks' in text
  assert 'pip install -e ".[test]" && python -m pytest' in text
