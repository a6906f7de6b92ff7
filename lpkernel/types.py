"""What every layer shares: the results of the ops and of scoring (the bottom floor).

:class:`Scores` (per-sequence chain-rule sums) and :class:`TokenStats` (per-token
statistics of the fused op) are registered pytrees, so they pass through
``jit``, ``vmap``, ``grad`` and sharding unchanged. They import nothing of
lpkernel: every module can use them without an import cycle.
"""

from __future__ import annotations

import flax.struct
import jax


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
class TokenStats:
  """Per-token results of one fused sweep, each float32/bool ``[...]``.

  Attributes:
    logprobs: log Pr(target); NaN for ids outside ``[0, V)``.
    lse: log-sum-exp of the (transformed) logits row (z-loss is ``lse ** 2``).
    entropy: entropy of the softmax, ``lse - E_p[y]``.
    greedy: the target is the first argmax of its row.
  """

  logprobs: jax.Array
  lse: jax.Array
  entropy: jax.Array
  greedy: jax.Array


__all__ = ["Scores", "TokenStats"]
