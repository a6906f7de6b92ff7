"""The fused path in XLA: a sweep over vocabulary blocks of ``hidden @ unembed``.

Each block's logits ``[N, Vb]`` come from one matmul (float32 accumulation) and
are reduced at once to :class:`~lpkernel.partials.RowPartials` (max, sum of
exp, centred sum of ``p * y`` for the entropy, the target's logit, the first
argmax), merged into the running partials by :func:`lpkernel.partials.merge`.
The backward sweeps the blocks again from each row's shift and ``log(sum exp)``
and writes ``d unembed`` block by block; only the ``[N, D]`` float32
``d hidden`` is accumulated across blocks.

Full blocks run in a ``fori_loop``; the ``V mod Vb`` tail columns are one more,
statically shaped step, so any ``V`` and ``N`` work without padding.

The matrix is read as it is stored: ``[D, V]`` (``vocab_axis=1``) or a tied
embedding table ``[V, D]`` (``vocab_axis=0``); each block's matmuls contract
the right axis, so no transposed copy of the matrix is ever made.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from lpkernel import partials as P
from lpkernel.ops import higher_order, tuning
from lpkernel.ops.blocks import block_of, sweep, sweep_in_place
from lpkernel.ops.fused.matmuls import (
  UnembedGrad,
  add_rows,
  chunked_grads,
  contract,
  fresh_rows,
  grad_unembed,
  hidden_for_grad_unembed,
)
from lpkernel.ops.platform import on_cpu_or
from lpkernel.ops.processed import cpu_top_k

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class FusedConfig:
  """Tiling of the fused sweep.

  Attributes:
    vocab_block: columns of ``unembed`` per step, or None for the default:
      about ``V / 128`` columns (a multiple of 128), so each ``[N, block]``
      float32 temporary stays under 1% of the logits' bytes, within
      ``[256, 256]`` on the CPU and ``[256, 2048]`` elsewhere. On 2 CPU cores
      at N = 4096, D = 512, V = 32000 forward+backward, 256 took 3.8 s / 21.6
      MB of temporaries in float32 (1024: 3.3 s / 63.6 MB) and 1.46 s / 45.5 MB
      in bfloat16 (512: 1.71 s / 71 MB); an H200 ran N = 32768, D = 4096,
      V = 128256 forward at 1.15x the bare matmul with 2048. Wider float32
      blocks on the CPU pay (512: 4.25 s against 4.8 s with 256, another run)
      but with softcap their backward holds 11% of the logits' bytes, past the
      10% bound the tests hold, so 256 stays.
    loss_chunks: how :meth:`XlaFused.loss_grads` (the training loss, whose
      gradient is written in the forward pass) runs: True, token chunks (each
      chunk's whole ``[C, V]`` float32 logits from one matmul, then ``d logits``,
      ``d hidden`` and a float32 ``d unembed`` accumulator: three matmuls in
      all); False, the forward sweep then the backward sweep (four); None, the
      measured best within the temporaries' bound: chunks for float32 on the
      CPU where they hold under 10% of the float32 logits (:meth:`chunked_loss`:
      N = 4096, D = 512, V = 32000 on 2 cores, same process: 512-token chunks
      3.1-3.3 s, 256-token chunks 3.2-3.7 s, the sweeps 4.6 s, the
      materialised form 3.2-3.3 s; another day 1.65 s at 25% of the logits,
      1.81 s at 50% with softcap and a temperature, the sweeps 2.06 s at 7%),
      sweeps for bfloat16 there (1.6 s against 1.9 s) and, unmeasured, on
      other backends.
    grad_chunks: the backward pass of the per-token ops (:meth:`XlaFused.grads`)
      in token chunks as well (``loss_chunk_tokens`` each; the cotangents are
      known there), instead of the backward sweep over vocabulary blocks. Off by
      default: it holds a gradient-sized float32 temporary (each chunk's
      ``d unembed``, which XLA:CPU does not add in place) and a chunk of
      logits. On 2 CPU cores at N = 4096, D = 512, V = 32000 float32 the
      forward+backward took 3.6-3.7 s in the default 512-token chunks (127 MB
      of temporaries; 128-token chunks 3.5 s / 79 MB, 64-token chunks 5.3 s)
      against 4.6 s by the sweep (21 MB), four bare matmuls 3.6 s; bfloat16
      1.65 s against 1.34 s.
    loss_chunk_tokens: tokens per chunk, or None for as many as keep one
      chunk's float32 logits within ``loss_chunk_bytes`` (64 MiB: 512 tokens at
      V = 32000, 128 at V = 128256; a multiple of 64, at least 64). The
      temporaries are about one chunk's logits plus the float32 ``d unembed``
      accumulator (the gradient's size), whatever N.
    grad_blocks: vocabulary blocks whose ``d logits`` one step of the backward
      sweep gathers for its two matmuls (``d hidden += dz @ w^T``, ``d w = h^T
      dz``), each block's logits still made and differentiated on their own;
      None for the default: 1 off the CPU (its blocks are wide already), on the
      CPU as many, up to 4, as keep the gathered ``dz`` within 16 MiB and 3%
      (from a float32 table) or 1% (from a narrower one, upcast or not) of the
      float32 logits' bytes. Each step reads and writes the float32 ``[N, D]``
      accumulator of ``d hidden``: a third of a bfloat16 backward at N = 4096,
      D = 512, V = 32000 on 2 cores with one block per step (same process: the
      training loss 958 ms; 2 blocks, the default there, 770 ms; 4, 746 ms but
      10.7% of the logits' bytes in temporaries). In float32 (the per-token
      backward; the training loss takes token chunks there) 3 blocks, the
      default, 2597 -> 2427 ms, temporaries 21 -> 34 MB.
    dot_dtype: None, the matmuls take ``hidden`` and ``unembed`` as they are;
      ``"float32"``, each vocabulary block of a narrower table (and the hidden
      states, once) is upcast first: for a CPU without bfloat16 dot
      instructions, where XLA:CPU emulates them about 4x slower than float32
      (the heuristic of :meth:`XlaFused.config_for`). The gradient keeps the
      table's dtype; temporaries grow by one block and one float32 copy of
      ``hidden``, never by a logits-sized buffer (the token-chunk loss upcasts
      the whole table).
  """

  vocab_block: int | None = None
  loss_chunks: bool | None = None
  grad_chunks: bool = False
  loss_chunk_tokens: int | None = None
  loss_chunk_bytes: int = 64 << 20
  grad_blocks: int | None = None
  dot_dtype: str | None = None

  def __post_init__(self):
    if self.dot_dtype not in (None, "float32"):
      raise ValueError(f"FusedConfig.dot_dtype={self.dot_dtype!r} must be None or 'float32'")
    if self.vocab_block is not None and (
      not isinstance(self.vocab_block, int) or self.vocab_block < 1
    ):
      raise ValueError(f"FusedConfig.vocab_block={self.vocab_block!r} must be None or positive")
    if self.loss_chunk_tokens is not None and (
      not isinstance(self.loss_chunk_tokens, int) or self.loss_chunk_tokens < 1
    ):
      raise ValueError(
        f"FusedConfig.loss_chunk_tokens={self.loss_chunk_tokens!r} must be None or positive"
      )
    if not isinstance(self.grad_chunks, bool):
      raise ValueError(f"FusedConfig.grad_chunks={self.grad_chunks!r} must be a bool")
    if self.grad_blocks is not None and (
      not isinstance(self.grad_blocks, int) or self.grad_blocks < 1
    ):
      raise ValueError(f"FusedConfig.grad_blocks={self.grad_blocks!r} must be None or positive")
    if not isinstance(self.loss_chunk_bytes, int) or self.loss_chunk_bytes < 1:
      raise ValueError(f"FusedConfig.loss_chunk_bytes={self.loss_chunk_bytes!r} must be positive")

  def chunked_loss(self, dtype, cpu: bool, n: int, d: int, vocab_size: int) -> bool:
    """Whether the training loss over ``n`` tokens of width ``d`` takes token
    chunks (else the forward and backward sweeps) in a program lowered for the
    CPU (``cpu``) or another platform.

    By default float32 on the CPU, where the chunks' temporaries are within 10%
    of the float32 logits: each chunk's ``d unembed``, a float32 ``[D, V]``
    product that XLA:CPU does not add in place, and up to 4 float32 copies of
    its ``[C, V]`` logits (3 with softcap and a temperature), so
    ``10 (D + 4 C) <= N``. At N = 4096, D = 512, V = 32000 they held 25% of
    the logits (50% with softcap and a temperature; 2x at V = 8192, where a
    chunk is half the tokens): a long sequence takes them (N = 32768, V = 32000:
    D up to 1228)."""
    if self.loss_chunks is not None:
      return self.loss_chunks
    fits = 10 * (d + 4 * self.loss_chunk(n, vocab_size)) <= n
    return cpu and jnp.dtype(dtype) == jnp.float32 and fits

  def loss_chunk(self, n: int, vocab_size: int) -> int:
    """Tokens per chunk of the training loss."""
    if self.loss_chunk_tokens is not None:
      return min(n, self.loss_chunk_tokens)
    return min(n, max(64, self.loss_chunk_bytes // (4 * vocab_size) // 64 * 64))

  def grad_group(self, n: int, vocab_size: int, dtype, table_dtype, cpu: bool) -> int:
    """Blocks per step of the backward sweep (``grad_blocks``) over ``n`` rows
    whose ``d logits`` are taken in ``dtype``, from a table of ``table_dtype``."""
    if self.grad_blocks is not None:
      return self.grad_blocks
    if not cpu:
      return 1
    itemsize = jnp.dtype(dtype).itemsize
    # Of the float32 logits' bytes: 3% from a float32 table, 1% from a narrower
    # one (its blocks' upcast copies make more of the other temporaries).
    share = 3 if itemsize == 4 and jnp.dtype(table_dtype).itemsize == 4 else 1
    budget = min(16 << 20, n * vocab_size * 4 * share // 100)
    return max(1, min(4, budget // max(1, n * self.block(vocab_size, cpu) * itemsize)))

  def block(self, vocab_size: int, cpu: bool) -> int:
    """Columns per step of the sweep in a program lowered for the CPU (``cpu``) or another."""
    if self.vocab_block is not None:
      return min(self.vocab_block, vocab_size)
    widest = 256 if cpu else 2048
    return min(max(256, min(widest, vocab_size // 128 // 128 * 128)), vocab_size)


def block_logits(h, w, lo, width, softcap, precision, vocab_axis, dot_dtype=None):
  """Vocabulary ``[lo, lo + width)``: (x raw float32 logits [N, width], z capped, the w
  block, upcast to ``dot_dtype`` if given)."""
  wb = block_of(w, lo, width, vocab_axis)
  if dot_dtype is not None:
    wb = wb.astype(dot_dtype)
  x = contract(h, 1, wb, 1 - vocab_axis, precision)
  return x, P.capped(x, softcap), wb


def _joined(pieces: list[jax.Array]) -> jax.Array:
  """``pieces [N, W_i]`` side by side; 2-byte floats through their bits (XLA:CPU
  joins bfloat16 pieces as float32: a float32 copy of them, then a convert)."""
  if len(pieces) == 1:
    return pieces[0]
  dtype = pieces[0].dtype
  if dtype.itemsize != 2:
    return jnp.concatenate(pieces, axis=1)
  bits = [lax.bitcast_convert_type(p, jnp.uint16) for p in pieces]
  return lax.bitcast_convert_type(jnp.concatenate(bits, axis=1), dtype)


def backward_sweep(h, w, grad, dw_out, tau_grad: bool, fused: FusedConfig, cpu: bool, ops):
  """(d h float32 ``[N, D]``, d w as ``dw_out``
  (:class:`~lpkernel.ops.fused.matmuls.UnembedGrad`) gives it, the summed
  ``d tau [N]`` or None) of ``h [N, D] @ w`` (``h`` as the matmuls take it):
  one sweep over the matrix's vocabulary blocks, recomputed, in a program
  lowered for the CPU (``cpu``) or another. Each step takes
  ``fused.grad_group`` blocks of ``fused.block`` columns
  (``FusedConfig.grad_blocks``): each block's logits from one matmul and its
  ``d logits`` (in ``h``'s dtype) by ``grad(x, z, cols, fresh) -> (dz, d tau or
  None)`` (``fresh``: bool ``[1, W]``, the columns not swept before:
  :func:`~lpkernel.ops.blocks.sweep_in_place`), then one ``d hidden`` and one
  ``d w`` matmul for them all. ``ops``: (softcap, precision, vocab_axis)."""
  softcap, precision, vocab_axis = ops
  dot_dtype, v = fused.dot_dtype, w.shape[vocab_axis]
  block = fused.block(v, cpu)
  h_t = hidden_for_grad_unembed(h, cpu, dot_dtype)  # on the CPU, h.T once

  def step(carry, lo, width, fresh):
    dh, dw, dtau = carry
    wb = block_of(w, lo, width, vocab_axis)
    if dot_dtype is not None:
      wb = wb.astype(dot_dtype)
    pieces = []
    for off in range(0, width, block):
      wd = min(block, width - off)
      piece = lax.slice_in_dim(wb, off, off + wd, axis=vocab_axis)
      x = contract(h, 1, piece, 1 - vocab_axis, precision)
      cols = lo + off + lax.broadcasted_iota(jnp.int32, (1, wd), 1)
      dz, dtau_b = grad(x, P.capped(x, softcap), cols, cols >= fresh)
      pieces.append(dz)
      dtau = None if dtau is None else dtau + dtau_b
    dz = _joined(pieces)
    fresh = lo + lax.broadcasted_iota(jnp.int32, (1, width), 1) >= fresh
    dh = add_rows(dh, dz, fresh_rows(wb, fresh, vocab_axis), vocab_axis, precision)
    # The overlapped columns' d w is written again, the same.
    dwb = grad_unembed(h, dz, vocab_axis, precision, h_t).astype(w.dtype)
    return dh, dw_out.put(dw, dwb, lo), dtau

  # Zeros computed from h (a 0 XLA cannot fold to a constant): a constant's
  # broadcast was scheduled before the forward, its [D, V] carry live through
  # it (beside a processed forward's [N, K] candidates: 13% of the float32
  # logits at V 32000, top-k 1000).
  first = jnp.sum(h.reshape(-1)[:1].astype(_F32))  # 0 where h is empty
  zero = jnp.where(jnp.isfinite(first), jnp.abs(first) * 0.0, 0.0)
  init = (
    jnp.broadcast_to(zero, h.shape),
    dw_out.zeros(zero),
    jnp.broadcast_to(zero, (h.shape[0],)) if tau_grad else None,
  )
  group = fused.grad_group(h.shape[0], v, h.dtype, w.dtype, cpu)
  dh, dw, dtau = sweep_in_place(step, init, v, block * group)
  return dh, dw_out.value(dw), dtau


def block_grad(x, z, cols, targets, tau_col, softcap, f: P.Finished, g, dtype, fresh=None):
  """``d x`` of one block of logits (in ``dtype``) and its rows' part of ``d tau``.

  Args:
    x, z: the block's raw and capped float32 logits ``[N, W]`` at global columns
      ``cols [1, W]``.
    targets: int32[N]; ``tau_col``: float32[N, 1] or None.
    f: the rows' finished statistics, ``[N]`` each; ``g``: (g_lp, g_lse, g_entropy),
      ``[N]`` each or None for an absent term.
    fresh: None, or bool ``[1, W]``: the columns ``d tau`` counts (a block that
      overlaps one already swept: :func:`lpkernel.ops.blocks.sweep_in_place`).

  Returns:
    (d x [N, W], d tau float32 [N] or None).
  """
  shift = f.shift[:, None]
  p = P.softmax(z, shift, f.log_s[:, None], tau_col)
  y_c = P.centred_y(z, shift, tau_col)
  g_lp, g_lse, g_ent = (None if c is None else c[:, None] for c in g)
  # An absent log-probability term is a zero cotangent (grad_y leaves it out).
  g_lp = jnp.zeros_like(f.shift[:, None]) if g_lp is None else g_lp
  dy = P.grad_y(cols == targets[:, None], p, g_lp, g_lse, g_ent, y_c, f.centred[:, None], z=z)
  dx = P.grad_x(dy, x, tau_col, softcap).astype(dtype)
  if tau_col is None:
    return dx, None
  if fresh is not None:
    dy, y_c, p = (jnp.where(fresh, a, 0.0) for a in (dy, y_c, p))
  return dx, P.grad_tau(dy, y_c, tau_col, shift, p, g_lse)[:, 0]


def chunk_grad(x, lo, width, targets, tau_col, softcap, dtype, stats):
  """``chunked_grads``' ``row_grads`` for tokens ``[lo, lo + width)`` whose whole
  float32 logits are ``x [width, V]``: (d x, d tau or None, out).

  ``stats(z, cols, t, tc, rows) -> (f, g, out)`` gives the chunk's finished
  statistics and cotangents from its capped logits, targets and temperatures
  (``rows(a)`` slices an ``[N, ...]`` array to the chunk's rows).
  """

  def rows(a):
    return None if a is None else lax.dynamic_slice_in_dim(a, lo, width)

  t, tc = rows(targets), rows(tau_col)
  z = P.capped(x, softcap)
  cols = lax.broadcasted_iota(jnp.int32, (1, x.shape[1]), 1)
  f, g, out = stats(z, cols, t, tc, rows)
  return (*block_grad(x, z, cols, t, tc, softcap, f, g, dtype), out)


@dataclasses.dataclass(frozen=True)
class XlaFused(tuning.Configured):
  """The XLA vocabulary-block sweep (any backend).

  Attributes:
    config: the vocabulary tiling.
    precision: the matmuls' precision (``jax.lax.Precision`` or its name); None
      takes ``jax.default_matmul_precision`` at the call (read once at the entry,
      so it reaches the loop bodies and the backward sweep too). GPUs default
      float32 matmuls to TF32, about 1e-3 relative.
  """

  config: FusedConfig = FusedConfig()
  precision: str | None = None
  op = "fused"
  name = "xla"
  platforms = None
  differentiable = True  # plain jnp at any order (lpkernel.ops.higher_order)

  @classmethod
  def config_for(cls, shape: tuple[int, ...], dtype, platform: str) -> XlaFused:
    """The configuration for ``hidden [N, D] @ unembed [D, V]`` of ``dtype`` on
    ``platform``: the heuristics (a CPU without bfloat16 dot instructions
    upcasts bfloat16 blocks for its matmuls), then this machine's tuned table
    (:mod:`lpkernel.ops.tuning`), whose fields win."""
    config = {}
    if platform == "cpu" and jnp.dtype(dtype) == jnp.bfloat16 and not tuning.native_bfloat16_dots():
      config["dot_dtype"] = "float32"
    return tuning.configured(cls, cls.op, platform, dtype, config=config)

  def _dot(self, a: jax.Array) -> jax.Array:
    """``a`` as the matmuls take it (``FusedConfig.dot_dtype``)."""
    return a if self.config.dot_dtype is None else a.astype(self.config.dot_dtype)

  def partials(self, h, w, targets, tau, softcap, vocab_axis=1) -> P.RowPartials:
    """Partials of ``h [N, D] @ w [D, Vb]`` (or ``w [Vb, D]`` with ``vocab_axis=0``)."""
    tau_col = None if tau is None else tau[:, None]
    h, dot_dtype = self._dot(h), self.config.dot_dtype

    def forward(cpu: bool) -> P.RowPartials:
      def step(carry, lo, width):
        _, z, _ = block_logits(h, w, lo, width, softcap, self.precision, vocab_axis, dot_dtype)
        cols = lo + lax.broadcasted_iota(jnp.int32, (1, width), 1)
        stats = cpu_top_k.block_stats(z, targets - lo) if cpu and cpu_top_k.available() else None
        return P.merge(carry, P.block_partials(z, cols, targets, tau_col, stats=stats), tau)

      v = w.shape[vocab_axis]
      return sweep(step, P.empty(h.shape[0], with_entropy=True), v, self.config.block(v, cpu))

    with jax.named_scope("fused_sweep"):
      return on_cpu_or(lambda: forward(True), lambda: forward(False))

  def grads(self, h, w, targets, tau, softcap, f: P.Finished, g, vocab_axis=1):
    """(d h float32 [N, D], d w in w's layout and dtype, d tau float32 [N] or None).

    Args:
      f: the rows' finished statistics (shift, log_s, centred).
      g: (g_lp, g_lse, g_entropy) float32 [N] (None for an absent term), zero on
        dead rows; ``tau`` and ``h`` are already made safe there by the caller.
    """
    if self.config.grad_chunks:
      return self._chunked_grads(h, w, targets, tau, softcap, f, g, vocab_axis)
    # On the CPU a bfloat16 d w is written through its bits: XLA:CPU updates a
    # bfloat16 [D, V] carry by copying all of it per block (2.8 s of 3.2 s at
    # N=4096, D=512, V=32000) but a uint16 one in place (see _grads for the
    # layouts); float16 has no fast CPU dot and does not gain. A bit view has no
    # derivative, so a derivative of this backward is the bfloat16 carry's.
    args = (self._dot(h), w, targets, tau, f, g)

    def backward(cpu: bool):
      bits = UnembedGrad.bits_for(w.dtype, cpu)
      sweep_back = functools.partial(self._grads, softcap=softcap, vocab_axis=vocab_axis, cpu=cpu)
      return higher_order.differentiated_as(sweep_back, bits, None)(*args)

    return on_cpu_or(lambda: backward(True), lambda: backward(False))

  def _grads(self, bits, h, w, targets, tau, f, g, *, softcap, vocab_axis, cpu: bool):
    """:meth:`grads` with ``d w`` written through ``bits`` (an unsigned dtype:
    :class:`~lpkernel.ops.fused.matmuls.UnembedGrad`) or, for None, as is; the
    CPU's layouts and block width with ``cpu``."""
    tau_col = None if tau is None else tau[:, None]
    dw_out = UnembedGrad(w.shape, w.dtype, vocab_axis, bits)

    def grad(x, z, cols, fresh):
      return block_grad(x, z, cols, targets, tau_col, softcap, f, g, h.dtype, fresh)

    ops = (softcap, self.precision, vocab_axis)
    with jax.named_scope("fused_sweep_backward"):
      return backward_sweep(h, w, grad, dw_out, tau is not None, self.config, cpu, ops)

  def _chunked_grads(self, h, w, targets, tau, softcap, f: P.Finished, g, vocab_axis):
    """:meth:`grads` over token chunks (three matmuls per chunk, as the training loss)."""
    tau_col = None if tau is None else tau[:, None]
    v, w_dtype = w.shape[vocab_axis], w.dtype
    h, w = self._dot(h), self._dot(w)

    def row_grads(x, lo, width):
      def stats(z, cols, t, tc, rows):  # the saved statistics and cotangents, this chunk's rows
        return jax.tree.map(rows, f), tuple(rows(c) for c in g), None

      return chunk_grad(x, lo, width, targets, tau_col, softcap, h.dtype, stats)

    size = self.config.loss_chunk(h.shape[0], v)
    with jax.named_scope("fused_chunks_backward"):
      _, dh, dw, dtau = chunked_grads(h, w, size, vocab_axis, self.precision, row_grads, tau=tau)
      return dh, dw.astype(w_dtype), dtau

  def loss_grads(self, h, w, tau, softcap, rows: P.LossRows, out_init, vocab_axis=1):
    """A training loss and its gradients in one call: token chunks, or the forward
    sweep then the backward sweep (``FusedConfig.loss_chunks``, chosen for the
    platform the program is lowered for).

    Args:
      h, w, tau, softcap: as for :meth:`partials` (``h`` and ``tau`` safe on dead rows).
      rows: the rows' local targets and their cotangents, known in the forward
        pass (:class:`lpkernel.partials.LossRows`).
      out_init: the ``[N]`` outputs' initial value (a pytree).

    Returns:
      (out, d h float32 [N, D], d w in w's layout and dtype, d tau float32 [N] or None).
    """
    shape = (h.shape[0], h.shape[1], w.shape[vocab_axis])
    chunked = [self.config.chunked_loss(h.dtype, cpu, *shape) for cpu in (True, False)]
    if chunked[0] == chunked[1]:  # no platform decides it
      return self._loss(chunked[0], h, w, tau, softcap, rows, out_init, vocab_axis)
    args = (h, w, tau, softcap, rows, out_init, vocab_axis)
    return on_cpu_or(lambda: self._loss(chunked[0], *args), lambda: self._loss(chunked[1], *args))

  def _loss(self, chunked: bool, h, w, tau, softcap, rows: P.LossRows, out_init, vocab_axis):
    """:meth:`loss_grads` in token chunks, or by the two sweeps."""
    if not chunked:
      p = self.partials(h, w, rows.targets, tau, softcap, vocab_axis)
      f, g, out = rows.cotangents(p, 0, h.shape[0])
      dh, dw, dtau = self.grads(h, w, rows.targets, tau, softcap, f, g, vocab_axis)
      return out, dh, dw, dtau
    tau_col = None if tau is None else tau[:, None]
    v, w_dtype = w.shape[vocab_axis], w.dtype
    h, w = self._dot(h), self._dot(w)

    def row_grads(x, lo, width):
      def stats(z, cols, t, tc, _):  # the chunk's statistics, then the loss's cotangents
        partials = P.block_partials(z, cols, t, tc, with_entropy=False)
        return rows.cotangents(partials, lo, width)

      return chunk_grad(x, lo, width, rows.targets, tau_col, softcap, h.dtype, stats)

    size = self.config.loss_chunk(h.shape[0], v)
    with jax.named_scope("fused_loss_chunks"):
      out, dh, dw, dtau = chunked_grads(
        h, w, size, vocab_axis, self.precision, row_grads, out_init, tau
      )
      return out, dh, dw.astype(w_dtype), dtau
