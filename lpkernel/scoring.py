"""``score``: chain-rule sums over batched, padded or packed ``[x, y]`` rows.

Logits row ``t`` predicts token ``t + 1``. Rather than slicing the logits (a
copy, and a padded gradient), the targets are shifted: row ``t`` is scored
against ``tokens[t + 1]`` and the last row is never scored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lpkernel import checks, ops
from lpkernel.ops.fused.api import fused_token_stats
from lpkernel.ops.logprobs.api import token_logprobs_and_greedy
from lpkernel.ops.processed.api import fused_processed_token_stats, processed_token_stats
from lpkernel.sampling import ProcessedStats, Sampling
from lpkernel.types import Scores, TokenStats

_F32 = jnp.float32


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
  """The shifted targets and masks of :func:`score` (arrays already checked)."""
  tokens, response_mask = jnp.asarray(tokens), jnp.asarray(response_mask)
  seg = jnp.ones_like(tokens, jnp.int32) if segment_ids is None else jnp.asarray(segment_ids)
  next_seg = _shift_left(seg, 0)
  scored = (next_seg > 0) & (next_seg == seg)
  row_ok = jnp.all(seg >= 0, axis=1)
  if num_segments is not None:
    row_ok &= jnp.all(seg <= num_segments, axis=1)
  if segment_ids is not None:
    row_ok &= checks.contiguous_segments(seg)
  return RowLayout(
    targets=_shift_left(tokens, 0),
    scored=scored,
    response=_shift_left(response_mask.astype(bool), False),
    segment=next_seg,
    row_ok=row_ok,
  )


def group_sum(values, groups, num_segments, dtype):
  """Sums ``values[B, T]`` (already zero where unscored) per row or per segment."""
  if num_segments is None:
    return jnp.sum(values, axis=1, dtype=dtype)
  onehot = groups[:, :, None] == jnp.arange(1, num_segments + 1, dtype=groups.dtype)
  return jnp.sum(jnp.where(onehot, values[:, :, None], 0), axis=1, dtype=dtype)


def sum_scores(row_logprobs, row_greedy, layout: RowLayout, num_segments=None) -> Scores:
  """Masked chain-rule sums of per-row log-probabilities.

  Args:
    row_logprobs: float32[B, T], lp of ``layout.targets`` under logits row t.
    row_greedy: bool[B, T], that target is the first argmax of its row.
    layout: from :func:`row_layout`.
  Returns:
    ``Scores``; a row with invalid segment ids has NaN log-probabilities (and
    NaN gradients), no greedy flag, and its counts as usual.
  """
  in_prompt = layout.scored & ~layout.response
  in_response = layout.scored & layout.response
  # `where`, not a product: a masked position holding NaN or -inf stays out.
  prompt = group_sum(jnp.where(in_prompt, row_logprobs, 0.0), layout.segment, num_segments, _F32)
  response = group_sum(
    jnp.where(in_response, row_logprobs, 0.0), layout.segment, num_segments, _F32
  )
  bad_row = ~layout.row_ok if num_segments is None else ~layout.row_ok[:, None]
  prompt, response = checks.poison(prompt, bad_row), checks.poison(response, bad_row)
  not_greedy = group_sum(in_response & ~row_greedy, layout.segment, num_segments, jnp.int32)
  # Position t + 1 holds the log-probability of token t + 1.
  token_lp = jnp.where(layout.scored, row_logprobs, 0.0)
  token_lp = jnp.concatenate([jnp.zeros_like(token_lp[:, :1]), token_lp[:, :-1]], axis=1)
  return Scores(
    prompt_logprob=prompt,
    response_logprob=response,
    joint_logprob=prompt + response,
    prompt_tokens=group_sum(in_prompt, layout.segment, num_segments, jnp.int32),
    response_tokens=group_sum(in_response, layout.segment, num_segments, jnp.int32),
    response_greedy=(not_greedy == 0) & ~bad_row,
    token_logprobs=checks.poison(token_lp, ~layout.row_ok[:, None]),
  )


def to_predicting_positions(token_logprobs: jax.Array) -> jax.Array:
  """``Scores.token_logprobs`` moved to the position of the logits that predicted each token.

  lpkernel puts log Pr(token t) at ``[:, t]`` (column 0 is never scored). TRL and
  most PyTorch code put it at ``[:, t - 1]``, the row of the logits that
  predicted it; this returns that alignment, ``[B, T]`` with 0 in the last column.

  Example:
    >>> import jax.numpy as jnp
    >>> to_predicting_positions(jnp.array([[0.0, -1.0, -2.0]]))
    Array([[-1., -2.,  0.]], dtype=float32)
  """
  return jnp.concatenate([token_logprobs[:, 1:], jnp.zeros_like(token_logprobs[:, :1])], axis=1)


def checked_layout(tokens, response_mask, segment_ids, num_segments, time_dims) -> RowLayout:
  """The static checks of :func:`score`'s row arrays, then their :func:`row_layout`.

  ``time_dims``: ``(name, shape)`` of the model output whose ``[B, T]`` leading
  dims must match ``tokens``.
  """
  tokens, response_mask, segment_ids = checks.as_rows(tokens, response_mask, segment_ids)
  checks.check_rows(tokens, response_mask, segment_ids, num_segments)
  name, shape = time_dims
  checks.check_same_dims(name, shape, "tokens", tokens.shape)
  return row_layout(tokens, response_mask, segment_ids, num_segments)


def score_rows(
  tokens: jax.Array,
  response_mask: jax.Array,
  segment_ids: jax.Array | None,
  num_segments: int | None,
  per_token: Callable[[jax.Array], tuple[jax.Array, jax.Array, Any]],
  time_dims: tuple[str, tuple[int, ...]],
) -> tuple[Scores, Any]:
  """The one scoring pipeline: check -> row layout -> per-token -> masked sums.

  Args:
    tokens, response_mask, segment_ids, num_segments: as for :func:`score`.
    per_token: ``targets int32[B, T] -> (logprobs float32[B, T], greedy bool[B, T], extra)``:
      any implementation of the per-token op (logits, fused, vocab-parallel).
    time_dims: ``(name, shape)`` of the model output whose ``[B, T]`` leading
      dims must match ``tokens``.

  Returns:
    (``Scores``, ``extra``).
  """
  layout = checked_layout(tokens, response_mask, segment_ids, num_segments, time_dims)
  with jax.named_scope("per_token"):
    lp, greedy, extra = per_token(layout.targets)
  with jax.named_scope("masked_sums"):
    return sum_scores(lp, greedy, layout, num_segments), extra


def one_temperature(temperature, sampling) -> None:
  """A ``ValueError`` when both ``temperature`` and ``sampling`` set one."""
  if sampling is not None and not (np.isscalar(temperature) and temperature == 1):
    raise ValueError("with sampling=, pass the temperature as Sampling.temperature")


def hidden_token_stats(
  hidden: jax.Array,
  unembed: jax.Array,
  targets: jax.Array,
  *,
  temperature: float | jax.Array = 1.0,
  softcap: float | None = None,
  sampling: Sampling | None = None,
  vocab_axis: int = -1,
  implementation=None,
) -> TokenStats | ProcessedStats:
  """Per-token statistics from hidden states in one sweep: the sampler's processed
  ones (:func:`lpkernel.fused_processed_token_stats`) under ``sampling``, else the
  plain fused sweep's (:func:`lpkernel.fused_token_stats`, with the entropy)."""
  one_temperature(temperature, sampling)
  if sampling is not None:
    return fused_processed_token_stats(
      hidden,
      unembed,
      targets,
      sampling,
      softcap=softcap,
      implementation=implementation,
      vocab_axis=vocab_axis,
    )
  return fused_token_stats(
    hidden,
    unembed,
    targets,
    temperature=temperature,
    softcap=softcap,
    implementation=implementation,
    vocab_axis=vocab_axis,
  )


def score(
  logits: jax.Array,
  tokens: jax.Array,
  response_mask: jax.Array,
  *,
  segment_ids: jax.Array | None = None,
  num_segments: int | None = None,
  temperature: float | jax.Array = 1.0,
  softcap: float | None = None,
  implementation: str | ops.LogitsImplementation | ops.ProcessedImplementation | None = None,
  sampling: Sampling | None = None,
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
    segment_ids: int[B, T] or None. 0 = padding, 1..S = packed sequence, each
      one contiguous run. An HF-style attention mask is valid (left or right
      padding), as ints or bools (``tokens != pad_id``).
    num_segments: None for ``[B]`` scores, or static S for ``[B, S]`` scores
      (index ``s - 1`` holds segment ``s``).
    temperature: finite positive Python number or array broadcastable to
      ``[B, T]`` (applied to logits row ``t``).
    softcap: None or a finite ``c > 0`` for ``c * tanh(logits / c)``.
    implementation: as for :func:`lpkernel.token_logprobs`; with ``sampling``
      a processed one, as for :func:`lpkernel.processed_token_stats` (None,
      ``"xla"``, ``"pallas_gpu"``, ``"reference"`` or such an object).
    sampling: score under the rollout engine's processed distribution
      (:class:`lpkernel.Sampling`: temperature, min-p, top-k, top-p, per-example
      arrays ``[B]`` allowed; :func:`lpkernel.processed_token_stats`); its
      temperature replaces ``temperature``. A token the sampler could not have
      drawn scores ``-inf``.

  Returns:
    ``Scores``. Out-of-range scored token ids give NaN at that position and in
    every sum holding it; invalid segment ids (negative, above S, or not
    contiguous) make the whole row NaN.

  Raises:
    TypeError / ValueError on mismatched shapes or dtypes.

  Example:
    >>> import jax.numpy as jnp, lpkernel as lpk
    >>> logits = jnp.zeros((1, 3, 4))            # uniform over 4 tokens
    >>> s = lpk.score(logits, jnp.array([[0, 1, 2]]), jnp.array([[False, False, True]]))
    >>> float(s.prompt_logprob[0]), float(s.response_logprob[0])  # log(1/4) each
    (-1.3862943649291992, -1.3862943649291992)
  """
  logits = checks.as_model_rows("logits", logits, "V")
  one_temperature(temperature, sampling)

  def per_token(targets):
    if sampling is not None:
      stats = processed_token_stats(
        logits, targets, sampling, softcap=softcap, implementation=implementation
      )
      return stats.logprobs, stats.greedy, None
    lp, greedy = token_logprobs_and_greedy(
      logits, targets, temperature=temperature, softcap=softcap, implementation=implementation
    )
    return lp, greedy, None

  return score_rows(
    tokens, response_mask, segment_ids, num_segments, per_token, ("logits", logits.shape)
  )[0]


def score_hidden(
  hidden: jax.Array,
  unembed: jax.Array,
  tokens: jax.Array,
  response_mask: jax.Array,
  *,
  segment_ids: jax.Array | None = None,
  num_segments: int | None = None,
  temperature: float | jax.Array = 1.0,
  softcap: float | None = None,
  implementation: str | ops.FusedImplementation | None = None,
  with_stats: bool = False,
  vocab_axis: int = -1,
  sampling: Sampling | None = None,
) -> Scores | tuple[Scores, TokenStats]:
  """``score(hidden @ unembed, ...)`` without materialising the logits.

  Args:
    hidden: float[B, T, D]; ``hidden[:, t] @ unembed`` predicts ``tokens[:, t + 1]``.
    unembed: float[D, V], or a tied embedding table float[V, D] as stored
      with ``vocab_axis=0`` (never transposed or copied).
    tokens, response_mask, segment_ids, num_segments, temperature, softcap: as
      for :func:`score`.
    implementation: as for :func:`lpkernel.fused_token_stats`.
    with_stats: also return the per-row ``TokenStats`` (log-sum-exp for z-loss,
      entropy), ``[B, T]`` aligned like the logits rows (row t predicts t + 1).
    vocab_axis: ``unembed``'s vocabulary axis (-1, or 0 for ``[V, D]``).
    sampling: as for :func:`score` (:func:`lpkernel.fused_processed_token_stats`);
      ``with_stats`` then returns its :class:`lpkernel.ProcessedStats`.

  Returns:
    ``Scores``, or ``(Scores, TokenStats)`` when ``with_stats``.
  """
  hidden = checks.as_model_rows("hidden", hidden, "D")
  one_temperature(temperature, sampling)

  def per_token(targets):
    stats = hidden_token_stats(
      hidden,
      unembed,
      targets,
      temperature=temperature,
      softcap=softcap,
      sampling=sampling,
      vocab_axis=vocab_axis,
      implementation=implementation,
    )
    return stats.logprobs, stats.greedy, stats

  scores, stats = score_rows(
    tokens, response_mask, segment_ids, num_segments, per_token, ("hidden", hidden.shape)
  )
  return (scores, stats) if with_stats else scores
