"""Score Flax models: an ``nnx.Module`` called directly, or a linen ``apply``.

A model returns either logits ``[B, T, V]`` (scored with ``lpkernel.score``) or
a pair ``(hidden [B, T, D], unembed [D, V])`` (scored with ``score_hidden``,
never building the logits). ``segment_ids`` and ``positions`` are passed to
models whose call accepts them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen

from lpkernel.flax.model import packed_positions
from lpkernel.fused import fused_token_stats
from lpkernel.logprobs import token_logprobs_and_greedy
from lpkernel.scoring import Scores, score, score_hidden, score_rows


def _accepts(fn: Callable, name: str) -> bool:
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False
  return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def model_kwargs(fn: Callable, segment_ids: jax.Array | None, fused: bool) -> dict:
  """The keywords ``fn`` is called with: packing information it accepts, ``return_hidden``."""
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


def scores_from_output(
  output: Any,
  tokens: jax.Array,
  response_mask: jax.Array,
  *,
  drops_last: bool = False,
  **score_kwargs: Any,
) -> Scores:
  """``Scores`` from a model's output: logits, or ``(hidden, unembed)``.

  Args:
    output: ``[B, T(-1), V]`` logits or ``(hidden [B, T(-1), D], unembed [D, V])``.
    drops_last: the model was fed ``tokens[:, :-1]`` (as lm-eval feeds it), so
      its output has ``T - 1`` rows; the last token, which predicts nothing, is
      never an input.
  """
  fused = isinstance(output, tuple) and len(output) == 2
  if not fused and not (isinstance(output, jax.Array) or hasattr(output, "shape")):
    raise TypeError(
      f"model output must be logits or (hidden, unembed), got {type(output).__name__}"
    )
  if not drops_last:
    if fused:
      return score_hidden(*output, tokens, response_mask, **score_kwargs)
    return score(output, tokens, response_mask, **score_kwargs)
  segment_ids = score_kwargs.pop("segment_ids", None)
  num_segments = score_kwargs.pop("num_segments", None)
  rows = output[0] if fused else output
  if rows.shape[:2] != (tokens.shape[0], tokens.shape[1] - 1):
    raise ValueError(f"model output has {rows.shape[:2]=} for tokens {tokens.shape=} minus one")

  def per_token(targets):
    if fused:
      stats = fused_token_stats(*output, targets[:, :-1], **score_kwargs)
      lp, greedy = stats.logprobs, stats.greedy
    else:
      lp, greedy = token_logprobs_and_greedy(output, targets[:, :-1], **score_kwargs)
    # The last row predicts nothing and is never scored.
    return (
      jnp.concatenate([lp, jnp.zeros_like(lp[:, :1])], axis=1),
      jnp.concatenate([greedy, jnp.zeros_like(greedy[:, :1])], axis=1),
      None,
    )

  return score_rows(
    tokens, response_mask, segment_ids, num_segments, per_token, ("tokens", tokens.shape)
  )[0]


def score_model(
  model: Callable,
  tokens: jax.Array,
  response_mask: jax.Array,
  *,
  segment_ids: jax.Array | None = None,
  num_segments: int | None = None,
  fused: bool = False,
  **score_kwargs: Any,
) -> Scores:
  """Scores rows with an ``nnx.Module`` (or any callable ``model(tokens, ...)``).

  Args:
    model: called as ``model(tokens, segment_ids=..., positions=...)`` with the
      keywords it accepts; with ``fused=True`` also ``return_hidden=True``.
    tokens, response_mask, segment_ids, num_segments: as for ``lpkernel.score``.
    fused: score from ``(hidden, unembed)`` without materialising logits.
    **score_kwargs: ``temperature``, ``softcap``, tiling configs.
  """
  out = model(tokens, **model_kwargs(model, segment_ids, fused))
  return scores_from_output(
    out, tokens, response_mask, segment_ids=segment_ids, num_segments=num_segments, **score_kwargs
  )


def score_linen(
  apply_fn: Callable,
  variables: Any,
  tokens: jax.Array,
  response_mask: jax.Array,
  *,
  segment_ids: jax.Array | None = None,
  num_segments: int | None = None,
  fused: bool = False,
  **score_kwargs: Any,
) -> Scores:
  """Scores rows with a linen module: ``apply_fn(variables, tokens, ...)``.

  ``apply_fn`` is usually ``module.apply``; keywords are passed as for
  :func:`score_model`.
  """
  # Module.apply takes **kwargs for anything; ask the module's own __call__.
  module = getattr(apply_fn, "__self__", None)
  target = module.__call__ if isinstance(module, linen.Module) else apply_fn
  kwargs = model_kwargs(target, segment_ids, fused)
  out = apply_fn(variables, tokens, **kwargs)
  return scores_from_output(
    out, tokens, response_mask, segment_ids=segment_ids, num_segments=num_segments, **score_kwargs
  )
