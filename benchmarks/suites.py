"""Benchmark suites: which shapes, dtypes and passes, built from ``benchmarks.shapes``."""

from __future__ import annotations

from typing import NamedTuple

from benchmarks import shapes


class Case(NamedTuple):
  """One benchmarked problem: a logits or hidden-state shape in one dtype.

  ``methods`` / ``passes``: only these run (the others' rows say so), for a
  shape too large for the slow baselines; None for all.
  """

  shape: shapes.LogitsShape | shapes.HiddenShape
  dtype: str
  methods: tuple[str, ...] | None = None
  passes: tuple[str, ...] | None = None

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
  )
  # Replaying a recorded kept set of 512 ids against the full-vocabulary forward.
  + [
    Case(
      shapes.REPLAY,
      "float32",
      ("lpkernel-fused", "lpkernel-replay", "lpkernel-replay-dv"),
      ("forward",),
    )
  ],  # fmt: skip
  # Longer CPU runs.
  "large": _cases([shapes.LLAMA3_VOCAB, shapes.LLAMA3_LONG], [shapes.FUSED_DEFAULT]),
  # Accelerator-sized shapes.
  "gpu": _cases([shapes.LLAMA2_VOCAB, shapes.LLAMA3_LONG], [], dtypes=("bfloat16", "float32"))
  + _cases([], [shapes.FUSED_GPU], dtypes=("bfloat16",))
  + [
    Case(
      shapes.REPLAY_GPU,
      "bfloat16",
      ("lpkernel-fused", "lpkernel-replay", "lpkernel-replay-pallas", "replay-materialised"),
    )
  ],  # fmt: skip
}

PASSES = ("forward", "forward+backward")
