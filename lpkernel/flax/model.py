"""A tiny decoder-only Transformer in ``flax.nnx`` for tests, notebooks and demos.

Token + learned position embeddings, pre-norm blocks of causal self-attention
(masked by ``segment_ids`` so packed sequences never attend across each other)
and a GELU MLP, RMSNorm, and a tied unembedding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lpkernel.flax.spec import ModelSpec, causal_segment_mask, packed_positions


@dataclasses.dataclass(frozen=True)
class TinyLMConfig:
  vocab_size: int = 64
  width: int = 64
  num_layers: int = 2
  num_heads: int = 4
  max_length: int = 128
  mlp_ratio: int = 4


def attention_mask(segment_ids: jax.Array) -> jax.Array:
  """bool[B, 1, T, T]: :func:`causal_segment_mask` with a heads axis."""
  return causal_segment_mask(segment_ids)[:, None]


class Block(nnx.Module):
  def __init__(self, cfg: TinyLMConfig, rngs: nnx.Rngs):
    self.norm1 = nnx.RMSNorm(cfg.width, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
      num_heads=cfg.num_heads, in_features=cfg.width, decode=False, rngs=rngs
    )
    self.norm2 = nnx.RMSNorm(cfg.width, rngs=rngs)
    self.up = nnx.Linear(cfg.width, cfg.mlp_ratio * cfg.width, rngs=rngs)
    self.down = nnx.Linear(cfg.mlp_ratio * cfg.width, cfg.width, rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.attn(self.norm1(x), mask=mask)
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class TinyLM(nnx.Module):
  """``TinyLM(cfg, rngs=nnx.Rngs(0))(tokens, segment_ids=..., positions=...)``.

  Returns logits float32[B, T, V], or with ``return_hidden=True`` the final
  hidden states [B, T, D] and the tied embedding table [V, D] (as stored) for
  ``score_hidden(..., vocab_axis=0)``. Its ``lpkernel_spec`` declares this and
  that it keeps packed sequences apart through ``segment_ids`` and ``positions``.
  """

  lpkernel_spec = ModelSpec(
    segment_ids="segment_ids",
    positions="positions",
    hidden="return_hidden",
    vocab_axis=0,
    max_length=lambda module, variables: module.cfg.max_length,
  )

  def __init__(self, cfg: TinyLMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.width, rngs=rngs)
    self.pos = nnx.Embed(cfg.max_length, cfg.width, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.norm = nnx.RMSNorm(cfg.width, rngs=rngs)

  def __call__(self, tokens, *, segment_ids=None, positions=None, return_hidden=False):
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    if positions is None:
      positions = packed_positions(segment_ids)
    if tokens.shape[1] > self.cfg.max_length:
      raise ValueError(f"T={tokens.shape[1]} exceeds max_length={self.cfg.max_length}")
    # Pad ids (e.g. -100) are clipped for the lookup; they are never scored.
    x = self.embed(jnp.clip(tokens, 0, self.cfg.vocab_size - 1)) + self.pos(positions)
    mask = attention_mask(segment_ids)
    for block in self.blocks:
      x = block(x, mask)
    hidden = self.norm(x)
    table = self.embed.embedding[...]  # [V, D], tied
    if return_hidden:
      return hidden, table
    return hidden @ table.T
