"""What the fused implementations share below them: their matmuls and the token-chunk driver.

``contract`` is every fused implementation's ``dot_general`` (float32
accumulation, the matrix read in its stored layout); ``grad_unembed`` writes
``d unembed`` in that layout; ``chunked_grads`` runs a training loss (or a
backward pass) over token chunks, each chunk's logits made once by one matmul,
for the XLA and Pallas GPU implementations alike.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from lpkernel.ops.blocks import sweep
from lpkernel.ops.platform import on_cpu_or

_F32 = jnp.float32


def contract(a: jax.Array, a_axis: int, b: jax.Array, b_axis: int, precision) -> jax.Array:
  """``a`` times ``b`` over ``a``'s axis ``a_axis`` and ``b``'s axis ``b_axis`` (``b`` 2-D;
  ``a``'s other axes lead the result)."""
  dims = (((a_axis,), (b_axis,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=_F32)


def materialised_logits(hidden: jax.Array, unembed: jax.Array, vocab_axis: int, precision):
  """float32 ``[..., V]``: ``hidden [..., D]`` times ``unembed`` (``[D, V]``, or a
  tied ``[V, D]`` table with ``vocab_axis`` 0, read as stored): the references'
  materialised logits."""
  return contract(hidden, hidden.ndim - 1, unembed, 1 - vocab_axis, precision)


ADD_ROWS_BYTES = 64 << 20


class UnembedGrad(NamedTuple):
  """``d unembed`` written block by block along its vocabulary axis in a loop.

  With ``bits`` (``uint16``, the CPU's bfloat16): XLA:CPU copies a whole
  bfloat16 carry per block update but updates a uint16 one in place. A ``[D, V]``
  matrix's gradient is carried as its bits (the view back at the end is one copy
  of it); a ``[V, D]`` table's row blocks go in through a bit view of the
  bfloat16 carry, in place and with no copy (a uint16 carry's view back was a
  table-sized temporary: 1.16 GiB at V = 151936, D = 4096).
  """

  shape: tuple[int, ...]
  dtype: Any
  vocab_axis: int
  bits: Any = None

  @property
  def carried(self):
    """The carry's dtype."""
    return self.bits if self.bits is not None and self.vocab_axis == 1 else self.dtype

  @staticmethod
  def bits_for(dtype, cpu: bool):
    """``uint16`` for a bfloat16 gradient on the CPU, else None."""
    return jnp.dtype(jnp.uint16) if cpu and dtype == jnp.bfloat16 else None

  def zeros(self, zero: jax.Array) -> jax.Array:
    """The carry's zeros, broadcast from the float32 scalar ``zero``."""
    return jnp.broadcast_to(zero.astype(self.carried), self.shape)

  def put(self, dw: jax.Array, block: jax.Array, lo) -> jax.Array:
    """``dw`` with ``block`` (in the gradient's dtype) at vocabulary offset ``lo``."""
    if self.bits is None:
      return lax.dynamic_update_slice_in_dim(dw, block, lo, self.vocab_axis)
    block = lax.bitcast_convert_type(block, self.bits)
    if self.vocab_axis == 1:
      return lax.dynamic_update_slice_in_dim(dw, block, lo, 1)
    view = lax.dynamic_update_slice_in_dim(lax.bitcast_convert_type(dw, self.bits), block, lo, 0)
    return lax.bitcast_convert_type(view, self.dtype)

  def value(self, dw: jax.Array) -> jax.Array:
    """The gradient in its dtype."""
    return dw if self.carried == self.dtype else lax.bitcast_convert_type(dw, self.dtype)


def add_rows(dh, dz, wb, vocab_axis: int, precision) -> jax.Array:
  """``dh + dz @ wb^T`` (float32 ``[N, D]``; ``dz [N, W]``, ``wb`` a block of the
  matrix, its vocabulary axis ``vocab_axis``), updated in place in token chunks
  of at most ``ADD_ROWS_BYTES``: one dot's ``[N, D]`` result beside ``dh`` was
  the largest temporary of a long sequence's backward (512 MiB at N = 32768,
  D = 4096)."""
  n, d = dh.shape
  chunk = max(1, min(n, ADD_ROWS_BYTES // (4 * d)))
  if chunk == n:
    return dh + contract(dz, 1, wb, vocab_axis, precision)

  def step(dh, lo, width):
    piece = contract(lax.dynamic_slice_in_dim(dz, lo, width, 0), 1, wb, vocab_axis, precision)
    rows = lax.dynamic_slice_in_dim(dh, lo, width, 0) + piece
    return lax.dynamic_update_slice_in_dim(dh, rows, lo, 0)

  return sweep(step, dh, n, chunk)


def fresh_rows(wb: jax.Array, fresh: jax.Array, vocab_axis: int) -> jax.Array:
  """A block of the matrix with the columns not ``fresh`` (bool ``[1, W]``) zeroed:
  in ``dz @ wb^T`` they then add nothing (masking the block of the matrix, not
  the larger ``dz [N, W]``)."""
  return jnp.where(fresh if vocab_axis == 1 else fresh.T, wb, 0)


def hidden_for_grad_unembed(h: jax.Array, cpu: bool, dot_dtype) -> jax.Array | None:
  """``h.T`` made once for :func:`grad_unembed` in a program lowered for the CPU
  (``cpu``) where the matmuls take ``h`` as it is (``dot_dtype`` None), else
  None. XLA:CPU's fast bfloat16 dots want the contracted axis last on the left
  (contracting N on ``h`` itself, the fused backward's d w dots ran 5x slower,
  and the processed forward and backward from hidden states took 1366 ms
  against 640 ms at N 4096, D 512, V 32000 in bfloat16). With
  ``dot_dtype`` set ``h`` is already a float32 copy, and a second one would
  take the temporaries past the bound for 15-30% on the d w dots; other
  backends contract ``h`` as it is."""
  return lax.optimization_barrier(h.T) if cpu and dot_dtype is None else None


def grad_unembed(h, dz, vocab_axis: int, precision, h_t=None) -> jax.Array:
  """``h^T dz`` float32 in the matrix's layout: ``[D, W]``, or ``[W, D]`` for a ``[V, D]``
  table.

  With ``h_t`` (``h.T``, made once by the caller: :func:`hidden_for_grad_unembed`)
  every dot contracts its left operand's last axis, which XLA:CPU's bfloat16
  dots need (to be fast, and with a float32 result at all); a ``[V, D]`` table
  then takes ``dz.T @ h``, the copy of ``dz`` kept by a barrier from being
  folded back into the dot.
  """
  if h_t is None:
    return contract(h, 0, dz, 0, precision) if vocab_axis == 1 else contract(dz, 0, h, 0, precision)
  if vocab_axis == 1:
    return contract(h_t, 1, dz, 0, precision)
  return lax.optimization_barrier(contract(h_t, 1, dz, 0, precision)).T


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
