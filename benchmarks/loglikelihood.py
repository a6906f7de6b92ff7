"""lm-eval-style requests per second: ``lpkernel.flax.Scorer`` on a multiple-choice-like load.

A local task's shape (contexts of 8-200 tokens, continuations of 1-8, four
choices each) scored by a small ``TinyLM`` with a 512-token window, packed
(several requests per row, as its spec allows) and one request per row. Rows
follow the requests' lengths (``lpkernel.flax.loglikelihood.row_width``), so
the rate depends on the requests, not on the window.
"""

from __future__ import annotations

import time

import numpy as np
from flax import nnx

from lpkernel.flax import Scorer, TinyLM, TinyLMConfig

WINDOW = 512
VOCAB = 1024


def requests(n_questions: int = 64, seed: int = 0) -> list[tuple[list[int], list[int]]]:
  """``(context, continuation)`` ids: each question's context with four choices."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n_questions):
    context = [1, *rng.integers(2, VOCAB, rng.integers(8, 200)).tolist()]
    for _ in range(4):
      out.append((context, rng.integers(2, VOCAB, rng.integers(1, 9)).tolist()))
  return out


def measure(repeats: int = 3, quick: bool = False) -> list[dict]:
  """Requests per second, packed and one per row (median of ``repeats`` after a
  warm-up); ``quick``: 4 questions instead of 64."""
  model = TinyLM(
    TinyLMConfig(vocab_size=VOCAB, width=128, num_heads=4, num_layers=2, max_length=WINDOW),
    rngs=nnx.Rngs(0),
  )
  load = requests(4 if quick else 64)
  rows = []
  for pack in (True, False):
    scorer = Scorer.of(model, max_length=WINDOW, batch_size=8, pack=pack)
    scorer.loglikelihood(load)  # compiles every row shape
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      scorer.loglikelihood(load)
      times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    rows.append(
      {
        "method": "lpkernel.flax.Scorer",
        "case": f"{len(load)} mc requests, window {WINDOW}",
        "packed": pack,
        "seconds": seconds,
        "requests_per_second": len(load) / seconds,
      }
    )
  return rows


def table(rows: list[dict]) -> str:
  lines = ["method | case | packing | median s | requests/s"]
  for r in rows:
    packing = "packed" if r["packed"] else "one per row"
    lines.append(
      f"{r['method']} | {r['case']} | {packing} | {r['seconds']:.3f} | "
      f"{r['requests_per_second']:.1f}"
    )
  return "\n".join(lines)
