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
    return self._partials(h, w, targets, tau, softcap, vocab_axis, self.blocks(h, w, vocab_axis))

  def partials_and_lane_maxima(self, h, w, targets, tau, softcap, group: int, vocab_axis=1):
    """(partials, float32 ``[N, 128 * tiles]`` lane-group maxima of the capped
    logits, as :meth:`lpkernel.ops.PallasTpuLogits.partials_and_lane_maxima`)
    over tiles of ``128 * group`` columns (the processed paths' first pass)."""
    v = w.shape[vocab_axis]
    rows = self.blocks(h, w, vocab_axis)[0]
    cols = 128 * group
    if v < cols:  # one tile, whole: a zero-padded copy of a narrow table
      pad = [(0, 0), (0, 0)]
      pad[vocab_axis] = (0, cols - v)
      w = jnp.pad(w, pad)
    w_block = (h.shape[1], cols) if vocab_axis == 1 else (cols, h.shape[1])
    tiling.check_tpu_block("processed unembed", w_block, w.shape, w.dtype)
    return self._partials(h, w, targets, tau, softcap, vocab_axis, (rows, cols), v)

  def _partials(self, h, w, targets, tau, softcap, vocab_axis, block, vocab_size=None):
    """The partials; with ``vocab_size`` (the table's columns before padding)
    also the lane-group maxima."""
    n, v = h.shape[0], w.shape[vocab_axis]
    lanes = vocab_size is not None
    rows, cols = block
    grid = (pl.cdiv(n, rows), pl.cdiv(v, cols))
    hs, ws, row = self._specs(h, w, vocab_axis, rows, cols)
    col = jax.ShapeDtypeStruct((n, 1), _F32)
    maxima = [jax.ShapeDtypeStruct((n, 128 * grid[1]), _F32)] * lanes
    m, s, t, arg, sy, *maxima = tpu_call(
      functools.partial(
        kernels.forward_kernel,
        lane_groups=lanes,
        **dict(
          self._statics(h, w, vocab_axis, softcap, tau), vocab_size=vocab_size if lanes else v
        ),
      ),
      grid,
      [hs, ws, row] + ([] if tau is None else [row]),
      [row] * 5 + [pl.BlockSpec((rows, 128), lambda i, k: (i, k))] * lanes,
      [col, col, col, jax.ShapeDtypeStruct((n, 1), jnp.int32), col, *maxima],
      (),
      ("parallel", "arbitrary"),
      self.interpret,
      self.vmem_limit_bytes,
    )(h, w, targets[:, None], *_column(tau))
    parts = P.RowPartials(*(a[:, 0] for a in (m, s, t, arg, sy)))
    return (parts, maxima[0]) if lanes else parts

  def grads(self, h, w, targets, tau, softcap, f: P.Finished, g, vocab_axis=1):
    """(d h float32 [N, D], d w in w's layout and dtype, d tau float32 [N] or None);
    arguments as for :meth:`lpkernel.ops.XlaFused.grads`."""
    g = P.dense_cotangents(g, f.shift)
    rows = [f.shift, f.log_s, f.centred, *g]
    return self.grads_of(h, w, targets, tau, softcap, rows, kernels.plain_dy, True, vocab_axis)

  def grads_of(self, h, w, targets, tau, softcap, rows, dy_fn, tau_grad, vocab_axis=1):
    """The backward's two kernels for any cotangent formula: ``dy_fn(z, cols,
    targets, rows, tau, inside, with_dtau) -> (d y, the tile's d tau or None)``
    (:func:`~lpkernel.ops.fused.pallas_tpu_kernel.plain_dy`) of the tile's capped
    logits and the ``[rows, 1]`` blocks of ``rows`` (``[N]`` vectors); with
    ``tau_grad`` and a ``tau``, each row's ``d tau`` too.

    Returns:
      (d h float32 [N, D], d w in w's layout and dtype, d tau float32 [N] or None).
    """
    n, d = h.shape
    v = w.shape[vocab_axis]
    blocks = self.blocks(h, w, vocab_axis)
    vectors = [targets, *rows, *([] if tau is None else [tau])]
    statics = dict(
      self._statics(h, w, vocab_axis, softcap, tau), dy_fn=dy_fn, rows_in=len(vectors) - 1
    )
    inputs = (h, w, *(_column(a)[0] for a in vectors))

    hs, ws, row = self._specs(h, w, vocab_axis, *blocks)
    dh_out = [jax.ShapeDtypeStruct((n, d), _F32)]
    dh_specs = [pl.BlockSpec((blocks[0], d), lambda i, k: (i, 0))]
    if tau is not None and tau_grad:
      dh_out.append(jax.ShapeDtypeStruct((n, 1), _F32))
      dh_specs.append(row)
    dh, *dtau = tpu_call(
      functools.partial(kernels.dh_kernel, **statics),
      (pl.cdiv(n, blocks[0]), pl.cdiv(v, blocks[1])),
      [hs, ws] + [row] * len(vectors),
      dh_specs,
      dh_out,
      (),
      ("parallel", "arbitrary"),
      self.interpret,
      self.vmem_limit_bytes,
    )(*inputs)

    hs, ws, row = self._specs(h, w, vocab_axis, *blocks, vocab_major=True)
    dw = tpu_call(
      functools.partial(kernels.dw_kernel, **statics),
      (pl.cdiv(v, blocks[1]), pl.cdiv(n, blocks[0])),
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
  """An optional ``[N]`` vector as the ``[N, 1]`` column kernels take (integers as
  they are, floats as float32)."""
  if a is None:
    return ()
  return (a[:, None] if jnp.issubdtype(a.dtype, jnp.integer) else a.astype(_F32)[:, None],)
