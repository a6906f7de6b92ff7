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

import jax
import jax.numpy as jnp
from jax import lax

from lpkernel import partials as P

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
  """

  vocab_block: int | None = None

  def __post_init__(self):
    if self.vocab_block is not None and (
      not isinstance(self.vocab_block, int) or self.vocab_block < 1
    ):
      raise ValueError(f"FusedConfig.vocab_block={self.vocab_block!r} must be None or positive")

  def block(self, vocab_size: int) -> int:
    if self.vocab_block is not None:
      return min(self.vocab_block, vocab_size)
    widest = 256 if jax.default_backend() == "cpu" else 2048
    return min(max(256, min(widest, vocab_size // 128 // 128 * 128)), vocab_size)


def contract(a: jax.Array, a_axis: int, b: jax.Array, b_axis: int, precision) -> jax.Array:
  """``a`` times ``b`` over ``a``'s axis ``a_axis`` and ``b``'s axis ``b_axis`` (2-D each)."""
  dims = (((a_axis,), (b_axis,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=_F32)


def _block_logits(h, w, lo, width, tau, softcap, precision, vocab_axis):
  """Vocabulary ``[lo, lo + width)``: (z raw float32 [N, width], y transformed, the w block)."""
  # XLA moves a dtype convert above a dynamic-slice and then out of the loop,
  # which would copy the whole matrix in float32 (bfloat16 dots are upcast on
  # the CPU). Slicing the output of a barrier over (matrix, offset) stops that.
  w, lo = lax.optimization_barrier((w, jnp.asarray(lo, jnp.int32)))
  wb = lax.dynamic_slice_in_dim(w, lo, width, axis=vocab_axis)
  z = contract(h, 1, wb, 1 - vocab_axis, precision)
  return z, P.transform(z, tau, softcap), wb


def sweep(step, carry, size: int, block: int):
  """Folds ``step(carry, lo, width)`` over the full blocks of ``[0, size)``, then
  the static tail block (if ``block`` does not divide ``size``)."""
  full, tail = divmod(size, block)
  carry = lax.fori_loop(0, full, lambda k, c: step(c, k * block, block), carry)
  return step(carry, full * block, tail) if tail else carry


@dataclasses.dataclass(frozen=True)
class XlaFused:
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
  name = "xla"
  platforms = None

  def partials(self, h, w, targets, tau, softcap, vocab_axis=1) -> P.RowPartials:
    """Partials of ``h [N, D] @ w [D, Vb]`` (or ``w [Vb, D]`` with ``vocab_axis=0``)."""
    tau_col = None if tau is None else tau[:, None]

    def step(carry, lo, width):
      _, y, _ = _block_logits(h, w, lo, width, tau_col, softcap, self.precision, vocab_axis)
      cols = lo + lax.broadcasted_iota(jnp.int32, (1, width), 1)
      return P.merge(carry, P.block_partials(y, cols, targets))

    with jax.named_scope("fused_sweep"):
      v = w.shape[vocab_axis]
      return sweep(step, P.empty(h.shape[0], with_entropy=True), v, self.config.block(v))

  def grads(self, h, w, targets, tau, softcap, f: P.Finished, g, vocab_axis=1):
    """(d h float32 [N, D], d w in w's layout and dtype, d tau float32 [N] or None).

    Args:
      f: the rows' finished statistics (shift, log_s, centred).
      g: (g_lp, g_lse, g_entropy) float32 [N], zero on dead rows; ``tau`` and
        ``h`` are already made safe there by the caller.
    """
    g_lp, g_lse, g_ent = (c[:, None] for c in g)
    tau_col = None if tau is None else tau[:, None]
    shift, log_s, centred = f.shift[:, None], f.log_s[:, None], f.centred[:, None]
    # On the CPU, d w blocks come from a [D, N] copy of h made once: XLA:CPU's fast
    # bfloat16 dots want the contracted axis last on the left (contracting N on h
    # itself ran 5x slower). Other backends contract h as it is, with no copy.
    on_cpu = jax.default_backend() == "cpu"
    h_t = lax.optimization_barrier(h.T) if on_cpu else None

    def step(carry, lo, width):
      dh, dw, dtau = carry
      z, y, wb = _block_logits(h, w, lo, width, tau_col, softcap, self.precision, vocab_axis)
      p = P.softmax(y, shift, log_s)
      onehot = (lo + lax.broadcasted_iota(jnp.int32, (1, width), 1)) == targets[:, None]
      y_c = P.finite_or_zero(y - shift)
      dy = P.grad_y(onehot, p, g_lp, g_lse, g_ent, y_c, centred)
      if tau is not None:
        dtau = dtau + P.grad_tau(dy, y_c, shift, tau_col)[:, 0]
      dz = (dy * P.transform_grad(z, tau_col, softcap)).astype(h.dtype)
      # d h += dz @ w_block^T, contracting the block's vocabulary axis as stored.
      dh = dh + contract(dz, 1, wb, vocab_axis, self.precision)
      # d w block [D, W] = h^T dz; a [V, D] table takes the block transposed.
      dwb = (
        contract(h_t, 1, dz, 0, self.precision) if on_cpu else contract(h, 0, dz, 0, self.precision)
      )
      dwb = lax.bitcast_convert_type((dwb if vocab_axis == 1 else dwb.T).astype(w.dtype), bits)
      return dh, lax.dynamic_update_slice_in_dim(dw, dwb, lo, vocab_axis), dtau

    # On the CPU a bfloat16 d w is carried as its bits: XLA:CPU updates a
    # bfloat16 [D, V] carry by copying all of it per block (2.8 s of 3.2 s at
    # N=4096, D=512, V=32000) but a uint16 one in place. The view back costs
    # one copy of d w (a temporary of the gradient's own size, never of the
    # logits'); float16 has no fast CPU dot and does not gain.
    bits = jnp.dtype(jnp.uint16) if on_cpu and w.dtype == jnp.bfloat16 else w.dtype
    init = (
      jnp.zeros(h.shape, _F32),
      jnp.zeros(w.shape, bits),
      None if tau is None else jnp.zeros((h.shape[0],), _F32),
    )
    with jax.named_scope("fused_sweep_backward"):
      v = w.shape[vocab_axis]
      dh, dw, dtau = sweep(step, init, v, self.config.block(v))
      return dh, lax.bitcast_convert_type(dw, w.dtype), dtau
