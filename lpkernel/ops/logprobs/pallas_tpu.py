"""The logits path as Pallas Mosaic TPU kernels (opt-in until measured on a TPU).

Forward: a grid of (row blocks, vocabulary blocks); the vocabulary axis is the
reduction ("arbitrary") axis. Each step reduces one ``[block_rows, block_v]``
VMEM tile to :class:`~lpkernel.partials.RowPartials`
(:func:`lpkernel.partials.block_partials`) and merges them
(:func:`lpkernel.partials.merge`) into the row block's float32 outputs, which
stay in VMEM across the vocabulary axis. Blocks respect the
``(8, 128)`` tiling (``(16, 128)`` for 16-bit logits); the tail columns of the
last block are masked by an iota compare (never padded by copying the
logits), and the tail rows of the last row block are dropped on write-back.

Backward: one elementwise pass over the same tiles from each row's shift and
``log(sum exp)``.

Training loss (:func:`lpkernel.nll_loss`), opt-in with ``loss_kernel=True``:
one kernel over blocks of whole rows (``[block_rows, V]`` in VMEM): the row
statistics, the loss's cotangents (``LossRows.row_terms``) and ``d logits``
from one read of the logits and one write.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lpkernel import partials as P
from lpkernel.ops import tiling, tuning
from lpkernel.ops.logprobs import pallas_tpu_kernel as kernels
from lpkernel.ops.mosaic import tpu_call

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class PallasTpuLogits(tuning.Configured):
  """Pallas Mosaic TPU kernels for the logits path.

  Attributes:
    block_rows: rows per tile (a multiple of 8 for float32 logits, 16 for 16-bit).
    block_v: columns per tile (a multiple of 128).
    loss_kernel: run the training loss as one kernel over blocks of whole rows
      (``block_rows`` rows of logits and of ``d logits``, double-buffered, and
      float32 temporaries of that size in VMEM: raise ``vmem_limit_bytes`` for
      long vocabularies); otherwise the forward kernel, then the gradient kernel.
    vmem_limit_bytes: Mosaic's scoped VMEM limit for the loss kernel (None: its default).
    interpret: run in Pallas TPU interpret mode (``pltpu.InterpretParams``) on the CPU.
  """

  block_rows: int = 16
  block_v: int = 2048
  loss_kernel: bool = False
  vmem_limit_bytes: int | None = None
  interpret: bool = False
  op = "logits"
  name = "pallas_tpu"
  platforms = ("tpu",)

  def __post_init__(self):
    tiling.check_tpu_tile_sizes("PallasTpuLogits", self.block_rows, self.block_v)

  def blocks(self, x) -> tuple[int, int]:
    """(rows, columns) of a block of logits ``x [N, V]``, checked against the
    hardware's tiling for ``x``'s dtype."""
    n, v = x.shape
    rows = min(self.block_rows, n) if n < self.block_rows else self.block_rows
    cols = v if v <= self.block_v else self.block_v
    tiling.check_tpu_block("logits", (rows, cols), (n, v), x.dtype)
    return rows, cols

  def partials(self, x, targets, tau, softcap) -> P.RowPartials:
    return self._partials(x, targets, tau, softcap, self.blocks(x))[0]

  def partials_and_lane_maxima(self, x, targets, tau, softcap, group: int):
    """(row partials of ``x [N, V]``, float32 ``[N, 128 * tiles]``: per tile of
    ``128 * group`` columns, each lane's max over its ``group`` columns
    ``l + 128 c`` of the capped logits), from one read of ``x`` (the processed
    paths' first pass; a row narrower than one tile is padded with ``-inf``)."""
    n, v = x.shape
    tile = 128 * group
    if v < tile:  # one tile, whole: a copy of a narrow row
      x = jnp.concatenate([x, jnp.full((n, tile - v), -jnp.inf, x.dtype)], axis=1)
    br = self.blocks(x)[0]
    tiling.check_tpu_block("processed forward", (br, tile), x.shape, x.dtype)
    return self._partials(x, targets, tau, softcap, (br, tile), vocab_size=v)

  def _partials(self, x, targets, tau, softcap, block, vocab_size=None):
    """(partials, the lane maxima or None): lane maxima when ``vocab_size`` is given."""
    n, v = x.shape
    br, bv = block
    grid = (pl.cdiv(n, br), pl.cdiv(v, bv))
    row = pl.BlockSpec((br, 1), lambda i, k: (i, 0))
    in_specs = [pl.BlockSpec((br, bv), lambda i, k: (i, k)), row] + ([] if tau is None else [row])
    col = jax.ShapeDtypeStruct((n, 1), _F32)
    lanes = vocab_size is not None
    out_specs = [row, row, row, row] + [pl.BlockSpec((br, 128), lambda i, k: (i, k))] * lanes
    maxima = [jax.ShapeDtypeStruct((n, 128 * grid[1]), _F32)] * lanes
    m, s, t, arg, *maxima = tpu_call(
      functools.partial(
        kernels.partials_kernel,
        vocab_size=v if vocab_size is None else vocab_size,
        softcap=softcap,
        has_tau=tau is not None,
        lane_groups=lanes,
      ),
      grid,
      in_specs,
      out_specs,
      [col, col, col, jax.ShapeDtypeStruct((n, 1), jnp.int32), *maxima],
      (),
      ("parallel", "arbitrary"),
      self.interpret,
    )(x, targets[:, None], *([] if tau is None else [tau.astype(_F32)[:, None]]))
    return P.RowPartials(m[:, 0], s[:, 0], t[:, 0], arg[:, 0]), (maxima[0] if lanes else None)

  def grad_logits(self, x, targets, tau, softcap, shift, log_s, g, g_lse=None) -> jax.Array:
    return self._grad(x, targets, tau, softcap, shift, log_s, g, g_lse, with_tau=False)[0]

  def grad_logits_and_tau(self, x, targets, tau, softcap, shift, log_s, g, g_lse=None):
    """``d x`` and, accumulated in the same kernel, each row's ``d tau`` (``tau``
    an array); as :meth:`lpkernel.ops.PallasGpuLogits.grad_logits_and_tau`."""
    return self._grad(x, targets, tau, softcap, shift, log_s, g, g_lse, with_tau=True)

  def _grad(self, x, targets, tau, softcap, shift, log_s, g, g_lse, *, with_tau):
    n, v = x.shape
    br, bv = self.blocks(x)
    tile = pl.BlockSpec((br, bv), lambda i, k: (i, k))
    row = pl.BlockSpec((br, 1), lambda i, k: (i, 0))
    optional = [r.astype(_F32) for r in (g_lse, tau) if r is not None]
    rows = [targets, shift, log_s, g, *optional]
    with_tau = with_tau and tau is not None
    kernel = functools.partial(
      kernels.grad_kernel,
      vocab_size=v,
      softcap=softcap,
      has_lse=g_lse is not None,
      has_tau=tau is not None,
      with_dtau=with_tau,
    )
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
    if with_tau:  # a row's sum, accumulated over its column tiles (resident output)
      out_shape.append(jax.ShapeDtypeStruct((n, 1), _F32))
    dx, *dtau = tpu_call(
      kernel,
      (pl.cdiv(n, br), pl.cdiv(v, bv)),
      [tile] + [row] * len(rows),
      [tile, row][: len(out_shape)],
      out_shape,
      (),
      ("parallel", "arbitrary" if with_tau else "parallel"),
      self.interpret,
    )(x, *(r[:, None] for r in rows))
    return dx, (dtau[0][:, 0] if dtau else None)

  def loss_grads(self, x, tau, softcap, rows: P.LossRows):
    """A training loss and its gradients in one kernel over whole rows, or None
    (without ``loss_kernel``, or rows merged across devices); arguments and
    result as for :meth:`lpkernel.ops.PallasGpuLogits.loss_grads`."""
    if not self.loss_kernel or rows.row_terms is None:
      return None
    n, v = x.shape
    br = self.blocks(x)[0]
    tiling.check_tpu_block("logits loss", (br, v), (n, v), x.dtype)
    whole = pl.BlockSpec((br, v), lambda i: (i, 0))
    row = pl.BlockSpec((br, 1), lambda i: (i, 0))
    taus = [] if tau is None else [tau, rows.tau]
    inputs = [x, rows.targets, rows.weights, *taus]
    col = jax.ShapeDtypeStruct((n, 1), _F32)
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype), col] + ([] if tau is None else [col])
    kernel = functools.partial(
      kernels.loss_kernel, softcap=softcap, has_tau=tau is not None, row_terms=rows.row_terms
    )
    dx, out, *dtau = tpu_call(
      kernel,
      (pl.cdiv(n, br),),
      [whole] + [row] * (len(inputs) - 1),
      [whole] + [row] * (len(out_shape) - 1),
      out_shape,
      (),
      ("parallel",),
      self.interpret,
      self.vmem_limit_bytes,
    )(x, *(r.astype(_F32 if r.dtype != jnp.int32 else r.dtype)[:, None] for r in inputs[1:]))
    return out[:, 0], dx, (dtau[0][:, 0] if dtau else None)
