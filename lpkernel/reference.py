"""The plain definitions, in straightforward ``jnp``: the yardstick for every
fast path (tests) and the baseline of the benchmark suite.

They materialise a full float32 log-softmax on purpose; never use them for speed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lpkernel.scoring import Scores

_F32 = jnp.float32


def token_logprobs(logits, targets, *, temperature=1.0, softcap=None):
  """``log_softmax(softcap(logits) / temperature)[target]``; NaN for ids outside [0, V)."""
  y = logits.astype(_F32)
  if softcap is not None:
    y = softcap * jnp.tanh(y / softcap)
  y = y / jnp.asarray(temperature, _F32)[..., None]
  log_probs = jax.nn.log_softmax(y, axis=-1)
  v = logits.shape[-1]
  in_range = (targets >= 0) & (targets < v)
  picked = jnp.take_along_axis(log_probs, jnp.where(in_range, targets, 0)[..., None], axis=-1)
  return jnp.where(in_range, picked[..., 0], jnp.nan)


def score(
  logits,
  tokens,
  response_mask,
  *,
  segment_ids=None,
  num_segments=None,
  temperature=1.0,
  softcap=None,
) -> Scores:
  """``Scores`` by slicing: ``logits[:, :-1]`` against ``tokens[:, 1:]``."""
  b, t, _ = logits.shape
  seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
  temperature = jnp.broadcast_to(jnp.asarray(temperature, _F32), (b, t))[:, :-1]
  lp = token_logprobs(logits[:, :-1], tokens[:, 1:], temperature=temperature, softcap=softcap)
  greedy = jnp.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:]
  # Ties: a target whose logit equals the row max counts as greedy.
  greedy |= jnp.take_along_axis(
    logits[:, :-1], jnp.clip(tokens[:, 1:], 0, logits.shape[-1] - 1)[..., None], axis=-1
  )[..., 0] == jnp.max(logits[:, :-1], axis=-1)
  scored = (seg[:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1])
  response = response_mask[:, 1:].astype(bool)
  ok = jnp.all(seg >= 0, axis=1)
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
    return squeeze(jnp.sum(jnp.where(mask, lp[:, :, None], 0.0), axis=1))

  prompt = jnp.where(ok_b, total(in_prompt), jnp.nan)
  response_lp = jnp.where(ok_b, total(in_response), jnp.nan)
  token_lp = jnp.where(ok[:, None], jnp.where(scored, lp, 0.0), jnp.nan)
  return Scores(
    prompt_logprob=prompt,
    response_logprob=response_lp,
    joint_logprob=prompt + response_lp,
    prompt_tokens=squeeze(jnp.sum(in_prompt, axis=1, dtype=jnp.int32)),
    response_tokens=squeeze(jnp.sum(in_response, axis=1, dtype=jnp.int32)),
    response_greedy=squeeze(jnp.all(~in_response | greedy[:, :, None], axis=1)),
    token_logprobs=jnp.concatenate([jnp.zeros((b, 1), _F32), token_lp], axis=1),
  )
