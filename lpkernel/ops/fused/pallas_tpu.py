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
from jax.experimental import pallas as pl

from lpkernel import partials as P
from lpkernel.ops import tiling, tuning
from lpkernel.ops.fused import pallas_tpu_kernel as kernels
from lpkernel.ops.mosaic import tpu_call
from lpkernel.ops.pallas_backends import require_mosaic

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class PallasTpuFused(tuning.Configured):
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
  op = "fused"
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
      functools.partial(kernels.forward_kernel, **self._statics(h, w, vocab_axis, softcap, tau)),
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
      functools.partial(kernels.dh_kernel, **statics),
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
      functools.partial(kernels.dw_kernel, **statics),
      (pl.cdiv(v, cols), pl.cdiv(n, rows)),
      [hs, ws] + [row] * len(vectors),
      ws,
      jax.ShapeDtypeStruct(w.shape, w.dtype),
      [require_mosaic().VMEM(ws.block_shape, _F32)],  # d w tile's float32 accumulator
      ("parallel", "arbitrary"),
      self.interpret,
      self.vmem_limit_bytes,
    )(*inputs)
    return dh, dw, (dtau[0][:, 0] if dtau else None)


def _column(a):
  """An optional ``[N]`` vector as the ``[N, 1]`` column kernels take."""
  return () if a is None else (a[:, None] if a.dtype == jnp.int32 else a.astype(_F32)[:, None],)
