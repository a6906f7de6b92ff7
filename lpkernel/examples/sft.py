"""A small synthetic instruction task and an SFT loop for the reference LM.

Used by the tests and the notebooks to show what the response-only objective
optimises: ``log Pr(y | x)``, leaving ``log Pr(x)`` alone.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lpkernel.flax.adapters import score_model, sft_loss_model

BOS, SEP = 0, 1


@dataclasses.dataclass(frozen=True)
class InstructionTask:
  """Rows ``[BOS, x..., SEP, y...]`` where ``y`` is ``x`` reversed, shifted by one.

  ``x`` tokens are drawn uniformly from ``[2, 2 + alphabet)``; the response
  mask marks ``y`` (the SEP token belongs to the prompt).
  """

  alphabet: int = 16
  prompt_length: int = 5

  @property
  def length(self) -> int:
    return 2 + 2 * self.prompt_length

  @property
  def vocab_size(self) -> int:
    return 3 + self.alphabet

  def sample(self, seed: int, n: int):
    rng = np.random.default_rng(seed)
    x = rng.integers(2, 2 + self.alphabet, size=(n, self.prompt_length))
    y = 2 + (x[:, ::-1] - 2 + 1) % self.alphabet
    tokens = np.concatenate([np.full((n, 1), BOS), x, np.full((n, 1), SEP), y], axis=1)
    response = np.zeros_like(tokens, bool)
    response[:, 2 + self.prompt_length :] = True
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(response)


def train_sft(
  model,
  task: InstructionTask,
  *,
  steps: int,
  response_only: bool,
  batch: int = 32,
  learning_rate: float = 3e-3,
  seed: int = 0,
  eval_every: int = 10,
  eval_size: int = 128,
):
  """Trains ``model`` in place with AdamW; returns the held-out history.

  Returns:
    list of ``{"step", "log Pr(x)", "log Pr(y|x)"}`` every ``eval_every`` steps.
  """
  optimizer = nnx.Optimizer(model, optax.adamw(learning_rate), wrt=nnx.Param)
  held_out = task.sample(10_000 + seed, eval_size)

  @nnx.jit
  def step(model, optimizer, tokens, response):
    def loss_fn(model):
      # sft_loss(score_model(...)), its gradients written in the forward pass from
      # the model's hidden states (no [B, T, V] logits).
      return sft_loss_model(model, tokens, response, response_only=response_only)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  evaluate = nnx.jit(lambda model, t, r: score_model(model, t, r))
  history = []

  def record(i):
    s = evaluate(model, *held_out)
    history.append(
      {
        "step": i,
        "log Pr(x)": float(jnp.mean(s.prompt_logprob)),
        "log Pr(y|x)": float(jnp.mean(s.response_logprob)),
      }
    )

  record(0)
  for i in range(1, steps + 1):
    step(model, optimizer, *task.sample(seed * 100_003 + i, batch))
    if i % eval_every == 0 or i == steps:
      record(i)
  return history
