"""Policy-gradient objectives (GRPO, DAPO, Dr. GRPO, GSPO, PPO) from per-token log-probabilities.

Every objective is a pure function of per-token arrays ``[B, T]``: the policy's
log-probabilities (the only input with a gradient), a loss mask, advantages and
the constants of the rollout (behaviour, reference and rollout-engine
log-probabilities). So it works on log-probabilities from logits, from hidden
states, from packed rows or from shards alike; :func:`policy_loss_hidden`
computes them (and the entropy) from hidden states in one vocabulary sweep
forward and one backward, without ``[N, V]`` logits.

Per token ``t`` of sequence ``s`` (``m`` the mask, ``A`` the advantage)::

  log w_t  = log pi(t) - log pi_old(t)                       (ratio="token")
           = mean_{t in s} (log pi - log pi_old)              (ratio="sequence", GSPO)
           = log pi(t) - sg(log pi(t)) + sg(mean_s ...)       (ratio="gspo-token")
  L_t      = -min(w_t A, clip(w_t, 1 - eps, 1 + eps_high) A)   (w capped at delta if set)
  L_t      = min(L_t, -eps_c A) where A < 0                    (dual clip, if epsilon_c)
  L_t     *= IS_t (truncated importance weights vs the rollout engine) * entropy mask
  loss     = agg(L) + beta * agg(KL) - entropy_coef * mean_t H_t

``agg`` is one of TRL's ``loss_type`` (``grpo``, ``bnpo``, ``dr_grpo``,
``dapo``) or tunix's ``loss_agg_mode`` (``token-mean``,
``sequence-mean-token-mean``, ``sequence-mean-token-scale``,
``seq-mean-token-sum``, ``sequence-mean-token-sum-norm``), each as that
library defines it; the KL estimators are k1 / k2 / k3 (tunix ``kl``,
``mse_kl``, ``low_var_kl``). The metrics dict carries the keys the library
whose aggregation name was chosen logs (TRL: ``clip_ratio/low_mean``, ...;
tunix: ``pg_clipfrac``, ``ppo_kl``, ``is_ratio/mean``, ...), each the number
that library computes.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from lpkernel import checks
from lpkernel.sampling import Sampling
from lpkernel.scoring import hidden_token_stats
from lpkernel.types import TokenStats

_F32 = jnp.float32

TRL_AGGREGATIONS = ("grpo", "bnpo", "dr_grpo", "dapo")
TUNIX_AGGREGATIONS = (
  "token-mean",
  "sequence-mean-token-mean",
  "sequence-mean-token-scale",
  "seq-mean-token-sum",
  "sequence-mean-token-sum-norm",
)
_KL = {"k1": "k1", "k2": "k2", "k3": "k3", "kl": "k1", "mse_kl": "k2", "low_var_kl": "k3"}
_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
Aggregation = Literal[
  "grpo",
  "bnpo",
  "dr_grpo",
  "dapo",
  "token-mean",
  "sequence-mean-token-mean",
  "sequence-mean-token-scale",
  "seq-mean-token-sum",
  "sequence-mean-token-sum-norm",
]


@dataclasses.dataclass(frozen=True)
class PolicyObjective:
  """The clipped policy-gradient objective, its penalties and corrections (static config).

  Attributes:
    epsilon: lower clip, ratios below ``1 - epsilon`` are clipped.
    epsilon_high: upper clip (DAPO's clip-higher, 0.28); None: ``epsilon``.
    epsilon_c: dual clip (tunix / verl): a negative-advantage token's loss is
      capped at ``-epsilon_c * A`` (e.g. 3.0); None: off.
    delta: TRL's two-sided clip (INTELLECT-2): the unclipped ratio is capped at
      ``delta`` (> 1 + epsilon_high); None: off.
    ratio: ``"token"`` (PPO/GRPO), ``"sequence"`` (GSPO, TRL's
      ``importance_sampling_level="sequence"``: one ratio per sequence, the
      exp of its mean log-ratio) or ``"gspo-token"`` (tunix: the sequence
      ratio's value with each token's gradient; its log capped at 10).
    log_ratio_clamp: clamp ``log pi - log pi_old`` to ``[-c, c]`` before the
      ratio (tunix: 20.0); None: off (TRL).
    aggregation: how per-token losses become the loss (module docstring).
    max_length: the constant of ``dr_grpo`` (TRL's ``max_completion_length``)
      and ``sequence-mean-token-scale`` (tunix's ``norm``); None: ``T``.
    beta: KL coefficient against the reference policy (0: no KL term).
    kl: estimator of KL(pi || pi_ref) per token: ``"k1"`` = ``lp - ref``,
      ``"k2"`` = ``(lp - ref)^2 / 2``, ``"k3"`` = ``exp(ref - lp) - (ref - lp) - 1``
      (tunix names ``kl``, ``mse_kl``, ``low_var_kl`` are accepted).
    kl_clamp: symmetric clamp of the per-token KL (tunix ``kl_clamp_value``).
    kl_ratio_weighted: multiply the KL by the (differentiable) importance
      ratio (TRL's ``use_bias_correction_kl``, DeepSeek-V3.2).
    entropy_coef: weight of the entropy bonus ``- coef * mean_t H_t`` (token
      mean over the tokens the policy loss acts on, as TRL and tunix's PPO).
    top_entropy_quantile: keep in the policy loss only tokens whose entropy is
      at or above this upper quantile of the batch's (TRL, "Beyond the 80/20
      rule"; 0.2 recommended); 1.0: all tokens.
    importance_sampling: truncated importance sampling against the rollout
      engine's log-probabilities (TRL's ``vllm_importance_sampling_mode``):
      ``"token_truncate"``, ``"token_mask"``, ``"sequence_truncate"``,
      ``"sequence_mask"``; None: off, or weights given in the rollout.
    is_clip_min, is_clip_max: its bounds (TRL ``vllm_importance_sampling_clip_min``
      / ``_max``; tunix ``sampler_is_threshold`` is ``is_clip_max``).
    metrics: ``"trl"`` or ``"tunix"`` keys; None: the family of ``aggregation``.
  """

  epsilon: float = 0.2
  epsilon_high: float | None = None
  epsilon_c: float | None = None
  delta: float | None = None
  ratio: Literal["token", "sequence", "gspo-token"] = "token"
  log_ratio_clamp: float | None = None
  aggregation: Aggregation = "dapo"
  max_length: int | None = None
  beta: float = 0.0
  kl: str = "k3"
  kl_clamp: float | None = None
  kl_ratio_weighted: bool = False
  entropy_coef: float = 0.0
  top_entropy_quantile: float = 1.0
  importance_sampling: str | None = None
  is_clip_min: float | None = None
  is_clip_max: float | None = 3.0
  metrics: Literal["trl", "tunix"] | None = None

  def __post_init__(self):
    def check(ok: bool, what: str):
      if not ok:
        raise ValueError(f"PolicyObjective: {what}")

    check(0 <= self.epsilon < 1, f"epsilon={self.epsilon} must be in [0, 1)")
    check(self.epsilon_high is None or self.epsilon_high >= 0, "epsilon_high must be >= 0")
    check(self.epsilon_c is None or self.epsilon_c > 1, f"epsilon_c={self.epsilon_c} must be > 1")
    check(self.delta is None or self.delta > 1, f"delta={self.delta} must be > 1")
    check(self.ratio in ("token", "sequence", "gspo-token"), f"unknown ratio={self.ratio!r}")
    check(self.log_ratio_clamp is None or self.log_ratio_clamp > 0, "log_ratio_clamp must be > 0")
    check(
      self.aggregation in TRL_AGGREGATIONS + TUNIX_AGGREGATIONS,
      f"unknown aggregation={self.aggregation!r}; one of {TRL_AGGREGATIONS + TUNIX_AGGREGATIONS}",
    )
    check(self.max_length is None or self.max_length > 0, "max_length must be > 0")
    check(self.kl in _KL, f"unknown kl={self.kl!r}; one of {tuple(_KL)}")
    check(self.kl_clamp is None or self.kl_clamp > 0, "kl_clamp must be > 0")
    check(self.entropy_coef >= 0, "entropy_coef must be >= 0")
    check(0 <= self.top_entropy_quantile <= 1, "top_entropy_quantile must be in [0, 1]")
    check(
      self.importance_sampling in (None,) + _IS_MODES,
      f"unknown importance_sampling={self.importance_sampling!r}; one of {_IS_MODES}",
    )
    check(self.metrics in (None, "trl", "tunix"), f"unknown metrics={self.metrics!r}")

  @property
  def eps_high(self) -> float:
    return self.epsilon if self.epsilon_high is None else self.epsilon_high

  @property
  def convention(self) -> str:
    """Whose metric keys: ``metrics``, else the family of the aggregation name."""
    if self.metrics is not None:
      return self.metrics
    return "trl" if self.aggregation in TRL_AGGREGATIONS else "tunix"

  @property
  def needs_entropy(self) -> bool:
    """The loss (not only a metric) reads the entropy."""
    return self.entropy_coef != 0 or self.top_entropy_quantile < 1


class Rollout(NamedTuple):
  """The constants of a policy step, per token ``[B, T]`` unless noted.

  Attributes:
    mask: which tokens the loss counts (the completion, minus tool output...).
    advantages: float ``[B]`` (one per sequence row) or ``[B, T]``.
    old_logprobs: the behaviour policy's log-probabilities (the policy at the
      start of the step); None: on-policy, ``stop_gradient(logprobs)``.
    ref_logprobs: the reference policy's, for the KL term (None: no KL).
    rollout_logprobs: the rollout engine's (e.g. vLLM's, processed ones when it
      sampled with top-k/top-p), for ``importance_sampling``.
    is_weights: precomputed truncated importance weights (tunix's
      ``sampler_is_weights``), multiplied into the policy loss as constants.
    segment_ids: int ``[B, T]``, 1, 2, ... per packed sequence, 0 elsewhere:
      sequence-level quantities (GSPO ratios, per-sequence means) are taken per
      segment; None: each row is one sequence.
    global_tokens: the loss-token count DAPO divides by when the batch is one
      of several (gradient accumulation, data parallel: TRL's
      ``num_items_in_batch``); None: this batch's ``sum(mask)``.
  """

  mask: jax.Array
  advantages: jax.Array
  old_logprobs: jax.Array | None = None
  ref_logprobs: jax.Array | None = None
  rollout_logprobs: jax.Array | None = None
  is_weights: jax.Array | None = None
  segment_ids: jax.Array | None = None
  global_tokens: jax.Array | float | None = None


class _Sequences(NamedTuple):
  """Which sequence each token belongs to: ``ids [B, T]`` into ``size`` sequences."""

  ids: jax.Array
  size: int
  present: jax.Array  # bool [size]: the sequence exists (a row, or a segment that occurs)

  def sum(self, x: jax.Array) -> jax.Array:
    return jax.ops.segment_sum(x.reshape(-1), self.ids.reshape(-1), self.size)

  def spread(self, per_sequence: jax.Array) -> jax.Array:
    return per_sequence[self.ids]


def _sequences(shape, segment_ids) -> _Sequences:
  b, t = shape
  if segment_ids is None:
    ids = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    return _Sequences(ids, b, jnp.ones((b,), bool))
  seg = jnp.asarray(segment_ids).astype(jnp.int32)
  # Segment ids are at most T per row; token (b, t) of segment s > 0 is sequence b * T + s - 1.
  ids = jnp.arange(b)[:, None] * t + jnp.clip(seg - 1, 0, t - 1)
  present = jax.ops.segment_sum((seg > 0).reshape(-1).astype(jnp.int32), ids.reshape(-1), b * t) > 0
  return _Sequences(ids, b * t, present)


def _check_rollout(logprobs, rollout: Rollout, entropy) -> None:
  shape = logprobs.shape
  if logprobs.ndim != 2:
    raise ValueError(f"logprobs must be [B, T], got shape {shape}")
  if not jnp.issubdtype(logprobs.dtype, jnp.floating):
    raise TypeError(f"logprobs must be floats, got {logprobs.dtype}")
  named = dict(rollout._asdict(), entropy=entropy)
  for name in (
    "mask", "old_logprobs", "ref_logprobs", "rollout_logprobs", "is_weights", "segment_ids",
    "entropy",
  ):  # fmt: skip
    if named[name] is not None:
      checks.check_same_dims(name, jnp.shape(named[name]), "logprobs", shape)
  adv = jnp.shape(rollout.advantages)
  if adv not in (shape[:1], shape):
    raise ValueError(f"advantages must be [B]={shape[:1]} or [B, T]={shape}, got {adv}")


def _aggregate(x, mask, seqs: _Sequences, objective: PolicyObjective, global_tokens=None):
  """``agg(x)`` over the masked tokens, as the aggregation's library defines it."""
  mode = objective.aggregation
  t = mask.shape[-1]
  xm = x * mask
  total = jnp.sum(xm)
  tokens = jnp.sum(mask)
  per_seq = seqs.sum(xm)
  seq_tokens = seqs.sum(mask)
  nonempty = seqs.present & (seq_tokens > 0)
  n_nonempty = jnp.maximum(jnp.sum(nonempty), 1)
  norm = t if objective.max_length is None else objective.max_length
  if mode in ("bnpo", "token-mean"):
    return total / jnp.maximum(tokens, 1)
  if mode == "dapo":
    count = tokens if global_tokens is None else jnp.asarray(global_tokens, _F32)
    return total / jnp.maximum(count, 1)
  if mode == "grpo":  # TRL: the mean over every sequence, an empty one counting 0
    means = per_seq / jnp.maximum(seq_tokens, 1)
    return jnp.sum(jnp.where(seqs.present, means, 0)) / jnp.maximum(jnp.sum(seqs.present), 1)
  if mode == "dr_grpo":
    return total / (jnp.sum(seqs.present) * norm)
  if mode == "sequence-mean-token-mean":
    return jnp.sum(jnp.where(nonempty, per_seq / jnp.maximum(seq_tokens, 1), 0)) / n_nonempty
  if mode == "sequence-mean-token-scale":
    return jnp.sum(jnp.where(seqs.present, per_seq, 0)) / max(norm, 1e-6) / n_nonempty
  if mode == "seq-mean-token-sum":
    return jnp.sum(jnp.where(nonempty, per_seq, 0)) / n_nonempty
  assert mode == "sequence-mean-token-sum-norm"
  return total / n_nonempty


def _token_mean(x, mask, eps: float = 0.0):
  """``sum(x m) / sum(m)``, the count clamped at 1 (TRL, tunix's ``kl``) or plus
  ``eps`` (tunix's ``masked_mean``)."""
  if eps:
    return jnp.sum(x * mask) / (jnp.sum(mask) + eps)
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1)


def kl_estimate(logprobs, ref_logprobs, kind: str = "k3", clamp: float | None = None):
  """Per-token estimate of KL(pi || pi_ref) from the sampled token's log-probabilities.

  ``k1 = lp - ref``; ``k2 = (lp - ref)^2 / 2``; ``k3 = exp(ref - lp) - (ref - lp) - 1``
  (Schulman's low-variance unbiased estimator, TRL's and tunix's ``low_var_kl``).
  """
  if kind not in _KL:
    raise ValueError(f"unknown kl={kind!r}; one of {tuple(_KL)}")
  lp, ref = logprobs.astype(_F32), ref_logprobs.astype(_F32)
  kind = _KL[kind]
  if kind == "k1":
    kl = lp - ref
  elif kind == "k2":
    kl = 0.5 * jnp.square(lp - ref)
  else:
    d = ref - lp
    kl = jnp.exp(d) - d - 1
  return kl if clamp is None else jnp.clip(kl, -clamp, clamp)


def _importance_weights(old_logprobs, rollout_logprobs, mask, seqs: _Sequences, objective):
  """Truncated / masked importance weights ``pi_old / pi_rollout`` (TRL's vLLM correction).

  Per token (``token_*``) or per sequence (``sequence_*``: the exp of the summed
  log-ratio); ``*_truncate`` clips to ``[is_clip_min, is_clip_max]``,
  ``*_mask`` zeroes weights outside. A NaN rollout log-probability (not
  reported by the engine) gives weight 1 there. Constant (no gradient).
  """
  diff = jnp.nan_to_num((old_logprobs - rollout_logprobs) * mask, nan=0.0)
  mode = objective.importance_sampling
  if mode.startswith("sequence"):
    diff = seqs.spread(seqs.sum(diff))
  w = jnp.exp(diff)
  lo, hi = objective.is_clip_min, objective.is_clip_max
  if mode.endswith("truncate"):
    w = jnp.clip(w, lo, hi)
  else:
    bad = (w < (-jnp.inf if lo is None else lo)) | (w > (jnp.inf if hi is None else hi))
    w = jnp.where(bad, 0.0, w)
  return lax.stop_gradient(w)


def _high_entropy_mask(entropy, mask, quantile: float):
  """Tokens whose entropy is at or above the ``1 - quantile`` quantile of the masked
  entropies (linear interpolation, as ``torch.quantile``)."""
  on = mask > 0
  threshold = jnp.nanquantile(jnp.where(on, entropy, jnp.nan), 1 - quantile)
  return (entropy >= threshold) & on


def policy_loss(
  logprobs: jax.Array,
  rollout: Rollout,
  objective: PolicyObjective = PolicyObjective(),
  *,
  entropy: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The policy-gradient loss (to minimise) and its metrics, from per-token log-probabilities.

  Args:
    logprobs: float ``[B, T]``: log pi(token) under the policy being trained,
      the only differentiated input (any float dtype; computed in float32).
    rollout: the step's constants (:class:`Rollout`).
    objective: the objective (:class:`PolicyObjective`), static.
    entropy: float ``[B, T]`` per-token entropy of the policy (differentiable),
      needed when ``objective.entropy_coef`` or ``top_entropy_quantile`` asks
      for it; otherwise only logged.

  Returns:
    ``(loss, metrics)``: a float32 scalar and a dict of float32 scalars under
    the keys of ``objective.convention`` (no gradient through the metrics).

  Raises:
    ValueError: shapes that disagree (named), or an entropy term without entropy.

  Example:
    >>> import jax.numpy as jnp, lpkernel as lpk
    >>> lp = jnp.log(jnp.array([[0.5, 0.25], [0.5, 0.5]]))
    >>> rollout = lpk.rl.Rollout(mask=jnp.ones((2, 2)), advantages=jnp.array([1.0, -1.0]))
    >>> loss, metrics = lpk.rl.policy_loss(lp, rollout)   # on-policy: ratio 1
    >>> float(loss)   # -(1 + 1 - 1 - 1) / 4
    0.0
  """
  _check_rollout(logprobs, rollout, entropy)
  if objective.needs_entropy and entropy is None:
    raise ValueError(
      "this objective reads the entropy (entropy_coef or top_entropy_quantile): pass entropy=, "
      "or use policy_loss_hidden, which computes it in the same sweep"
    )
  obj = objective
  mask = jnp.asarray(rollout.mask).astype(_F32)
  if rollout.segment_ids is not None:  # a token outside every sequence counts nowhere
    mask = mask * (jnp.asarray(rollout.segment_ids) > 0)
  on = mask > 0

  def counted(x):
    """float32 ``x`` with masked positions 0: whatever they held (padding's -inf or
    NaN log-probabilities, entropies, advantages) adds exactly 0 to the values
    and, through ``where``, to the gradients."""
    return None if x is None else jnp.where(on, jnp.asarray(x).astype(_F32), 0.0)

  lp = counted(logprobs)
  entropy = counted(entropy)
  seqs = _sequences(lp.shape, rollout.segment_ids)
  adv = jnp.asarray(rollout.advantages)
  adv = counted(jnp.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, lp.shape))
  old = lax.stop_gradient(lp) if rollout.old_logprobs is None else counted(rollout.old_logprobs)

  with jax.named_scope("ratio"):
    log_ratio = lp - old
    ppo_kl = _token_mean(-log_ratio, mask, 1e-8)
    if obj.log_ratio_clamp is not None:
      log_ratio = jnp.clip(log_ratio, -obj.log_ratio_clamp, obj.log_ratio_clamp)
    seq_log_ratio = seqs.spread(seqs.sum(log_ratio * mask) / jnp.maximum(seqs.sum(mask), 1))
    if obj.ratio == "token":
      log_w = log_ratio
    elif obj.ratio == "sequence":
      log_w = seq_log_ratio
    else:  # gspo-token: the sequence ratio's value, each token's own gradient
      log_w = lp - lax.stop_gradient(lp) + lax.stop_gradient(seq_log_ratio)
      log_w = jnp.minimum(log_w, 10.0)
    ratio = jnp.exp(log_w)

  with jax.named_scope("surrogate"):
    clipped = jnp.clip(ratio, 1 - obj.epsilon, 1 + obj.eps_high)
    capped = ratio if obj.delta is None else jnp.minimum(ratio, obj.delta)
    pg_unclipped, pg_clipped = -adv * capped, -adv * clipped
    per_token = jnp.maximum(pg_unclipped, pg_clipped)
    pre_dual = per_token
    if obj.epsilon_c is not None:
      per_token = jnp.where(adv < 0, jnp.minimum(per_token, -obj.epsilon_c * adv), per_token)

  entropy_mask = None
  if obj.top_entropy_quantile < 1:
    entropy_mask = _high_entropy_mask(lax.stop_gradient(entropy), mask, obj.top_entropy_quantile)
    per_token = per_token * entropy_mask
  is_w = rollout.is_weights
  if obj.importance_sampling is not None:
    if rollout.rollout_logprobs is None:
      raise ValueError(f"importance_sampling={obj.importance_sampling!r} needs rollout_logprobs")
    is_w = _importance_weights(old, counted(rollout.rollout_logprobs), mask, seqs, obj)
  else:
    is_w = counted(is_w)
  if is_w is not None:
    per_token = per_token * lax.stop_gradient(is_w)

  pg_loss = _aggregate(per_token, mask, seqs, obj, rollout.global_tokens)
  loss = pg_loss
  kl = None
  if rollout.ref_logprobs is not None:
    kl = kl_estimate(lp, counted(rollout.ref_logprobs), obj.kl, obj.kl_clamp)
    if obj.kl_ratio_weighted:
      kl = kl * ratio
    kl_loss = _aggregate(kl, mask, seqs, obj, rollout.global_tokens)
    if obj.beta:
      loss = loss + obj.beta * kl_loss
  elif obj.beta:
    raise ValueError(f"beta={obj.beta} needs ref_logprobs in the rollout")
  bonus_mask = mask if entropy_mask is None else mask * entropy_mask
  before_entropy = loss
  if obj.entropy_coef:
    assert entropy is not None  # needs_entropy, checked above
    loss = loss - obj.entropy_coef * _token_mean(entropy, bonus_mask)

  terms = dict(
    mask=mask,
    adv=adv,
    ratio=ratio,
    capped=capped,
    log_w=log_w,
    seqs=seqs,
    pre_dual=pre_dual,
    pg=(pg_unclipped, pg_clipped),
    pg_loss=pg_loss,
    before_entropy=before_entropy,
    kl=kl,
    entropy=entropy,
    ppo_kl=ppo_kl,
    is_w=is_w,
  )
  metrics = _trl_metrics(obj, **terms) if obj.convention == "trl" else _tunix_metrics(obj, **terms)
  return loss, lax.stop_gradient(metrics)


def _trl_metrics(obj, *, mask, adv, capped, seqs, kl, entropy, is_w, before_entropy, **_):
  """TRL GRPOTrainer's logged numbers for this batch (one process)."""
  sequence_level = obj.ratio == "sequence"
  seq_mask = seqs.present & (seqs.sum(mask) > 0)

  def global_mean(x, per_sequence_values=False):
    if per_sequence_values:  # one value per sequence (a GSPO ratio's flags)
      first = seqs.sum(x * mask) / jnp.maximum(seqs.sum(mask), 1)
      return jnp.sum(jnp.where(seqs.present, first, 0)) / jnp.maximum(jnp.sum(seqs.present), 1)
    return _token_mean(x, mask)

  def per_sequence(x):  # NaN for a sequence without tokens, as TRL's 0/0
    return jnp.where(seq_mask, seqs.sum(x * mask) / jnp.maximum(seqs.sum(mask), 1), jnp.nan)

  low = ((capped < 1 - obj.epsilon) & (adv < 0)).astype(_F32)
  high = ((capped > 1 + obj.eps_high) & (adv > 0)).astype(_F32)
  out = {
    "clip_ratio/low_mean": global_mean(low, sequence_level),
    "clip_ratio/high_mean": global_mean(high, sequence_level),
    "clip_ratio/region_mean": global_mean(jnp.maximum(low, high), sequence_level),
    "clip_ratio/low_min": jnp.nanmin(per_sequence(low)),
    "clip_ratio/high_max": jnp.nanmax(per_sequence(high)),
  }
  if obj.beta:
    out["kl"] = global_mean(kl)
  if entropy is not None:
    out["entropy"] = _token_mean(entropy, mask)
  if obj.entropy_coef:
    out["policy_loss"] = before_entropy
  if is_w is not None and obj.importance_sampling is not None:
    if obj.importance_sampling.startswith("sequence"):
      ones = jnp.ones_like(mask)  # the sequence's weight sits on each of its tokens
      w, on = seqs.sum(is_w) / jnp.maximum(seqs.sum(ones), 1), seqs.present
    else:
      w, on = is_w, mask > 0
    out["sampling/importance_sampling_ratio/min"] = jnp.min(jnp.where(on, w, jnp.inf))
    out["sampling/importance_sampling_ratio/mean"] = jnp.sum(jnp.where(on, w, 0)) / jnp.maximum(
      jnp.sum(on), 1
    )
    out["sampling/importance_sampling_ratio/max"] = jnp.max(jnp.where(on, w, -jnp.inf))
  return out


def _tunix_metrics(
  obj, *, mask, adv, ratio, log_w, seqs, pre_dual, pg, pg_loss, kl, entropy, ppo_kl, is_w, **_
):
  """tunix's ``grpo_loss_fn`` aux dict for this batch."""
  on = mask > 0
  pg_unclipped, pg_clipped = pg

  def mean(x):
    return _token_mean(x, mask, 1e-8)

  lower = (pre_dual > -obj.epsilon_c * adv) & (adv < 0) if obj.epsilon_c is not None else None
  zero = jnp.zeros((), _F32)
  out = {
    "kl": zero,
    "kl_loss": zero,
    "pg_loss": pg_loss,
    "pg_clipfrac": mean((pg_clipped > pg_unclipped).astype(_F32)),
    "ppo_kl": ppo_kl,
    "pg_clipfrac_lower": zero if lower is None else _aggregate(lower.astype(_F32), mask, seqs, obj),
    "is_ratio/mean": mean(ratio),
    "is_ratio/max": jnp.max(jnp.where(on, ratio, 0.0)),
    "is_ratio/min": jnp.min(jnp.where(on, ratio, jnp.inf)),
    "log_ratio/abs_mean": mean(jnp.abs(log_w)),
    "pg_loss/unclipped_mean": mean(pg_unclipped),
    "pg_loss/clipped_mean": mean(pg_clipped),
    "advantage/abs_mean": mean(jnp.abs(adv)),
    "advantage/max": jnp.max(jnp.where(on, adv, -jnp.inf)),
    "advantage/min": jnp.min(jnp.where(on, adv, jnp.inf)),
    "advantage/nonzero_frac": mean((jnp.abs(adv) > 1e-8).astype(_F32)),
    "sampler_is/weight_mean": jnp.ones((), _F32) if is_w is None else mean(is_w),
    "sampler_is/weight_min": jnp.ones((), _F32)
    if is_w is None
    else jnp.min(jnp.where(on, is_w, jnp.inf)),
  }
  if kl is not None:
    out["kl"] = _token_mean(kl, mask)
    out["kl_loss"] = _aggregate(kl, mask, seqs, obj)
  if entropy is not None:
    out["entropy"] = _aggregate(entropy, mask, seqs, obj)
  return out


def policy_token_stats(
  hidden: jax.Array,
  unembed: jax.Array,
  targets: jax.Array,
  *,
  temperature: float | jax.Array = 1.0,
  softcap: float | None = None,
  sampling: Sampling | None = None,
  vocab_axis: int = -1,
  implementation=None,
) -> tuple[jax.Array, jax.Array | None]:
  """``(logprobs, entropy)`` ``[...]`` of the policy from hidden states, one fused sweep.

  Without ``sampling``: the full-vocabulary log-probabilities at
  ``temperature`` and the entropy of that distribution (both differentiable).
  With ``sampling`` (the rollout engine's top-k / top-p / min-p): the processed
  log-probabilities (``lpk.fused_processed_token_stats``) and no entropy (None).
  """
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
  return stats.logprobs, stats.entropy if isinstance(stats, TokenStats) else None


def policy_loss_hidden(
  hidden: jax.Array,
  unembed: jax.Array,
  targets: jax.Array,
  rollout: Rollout,
  objective: PolicyObjective = PolicyObjective(),
  *,
  temperature: float | jax.Array = 1.0,
  softcap: float | None = None,
  sampling: Sampling | None = None,
  vocab_axis: int = -1,
  implementation=None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """:func:`policy_loss` from hidden states: one vocabulary sweep forward, one backward.

  The policy's log-probabilities and entropy come from one
  ``lpk.fused_token_stats`` sweep (or the processed ones under ``sampling``);
  whatever terms the objective asks for, nothing ``[N, V]``-sized is built.

  Args:
    hidden: float ``[B, T, D]``: the states that predict ``targets``.
    unembed: ``[D, V]`` (or a tied ``[V, D]`` table with ``vocab_axis=0``).
    targets: int ``[B, T]``: the sampled tokens.
    rollout, objective: as :func:`policy_loss`.
    temperature, softcap, vocab_axis, implementation: as ``lpk.fused_token_stats``.
    sampling: the engine's ``lpk.Sampling`` when the rollout sampled with
      truncation: the policy's log-probabilities are then the processed ones
      (entropy terms are refused: the processed entropy is not computed).

  Returns:
    ``(loss, metrics)`` as :func:`policy_loss`.
  """
  if sampling is not None and objective.needs_entropy:
    raise ValueError("entropy terms are not available with sampling= (processed log-probabilities)")
  lp, entropy = policy_token_stats(
    hidden,
    unembed,
    targets,
    temperature=temperature,
    softcap=softcap,
    sampling=sampling,
    vocab_axis=vocab_axis,
    implementation=implementation,
  )
  return policy_loss(lp, rollout, objective, entropy=entropy)


__all__ = [
  "PolicyObjective",
  "Rollout",
  "kl_estimate",
  "policy_loss",
  "policy_loss_hidden",
  "policy_token_stats",
]
