"""The fused path as Pallas Mosaic TPU kernels (opt-in until measured on a TPU).

Forward: a grid of (row blocks, vocabulary blocks), the vocabulary the
reduction ("arbitrary") axis. Each step multiplies a ``[block_rows, D]`` tile of
``hidden`` by a ``[D, block_v]`` tile of the matrix (``[block_v, D]`` for a tied
table) on the MXU with float32 accumulation, so the logits only ever exist as
one float32 VMEM tile; its :class:`~lpkernel.partials.RowPartials` (with the
entropy's sum) are merged by :func:`lpkernel.partials.merge` into the row
block's output, which stays in VMEM across the vocabulary axis.

Backward: two kernels that recompute each tile's logits, as flash attention's
backward does: ``d hidden`` (and ``d tau``) over (row blocks, vocabulary
blocks), accumulated in the float32 output tile; ``d unembed`` over
(vocabulary blocks, row blocks), accumulated in a float32 VMEM tile and written
in the matrix's dtype. That is five matmuls per forward+backward against the
XLA sweep's four, in exchange for never writing a logits block to HBM.

Tails: the rows of the last row block past ``N`` and the columns of the last
vocabulary block past ``V`` hold unspecified values on a TPU. They are zeroed
by an iota compare before any matmul (never padded by copying), the columns
past ``V`` are ``-inf`` in the softmax and zero in every gradient, and the
write-back drops them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lpkernel import partials as P
from lpkernel.ops import tiling
from lpkernel.ops.fused.matmuls import contract
from lpkernel.ops.mosaic import tpu_call

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class PallasTpuFused:
  """Pallas Mosaic TPU kernels for the fused path.

  Attributes:
    block_rows: tokens per tile (a multiple of 8; of 16 for 16-bit hidden states).
    block_v: vocabulary columns per tile (a multiple of 128).
    precision: the matmuls' precision, as for :class:`~lpkernel.ops.XlaFused`.
    vmem_limit_bytes: Mosaic's scoped VMEM limit for the kernels, or None for
      its default (16 MiB on some chips).
    interpret: run in Pallas TPU interpret mode (``pltpu.InterpretParams``) on the CPU.

  VMEM: the ``d unembed`` kernel, the largest, double-buffers a ``[block_rows,
  D]`` and a ``[D, block_v]`` input tile and a ``[D, block_v]`` output tile and
  keeps a float32 ``[D, block_v]`` accumulator: about 14 MiB at D = 4096 in
  bfloat16 with the defaults. Lower ``block_v`` for wider models, or raise
  ``vmem_limit_bytes`` on chips with more VMEM.
  """

  block_rows: int = 128
  block_v: int = 256
  precision: str | None = None
  vmem_limit_bytes: int | None = None
  interpret: bool = False
  name = "pallas_tpu"
  platforms = ("tpu",)

  def __post_init__(self):
    tiling.check_tpu_tile_sizes("PallasTpuFused", self.block_rows, self.block_v)

  def blocks(self, h, w, vocab_axis: int) -> tuple[int, int]:
    """(rows, columns) of the tiles for ``h [N, D]`` and ``w``; validated against the tiling."""
    n, d = h.shape
    v = w.shape[vocab_axis]
    rows = n if n < self.block_rows else self.block_rows
    cols = v if v <= self.block_v else self.block_v
    tiling.check_tpu_block("hidden", (rows, d), (n, d), h.dtype)
    tiling.check_tpu_block("row statistics", (rows, 1), (n, 1), _F32)
    w_block = (d, cols) if vocab_axis == 1 else (cols, d)
    tiling.check_tpu_block("unembed", w_block, w.shape, w.dtype)
    return rows, cols

  def _specs(self, h, w, vocab_axis, rows, cols, vocab_major=False):
    """BlockSpecs of ``h``, ``w`` and ``[N, 1]`` row vectors over a grid (i, k)
    of row and vocabulary blocks, or (k, i) with ``vocab_major``."""

    def ik(f):
      return (lambda k, i: f(i, k)) if vocab_major else f

    d = h.shape[1]
    hs = pl.BlockSpec((rows, d), ik(lambda i, k: (i, 0)))
    if vocab_axis == 1:
      ws = pl.BlockSpec((d, cols), ik(lambda i, k: (0, k)))
    else:
      ws = pl.BlockSpec((cols, d), ik(lambda i, k: (k, 0)))
    return hs, ws, pl.BlockSpec((rows, 1), ik(lambda i, k: (i, 0)))

  def _statics(self, h, w, vocab_axis, softcap, tau):
    return dict(
      n=h.shape[0],
      vocab_size=w.shape[vocab_axis],
      vocab_axis=vocab_axis,
      softcap=softcap,
      has_tau=tau is not None,
      precision=self.precision,
    )

  def partials(self, h, w, targets, tau, softcap, vocab_axis=1) -> P.RowPartials:
    """Partials of ``h [N, D] @ w [D, V]`` (or ``w [V, D]`` with ``vocab_axis=0``)."""
    n, v = h.shape[0], w.shape[vocab_axis]
    rows, cols = self.blocks(h, w, vocab_axis)
    hs, ws, row = self._specs(h, w, vocab_axis, rows, cols)
    col = jax.ShapeDtypeStruct((n, 1), _F32)
    out = tpu_call(
      functools.partial(_forward_kernel, **self._statics(h, w, vocab_axis, softcap, tau)),
      (pl.cdiv(n, rows), pl.cdiv(v, cols)),
      [hs, ws, row] + ([] if tau is None else [row]),
      [row] * 5,
      [col, col, col, jax.ShapeDtypeStruct((n, 1), jnp.int32), col],
      (),
      ("parallel", "arbitrary"),
      self.interpret,
      self.vmem_limit_bytes,
    )(h, w, targets[:, None], *_column(tau))
    return P.RowPartials(*(a[:, 0] for a in out))

  def grads(self, h, w, targets, tau, softcap, f: P.Finished, g, vocab_axis=1):
    """(d h float32 [N, D], d w in w's layout and dtype, d tau float32 [N] or None);
    arguments as for :meth:`lpkernel.ops.XlaFused.grads`."""
    n, d = h.shape
    v = w.shape[vocab_axis]
    rows, cols = self.blocks(h, w, vocab_axis)
    statics = self._statics(h, w, vocab_axis, softcap, tau)
    g = P.dense_cotangents(g, f.shift)
    vectors = [targets, f.shift, f.log_s, f.centred, *g, *([] if tau is None else [tau])]
    inputs = (h, w, *(_column(a)[0] for a in vectors))

    hs, ws, row = self._specs(h, w, vocab_axis, rows, cols)
    dh_out = [jax.ShapeDtypeStruct((n, d), _F32)]
    dh_specs = [pl.BlockSpec((rows, d), lambda i, k: (i, 0))]
    if tau is not None:
      dh_out.append(jax.ShapeDtypeStruct((n, 1), _F32))
      dh_specs.append(row)
    dh, *dtau = tpu_call(
      functools.partial(_dh_kernel, **statics),
      (pl.cdiv(n, rows), pl.cdiv(v, cols)),
      [hs, ws] + [row] * len(vectors),
      dh_specs,
      dh_out,
      (),
      ("parallel", "arbitrary"),
      self.interpret,
      self.vmem_limit_bytes,
    )(*inputs)

    hs, ws, row = self._specs(h, w, vocab_axis, rows, cols, vocab_major=True)
    dw = tpu_call(
      functools.partial(_dw_kernel, **statics),
      (pl.cdiv(v, cols), pl.cdiv(n, rows)),
      [hs, ws] + [row] * len(vectors),
      ws,
      jax.ShapeDtypeStruct(w.shape, w.dtype),
      [pltpu.VMEM(ws.block_shape, _F32)],  # d w tile's float32 accumulator
      ("parallel", "arbitrary"),
      self.interpret,
      self.vmem_limit_bytes,
    )(*inputs)
    return dh, dw, (dtau[0][:, 0] if dtau else None)


def _column(a):
  """An optional ``[N]`` vector as the ``[N, 1]`` column kernels take."""
  return () if a is None else (a[:, None] if a.dtype == jnp.int32 else a.astype(_F32)[:, None],)


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


def _forward_kernel(h_ref, w_ref, t_ref, *refs, has_tau, softcap, **tile):
  tau_ref, outs = (refs[0], refs[1:]) if has_tau else (None, refs)
  i, k = pl.program_id(0), pl.program_id(1)

  @pl.when(k == 0)
  def _init():
    for ref, value in zip(outs, P.empty(outs[0].shape, with_entropy=True), strict=True):
      ref[...] = value

  _, _, x, col, inside = _tile_logits(h_ref, w_ref, i, k, **tile)
  tau = None if tau_ref is None else tau_ref[...]
  z = jnp.where(inside, P.capped(x, softcap), -jnp.inf)  # no mass, never the argmax
  block = P.block_partials(z, col, t_ref[...], tau, keepdims=True)
  merged = P.merge(P.RowPartials(*(ref[...] for ref in outs)), block, tau)
  for ref, value in zip(outs, merged, strict=True):
    ref[...] = value


def _tile_dz(h_ref, w_ref, t_ref, refs, i, k, *, has_tau, softcap, **tile):
  """Tile (i, k)'s ``d logits`` (zero outside the array), with what d h, d w and d tau need."""
  shift, log_s, centred, g_lp, g_lse, g_ent, *tau = (ref[...] for ref in refs)
  tau = tau[0] if has_tau else None
  h, w, x, col, inside = _tile_logits(h_ref, w_ref, i, k, **tile)
  z = P.capped(x, softcap)
  y_c = P.centred_y(z, shift, tau)
  p = P.softmax(z, shift, log_s, tau)
  dy = P.grad_y(col == t_ref[...], p, g_lp, g_lse, g_ent, y_c, centred, z=z)
  dy, p = (jnp.where(inside, a, 0.0) for a in (dy, p))
  dx = P.grad_x(dy, x, tau, softcap).astype(h.dtype)
  return h, w, dx, dy, y_c, shift, tau, p, g_lse


def _dh_kernel(h_ref, w_ref, t_ref, *refs, **statics):
  rows_in = 6 + statics["has_tau"]  # shift, log_s, centred, g_lp, g_lse, g_ent (, tau)
  (dh_ref, *dtau_ref), refs = refs[rows_in:], refs[:rows_in]
  i, k = pl.program_id(0), pl.program_id(1)

  @pl.when(k == 0)
  def _init():
    for ref in (dh_ref, *dtau_ref):
      ref[...] = jnp.zeros(ref.shape, _F32)

  _, w, dz, dy, y_c, shift, tau, p, g_lse = _tile_dz(h_ref, w_ref, t_ref, refs, i, k, **statics)
  dh_ref[...] += contract(dz, 1, w, statics["vocab_axis"], statics["precision"])
  if dtau_ref:
    dtau_ref[0][...] += P.grad_tau(dy, y_c, tau, shift, p, g_lse)


def _dw_kernel(h_ref, w_ref, t_ref, *refs, **statics):
  dw_ref, acc = refs[-2:]
  k, i = pl.program_id(0), pl.program_id(1)

  @pl.when(i == 0)
  def _init():
    acc[...] = jnp.zeros(acc.shape, _F32)

  h, _, dz, *_ = _tile_dz(h_ref, w_ref, t_ref, refs[:-2], i, k, **statics)
  precision = statics["precision"]
  # d w tile = h^T dz ([D, cols]), or its transpose for a [V, D] table.
  if statics["vocab_axis"] == 1:
    acc[...] += contract(h, 0, dz, 0, precision)
  else:
    acc[...] += contract(dz, 0, h, 0, precision)

  @pl.when(i == pl.num_programs(1) - 1)
  def _write():
    dw_ref[...] = acc[...].astype(dw_ref.dtype)
