"""The fused path on GPUs: token chunks through the vendor matmul and the Pallas row kernels.

Tokens are taken ``chunk_tokens`` at a time. For each chunk, one vendor matmul
(cuBLAS through XLA, float32 accumulation and output) makes the chunk's logits
``[C, V]``; the Pallas GPU row kernel (:class:`~lpkernel.ops.PallasGpuLogits`,
one pass per row, here with the entropy's sum) reduces them to
:class:`~lpkernel.partials.RowPartials`. The backward recomputes the chunk's
logits, the row kernel's gradient pass writes ``d logits`` in the hidden
states' dtype (with the lse and entropy terms and each row's ``d tau``), and
two more vendor matmuls give the chunk's ``d hidden`` and its part of
``d unembed``, accumulated in float32 across chunks.

So the matmuls run at the vendor's rate (three in the forward+backward plus the
backward's recompute, as for the XLA sweep) and the rest is bandwidth-bound row
passes over one chunk at a time: temporaries are about one chunk of float32
logits plus one of ``d logits`` (``chunk_bytes``) and, with more than one chunk,
a float32 ``d unembed``, never ``[N, V]``.

A training loss (:func:`lpkernel.fused_nll_loss`), whose cotangents are known
in the forward pass, runs each chunk once: matmul, the row kernel's forward
then gradient pass over the same logits, ``d hidden`` and ``d unembed``, three
matmuls in all.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from lpkernel import partials as P
from lpkernel.ops import tuning
from lpkernel.ops.blocks import sweep
from lpkernel.ops.fused.matmuls import chunked_grads, contract
from lpkernel.ops.logprobs.pallas_gpu import PallasGpuLogits

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class PallasGpuFused(tuning.Configured):
  """Token chunks: vendor matmuls feeding the Pallas GPU row kernels.

  Attributes:
    chunk_tokens: tokens per chunk, or None for as many as keep one chunk's
      float32 logits within ``chunk_bytes`` (a multiple of 128, at least 128).
    chunk_bytes: the default chunk's float32 logits budget (1 GiB: 2048 tokens
      at V = 128256).
    logits: the row kernels' tiling (``interpret`` is taken from this object).
    precision: the matmuls' precision, as for :class:`~lpkernel.ops.XlaFused`.
    interpret: run the row kernels in Pallas interpret mode (on the CPU, for tests).
  """

  chunk_tokens: int | None = None
  chunk_bytes: int = 1 << 30
  logits: PallasGpuLogits = PallasGpuLogits()
  precision: str | None = None
  interpret: bool = False
  op = "fused"
  name = "pallas_gpu"
  platforms = ("gpu",)

  def __post_init__(self):
    if self.chunk_tokens is not None and self.chunk_tokens < 1:
      raise ValueError(f"PallasGpuFused.chunk_tokens={self.chunk_tokens} must be None or positive")

  def chunk(self, n: int, vocab_size: int) -> int:
    """Tokens per chunk for ``n`` tokens over a vocabulary of ``vocab_size``."""
    if self.chunk_tokens is not None:
      return min(self.chunk_tokens, n)
    return min(n, max(128, self.chunk_bytes // (4 * vocab_size) // 128 * 128))

  def _rows(self) -> PallasGpuLogits:
    return dataclasses.replace(self.logits, interpret=self.interpret)

  def _logits(self, h, w, lo, width, vocab_axis):
    """Raw float32 logits ``[width, V]`` of tokens ``[lo, lo + width)``; their hidden rows."""
    hc = lax.dynamic_slice_in_dim(h, lo, width, axis=0)
    return contract(hc, 1, w, 1 - vocab_axis, self.precision), hc

  def partials(self, h, w, targets, tau, softcap, vocab_axis=1) -> P.RowPartials:
    """Partials of ``h [N, D] @ w [D, V]`` (or ``w [V, D]`` with ``vocab_axis=0``)."""
    rows = self._rows()

    def step(out, lo, width):
      z, _ = self._logits(h, w, lo, width, vocab_axis)
      t = lax.dynamic_slice_in_dim(targets, lo, width)
      tc = None if tau is None else lax.dynamic_slice_in_dim(tau, lo, width)
      p = rows.partials(z, t, tc, softcap, with_entropy=True)
      return jax.tree.map(lambda a, b: lax.dynamic_update_slice_in_dim(a, b, lo, 0), out, p)

    n, v = h.shape[0], w.shape[vocab_axis]
    with jax.named_scope("fused_chunks"):
      return sweep(step, P.empty(n, with_entropy=True), n, self.chunk(n, v))

  def grads(self, h, w, targets, tau, softcap, f: P.Finished, g, vocab_axis=1):
    """(d h float32 [N, D], d w in w's layout and dtype, d tau float32 [N] or None);
    arguments as for :meth:`lpkernel.ops.XlaFused.grads`."""
    rows = self._rows()
    g = P.dense_cotangents(g, f.shift)

    def row_grads(z, lo, width):
      def cut(a):
        return None if a is None else lax.dynamic_slice_in_dim(a, lo, width)

      fc = P.Finished(*(cut(a) for a in f))
      dz, dtau = rows.grad_fused_logits(
        z, cut(targets), cut(tau), softcap, fc, [cut(c) for c in g], h.dtype
      )
      return dz, dtau, None

    size = self.chunk(h.shape[0], w.shape[vocab_axis])
    with jax.named_scope("fused_chunks_backward"):
      _, dh, dw, dtau = chunked_grads(h, w, size, vocab_axis, self.precision, row_grads, tau=tau)
      return dh, dw, dtau

  def loss_grads(self, h, w, tau, softcap, rows: P.LossRows, out_init, vocab_axis=1):
    """A training loss and its gradients from each chunk's logits, made once (three
    matmuls in all); arguments and result as for :meth:`lpkernel.ops.XlaFused.loss_grads`."""
    kernels = self._rows()

    def row_grads(z, lo, width):
      t = lax.dynamic_slice_in_dim(rows.targets, lo, width)
      tc = None if tau is None else lax.dynamic_slice_in_dim(tau, lo, width)
      f, g, out = rows.cotangents(kernels.partials(z, t, tc, softcap), lo, width)
      g = P.dense_cotangents(g, f.shift)
      return (*kernels.grad_fused_logits(z, t, tc, softcap, f, g, h.dtype), out)

    size = self.chunk(h.shape[0], w.shape[vocab_axis])
    with jax.named_scope("fused_loss_chunks"):
      return chunked_grads(h, w, size, vocab_axis, self.precision, row_grads, out_init, tau)
