"""A GRPO-style step against a rollout engine's processed distribution.

The engine sampled with temperature 0.7, top-k 50 and top-p 0.95 and reported
processed log-probabilities (vLLM's ``logprobs_mode="processed_logprobs"``);
the trainer recomputes the same quantity from hidden states, without the
logits, and the importance ratio is unbiased. Run: ``python -m lpkernel.examples.rollout_replay``.
"""

import jax
import jax.numpy as jnp

import lpkernel as lpk

B, T, D, V = 4, 16, 32, 1000
SAMPLING = lpk.Sampling(temperature=0.7, top_k=50, top_p=0.95)  # as the engine sampled


def policy_step(hidden, unembed, tokens, response, rollout_lp, advantages, eps=0.2):
  """The clipped surrogate over the response tokens the sampler could draw."""
  targets = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)  # row t predicts t + 1
  stats = lpk.fused_processed_token_stats(hidden, unembed, targets, SAMPLING)
  mask = jnp.concatenate([response[:, 1:], jnp.zeros_like(response[:, :1])], axis=1) & stats.kept
  ratio = jnp.exp(jnp.where(mask, stats.logprobs - rollout_lp, 0.0))
  adv = advantages[:, None]
  surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - eps, 1 + eps) * adv)
  return -jnp.sum(jnp.where(mask, surrogate, 0.0)) / jnp.maximum(mask.sum(), 1)


def main() -> float:
  keys = jax.random.split(jax.random.key(0), 3)
  hidden = jax.random.normal(keys[0], (B, T, D))
  unembed = jax.random.normal(keys[1], (D, V)) / D**0.5
  # Responses the engine could have sampled: each token its row's most likely.
  greedy = jnp.argmax(hidden @ unembed, axis=-1)
  tokens = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), greedy[:, :-1]], axis=1)
  response = jnp.broadcast_to(jnp.arange(T) >= 6, (B, T))
  targets = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
  rollout_lp = lpk.fused_processed_token_stats(hidden, unembed, targets, SAMPLING).logprobs
  advantages = jnp.array([1.0, -0.5, 0.3, -0.8])
  loss, (dh, dw) = jax.value_and_grad(policy_step, argnums=(0, 1))(
    hidden, unembed, tokens, response, rollout_lp, advantages
  )
  print(f"loss {float(loss):.4f}, |d hidden| {float(jnp.abs(dh).sum()):.4f}, d unembed {dw.shape}")
  return float(loss)


if __name__ == "__main__":
  main()
