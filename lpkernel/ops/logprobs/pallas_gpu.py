"""The logits path as Pallas GPU (Triton) kernels.

Forward: one pass over each row. A program owns ``block_rows`` rows and one of
``splits`` spans of the vocabulary; it streams ``[block_rows, block_v]`` tiles
with masked loads (any ``V``, any ``N``), keeps the running max, the rescaled
sum of ``exp`` and the first argmax in float32 registers, and writes one
:class:`~lpkernel.partials.RowPartials` per (row, span). The spans are merged by
:func:`lpkernel.partials.combine`; they exist so that a few long rows still fill
the GPU. The target's logit is picked in the same pass, from the same
arithmetic as the max it is compared with (in the one tile that holds it).

Backward: one elementwise pass (1 read, 1 write) from each row's shift and
``log(sum exp)``.

Training loss (:func:`lpkernel.nll_loss`), opt-in with ``loss_kernel=True``:
one kernel per row block does the forward's online pass over the row, computes
the loss's cotangents from the row's statistics (``LossRows.row_terms``), and
writes ``d logits`` tile by tile in a second pass over the row, which the GPU's
L2 mostly still holds.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lpkernel import partials as P
from lpkernel.ops import tiling, tuning
from lpkernel.ops.logprobs import pallas_gpu_kernel as kernels
from lpkernel.ops.pallas_backends import require_triton

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class PallasGpuLogits(tuning.Configured):
  """Pallas GPU (Triton) kernels for the logits path.

  Attributes:
    block_rows: rows per program (a power of two).
    block_v: columns per tile (a power of two).
    num_warps: warps per program.
    splits: vocabulary spans per row, or None to fill about ``target_programs``
      programs when there are few rows.
    target_programs: programs the forward aims for (a few per multiprocessor).
    bwd_block_rows, bwd_block_v, bwd_num_warps: the backward's tiles.
    loss_kernel: run the training loss (:func:`lpkernel.nll_loss`) as one
      kernel per row block (the forward's tiling), its gradient written while
      the row is in L2; opt-in until timed on a GPU (otherwise the forward
      kernel, then the gradient kernel, both measured).
    interpret: run in Pallas interpret mode (on the CPU, for tests).
  """

  block_rows: int = 1
  block_v: int = 2048
  num_warps: int = 4
  splits: int | None = None
  target_programs: int = 528
  bwd_block_rows: int = 4
  bwd_block_v: int = 1024
  bwd_num_warps: int = 4
  loss_kernel: bool = False
  interpret: bool = False
  op = "logits"
  name = "pallas_gpu"
  platforms = ("gpu",)

  def __post_init__(self):
    for field in ("block_rows", "block_v", "bwd_block_rows", "bwd_block_v", "num_warps"):
      tiling.check_power_of_two(f"PallasGpuLogits.{field}", getattr(self, field))
    if self.splits is not None and self.splits < 1:
      raise ValueError(f"PallasGpuLogits.splits={self.splits} must be None or positive")

  def num_splits(self, n: int, v: int) -> int:
    if self.splits is not None:
      return min(self.splits, pl.cdiv(v, self.block_v))
    row_blocks = pl.cdiv(n, self.block_rows)
    return max(1, min(pl.cdiv(self.target_programs, row_blocks), pl.cdiv(v, self.block_v)))

  def partials(self, x, targets, tau, softcap, with_entropy: bool = False) -> P.RowPartials:
    """Row partials of logits ``x [N, V]``; with the entropy's ``sy`` if asked (the fused path)."""
    return self._partials(x, targets, tau, softcap, with_entropy, None)[0]

  def partials_and_group_maxima(self, x, targets, tau, softcap, group: int):
    """(row partials of ``x [N, V]``, float32 ``[N, ceil(V / group)]``: the max of
    each ``group``-column group of the capped logits), from one read of ``x``
    (the processed paths' first pass; ``group`` divides ``block_v``)."""
    if self.block_v % group:
      raise ValueError(
        f"PallasGpuLogits.block_v={self.block_v} must be a multiple of the "
        f"candidates' group={group} (lpkernel.ProcessedConfig.group)"
      )
    return self._partials(x, targets, tau, softcap, False, group)

  def _partials(self, x, targets, tau, softcap, with_entropy: bool, group: int | None):
    n, v = x.shape
    splits = self.num_splits(n, v)
    span = pl.cdiv(pl.cdiv(v, splits), self.block_v) * self.block_v
    tiling.check_gpu_block("logits forward", (self.block_rows, self.block_v), x.dtype)
    kernel = functools.partial(
      kernels.partials_kernel,
      block_rows=self.block_rows,
      block_v=self.block_v,
      span=span,
      softcap=softcap,
      has_tau=tau is not None,
      with_entropy=with_entropy,
      group=group,
    )
    out = jax.ShapeDtypeStruct((splits * n,), _F32)
    arg = jax.ShapeDtypeStruct((splits * n,), jnp.int32)
    groups = () if group is None else (jax.ShapeDtypeStruct((n, pl.cdiv(v, group)), _F32),)
    (*fields,) = pl.pallas_call(
      kernel,
      grid=(pl.cdiv(n, self.block_rows), splits),
      out_shape=(out, out, out, arg) + ((out,) if with_entropy else ()) + groups,
      compiler_params=require_triton().CompilerParams(num_warps=self.num_warps, num_stages=3),
      interpret=self.interpret,
      name="lpkernel_logits_partials",
    )(x, targets, *_tau_args(tau))
    fields, maxima = (fields, None) if group is None else (fields[:-1], fields[-1])
    if splits == 1:
      return P.RowPartials(*fields), maxima
    blocks = P.RowPartials(*(a.reshape(splits, n) for a in fields))
    return P.combine(blocks, P.over_axis(0), tau, expand=lambda r: r[None]), maxima

  def grad_logits(self, x, targets, tau, softcap, shift, log_s, g, g_lse=None) -> jax.Array:
    if g_lse is None:
      return self._grad(x, targets, tau, softcap, [shift, log_s, g], x.dtype)[0]
    return self.grad_logits_and_tau(x, targets, tau, softcap, shift, log_s, g, g_lse)[0]

  def grad_logits_and_tau(self, x, targets, tau, softcap, shift, log_s, g, g_lse=None):
    """``d x`` and, summed in the same kernel, each row's ``d tau`` (``tau`` an array).

    Returns:
      (d x [N, V] in x's dtype, float32[N]: this block's part of ``d tau``; the
      parts of a row's vocabulary blocks, or shards, add up to its ``d tau``).
    """
    zeros = jnp.zeros_like(g)
    rows = [shift, log_s, g, zeros if g_lse is None else g_lse, zeros, zeros]
    return self._grad_and_tau(x, targets, tau, softcap, rows, x.dtype)

  def loss_grads(self, x, tau, softcap, rows: P.LossRows):
    """A training loss over whole rows and its gradients in one kernel, or None
    (without ``loss_kernel``, rows merged across devices, or too few rows to
    fill the GPU: then the caller runs :meth:`partials` and :meth:`grad_logits`).

    Args:
      x: float[N, V] logits; ``tau``: float32[N] safe temperatures (1 on dead
        and poisoned rows) or None.
      rows: the loss's rows (:class:`lpkernel.partials.LossRows`, with ``row_terms``).

    Returns:
      (float32[N] per-row terms, d x [N, V] in x's dtype, d tau float32[N] or None).
    """
    n, v = x.shape
    if not self.loss_kernel or rows.row_terms is None or self.num_splits(n, v) > 1:
      return None
    tiling.check_gpu_block("logits loss", (self.block_rows, self.block_v), x.dtype)
    kernel = functools.partial(
      kernels.loss_kernel,
      block_rows=self.block_rows,
      block_v=self.block_v,
      softcap=softcap,
      has_tau=tau is not None,
      row_terms=rows.row_terms,
    )
    row = jax.ShapeDtypeStruct((n,), _F32)
    out_shape = (jax.ShapeDtypeStruct(x.shape, x.dtype), row) + (() if tau is None else (row,))
    assert rows.weights is not None, "a loss's rows carry their weights"
    taus = () if tau is None or rows.tau is None else (tau.astype(_F32), rows.tau.astype(_F32))
    dx, out, *dtau = pl.pallas_call(
      kernel,
      grid=(pl.cdiv(n, self.block_rows),),
      out_shape=out_shape,
      compiler_params=require_triton().CompilerParams(num_warps=self.num_warps, num_stages=3),
      interpret=self.interpret,
      name="lpkernel_logits_loss",
    )(x, rows.targets, rows.weights.astype(_F32), *taus)
    return out, dx, (dtau[0] if dtau else None)

  def grad_fused_logits(self, z, targets, tau, softcap, f: P.Finished, g, dtype):
    """The fused path's ``d z`` from float32 logits ``z [N, V]`` (a token chunk).

    Args:
      f: the rows' finished statistics; g: (g_lp, g_lse, g_entropy) float32 [N].
      dtype: ``d z``'s dtype (the hidden states', for the matmuls that follow).

    Returns:
      (d z [N, V] in ``dtype``, d tau float32 [N] or None).
    """
    return self._grad_and_tau(z, targets, tau, softcap, [f.shift, f.log_s, *g, f.centred], dtype)

  def _grad_and_tau(self, x, targets, tau, softcap, rows, dtype):
    """The gradient kernel in its fused mode (six ``rows``): (d x, d tau float32[N] or None)."""
    dx, *parts = self._grad(x, targets, tau, softcap, rows, dtype)
    return dx, (jnp.sum(parts[0].reshape(-1, x.shape[0]), axis=0) if parts else None)

  def _grad(self, x, targets, tau, softcap, rows, dtype):
    n, v = x.shape
    bn, bv = self.bwd_block_rows, self.bwd_block_v
    tiling.check_gpu_block("logits backward", (bn, bv), x.dtype)
    fused = len(rows) > 3
    kernel = functools.partial(
      kernels.grad_kernel,
      block_rows=bn,
      block_v=bv,
      softcap=softcap,
      has_tau=tau is not None,
      fused=fused,
    )
    out = [jax.ShapeDtypeStruct(x.shape, dtype)]
    if fused and tau is not None:  # per (column block, row): the block's sum for d tau
      out.append(jax.ShapeDtypeStruct((pl.cdiv(v, bv) * n,), _F32))
    return pl.pallas_call(
      kernel,
      grid=(pl.cdiv(n, bn), pl.cdiv(v, bv)),
      out_shape=tuple(out),
      compiler_params=require_triton().CompilerParams(num_warps=self.bwd_num_warps, num_stages=2),
      interpret=self.interpret,
      name="lpkernel_logits_grad",
    )(x, targets, *rows, *_tau_args(tau))


def _tau_args(tau):
  """The temperature rows as an optional trailing kernel input."""
  return () if tau is None else (tau.astype(_F32),)
