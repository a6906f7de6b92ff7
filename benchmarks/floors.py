"""The machine's floors, measured on the same inputs as the methods.

* read: one ``jnp.sum`` over the logits (every byte read once);
* exp: ``sum(exp(x - c))`` (on CPUs exp throughput, not bandwidth, often binds);
* read+write: one fused elementwise op writing a logits-sized result (the
  backward pass must at least read the logits and write their gradient);
* matmul: the bare ``hidden @ unembed`` (fused rows), and for the backward the
  three matmuls of a linear layer's forward and backward.
"""

from __future__ import annotations

import jax.numpy as jnp

_F32 = jnp.float32


def read(logits):
  return jnp.sum(logits, dtype=_F32)


def exp(logits):
  return jnp.sum(jnp.exp(logits.astype(_F32) - 3.0))


def read_write(logits):
  return (logits * 2).astype(logits.dtype)


def matmul(hidden, unembed):
  return jnp.dot(hidden, unembed, preferred_element_type=_F32).astype(hidden.dtype)


def three_matmuls(hidden, unembed):
  """Forward logits, then ``dhidden = dlogits @ W.T`` and ``dW = h.T @ dlogits``."""
  logits = matmul(hidden, unembed)
  return logits @ unembed.T, hidden.T @ logits


LOGITS_FLOORS = {"read": read, "exp": exp, "read+write": read_write}
FUSED_FLOORS = {"matmul": matmul, "3 matmuls": three_matmuls}
