"""The fused path's Pallas TPU (Mosaic) kernel bodies: a tile's logits on the
MXU, the forward's merge into resident row partials, and the backward's
``d hidden`` (with ``d tau``) and ``d unembed`` kernels. Their wrapper, block
sizes and launch are :mod:`lpkernel.ops.fused.pallas_tpu`."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lpkernel import partials as P
from lpkernel.ops.fused.matmuls import contract
from lpkernel.ops.mosaic import lane_maxima

_F32 = jnp.float32


def _tile_logits(h_ref, w_ref, i, k, *, n, vocab_size, vocab_axis, precision):
  """Tile (i, k): (h, w with the rows past N and columns past V zeroed, raw
  float32 logits x [rows, cols], their global columns, bool[rows, cols] inside the array)."""
  h, w = h_ref[...], w_ref[...]
  rows, cols = h.shape[0], w.shape[vocab_axis]
  row_ok = i * rows + lax.broadcasted_iota(jnp.int32, (rows, 1), 0) < n
  w_cols = k * cols + lax.broadcasted_iota(jnp.int32, w.shape, vocab_axis)
  h = jnp.where(row_ok, h, jnp.zeros_like(h))
  w = jnp.where(w_cols < vocab_size, w, jnp.zeros_like(w))
  x = contract(h, 1, w, 1 - vocab_axis, precision)
  col = k * cols + lax.broadcasted_iota(jnp.int32, x.shape, 1)
  return h, w, x, col, row_ok & (col < vocab_size)


def forward_kernel(h_ref, w_ref, t_ref, *refs, has_tau, softcap, lane_groups=False, **tile):
  """The running row partials (with the entropy's sum); with ``lane_groups``,
  also each tile's 128 lane groups' maxima of the capped logits (the last output,
  :func:`lpkernel.ops.mosaic.lane_maxima`)."""
  tau_ref, outs = (refs[0], refs[1:]) if has_tau else (None, refs)
  maxima_ref, outs = (outs[-1], outs[:-1]) if lane_groups else (None, outs)
  i, k = pl.program_id(0), pl.program_id(1)

  @pl.when(k == 0)
  def _init():
    for ref, value in zip(outs, P.empty(outs[0].shape, with_entropy=True), strict=True):
      ref[...] = value

  _, _, x, col, inside = _tile_logits(h_ref, w_ref, i, k, **tile)
  tau = None if tau_ref is None else tau_ref[...]
  z = jnp.where(inside, P.capped(x, softcap), -jnp.inf)  # no mass, never the argmax
  if maxima_ref is not None:
    maxima_ref[...] = lane_maxima(z)
  block = P.block_partials(z, col, t_ref[...], tau, keepdims=True)
  merged = P.merge(P.RowPartials(*(ref[...] for ref in outs)), block, tau)
  for ref, value in zip(outs, merged, strict=True):
    ref[...] = value


def plain_dy(z, col, target, rows, tau, inside, with_dtau):
  """``d y`` (zero outside the array) of the fused statistics' cotangents and, with
  ``with_dtau``, the tile's part of ``d tau``; ``rows``: shift, log_s, centred,
  g_lp, g_lse, g_entropy (``[rows, 1]`` each)."""
  shift, log_s, centred, g_lp, g_lse, g_ent = rows
  y_c = P.centred_y(z, shift, tau)
  p = P.softmax(z, shift, log_s, tau)
  dy = P.grad_y(col == target, p, g_lp, g_lse, g_ent, y_c, centred, z=z)
  dy, p = (jnp.where(inside, a, 0.0) for a in (dy, p))
  return dy, (P.grad_tau(dy, y_c, tau, shift, p, g_lse) if with_dtau else None)


def _tile_dz(h_ref, w_ref, t_ref, refs, i, k, *, has_tau, softcap, dy_fn, with_dtau, **tile):
  """Tile (i, k)'s (h, w, ``d logits`` zero outside the array, its part of d tau or None)."""
  rows = [ref[...] for ref in refs]
  tau = rows.pop() if has_tau else None
  h, w, x, col, inside = _tile_logits(h_ref, w_ref, i, k, **tile)
  dy, dtau = dy_fn(P.capped(x, softcap), col, t_ref[...], rows, tau, inside, with_dtau)
  dy = jnp.where(inside, dy, 0.0)  # rows past N and columns past V hold anything
  return h, w, P.grad_x(dy, x, tau, softcap).astype(h.dtype), dtau


def dh_kernel(h_ref, w_ref, t_ref, *refs, rows_in, **statics):
  """``d hidden`` (and each row's ``d tau``) over (row blocks, vocabulary blocks);
  ``rows_in``: the ``[N, 1]`` inputs after the targets (``statics["dy_fn"]``'s rows, then tau)."""
  (dh_ref, *dtau_ref), refs = refs[rows_in:], refs[:rows_in]
  i, k = pl.program_id(0), pl.program_id(1)

  @pl.when(k == 0)
  def _init():
    for ref in (dh_ref, *dtau_ref):
      ref[...] = jnp.zeros(ref.shape, _F32)

  _, w, dz, dtau = _tile_dz(h_ref, w_ref, t_ref, refs, i, k, with_dtau=bool(dtau_ref), **statics)
  dh_ref[...] += contract(dz, 1, w, statics["vocab_axis"], statics["precision"])
  if dtau_ref:
    dtau_ref[0][...] += dtau


def dw_kernel(h_ref, w_ref, t_ref, *refs, rows_in, **statics):
  dw_ref, acc = refs[-2:]
  k, i = pl.program_id(0), pl.program_id(1)

  @pl.when(i == 0)
  def _init():
    acc[...] = jnp.zeros(acc.shape, _F32)

  h, _, dz, _ = _tile_dz(h_ref, w_ref, t_ref, refs[:-2], i, k, with_dtau=False, **statics)
  precision = statics["precision"]
  # d w tile = h^T dz ([D, cols]), or its transpose for a [V, D] table.
  if statics["vocab_axis"] == 1:
    acc[...] += contract(h, 0, dz, 0, precision)
  else:
    acc[...] += contract(dz, 0, h, 0, precision)

  @pl.when(i == pl.num_programs(1) - 1)
  def _write():
    dw_ref[...] = acc[...].astype(dw_ref.dtype)
