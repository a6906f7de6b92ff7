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

From hidden states (:func:`lpkernel.fused_processed_token_stats`), as
:class:`~lpkernel.ops.PallasGpuFused`: token chunks, each chunk's float32
logits made by one vendor matmul and read by the row kernel's partials and by
XLA's record of each group's largest values (:mod:`~lpkernel.ops.processed.record`:
the ``K`` largest come from it, only the few groups that may hold more of them
gathered), the backward's by the gradient kernel after a recompute; ``d hidden``
and ``d unembed`` by two more vendor matmuls; the candidates' dot products are
XLA's.

Replay of recorded kept ids from hidden states
(:func:`lpkernel.fused_replay_token_logprobs`): one kernel gathers each token's
kept rows of the ``[V, D]`` table and takes their dot products; the backward's
kernel gives ``d hidden`` and adds each row's ``d unembed`` atomically, one
kept id at a time. No chunks: nothing beyond ``[N, K]`` and the float32
``[V, D]`` gradient is held (XLA's steps take one token at a time where a
token's kept rows outweigh 1% of the logits).

Opt-in (``implementation="pallas_gpu"``) until a GPU measures it faster than XLA.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lpkernel import partials as P
from lpkernel.ops import tiling
from lpkernel.ops.blocks import sweep
from lpkernel.ops.fused.matmuls import chunked_grads, contract
from lpkernel.ops.fused.pallas_gpu import PallasGpuFused
from lpkernel.ops.logprobs.pallas_gpu import PallasGpuLogits
from lpkernel.ops.pallas_backends import require_triton
from lpkernel.ops.processed import pallas_gpu_kernel as kernels
from lpkernel.ops.processed import select as S
from lpkernel.ops.processed.candidates import from_group_maxima, from_hidden_record
from lpkernel.ops.processed.grads import live_rows
from lpkernel.ops.processed.record import group_tops

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class PallasGpuProcessed:
  """Pallas GPU kernels for the processed logits path
  (:class:`lpkernel.ops.base.ProcessedImplementation`).

  Attributes:
    logits: the row kernels' tiling (forward ``block_rows``, ``block_v``, a
      multiple of :attr:`lpkernel.ProcessedConfig.group`, ``splits``; backward
      ``bwd_*``); ``interpret`` is taken from this object.
    fused: the path from hidden states' token chunks (``chunk_tokens``,
      ``chunk_bytes``; its other fields unused).
    replay_block_k, replay_block_d, replay_num_warps: the replay kernels'
      tiling: kept ids per program of the forward, columns per program (the
      largest power of two up to it that divides ``D``), warps per program.
    interpret: run in Pallas interpret mode (on the CPU, for tests).
  """

  logits: PallasGpuLogits = PallasGpuLogits()
  fused: PallasGpuFused = PallasGpuFused()
  replay_block_k: int = 64
  replay_block_d: int = 128
  replay_num_warps: int = 4
  interpret: bool = False
  op = "processed"
  name = "pallas_gpu"
  platforms = ("gpu",)
  lanes = 1

  def _rows(self) -> PallasGpuLogits:
    return dataclasses.replace(self.logits, interpret=self.interpret)

  def partials_and_candidates(self, x, targets, tau, softcap, k, config):
    """The row kernel's partials and group maxima, then the candidates from the
    maxima (:func:`~lpkernel.ops.processed.candidates.from_group_maxima`)."""
    parts, maxima = self._rows().partials_and_group_maxima(x, targets, tau, softcap, config.group)
    return parts, from_group_maxima(x, maxima, softcap, k, config, self.lanes)

  def processed_grads(self, x, targets, params, kappa, log_s, log_sk, g, softcap, tau_grad):
    return self._grads(x, targets, params, kappa, log_s, log_sk, g, softcap, tau_grad, x.dtype)

  def hidden_partials_and_candidates(
    self, h, w, targets, tau, softcap, vocab_axis, precision, k, config, fused
  ):
    """Token chunks: one vendor matmul (float32 logits ``[C, V]``), then the row
    kernel's partials and the record of each group's largest capped values
    (:func:`~lpkernel.ops.processed.record.group_tops`, XLA's elementwise merge
    tree on the chunk's logits), so only the few groups that may hold more of a
    token's ``K`` largest are gathered
    (:func:`~lpkernel.ops.processed.candidates.from_hidden_record`)."""
    rows = self._rows()
    n, v = h.shape[0], w.shape[vocab_axis]
    group, c = config.hidden_group, config.group_values

    def step(out, lo, width):
      z = contract(lax.dynamic_slice_in_dim(h, lo, width, 0), 1, w, 1 - vocab_axis, precision)
      t, tc = (
        None if a is None else lax.dynamic_slice_in_dim(a, lo, width) for a in (targets, tau)
      )
      recorded = group_tops(P.capped(lax.stop_gradient(z), softcap), group, c)  # capped, as XLA's
      got = (rows.partials(z, t, tc, softcap), recorded)
      return jax.tree.map(lambda a, b: lax.dynamic_update_slice_in_dim(a, b, lo, 0), out, got)

    init = (P.empty(n), jnp.full((n, pl.cdiv(v, group), c), -jnp.inf, _F32))
    with jax.named_scope("processed_chunks"):
      parts, tops = sweep(step, init, n, self.fused.chunk(n, v))
    args = (softcap, vocab_axis, precision, k, config, fused.dot_dtype)
    return parts, from_hidden_record(h, w, tops, *args)

  def hidden_processed_grads(
    self, h, w, targets, params, kappa, log_s, log_sk, g, softcap, vocab_axis, precision, fused,
    tau_grad,
  ):  # fmt: skip
    """Token chunks: the chunk's logits made once, the gradient kernel's ``d z``
    in ``h``'s dtype, two vendor matmuls (:func:`~lpkernel.ops.fused.matmuls.chunked_grads`)."""
    h = jnp.where(live_rows(g)[:, None], h, 0)  # dead rows (NaN, padding) stay out of d w

    def row_grads(z, lo, width):
      def cut(a):
        return None if a is None else lax.dynamic_slice_in_dim(a, lo, width)

      pc = S.Params(*(cut(a) for a in params))
      rows = (cut(targets), pc, cut(kappa), cut(log_s), cut(log_sk), [cut(c) for c in g])
      dz, dtau = self._grads(z, *rows, softcap, tau_grad, h.dtype)
      return dz, dtau, None

    size = self.fused.chunk(h.shape[0], w.shape[vocab_axis])
    tau = params.tau if tau_grad else None
    with jax.named_scope("processed_chunks_backward"):
      _, dh, dw, dtau = chunked_grads(h, w, size, vocab_axis, precision, row_grads, tau=tau)
    return dh, dw, dtau

  def _grads(self, x, targets, params, kappa, log_s, log_sk, g, softcap, tau_grad, dtype):
    """(d x in ``dtype``, d tau float32[N] or None): the gradient kernel."""
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
    out = [jax.ShapeDtypeStruct(x.shape, dtype)]
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

  def kept_dots(self, h, w_rows, ids):
    """float32[N, K]: ``h[i] . w_rows[ids[i, j]]`` (float32 products), anything
    where an id is outside ``[0, V)``: :func:`~.pallas_gpu_kernel.replay_dots_kernel`."""
    n, k = ids.shape
    block_k = min(self.replay_block_k, pl.next_power_of_2(k))
    kernel = functools.partial(
      kernels.replay_dots_kernel, block_k=block_k, block_d=self._replay_block_d(h.shape[1])
    )
    return pl.pallas_call(
      kernel,
      grid=(n, pl.cdiv(k, block_k)),
      out_shape=jax.ShapeDtypeStruct((n, k), _F32),
      compiler_params=self._replay_params(),
      interpret=self.interpret,
      name="lpkernel_replay_dots",
    )(h, w_rows, ids)

  def kept_grads(self, h, w_rows, ids, dx):
    """``(d h [N, D] in h's dtype, d w float32 [V, D])`` of :meth:`kept_dots` for
    ``dx float32 [N, K]`` (0 where an id is outside ``[0, V)``):
    :func:`~.pallas_gpu_kernel.replay_grads_kernel`."""
    n, d = h.shape
    block_d = self._replay_block_d(d)
    kernel = functools.partial(kernels.replay_grads_kernel, block_d=block_d)
    out = (jax.ShapeDtypeStruct(h.shape, h.dtype), jax.ShapeDtypeStruct(w_rows.shape, _F32))
    return pl.pallas_call(
      kernel,
      grid=(n, d // block_d),
      out_shape=out,
      input_output_aliases={4: 1},
      compiler_params=self._replay_params(),
      interpret=self.interpret,
      name="lpkernel_replay_grads",
    )(h, w_rows, ids, dx, jnp.zeros(w_rows.shape, _F32))

  def _replay_block_d(self, d: int) -> int:
    """The largest power of two up to ``replay_block_d`` that divides ``d``
    (the backward's atomic adds take whole blocks, unmasked)."""
    block = 1
    while block * 2 <= self.replay_block_d and d % (block * 2) == 0:
      block *= 2
    return block

  def _replay_params(self):
    return require_triton().CompilerParams(num_warps=self.replay_num_warps, num_stages=2)
