"""GRPO on a toy task with optax, through lpkernel's objective from hidden states.

A tiny ``TinyLM`` policy samples responses with top-k truncation (the rollout
engine's sampler, here in plain JAX); the reward is the fraction of response
tokens equal to ``TARGET``. Each step: sample groups, score them, take the
group-relative advantages, then a clipped-surrogate step (DAPO's clip-higher,
k3 KL against the frozen reference) with the policy's *processed*
log-probabilities recomputed from hidden states, without the logits. Run:
``python -m lpkernel.examples.grpo`` (prints the mean reward per step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import lpkernel as lpk
from lpkernel import rl
from lpkernel.flax import TinyLM, TinyLMConfig

VOCAB, PROMPT, RESPONSE, GROUP, PROMPTS = 12, 2, 6, 8, 4
TARGET = 3  # the toy reward: the fraction of response tokens equal to it
SAMPLING = lpk.Sampling(temperature=1.0, top_k=6)  # the engine's truncation
OBJECTIVE = rl.PolicyObjective(epsilon_high=0.28, beta=0.02, aggregation="dapo")


def policy_stats(model, tokens, sampling=SAMPLING):
  """Processed log-probabilities ``[B, RESPONSE]`` of the response tokens."""
  hidden, table = model(tokens, return_hidden=True)
  rows = hidden[:, PROMPT - 1 : -1]  # row t predicts token t + 1
  stats = lpk.fused_processed_token_stats(rows, table, tokens[:, PROMPT:], sampling, vocab_axis=0)
  return stats.logprobs


@nnx.jit
def sample(model, prompts, key):
  """Responses drawn from the processed (top-k) distribution, token by token (one
  compiled program: eagerly, each token's step would compile op by op)."""
  tokens = prompts
  for _ in range(RESPONSE):
    key, sub = jax.random.split(key)
    logits = model(tokens)[:, -1] / SAMPLING.temperature
    keep = lpk.sampling.kept_mask(logits, SAMPLING)
    nxt = jax.random.categorical(sub, jnp.where(keep, logits, -jnp.inf))
    tokens = jnp.concatenate([tokens, nxt[:, None]], axis=1)
  return tokens


def advantages(rewards):
  """GRPO's group-relative advantages: (r - group mean) / (group std + 1e-6)."""
  r = rewards.reshape(-1, GROUP)
  return ((r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True, ddof=1) + 1e-6)).reshape(-1)


def grpo_step(model, reference, optimizer, tokens, rewards):
  old = jax.lax.stop_gradient(policy_stats(model, tokens))  # the rollout's log-probs
  rollout = rl.Rollout(
    mask=jnp.ones_like(old),
    advantages=advantages(rewards),
    old_logprobs=old,
    # The reference scores the full distribution: its top-k may not hold the token.
    ref_logprobs=policy_stats(reference, tokens, SAMPLING._replace(top_k=0)),
  )

  def loss_fn(model):
    hidden, table = model(tokens, return_hidden=True)
    return rl.policy_loss_hidden(
      hidden[:, PROMPT - 1 : -1], table, tokens[:, PROMPT:], rollout, OBJECTIVE,
      sampling=SAMPLING, vocab_axis=0,
    )  # fmt: skip

  (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads)
  return loss, metrics


def main(steps: int = 12, seed: int = 0) -> list[float]:
  cfg = TinyLMConfig(vocab_size=VOCAB, width=32, num_heads=2, num_layers=1, max_length=16)
  model, reference = TinyLM(cfg, rngs=nnx.Rngs(seed)), TinyLM(cfg, rngs=nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
  step = nnx.jit(grpo_step)
  key = jax.random.key(seed)
  mean_rewards = []
  for i in range(steps):
    key, k_prompt, k_sample = jax.random.split(key, 3)
    prompts = jax.random.randint(k_prompt, (PROMPTS, PROMPT), 1, VOCAB).repeat(GROUP, axis=0)
    tokens = sample(model, prompts, k_sample)
    rewards = jnp.mean(tokens[:, PROMPT:] == TARGET, axis=1).astype(jnp.float32)
    loss, metrics = step(model, reference, optimizer, tokens, rewards)
    mean_rewards.append(float(rewards.mean()))
    print(
      f"step {i}: reward {mean_rewards[-1]:.3f}  loss {float(loss):+.4f}  "
      f"kl {float(metrics['kl']):.4f}  clipped {float(metrics['clip_ratio/region_mean']):.3f}"
    )
  return mean_rewards


if __name__ == "__main__":
  main()
