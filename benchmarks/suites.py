"""Benchmark suites: which shapes, dtypes and passes, built from ``benchmarks.shapes``."""

from __future__ import annotations

from typing import NamedTuple

from benchmarks import shapes


class Case(NamedTuple):
  """One benchmarked problem: a logits or hidden-state shape in one dtype."""

  shape: shapes.LogitsShape | shapes.HiddenShape
  dtype: str

  @property
  def fused(self) -> bool:
    return isinstance(self.shape, shapes.HiddenShape)

  @property
  def label(self) -> str:
    s = self.shape
    dims = (
      f"N{s.tokens} D{s.width} V{s.vocab}" if self.fused else f"B{s.batch} T{s.time} V{s.vocab}"
    )
    return f"{dims} {self.dtype}"


def _cases(logits, hidden, dtypes=("float32", "bfloat16")):
  return [Case(s, d) for s in logits for d in dtypes] + [Case(s, d) for s in hidden for d in dtypes]


SUITES: dict[str, list[Case]] = {
  # Seconds: tiny shapes for the smoke test and quick checks.
  "quick": _cases([shapes.TINY], [shapes.TINY_HIDDEN]),
  # A few minutes on 2 CPU cores.
  "default": _cases(
    [shapes.SMALL_VOCAB, shapes.LLAMA2_VOCAB, shapes.LLAMA3_VOCAB], [shapes.FUSED_MEMORY]
  ),
  # Longer CPU runs.
  "large": _cases([shapes.LLAMA3_VOCAB, shapes.LLAMA3_LONG], [shapes.FUSED_DEFAULT]),
  # Accelerator-sized shapes.
  "gpu": _cases([shapes.LLAMA2_VOCAB, shapes.LLAMA3_LONG], [], dtypes=("bfloat16", "float32"))
  + _cases([], [shapes.FUSED_GPU], dtypes=("bfloat16",)),
}

PASSES = ("forward", "forward+backward")
