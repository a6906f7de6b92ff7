"""The processed logits path as Pallas Mosaic TPU kernels, opt-in.

Forward: the logits path's kernel (:class:`~lpkernel.ops.PallasTpuLogits`)
reads each row once, in tiles of ``128 * group`` columns, for its softmax
partials and, from the same VMEM tiles, the maxima of 128 lane groups per tile
(lane ``l``'s group: the tile's columns ``l + 128 c``, ``c < group``; elementwise
maxima of lane-aligned slices, no relayout). The ``K`` largest values come from
the gathered columns of the ``K`` groups with the largest maxima (XLA's top-k
and gather), the kept set from :mod:`lpkernel.ops.processed.select` (its rare
searches as XLA sweeps).

Backward: one elementwise pass over the logits path's tiles from each row's
shift, normaliser, kept mass and threshold key, with each row's
``d temperature`` accumulated in the same kernel.

From hidden states (:func:`lpkernel.fused_processed_token_stats`), as
:class:`~lpkernel.ops.PallasTpuFused`: MXU tiles whose logits never leave VMEM,
the forward kernel writing the lane-group maxima beside the partials, and the
backward's ``d hidden`` (with ``d tau``) and ``d unembed`` kernels with the
processed cotangents; the candidates' dot products are XLA's.

Opt-in (``implementation="pallas_tpu"``) until a TPU measures it faster than XLA.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lpkernel.ops.fused.pallas_tpu import PallasTpuFused
from lpkernel.ops.logprobs.pallas_tpu import PallasTpuLogits
from lpkernel.ops.mosaic import tpu_call
from lpkernel.ops.processed import pallas_tpu_kernel as kernels
from lpkernel.ops.processed.candidates import from_group_maxima, from_hidden_record
from lpkernel.ops.processed.grads import live_rows

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class PallasTpuProcessed:
  """Pallas Mosaic TPU kernels for the processed logits path
  (:class:`lpkernel.ops.base.ProcessedImplementation`).

  Attributes:
    logits: the tiles (``block_rows``; the backward's ``block_v``; the forward's
      tiles are ``128 * group`` columns wide, :attr:`lpkernel.ProcessedConfig.group`);
      ``interpret`` is taken from this object.
    fused: the path from hidden states' tiles (``block_rows``; the backward's
      ``block_v``; ``vmem_limit_bytes``); the forward's tiles are ``128 * group``
      columns wide.
    interpret: run in Pallas TPU interpret mode on the CPU.
  """

  logits: PallasTpuLogits = PallasTpuLogits()
  fused: PallasTpuFused = PallasTpuFused()
  interpret: bool = False
  op = "processed"
  name = "pallas_tpu"
  platforms = ("tpu",)
  lanes = 128

  def _rows(self) -> PallasTpuLogits:
    return dataclasses.replace(self.logits, interpret=self.interpret)

  def partials_and_candidates(self, x, targets, tau, softcap, k, config):
    """The row kernel's partials and group maxima, then the candidates from the
    maxima (:func:`~lpkernel.ops.processed.candidates.from_group_maxima`)."""
    parts, maxima = self._rows().partials_and_lane_maxima(x, targets, tau, softcap, config.group)
    return parts, from_group_maxima(x, maxima, softcap, k, config, self.lanes)

  def _fused(self, precision) -> PallasTpuFused:
    return dataclasses.replace(self.fused, precision=precision, interpret=self.interpret)

  def hidden_partials_and_candidates(
    self, h, w, targets, tau, softcap, vocab_axis, precision, k, config, fused
  ):
    """The fused forward kernel with its lane-group maxima, then the ``K`` groups
    with the largest maxima gathered
    (:func:`~lpkernel.ops.processed.candidates.from_hidden_record`)."""
    parts, maxima = self._fused(precision).partials_and_lane_maxima(
      h, w, targets, tau, softcap, config.group, vocab_axis
    )
    args = (softcap, vocab_axis, precision, k, config, fused.dot_dtype, self.lanes)
    return parts._replace(sy=None), from_hidden_record(h, w, maxima, *args)

  def hidden_processed_grads(
    self, h, w, targets, params, kappa, log_s, log_sk, g, softcap, vocab_axis, precision, fused,
    tau_grad,
  ):  # fmt: skip
    """The fused backward's two kernels (``d hidden`` with ``d tau``, ``d unembed``)
    with the processed cotangents (:func:`.pallas_tpu_kernel.processed_dy`)."""
    h = jnp.where(live_rows(g)[:, None], h, 0)  # dead rows (NaN, padding) stay out of d w
    rows = [params.shift, log_s, log_sk, kappa, params.min_p, *g]
    return self._fused(precision).grads_of(
      h, w, targets, params.tau, softcap, rows, kernels.processed_dy, tau_grad, vocab_axis
    )

  def processed_grads(self, x, targets, params, kappa, log_s, log_sk, g, softcap, tau_grad):
    rows = self._rows()
    n, v = x.shape
    br, bv = rows.blocks(x)
    tile = pl.BlockSpec((br, bv), lambda i, k: (i, k))
    row = pl.BlockSpec((br, 1), lambda i, k: (i, 0))
    with_dtau = tau_grad and params.tau is not None
    kernel = functools.partial(
      kernels.grad_kernel,
      vocab_size=v,
      softcap=softcap,
      has_tau=params.tau is not None,
      with_dtau=with_dtau,
    )
    row_args = [targets, params.shift, log_s, log_sk, kappa, params.min_p, *g]
    row_args += [] if params.tau is None else [params.tau]
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
    if with_dtau:  # a row's sum, accumulated over its column tiles (resident output)
      out_shape.append(jax.ShapeDtypeStruct((n, 1), _F32))
    dx, *dtau = tpu_call(
      kernel,
      (pl.cdiv(n, br), pl.cdiv(v, bv)),
      [tile] + [row] * len(row_args),
      [tile, row][: len(out_shape)],
      out_shape,
      (),
      ("parallel", "arbitrary" if with_dtau else "parallel"),
      self.interpret,
    )(x, *(r[:, None] for r in row_args))
    return dx, (dtau[0][:, 0] if dtau else None)
