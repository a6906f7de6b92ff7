"""Training losses on sequence log-probabilities: pure functions of arrays, optax-ready.

Every preference loss takes its sequences the same way: a :class:`~lpkernel.Scores`
(its ``response_logprob`` and ``response_tokens``), a :class:`Sequences`
``(logps, tokens)`` of ``[B]`` arrays, or a bare ``[B]`` array of summed
log-probabilities where no length normalisation is asked for; a plain tuple is
refused (it could be either). Shapes are checked and named. Losses are
scalars to *minimise*; the metrics dict uses TRL's keys (``rewards/chosen``,
``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
``logps/chosen``, ``logps/rejected``), means over the batch.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from lpkernel import checks, ops
from lpkernel.ops.fused.api import fused_nll_loss
from lpkernel.ops.logprobs.api import nll_loss
from lpkernel.scoring import checked_layout, group_sum
from lpkernel.types import Scores

Normalisation = Literal["tokens", "sequences", "sum"]
DpoLossType = Literal["sigmoid", "hinge", "robust"]


class Sequences(NamedTuple):
  """Per-sequence response log-probabilities (summed) and token counts, ``[B]`` each.

  The typed pair the preference losses read; a bare tuple is refused (a
  ``(logps, tokens)`` pair and two log-probabilities look alike).
  """

  logps: jax.Array
  tokens: jax.Array | None = None

  def mean_logps(self, name: str = "sequences") -> jax.Array:
    """``logps / tokens``: the length-averaged log-probability (TRL's IPO and SimPO).

    An empty response (0 tokens) has no average: NaN (and a NaN gradient).
    """
    if self.tokens is None:
      raise ValueError(
        f"{name}: length-averaged log-probabilities need token counts: pass Scores or "
        "lpkernel.losses.Sequences(logps, tokens)"
      )
    empty = self.tokens <= 0
    return checks.poison(self.logps / jnp.where(empty, 1, self.tokens), empty)


SequenceLike = Scores | Sequences | jax.Array


def as_sequences(x: SequenceLike, name: str = "sequences") -> Sequences:
  """``Scores`` | ``Sequences(logps, tokens)`` | ``logps`` array -> :class:`Sequences`.

  Raises:
    TypeError: for anything else (a tuple or list of numbers is ambiguous: a
      ``(logps, tokens)`` pair or two log-probabilities).
  """
  if isinstance(x, Scores):
    return Sequences(x.response_logprob, x.response_tokens)
  if isinstance(x, Sequences):
    tokens = None if x.tokens is None else jnp.asarray(x.tokens)
    return Sequences(jnp.asarray(x.logps), tokens)
  if isinstance(x, (tuple, list)) or not (hasattr(x, "shape") and hasattr(x, "dtype")):
    raise TypeError(
      f"{name} must be Scores, lpkernel.losses.Sequences(logps, tokens) or an array of "
      f"summed log-probabilities [B], got {type(x).__name__}"
    )
  return Sequences(jnp.asarray(x), None)


def _pairs(**named: SequenceLike) -> list[Sequences]:
  """The named inputs as :class:`Sequences`, checked: float ``[B]`` log-probabilities,
  one ``B`` for all, token counts (where given) of the same shape."""
  seqs = {name: as_sequences(x, name) for name, x in named.items()}
  first, ref = next(iter(seqs.items()))
  for name, s in seqs.items():
    if not jnp.issubdtype(s.logps.dtype, jnp.floating):
      raise TypeError(f"{name} log-probabilities must be floats, got {s.logps.dtype}")
    if s.logps.ndim != 1:
      raise ValueError(
        f"{name} log-probabilities must be [B] (one per sequence), got shape {s.logps.shape}"
      )
    if s.logps.shape != ref.logps.shape:
      raise ValueError(f"{name} has B={s.logps.shape[0]} but {first} has B={ref.logps.shape[0]}")
    if s.tokens is not None:
      if s.tokens.shape != s.logps.shape:
        raise ValueError(
          f"{name} token counts have shape {s.tokens.shape}, its log-probabilities {s.logps.shape}"
        )
      if s.tokens.dtype == jnp.bool_ or not jnp.issubdtype(s.tokens.dtype, jnp.number):
        raise TypeError(f"{name} token counts must be numbers, got {s.tokens.dtype}")
  return list(seqs.values())


def sft_loss(
  scores: Scores, normalise: Normalisation = "tokens", *, response_only: bool = True
) -> jax.Array:
  """Negative log-likelihood of the responses (or of whole sequences).

  Args:
    scores: from ``score`` / ``score_hidden``.
    normalise: ``"tokens"``: total NLL / number of scored tokens in the batch;
      ``"sequences"``: mean of per-sequence NLL sums (over sequences with at
      least one scored token); ``"sum"``: the total.
    response_only: maximise ``log Pr(y | x)`` (True) or ``log Pr([x, y])``.

  Returns:
    float32 scalar.
  """
  _check_normalise(normalise)
  if response_only:
    logprob, count = scores.response_logprob, scores.response_tokens
  else:
    logprob, count = scores.joint_logprob, scores.prompt_tokens + scores.response_tokens
  nll = -jnp.sum(jnp.where(count > 0, logprob, 0.0))
  return nll / _normaliser(normalise, count)


def _check_normalise(normalise) -> None:
  if normalise not in ("tokens", "sequences", "sum"):
    raise ValueError(f"normalise must be 'tokens', 'sequences' or 'sum', got {normalise!r}")


def _normaliser(normalise: Normalisation, count: jax.Array) -> jax.Array:
  """What the summed NLL is divided by, from the scored tokens per sequence."""
  if normalise == "tokens":
    return jnp.maximum(jnp.sum(count), 1)
  if normalise == "sequences":
    return jnp.maximum(jnp.sum(count > 0), 1)
  return jnp.ones((), jnp.int32)


def sft_loss_hidden(
  hidden: jax.Array,
  unembed: jax.Array,
  tokens: jax.Array,
  response_mask: jax.Array,
  *,
  segment_ids: jax.Array | None = None,
  num_segments: int | None = None,
  normalise: Normalisation = "tokens",
  response_only: bool = True,
  z_loss: float = 0.0,
  temperature: float | jax.Array = 1.0,
  softcap: float | None = None,
  implementation: str | ops.FusedImplementation | None = None,
  vocab_axis: int = -1,
) -> jax.Array:
  """``sft_loss(score_hidden(...))`` (+ z-loss), its gradients written in the forward pass.

  The same number as ``sft_loss(score_hidden(hidden, unembed, tokens,
  response_mask, ...), normalise, response_only=...)`` plus ``z_loss`` times
  the same normalisation of the scored tokens' squared log-sum-exp, computed
  by :func:`lpkernel.fused_nll_loss`: under ``jax.grad`` no logits are made
  twice where the implementation measures that faster.

  Args:
    hidden: float[B, T, D]; ``hidden[:, t] @ unembed`` predicts ``tokens[:, t + 1]``.
    unembed, temperature, softcap, implementation, vocab_axis: as for
      :func:`lpkernel.score_hidden`.
    tokens, response_mask, segment_ids, num_segments: as for :func:`lpkernel.score`;
      ``"sequences"`` counts rows (``num_segments=None``) or packed segments.
    normalise, response_only: as for :func:`sft_loss`.
    z_loss: weight of the squared log-sum-exp of the same tokens (PaLM: 1e-4).

  Returns:
    float32 scalar; NaN if a counted token id is out of range or a row's
    segment ids are invalid.
  """
  hidden = checks.as_model_rows("hidden", hidden, "D")
  args = (tokens, response_mask, segment_ids, num_segments, normalise, response_only)
  targets, weights = _sft_weights(*args, ("hidden", hidden.shape))
  return fused_nll_loss(
    hidden,
    unembed,
    targets,
    weights,
    z_loss=z_loss,
    temperature=temperature,
    softcap=softcap,
    implementation=implementation,
    vocab_axis=vocab_axis,
  )


def sft_loss_logits(
  logits: jax.Array,
  tokens: jax.Array,
  response_mask: jax.Array,
  *,
  segment_ids: jax.Array | None = None,
  num_segments: int | None = None,
  normalise: Normalisation = "tokens",
  response_only: bool = True,
  z_loss: float = 0.0,
  temperature: float | jax.Array = 1.0,
  softcap: float | None = None,
  implementation: str | ops.LogitsImplementation | None = None,
) -> jax.Array:
  """``sft_loss(score(...))`` (+ z-loss) from logits, its gradient written in the forward pass.

  The same number as :func:`sft_loss_hidden` from ``[B, T, V]`` logits,
  computed by :func:`lpkernel.nll_loss`: under ``jax.grad`` the forward pass
  writes ``d logits``.

  Args:
    logits: float[B, T, V]; ``logits[:, t]`` predicts ``tokens[:, t + 1]``.
    temperature, softcap, implementation: as for :func:`lpkernel.score`.
    Others as for :func:`sft_loss_hidden`.

  Returns:
    float32 scalar; NaN if a counted token id is out of range or a row's
    segment ids are invalid.
  """
  logits = checks.as_model_rows("logits", logits, "V")
  args = (tokens, response_mask, segment_ids, num_segments, normalise, response_only)
  targets, weights = _sft_weights(*args, ("logits", logits.shape))
  return nll_loss(
    logits,
    targets,
    weights,
    z_loss=z_loss,
    temperature=temperature,
    softcap=softcap,
    implementation=implementation,
  )


def _sft_weights(tokens, response_mask, segment_ids, num_segments, normalise, response_only, dims):
  """(targets int32[B, T], weights float32[B, T]): the rows' next tokens and
  each counted token's ``1 / normaliser`` (0 elsewhere; NaN where a row's
  segment ids are invalid, as in :func:`sft_loss`)."""
  _check_normalise(normalise)
  layout = checked_layout(tokens, response_mask, segment_ids, num_segments, dims)
  counted = layout.scored & layout.response if response_only else layout.scored
  count = group_sum(counted, layout.segment, num_segments, jnp.int32)
  weights = jnp.where(counted, 1.0 / _normaliser(normalise, count), 0.0)
  return layout.targets, jnp.where(counted & ~layout.row_ok[:, None], jnp.nan, weights)


def _metrics(loss, chosen_reward, rejected_reward, chosen_logps, rejected_logps):
  """TRL's metric keys, means over the batch; a pair holding NaN is NaN in every
  metric (``rewards/accuracies`` included), never counted as a win or a loss."""
  margin = chosen_reward - rejected_reward
  win = jnp.where(jnp.isnan(margin), jnp.nan, (margin > 0).astype(jnp.float32))
  return {
    "loss": jnp.mean(loss),
    "rewards/chosen": jnp.mean(chosen_reward),
    "rewards/rejected": jnp.mean(rejected_reward),
    "rewards/margins": jnp.mean(margin),
    "rewards/accuracies": jnp.mean(win),
    "logps/chosen": jnp.mean(chosen_logps),
    "logps/rejected": jnp.mean(rejected_logps),
  }


def _check_smoothing(label_smoothing: float, upper: float) -> None:
  if not 0.0 <= label_smoothing < upper:
    raise ValueError(f"label_smoothing={label_smoothing} must be in [0, {upper})")


def dpo_loss(
  policy_chosen: SequenceLike,
  policy_rejected: SequenceLike,
  reference_chosen: SequenceLike,
  reference_rejected: SequenceLike,
  *,
  beta: float = 0.1,
  label_smoothing: float = 0.0,
  loss_type: DpoLossType = "sigmoid",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  r"""DPO-family losses on ``log Pr(y | x)`` of chosen and rejected responses (TRL's).

  With :math:`h = (\pi_c - \rho_c) - (\pi_r - \rho_r)` (policy minus reference
  log-ratios, summed over tokens) and :math:`\epsilon` the label smoothing:

  * ``"sigmoid"`` (DPO, Rafailov et al. 2023; conservative DPO with
    :math:`\epsilon > 0`): :math:`-(1-\epsilon)\log\sigma(\beta h) - \epsilon\log\sigma(-\beta h)`;
  * ``"robust"`` (rDPO, Chowdhury et al. 2024):
    :math:`[-(1-\epsilon)\log\sigma(\beta h) + \epsilon\log\sigma(-\beta h)] / (1 - 2\epsilon)`;
  * ``"hinge"`` (SLiC, Zhao et al. 2023): :math:`\max(0, 1 - \beta h)`.

  Args:
    policy_chosen, policy_rejected, reference_chosen, reference_rejected:
      ``Scores``, ``Sequences(logps, tokens)`` or ``[B]`` summed log-probabilities.
    beta: inverse temperature of the implicit reward ``beta * (pi - rho)``.
    label_smoothing: the probability that a preference label is flipped.
    loss_type: ``"sigmoid"``, ``"robust"`` or ``"hinge"``.

  Returns:
    (mean loss, metrics with TRL's keys).

  Raises:
    TypeError / ValueError: an input that is not ``Scores``, ``Sequences`` or a
      float ``[B]`` array, or whose ``B`` differs from ``policy_chosen``'s.
  """
  pc, pr, rc, rr = (
    s.logps
    for s in _pairs(
      policy_chosen=policy_chosen,
      policy_rejected=policy_rejected,
      reference_chosen=reference_chosen,
      reference_rejected=reference_rejected,
    )
  )
  chosen, rejected = beta * (pc - rc), beta * (pr - rr)
  h = chosen - rejected
  if loss_type == "sigmoid":
    _check_smoothing(label_smoothing, 1.0)
    loss = -(1 - label_smoothing) * jax.nn.log_sigmoid(h) - label_smoothing * jax.nn.log_sigmoid(-h)
  elif loss_type == "robust":
    _check_smoothing(label_smoothing, 0.5)
    loss = (
      -(1 - label_smoothing) * jax.nn.log_sigmoid(h) + label_smoothing * jax.nn.log_sigmoid(-h)
    ) / (1 - 2 * label_smoothing)
  elif loss_type == "hinge":
    loss = jax.nn.relu(1 - h)
  else:
    raise ValueError(f"loss_type must be 'sigmoid', 'robust' or 'hinge', got {loss_type!r}")
  return jnp.mean(loss), _metrics(loss, chosen, rejected, pc, pr)


def ipo_loss(
  policy_chosen: SequenceLike,
  policy_rejected: SequenceLike,
  reference_chosen: SequenceLike,
  reference_rejected: SequenceLike,
  *,
  beta: float = 0.1,
  average_log_probs: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  r"""IPO (Azar et al. 2023): :math:`(h - 1 / (2\beta))^2`, ``h`` the log-ratio margin.

  Args:
    policy_chosen, policy_rejected, reference_chosen, reference_rejected: as
      for :func:`dpo_loss`; with ``average_log_probs`` the policy's need token
      counts (``Scores`` or ``Sequences``), and a reference without its own is
      averaged over the policy's (TRL divides both by the completion length).
    average_log_probs: True (TRL's default) uses each sequence's log-probability
      divided by its token count in ``h`` (NaN for an empty response); False
      uses the summed log-probabilities of the paper.

  Returns:
    (mean loss, metrics). The TRL keys carry TRL's DPOTrainer numbers whatever
    the averaging: ``rewards/*`` are ``beta`` times the *summed* log-ratios and
    ``logps/*`` the summed policy log-probabilities; with ``average_log_probs``
    the averaged log-ratios the loss used are under ``logratios_mean/chosen``
    and ``logratios_mean/rejected``.
  """
  pc, pr, rc, rr = _pairs(
    policy_chosen=policy_chosen,
    policy_rejected=policy_rejected,
    reference_chosen=reference_chosen,
    reference_rejected=reference_rejected,
  )
  chosen_sum, rejected_sum = pc.logps - rc.logps, pr.logps - rr.logps
  if average_log_probs:
    rc = rc if rc.tokens is not None else rc._replace(tokens=pc.tokens)
    rr = rr if rr.tokens is not None else rr._replace(tokens=pr.tokens)
    chosen = pc.mean_logps("policy_chosen") - rc.mean_logps("reference_chosen")
    rejected = pr.mean_logps("policy_rejected") - rr.mean_logps("reference_rejected")
  else:
    chosen, rejected = chosen_sum, rejected_sum
  loss = jnp.square(chosen - rejected - 1.0 / (2.0 * beta))
  metrics = _metrics(loss, beta * chosen_sum, beta * rejected_sum, pc.logps, pr.logps)
  if average_log_probs:
    metrics["logratios_mean/chosen"] = jnp.mean(chosen)
    metrics["logratios_mean/rejected"] = jnp.mean(rejected)
  return jnp.mean(loss), metrics


def simpo_loss(
  chosen: SequenceLike,
  rejected: SequenceLike,
  *,
  beta: float = 2.0,
  gamma: float = 0.5,
  label_smoothing: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  r"""SimPO (Meng et al. 2024): length-normalised, reference-free, target margin ``gamma``.

  .. math:: u = \beta \bar\pi_c - \beta \bar\pi_r - \gamma,\quad
     L = -(1-\epsilon)\log\sigma(u) - \epsilon\log\sigma(-u),\quad
     \bar\pi = \log \Pr(y|x) / |y|

  Args:
    chosen, rejected: ``Scores`` or ``Sequences(logps, tokens)`` (token counts
      are needed; an empty response has no average: NaN).
    label_smoothing: :math:`\epsilon`, as TRL's CPO trainer.

  Returns:
    (mean loss, metrics with TRL's keys; rewards are ``beta`` times the averages).
  """
  _check_smoothing(label_smoothing, 1.0)
  c, r = _pairs(chosen=chosen, rejected=rejected)
  c_avg, r_avg = c.mean_logps("chosen"), r.mean_logps("rejected")
  c_reward, r_reward = beta * c_avg, beta * r_avg
  u = c_reward - r_reward - gamma
  loss = -(1 - label_smoothing) * jax.nn.log_sigmoid(u) - label_smoothing * jax.nn.log_sigmoid(-u)
  return jnp.mean(loss), _metrics(loss, c_reward, r_reward, c_avg, r_avg)


def z_loss(lse: jax.Array, mask: jax.Array | None = None, *, weight: float = 1e-4) -> jax.Array:
  """``weight * mean(lse ** 2)`` over ``mask`` (the log-sum-exp from ``TokenStats``)."""
  sq = jnp.square(lse)
  if mask is None:
    return weight * jnp.mean(sq)
  return weight * jnp.sum(jnp.where(mask, sq, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


__all__ = [
  "Sequences",
  "as_sequences",
  "dpo_loss",
  "ipo_loss",
  "simpo_loss",
  "sft_loss",
  "sft_loss_hidden",
  "z_loss",
]
