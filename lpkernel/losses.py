"""Training losses on ``Scores``: pure functions of arrays, usable with optax.

Conventions: log-probabilities are ``Scores`` fields (float32 ``[B]`` or
``[B, S]``); losses are scalars to *minimise*.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from lpkernel.scoring import Scores

Normalisation = Literal["tokens", "sequences", "sum"]


def sft_loss(scores: Scores, normalise: Normalisation = "tokens", *, response_only: bool = True):
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
  if response_only:
    logprob, count = scores.response_logprob, scores.response_tokens
  else:
    logprob, count = scores.joint_logprob, scores.prompt_tokens + scores.response_tokens
  nll = -jnp.sum(jnp.where(count > 0, logprob, 0.0))
  if normalise == "sum":
    return nll
  if normalise == "tokens":
    return nll / jnp.maximum(jnp.sum(count), 1)
  if normalise == "sequences":
    return nll / jnp.maximum(jnp.sum(count > 0), 1)
  raise ValueError(f"normalise must be 'tokens', 'sequences' or 'sum', got {normalise!r}")


def _preference_metrics(chosen_reward, rejected_reward, loss):
  margin = chosen_reward - rejected_reward
  return {
    "loss": jnp.mean(loss),
    "rewards/chosen": jnp.mean(chosen_reward),
    "rewards/rejected": jnp.mean(rejected_reward),
    "rewards/margin": jnp.mean(margin),
    "rewards/accuracy": jnp.mean((margin > 0).astype(jnp.float32)),
  }


def dpo_loss(
  policy_chosen,
  policy_rejected,
  reference_chosen,
  reference_rejected,
  *,
  beta: float = 0.1,
  label_smoothing: float = 0.0,
):
  r"""DPO (sigmoid) loss on ``log Pr(y | x)`` of chosen and rejected responses.

  .. math::
    h = \beta [(\pi_c - r_c) - (\pi_r - r_r)],\quad
    L = -(1 - \epsilon) \log\sigma(h) - \epsilon \log\sigma(-h)

  Args:
    policy_chosen, policy_rejected: float32[B] ``response_logprob`` under the policy.
    reference_chosen, reference_rejected: the same under the frozen reference.
    beta: inverse temperature of the implicit reward.
    label_smoothing: conservative DPO's flip probability ``epsilon``.

  Returns:
    (loss scalar, metrics dict with rewards and accuracy).
  """
  chosen = beta * (policy_chosen - reference_chosen)
  rejected = beta * (policy_rejected - reference_rejected)
  h = chosen - rejected
  loss = -(1 - label_smoothing) * jax.nn.log_sigmoid(h) - label_smoothing * jax.nn.log_sigmoid(-h)
  return jnp.mean(loss), _preference_metrics(chosen, rejected, loss)


def ipo_loss(
  policy_chosen, policy_rejected, reference_chosen, reference_rejected, *, beta: float = 0.1
):
  r"""IPO loss: :math:`(h - 1 / (2\beta))^2` with ``h`` the log-ratio margin (no beta)."""
  chosen = policy_chosen - reference_chosen
  rejected = policy_rejected - reference_rejected
  loss = jnp.square(chosen - rejected - 1.0 / (2.0 * beta))
  return jnp.mean(loss), _preference_metrics(beta * chosen, beta * rejected, loss)


def simpo_loss(chosen: Scores, rejected: Scores, *, beta: float = 2.0, gamma: float = 0.5):
  r"""SimPO: length-normalised, reference-free, with a target margin ``gamma``.

  .. math:: L = -\log\sigma(\beta \bar\pi_c - \beta \bar\pi_r - \gamma),\quad
     \bar\pi = \log \Pr(y|x) / |y|
  """
  c = beta * chosen.response_logprob / jnp.maximum(chosen.response_tokens, 1)
  r = beta * rejected.response_logprob / jnp.maximum(rejected.response_tokens, 1)
  loss = -jax.nn.log_sigmoid(c - r - gamma)
  return jnp.mean(loss), _preference_metrics(c, r, loss)


def z_loss(lse: jax.Array, mask: jax.Array | None = None, *, weight: float = 1e-4):
  """``weight * mean(lse ** 2)`` over ``mask`` (the log-sum-exp from ``TokenStats``)."""
  sq = jnp.square(lse)
  if mask is None:
    return weight * jnp.mean(sq)
  return weight * jnp.sum(jnp.where(mask, sq, 0.0)) / jnp.maximum(jnp.sum(mask), 1)
