"""The processed logits path as Pallas GPU (Triton) kernels, opt-in.

Forward: the logits path's row kernel (:class:`~lpkernel.ops.PallasGpuLogits`)
reads each row once for its softmax partials and, from the same tiles, the max
of every ``group``-column group; the ``K`` largest values come from the gathered
columns of the ``K`` groups with the largest maxima (XLA's top-k and gather,
``K * group`` columns per row), and the kept set from
:mod:`lpkernel.ops.processed.select` (its rare searches as XLA sweeps).

Backward: one elementwise pass (1 read, 1 write) from each row's shift,
normaliser, kept mass and threshold key, with each row's ``d temperature``
summed in the same kernel.

Opt-in (``implementation="pallas_gpu"``) until a GPU measures it faster than XLA.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lpkernel.ops import tiling
from lpkernel.ops.logprobs.pallas_gpu import PallasGpuLogits
from lpkernel.ops.pallas_backends import require_triton
from lpkernel.ops.processed import pallas_gpu_kernel as kernels

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class PallasGpuProcessed:
  """Pallas GPU kernels for the processed logits path
  (:class:`lpkernel.ops.base.ProcessedImplementation`).

  Attributes:
    logits: the row kernels' tiling (forward ``block_rows``, ``block_v``, a
      multiple of :attr:`lpkernel.ProcessedConfig.group`, ``splits``; backward
      ``bwd_*``); ``interpret`` is taken from this object.
    interpret: run in Pallas interpret mode (on the CPU, for tests).
  """

  logits: PallasGpuLogits = PallasGpuLogits()
  interpret: bool = False
  op = "processed"
  name = "pallas_gpu"
  platforms = ("gpu",)
  lanes = 1

  def _rows(self) -> PallasGpuLogits:
    return dataclasses.replace(self.logits, interpret=self.interpret)

  def partials_and_group_maxima(self, x, targets, tau, softcap, config):
    return self._rows().partials_and_group_maxima(x, targets, tau, softcap, config.group)

  def processed_grads(self, x, targets, params, kappa, log_s, log_sk, g, softcap, tau_grad):
    rows = self._rows()
    n, v = x.shape
    bn, bv = rows.bwd_block_rows, rows.bwd_block_v
    tiling.check_gpu_block("processed backward", (bn, bv), x.dtype)
    with_dtau = tau_grad and params.tau is not None
    kernel = functools.partial(
      kernels.grad_kernel,
      block_rows=bn,
      block_v=bv,
      softcap=softcap,
      has_tau=params.tau is not None,
      tau_grad=with_dtau,
    )
    out = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
    if with_dtau:  # per (column block, row): the block's part of d tau
      out.append(jax.ShapeDtypeStruct((pl.cdiv(v, bv) * n,), _F32))
    row_args = (params.shift, log_s, log_sk, kappa, params.min_p, *g)
    tau = () if params.tau is None else (params.tau,)
    dx, *parts = pl.pallas_call(
      kernel,
      grid=(pl.cdiv(n, bn), pl.cdiv(v, bv)),
      out_shape=tuple(out),
      compiler_params=require_triton().CompilerParams(num_warps=rows.bwd_num_warps, num_stages=2),
      interpret=self.interpret,
      name="lpkernel_processed_grad",
    )(x, targets, *row_args, *tau)
    return dx, (jnp.sum(parts[0].reshape(-1, n), axis=0) if parts else None)
