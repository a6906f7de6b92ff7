"""The module graph: every lpkernel import at the top of its module, and no cycles.

An import inside a function hides a cycle that only works because of the order
in which modules happen to be loaded; here each module's top-level imports of
lpkernel modules form a graph that must be acyclic (a package's implicit import
of its parent ``__init__`` is not an edge: Python runs it first).
"""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lpkernel"


def _module_name(path: Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _targets(node: ast.AST) -> list[str]:
  """The lpkernel modules an import statement loads."""
  if isinstance(node, ast.Import):
    names = [a.name for a in node.names]
  elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
    # `from pkg import sub` loads pkg.sub when it is a module, else a name of pkg.
    names = [
      f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
      for a in node.names
    ]
  else:
    return []
  return [n for n in names if n == "lpkernel" or n.startswith("lpkernel.")]


def _top_level_edges(tree: ast.Module) -> set[str]:
  edges = set()
  for node in tree.body:
    statements = [node]
    if isinstance(node, ast.Try):  # a guarded optional import
      statements = node.body
    for s in statements:
      edges.update(_targets(s))
  return edges


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_lpkernel_import_inside_a_function(name):
  tree = ast.parse(MODULES[name].read_text())
  nested = [
    f"line {inner.lineno}"
    for outer in ast.walk(tree)
    if isinstance(outer, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    for inner in ast.walk(outer)
    if _targets(inner)
  ]
  assert not nested, f"{name} imports lpkernel modules inside functions: {nested}"


def test_the_module_graph_is_acyclic():
  graph = {
    name: {t for t in _top_level_edges(ast.parse(path.read_text())) if t != name}
    for name, path in MODULES.items()
  }
  # The package __init__ files re-export their submodules: an edge from a module to
  # its own ancestor package is the implicit parent import, not a dependency.
  for name, edges in graph.items():
    graph[name] = {t for t in edges if not name.startswith(t + ".")}
  state: dict[str, str] = {}

  def visit(node: str, path: list[str]) -> None:
    state[node] = "open"
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        cycle = path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
        raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
      if nxt not in state:
        visit(nxt, [*path, nxt])
    state[node] = "done"

  for name in sorted(graph):
    if name not in state:
      visit(name, [name])


IMPLEMENTATIONS = {
  n for n in MODULES if n.rsplit(".", 1)[-1] in ("xla", "pallas_gpu", "pallas_tpu")
}
# The fused GPU kernels reduce each block of logits with the logits kernels; the
# processed op is built on the logits paths' forward kernels (XLA's partials, the
# Pallas row kernels with their group maxima), the fused sweep's blocks and, from
# hidden states, the fused path's GPU token chunks and TPU kernels.
USES_ANOTHER = {
  ("lpkernel.ops.fused.pallas_gpu", "lpkernel.ops.logprobs.pallas_gpu"),
  ("lpkernel.ops.processed.xla", "lpkernel.ops.logprobs.xla"),
  ("lpkernel.ops.processed.xla", "lpkernel.ops.fused.xla"),
  ("lpkernel.ops.processed.pallas_gpu", "lpkernel.ops.logprobs.pallas_gpu"),
  ("lpkernel.ops.processed.pallas_gpu", "lpkernel.ops.fused.pallas_gpu"),
  ("lpkernel.ops.processed.pallas_tpu", "lpkernel.ops.logprobs.pallas_tpu"),
  ("lpkernel.ops.processed.pallas_tpu", "lpkernel.ops.fused.pallas_tpu"),
}


def test_implementations_import_no_other_implementation():
  """What two implementations share lives in a module below them (``ops.blocks``,
  ``ops.fused.matmuls``, ``ops.mosaic``, ``partials``), not in one of them."""
  assert len(IMPLEMENTATIONS) == 9
  for name in sorted(IMPLEMENTATIONS):
    edges = _top_level_edges(ast.parse(MODULES[name].read_text()))
    others = {e for e in edges & IMPLEMENTATIONS if e != name and (name, e) not in USES_ANOTHER}
    assert not others, f"{name} imports the implementations {sorted(others)}"


def test_lpkernel_imports_without_the_pallas_backends_and_names_what_is_missing():
  """A JAX build without Triton's or Mosaic's Pallas backend: importing them fails,
  lpkernel still imports and runs XLA, and a Pallas implementation raises naming
  the missing module."""
  program = textwrap.dedent(
    """
    import sys
    sys.modules["jax.experimental.pallas.triton"] = None  # import raises ImportError
    sys.modules["jax.experimental.pallas.tpu"] = None
    import jax.numpy as jnp
    import lpkernel as lpk
    x, t = jnp.zeros((2, 5)), jnp.array([0, 4])
    print(float(lpk.token_logprobs(x, t)[0]))
    for impl in [lpk.PallasGpuLogits(interpret=True), lpk.PallasTpuLogits(interpret=True)]:
      try:
        lpk.token_logprobs(x, t, implementation=impl)
      except ImportError as e:
        print("refused:", e)
    """
  )
  result = subprocess.run(
    [sys.executable, "-c", program], capture_output=True, text=True, timeout=300, cwd=PACKAGE.parent
  )
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert abs(float(lines[0]) + 1.6094379) < 1e-6  # -log 5
  assert "jax.experimental.pallas.triton" in lines[1] and "implementation='xla'" in lines[1]
  assert "jax.experimental.pallas.tpu" in lines[2]
