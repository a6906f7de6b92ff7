"""``score``: chain-rule sums over batched, padded or packed ``[x, y]`` rows.

Logits row ``t`` predicts token ``t + 1``. Rather than slicing the logits (a
copy, and a padded gradient), the targets are shifted: row ``t`` is scored
against ``tokens[t + 1]`` and the last row is never scored.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from lpkernel import checks
from lpkernel.logprobs import DEFAULT_CHUNKS, ChunkConfig, token_logprobs_and_greedy

_F32 = jnp.float32


@flax.struct.dataclass
class Scores:
  """Chain-rule scores; every field is ``[B]`` (per row) or ``[B, S]`` (per segment).

  Attributes:
    prompt_logprob: float32, log Pr(x) (the first token conditions, unscored).
    response_logprob: float32, log Pr(y | x).
    joint_logprob: float32, log Pr([x, y]) == prompt_logprob + response_logprob.
    prompt_tokens: int32, number of scored x tokens.
    response_tokens: int32, number of scored y tokens.
    response_greedy: bool, every scored y token is an argmax of its logits row.
    token_logprobs: float32[B, T], lp[t] at scored positions, 0 elsewhere.
  """

  prompt_logprob: jax.Array
  response_logprob: jax.Array
  joint_logprob: jax.Array
  prompt_tokens: jax.Array
  response_tokens: jax.Array
  response_greedy: jax.Array
  token_logprobs: jax.Array


@flax.struct.dataclass
class RowLayout:
  """Where each logits row ``t`` of ``[B, T]`` points, after the shift.

  Attributes:
    targets: int32[B, T], ``tokens[:, t + 1]`` (0 in the last column).
    scored: bool[B, T], row ``t`` is scored (its target continues a sequence).
    response: bool[B, T], the target belongs to y.
    segment: int32[B, T], the segment id of the target.
    row_ok: bool[B], the row's segment ids are valid.
  """

  targets: jax.Array
  scored: jax.Array
  response: jax.Array
  segment: jax.Array
  row_ok: jax.Array


def _shift_left(x: jax.Array, fill) -> jax.Array:
  """``[B, T] -> [B, T]``: ``out[:, t] = x[:, t + 1]``, ``fill`` in the last column."""
  return jnp.concatenate([x[:, 1:], jnp.full_like(x[:, :1], fill)], axis=1)


def row_layout(tokens, response_mask, segment_ids=None, num_segments=None) -> RowLayout:
  """The shifted targets and masks of :func:`score` (shapes checked by the caller)."""
  seg = jnp.ones_like(tokens, jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  next_seg = _shift_left(seg, 0)
  scored = (next_seg > 0) & (next_seg == seg)
  row_ok = jnp.all(seg >= 0, axis=1)
  if num_segments is not None:
    row_ok &= jnp.all(seg <= num_segments, axis=1)
  return RowLayout(
    targets=_shift_left(tokens.astype(jnp.int32), 0),
    scored=scored,
    response=_shift_left(response_mask.astype(bool), False),
    segment=next_seg,
    row_ok=row_ok,
  )


def _group_sum(values, groups, num_segments, dtype):
  """Sums ``values[B, T]`` (already zero where unscored) per row or per segment."""
  if num_segments is None:
    return jnp.sum(values, axis=1, dtype=dtype)
  onehot = groups[:, :, None] == jnp.arange(1, num_segments + 1, dtype=groups.dtype)
  return jnp.sum(jnp.where(onehot, values[:, :, None], 0), axis=1, dtype=dtype)


def sum_scores(row_logprobs, row_greedy, layout: RowLayout, num_segments=None) -> Scores:
  """Masked chain-rule sums of per-row log-probabilities.

  Args:
    row_logprobs: float32[B, T], lp of ``layout.targets`` under logits row t.
    row_greedy: bool[B, T], that target is an argmax of its row.
    layout: from :func:`row_layout`.
  Returns:
    ``Scores``; a row with invalid segment ids has NaN log-probabilities.
  """
  in_prompt = layout.scored & ~layout.response
  in_response = layout.scored & layout.response
  # `where`, not a product: a masked position holding NaN or -inf stays out.
  prompt = _group_sum(jnp.where(in_prompt, row_logprobs, 0.0), layout.segment, num_segments, _F32)
  response = _group_sum(
    jnp.where(in_response, row_logprobs, 0.0), layout.segment, num_segments, _F32
  )
  poison = ~layout.row_ok if num_segments is None else ~layout.row_ok[:, None]
  prompt = jnp.where(poison, jnp.nan, prompt)
  response = jnp.where(poison, jnp.nan, response)
  not_greedy = _group_sum(in_response & ~row_greedy, layout.segment, num_segments, jnp.int32)
  token_lp = jnp.where(layout.scored, row_logprobs, 0.0)
  token_lp = jnp.where(layout.row_ok[:, None], token_lp, jnp.nan)
  return Scores(
    prompt_logprob=prompt,
    response_logprob=response,
    joint_logprob=prompt + response,
    prompt_tokens=_group_sum(in_prompt, layout.segment, num_segments, jnp.int32),
    response_tokens=_group_sum(in_response, layout.segment, num_segments, jnp.int32),
    response_greedy=not_greedy == 0,
    # Position t + 1 holds the log-probability of token t + 1.
    token_logprobs=jnp.concatenate([jnp.zeros_like(token_lp[:, :1]), token_lp[:, :-1]], axis=1),
  )


def score(
  logits: jax.Array,
  tokens: jax.Array,
  response_mask: jax.Array,
  *,
  segment_ids: jax.Array | None = None,
  num_segments: int | None = None,
  temperature=1.0,
  softcap: float | None = None,
  chunks: ChunkConfig = DEFAULT_CHUNKS,
) -> Scores:
  """Scores batched ``[x, y]`` rows: log Pr(x), log Pr(y | x) and log Pr([x, y]).

  Token ``t >= 1`` is scored iff ``segment_ids[t] > 0`` and
  ``segment_ids[t] == segment_ids[t - 1]``; its role is response where
  ``response_mask[t]``, else prompt. Each sum is its own masked float32 sum and
  ``joint = prompt + response`` exactly.

  Args:
    logits: float[B, T, V]; ``logits[:, t]`` predicts ``tokens[:, t + 1]``.
    tokens: int[B, T].
    response_mask: bool[B, T], True where the token belongs to y.
    segment_ids: int[B, T] or None. 0 = padding, 1..S = packed sequence. An
      HF-style attention mask is valid (left or right padding).
    num_segments: None for ``[B]`` scores, or static S for ``[B, S]`` scores
      (index ``s - 1`` holds segment ``s``).
    temperature: positive scalar or array broadcastable to ``[B, T]`` (applied
      to logits row ``t``).
    softcap: None or ``c > 0`` for ``c * tanh(logits / c)``.
    chunks: vocabulary chunking of the reductions.

  Returns:
    ``Scores``. Out-of-range scored token ids give NaN at that position and in
    every sum holding it; invalid segment ids make the whole row NaN.

  Raises:
    TypeError / ValueError on mismatched shapes or dtypes.

  Example:
    >>> import jax.numpy as jnp, lpkernel as lpk
    >>> logits = jnp.zeros((1, 3, 4))            # uniform over 4 tokens
    >>> s = lpk.score(logits, jnp.array([[0, 1, 2]]), jnp.array([[False, False, True]]))
    >>> float(s.prompt_logprob[0]), float(s.response_logprob[0])  # log(1/4) each
    (-1.3862943649291992, -1.3862943649291992)
  """
  checks.check_score_shapes(logits, tokens, response_mask, segment_ids, num_segments)
  layout = row_layout(tokens, response_mask, segment_ids, num_segments)
  with jax.named_scope("token_logprobs"):
    row_lp, row_greedy = token_logprobs_and_greedy(
      logits, layout.targets, temperature=temperature, softcap=softcap, chunks=chunks
    )
  with jax.named_scope("masked_sums"):
    return sum_scores(row_lp, row_greedy, layout, num_segments)
