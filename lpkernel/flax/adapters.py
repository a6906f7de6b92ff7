"""Score Flax models: an ``nnx.Module`` called directly, or a linen ``apply``.

A model returns either logits ``[B, T, V]`` (scored with ``lpkernel.score``) or
a pair ``(hidden [B, T, D], unembed [D, V])`` (scored with ``score_hidden``,
never building the logits). ``segment_ids`` and ``positions`` are passed to
models whose call accepts them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import jax
from flax import linen

from lpkernel.flax.model import packed_positions
from lpkernel.scoring import Scores, score, score_hidden


def _accepts(fn: Callable, name: str) -> bool:
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False
  return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _model_kwargs(fn, segment_ids, fused: bool) -> dict:
  kwargs = {}
  if segment_ids is not None and _accepts(fn, "segment_ids"):
    kwargs["segment_ids"] = segment_ids
  if segment_ids is not None and _accepts(fn, "positions"):
    kwargs["positions"] = packed_positions(segment_ids)
  if fused:
    if not _accepts(fn, "return_hidden"):
      raise TypeError("fused=True needs a model whose call accepts return_hidden=True")
    kwargs["return_hidden"] = True
  return kwargs


def scores_from_output(output, tokens, response_mask, **score_kwargs) -> Scores:
  """``Scores`` from a model's output: logits, or ``(hidden, unembed)``."""
  if isinstance(output, tuple) and len(output) == 2:
    hidden, unembed = output
    return score_hidden(hidden, unembed, tokens, response_mask, **score_kwargs)
  if isinstance(output, jax.Array) or hasattr(output, "shape"):
    return score(output, tokens, response_mask, **score_kwargs)
  raise TypeError(f"model output must be logits or (hidden, unembed), got {type(output).__name__}")


def score_model(
  model,
  tokens,
  response_mask,
  *,
  segment_ids=None,
  num_segments=None,
  fused: bool = False,
  **score_kwargs,
) -> Scores:
  """Scores rows with an ``nnx.Module`` (or any callable ``model(tokens, ...)``).

  Args:
    model: called as ``model(tokens, segment_ids=..., positions=...)`` with the
      keywords it accepts; with ``fused=True`` also ``return_hidden=True``.
    tokens, response_mask, segment_ids, num_segments: as for ``lpkernel.score``.
    fused: score from ``(hidden, unembed)`` without materialising logits.
    **score_kwargs: ``temperature``, ``softcap``, tiling configs.
  """
  out = model(tokens, **_model_kwargs(model, segment_ids, fused))
  return scores_from_output(
    out, tokens, response_mask, segment_ids=segment_ids, num_segments=num_segments, **score_kwargs
  )


def score_linen(
  apply_fn,
  variables,
  tokens,
  response_mask,
  *,
  segment_ids=None,
  num_segments=None,
  fused: bool = False,
  **score_kwargs,
) -> Scores:
  """Scores rows with a linen module: ``apply_fn(variables, tokens, ...)``.

  ``apply_fn`` is usually ``module.apply``; keywords are passed as for
  :func:`score_model`.
  """
  # Module.apply takes **kwargs for anything; ask the module's own __call__.
  module = getattr(apply_fn, "__self__", None)
  target = module.__call__ if isinstance(module, linen.Module) else apply_fn
  kwargs = _model_kwargs(target, segment_ids, fused)
  out = apply_fn(variables, tokens, **kwargs)
  return scores_from_output(
    out, tokens, response_mask, segment_ids=segment_ids, num_segments=num_segments, **score_kwargs
  )
