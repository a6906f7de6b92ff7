"""``python -m benchmarks --tune``: lpkernel's tuned table, measured on this machine.

For each fused case of the suite, times the XLA fused implementation's
forward+backward under each candidate configuration (the heuristics' choice
and its alternative: bfloat16 / float16 matmuls as they are, or upcast to
float32 block by block), and records, per dtype, the fastest over the suite's
cases in lpkernel's tuned table (:mod:`lpkernel.ops.tuning`), which
``implementation=None`` then reads on this machine.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import lpkernel as lpk
from benchmarks.runner import make_inputs, measure
from benchmarks.suites import Case
from lpkernel import ops
from lpkernel.ops import tuning


def candidates(dtype: str) -> list[dict]:
  """``FusedConfig`` fields to time for a dtype (one when there is nothing to choose)."""
  if jnp.dtype(dtype) == jnp.float32:
    return [{"dot_dtype": None}]
  return [{"dot_dtype": None}, {"dot_dtype": "float32"}]


def _time(inp: dict, fields: dict, repeats: int) -> float:
  """Median ms of the fused forward+backward on a case's inputs under ``fields``."""
  impl = lpk.XlaFused(lpk.FusedConfig(**fields))

  def loss(h, w):
    return jnp.sum(lpk.fused_token_logprobs(h, w, inp["targets"], implementation=impl))

  timing, _ = measure(
    jax.value_and_grad(loss, argnums=(0, 1)), (inp["hidden"], inp["unembed"]), repeats
  )
  return timing.median_ms


def tune(cases: list[Case], repeats: int) -> list[dict]:
  """Times every candidate on every fused case, records the fastest per dtype, and
  returns the rows (case, dtype, fields, median ms, chosen)."""
  platform = jax.default_backend()
  rows = []
  for case in cases:
    if not case.fused:
      continue
    inp = make_inputs(case)  # once per case, whatever the candidates
    for fields in candidates(case.dtype):
      ms = _time(inp, fields, repeats)
      rows.append({"case": case.label, "dtype": case.dtype, "config": fields, "median_ms": ms})
  for dtype in sorted({r["dtype"] for r in rows}):
    total: dict[str, float] = {}
    for r in rows:
      if r["dtype"] == dtype:
        total[repr(r["config"])] = total.get(repr(r["config"]), 0.0) + r["median_ms"]
    best = min(candidates(dtype), key=lambda f: total[repr(f)])
    tuning.record("fused", "xla", platform, dtype, {"config": best})
    for r in rows:
      if r["dtype"] == dtype:
        r["chosen"] = r["config"] == best
  return rows


def configurations(cases: list[Case]) -> dict[str, str]:
  """What ``implementation=None`` runs for each case on this machine (heuristics and
  tuned table): the benchmark JSON records it beside the times."""
  out = {}
  for case in cases:
    s, dtype = case.shape, jnp.dtype(case.dtype)
    if case.fused:
      impl = ops.fused_implementation(None, ((s.tokens, s.width, s.vocab), dtype))
    else:
      impl = ops.logits_implementation(None, ((s.batch * s.time, s.vocab), dtype))
    out[case.label] = repr(impl)
  return out


def table(rows: list[dict]) -> str:
  lines = [f"{'case':<28} {'config':<28} {'median ms':>10}  chosen"]
  for r in rows:
    lines.append(
      f"{r['case']:<28} {r['config']!r:<28} {r['median_ms']:>10.1f}  {'*' if r['chosen'] else ''}"
    )
  return "\n".join(lines)
