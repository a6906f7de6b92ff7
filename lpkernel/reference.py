"""The plain definitions, in straightforward ``jnp``: the yardstick for every
implementation (tests hold each to these, values and gradients by autodiff,
special values included). ``implementation="reference"`` runs them.

Each op's reference lives in its folder (``lpkernel.ops.logprobs.reference``,
``lpkernel.ops.fused.reference``) and is re-exported here beside the scoring
pipeline's, :func:`score`. They materialise full float32 ``[..., V]``
temporaries on purpose; never use them for speed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lpkernel.checks import contiguous_segments
from lpkernel.ops.fused.reference import fused_token_stats as fused_token_stats
from lpkernel.ops.logprobs.reference import logits_stats as logits_stats
from lpkernel.ops.logprobs.reference import nll_loss as nll_loss
from lpkernel.ops.logprobs.reference import token_logprobs as token_logprobs
from lpkernel.ops.logprobs.reference import (
  token_logprobs_and_greedy as token_logprobs_and_greedy,
)
from lpkernel.types import Scores

_F32 = jnp.float32


def score(
  logits: jax.Array,
  tokens: jax.Array,
  response_mask: jax.Array,
  *,
  segment_ids: jax.Array | None = None,
  num_segments: int | None = None,
  temperature: float | jax.Array = 1.0,
  softcap: float | None = None,
):
  """``Scores`` by slicing: ``logits[:, :-1]`` against ``tokens[:, 1:]``."""
  b, t, _ = logits.shape
  seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
  temperature = jnp.broadcast_to(jnp.asarray(temperature, _F32), (b, t))[:, :-1]
  lp, greedy = token_logprobs_and_greedy(
    logits[:, :-1], tokens[:, 1:], temperature=temperature, softcap=softcap
  )
  scored = (seg[:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1])
  response = response_mask[:, 1:].astype(bool)
  ok = jnp.all(seg >= 0, axis=1) & contiguous_segments(seg)
  if num_segments is None:
    member = scored[:, :, None]
  else:
    ok &= jnp.all(seg <= num_segments, axis=1)
    member = scored[:, :, None] & (seg[:, 1:, None] == jnp.arange(1, num_segments + 1))
  in_prompt = member & ~response[:, :, None]
  in_response = member & response[:, :, None]
  squeeze = (lambda x: x[:, 0]) if num_segments is None else (lambda x: x)
  ok_b = ok if num_segments is None else ok[:, None]

  def total(mask):
    return jnp.where(ok_b, squeeze(jnp.sum(jnp.where(mask, lp[:, :, None], 0.0), axis=1)), jnp.nan)

  prompt = total(in_prompt)
  response_lp = total(in_response)
  token_lp = jnp.where(scored, lp, 0.0)
  return Scores(
    prompt_logprob=prompt,
    response_logprob=response_lp,
    joint_logprob=prompt + response_lp,
    prompt_tokens=squeeze(jnp.sum(in_prompt, axis=1, dtype=jnp.int32)),
    response_tokens=squeeze(jnp.sum(in_response, axis=1, dtype=jnp.int32)),
    response_greedy=squeeze(jnp.all(~in_response | greedy[:, :, None], axis=1)) & ok_b,
    token_logprobs=jnp.where(
      ok[:, None], jnp.concatenate([jnp.zeros((b, 1), _F32), token_lp], axis=1), jnp.nan
    ),
  )
