"""A faithful stand-in for the ``gemma`` library's ``gm.nn.Transformer`` (linen).

The real library needs Python >= 3.12 (CI runs 3.11), so the tests drive this
small, randomly initialised copy of its interface instead:

* ``module.apply({"params": params}, tokens, *, images=None, positions=None,
  cache=None, attention_mask=None, return_last_only=None,
  return_hidden_states=None)``, whose call is wrapped so that its signature
  reads ``(*args, **kwargs)`` (gemma's ``nn.jit`` / ``typechecked`` wrappers do
  the same: nothing can be learnt from it);
* it returns ``Output(logits, cache, hidden_states)`` (a ``flax.struct``
  dataclass), ``hidden_states`` after the final norm;
* token 0 is padding: without ``positions`` / ``attention_mask`` it builds them
  from ``tokens != 0`` (positions count real tokens; causal over real keys);
  ``attention_mask`` is ``bool[B, L, L]``;
* the tied table is ``params["embedder"]["input_embedding"]`` ``[V, D]``,
  inputs are scaled by ``sqrt(D)``, logits are ``x @ table.T``, then
  ``config.final_logit_softcap`` (``c * tanh(logits / c)``) when set;
* rotary positions, so a packed sequence scored with the wrong positions or
  mask gives a different number.
"""

from __future__ import annotations

import dataclasses

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

_PADDING_ID = 0


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  num_embed: int = 263
  embed_dim: int = 32
  num_layers: int = 2
  num_heads: int = 2
  head_dim: int = 16
  hidden_dim: int = 64
  final_logit_softcap: float | None = 30.0


@flax.struct.dataclass
class Output:
  logits: jax.Array
  cache: dict | None
  hidden_states: jax.Array | None


def _opaque(fn):
  """Hides ``fn``'s signature as gemma's decorators do: ``(*args, **kwargs)``."""

  def call(*args, **kwargs):
    return fn(*args, **kwargs)

  return call


def _rope(x, positions, base=10_000.0):
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half) / half)
  angle = positions[..., None, None].astype(jnp.float32) * freq  # [B, L, 1, half]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  a, b = x[..., :half], x[..., half:]
  return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


class RMSNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    return x * (1 + scale)


class Embedder(nn.Module):
  vocab_size: int
  embed_dim: int

  def setup(self):
    self.input_embedding_table = self.param(
      "input_embedding", nn.initializers.normal(), (self.vocab_size, self.embed_dim)
    )

  def encode(self, x):
    return self.input_embedding_table[(x,)] * jnp.sqrt(self.embed_dim)

  def decode(self, x):
    return jnp.dot(x, self.input_embedding_table.T)


class Block(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, x, positions, attention_mask):
    c = self.config
    y = RMSNorm()(x)
    q, k, v = (nn.DenseGeneral((c.num_heads, c.head_dim), use_bias=False)(y) for _ in range(3))
    q, k = _rope(q, positions), _rope(k, positions)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(c.head_dim)
    logits = jnp.where(attention_mask[:, None], logits, -2.3819763e38)
    attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    x = x + nn.DenseGeneral(c.embed_dim, axis=(-2, -1), use_bias=False)(attn)
    y = RMSNorm()(x)
    return x + nn.Dense(c.embed_dim)(jax.nn.gelu(nn.Dense(c.hidden_dim)(y)))


class Transformer(nn.Module):
  config: TransformerConfig = TransformerConfig()

  def setup(self):
    self.embedder = Embedder(self.config.num_embed, self.config.embed_dim)
    self.blocks = [Block(self.config, name=f"layer_{i}") for i in range(self.config.num_layers)]
    self.final_norm = RMSNorm()

  @_opaque
  def __call__(
    self,
    tokens,
    *,
    images=None,
    positions=None,
    cache=None,
    attention_mask=None,
    return_last_only=None,
    return_hidden_states=None,
  ) -> Output:
    if images is not None or cache is not None or return_last_only:
      raise NotImplementedError("the stand-in scores whole text sequences only")
    inputs_mask = tokens != _PADDING_ID
    if positions is None:
      positions = jnp.maximum(jnp.cumsum(inputs_mask, axis=-1) - 1, 0)
    if attention_mask is None:
      length = tokens.shape[-1]
      causal = jnp.tril(jnp.ones((length, length), bool))
      attention_mask = causal[None] & inputs_mask[:, None, :]
    x = self.embedder.encode(tokens)
    for block in self.blocks:
      x = block(x, positions, attention_mask)
    x = self.final_norm(x)
    logits = self.embedder.decode(x)
    if self.config.final_logit_softcap is not None:
      logits = jnp.tanh(logits / self.config.final_logit_softcap) * self.config.final_logit_softcap
    return Output(logits=logits, cache=None, hidden_states=x if return_hidden_states else None)
