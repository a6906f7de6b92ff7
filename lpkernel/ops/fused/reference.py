"""The fused op's plain definition: the logits op's reference on the
materialised ``h @ w`` (a float32 ``[N, V]`` temporary, on purpose)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lpkernel.ops.logprobs.reference import logits_stats
from lpkernel.ops.logprobs.reference import nll_loss as nll_loss

_F32 = jnp.float32


def fused_token_stats(
  h: jax.Array,
  w: jax.Array,
  targets: jax.Array,
  tau: jax.Array | None = None,
  softcap: float | None = None,
):
  """``TokenStats`` of the materialised ``h @ w`` (float32 accumulation)."""
  return logits_stats(jnp.dot(h, w, preferred_element_type=_F32), targets, tau, softcap)
