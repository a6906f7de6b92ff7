"""What the fused implementations share below them: their matmuls and the token-chunk driver.

``contract`` is every fused implementation's ``dot_general`` (float32
accumulation, the matrix read in its stored layout); ``grad_unembed`` writes
``d unembed`` in that layout; ``chunked_grads`` runs a training loss (or a
backward pass) over token chunks, each chunk's logits made once by one matmul,
for the XLA and Pallas GPU implementations alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from lpkernel.ops.blocks import sweep
from lpkernel.ops.platform import on_cpu_or

_F32 = jnp.float32


def contract(a: jax.Array, a_axis: int, b: jax.Array, b_axis: int, precision) -> jax.Array:
  """``a`` times ``b`` over ``a``'s axis ``a_axis`` and ``b``'s axis ``b_axis`` (2-D each)."""
  dims = (((a_axis,), (b_axis,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=_F32)


def grad_unembed(h, dz, vocab_axis: int, precision, h_t=None) -> jax.Array:
  """``h^T dz`` float32 in the matrix's layout: ``[D, W]``, or ``[W, D]`` for a ``[V, D]``
  table.

  With ``h_t`` (``h.T``, made once by the caller: the CPU) every dot contracts its
  left operand's last axis, which XLA:CPU's bfloat16 dots need (to be fast, and
  with a float32 result at all); a ``[V, D]`` table then takes ``dz.T @ h``, the
  copy of ``dz`` kept by a barrier from being folded back into the dot.
  """
  if h_t is None:
    return contract(h, 0, dz, 0, precision) if vocab_axis == 1 else contract(dz, 0, h, 0, precision)
  if vocab_axis == 1:
    return contract(h_t, 1, dz, 0, precision)
  return contract(lax.optimization_barrier(dz.T), 1, h, 0, precision)


def chunked_grads(h, w, size: int, vocab_axis: int, precision, row_grads, out_init=None, tau=None):
  """Gradients over token chunks, each chunk's logits made once by one matmul.

  For tokens ``[lo, lo + width)`` (``size`` at a time, the tail statically
  shaped): ``z = h_c @ w`` (float32 ``[width, V]``), then
  ``row_grads(z, lo, width) -> (d z, d tau [width] or None, out [width])``, then
  ``d h`` rows ``= d z @ w^T`` and ``d w += h_c^T d z`` (a float32 accumulator
  when there is more than one chunk).

  Returns:
    (out, d h float32 [N, D], d w in w's layout and dtype, d tau float32 [N] or None).
  """
  n = h.shape[0]
  one_chunk = size >= n

  def put(a, b, lo):
    return jax.tree.map(lambda x, y: lax.dynamic_update_slice_in_dim(x, y, lo, 0), a, b)

  def step(carry, lo, width):
    out, dh, dw, dtau = carry
    hc = lax.dynamic_slice_in_dim(h, lo, width, axis=0)
    z = contract(hc, 1, w, 1 - vocab_axis, precision)
    dz, dtau_c, out_c = row_grads(z, lo, width)
    # d h rows = dz @ w^T, contracting the vocabulary axis as stored.
    dh = put(dh, contract(dz, 1, w, vocab_axis, precision), lo)
    # The CPU's layout: a [D, C] copy of the chunk's h for its bfloat16 dots.
    dwc = on_cpu_or(
      lambda: grad_unembed(hc, dz, vocab_axis, precision, lax.optimization_barrier(hc.T)),
      lambda: grad_unembed(hc, dz, vocab_axis, precision),
    )
    dw = dwc.astype(w.dtype) if one_chunk else dw + dwc
    if dtau is not None:
      dtau = put(dtau, dtau_c, lo)
    return put(out, out_c, lo), dh, dw, dtau

  init = (
    out_init,
    jnp.zeros(h.shape, _F32),
    jnp.zeros(w.shape, w.dtype if one_chunk else _F32),
    None if tau is None else jnp.zeros((n,), _F32),
  )
  out, dh, dw, dtau = sweep(step, init, n, min(size, n))
  return out, dh, dw.astype(w.dtype), dtau
