"""Processed log-probabilities in XLA, from logits or from hidden states.

The forward pass reads the row twice at most in the common case, never sorting
it and never forming an ``[N, V]`` temporary:

1. the row's softmax partials (max, sum of exp, target, first argmax: the plain
   forward pass) and the maxima of its ``GROUP``-column groups;
2. the ``K`` largest values, exactly, from the ``K`` groups with the largest
   maxima (every column among a row's ``K`` largest lies in one of them): a
   gather of ``K * GROUP`` columns, or from hidden states a dot product with
   ``K * GROUP`` gathered rows of the unembedding per token;
3. :func:`lpkernel.ops.processed.select.decide`, then for the rows it leaves
   open a search by sweeps (:func:`lpkernel.ops.processed.select.threshold`).

The backward pass is one elementwise pass over the logits (or one sweep over
the unembedding's blocks), the kept set given by each row's threshold key.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from lpkernel import partials as P
from lpkernel.ops.blocks import block_of, sweep, sweep_in_place
from lpkernel.ops.fused.matmuls import UnembedGrad, add_rows, fresh_rows, grad_unembed
from lpkernel.ops.fused.xla import FusedConfig, block_logits
from lpkernel.ops.logprobs.xla import XlaLogits, chunk_rows, gather
from lpkernel.ops.platform import on_cpu_or
from lpkernel.ops.processed import select as S
from lpkernel.ops.processed.grads import live_rows, row_grads
from lpkernel.ops.processed.replay import rows_major

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class ProcessedConfig:
  """Tiling of the processed paths.

  Attributes:
    candidates: ``K``, the largest values per row taken exactly; rows whose kept
      set lies among them need no search (top-k up to ``K``, a nucleus of up to
      ``K`` tokens). A Python ``top_k`` at or above it raises ``K`` to
      ``top_k + 1`` (up to 1024).
    group: columns per group whose maxima locate the ``K`` largest values; the
      group maxima are ``1 / group`` of the logits (under the 10% bound from 16).
    sweep_block: columns per step of a search sweep over logits.
    gather_bytes: the most bytes of the candidates' pass held at once (its token
      chunks: ``K * group`` columns, and from hidden states as many gathered
      unembedding rows, per token; also at most 1% of the float32 logits).
  """

  candidates: int = 64
  group: int = 32
  sweep_block: int = 512
  gather_bytes: int = 32 << 20

  def __post_init__(self):
    for name in ("candidates", "group", "sweep_block", "gather_bytes"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"ProcessedConfig.{name}={getattr(self, name)!r} must be a positive int")

  def k_for(self, top_k, vocab_size: int) -> int:
    """``K`` for a row of ``vocab_size`` with a static (Python) or traced ``top_k``."""
    k = self.candidates
    if isinstance(top_k, int) and 0 < top_k < vocab_size:
      k = max(k, min(top_k + 1, 1024))  # one past the k-th: its next smaller value
    return min(k, vocab_size)


def _group_maxima(z: jax.Array, group: int) -> jax.Array:
  """``[N, W] -> [N, ceil(W / group)]`` maxima (a short tail padded with ``-inf``)."""
  n, w = z.shape
  pad = -w % group
  if pad:
    z = jnp.concatenate([z, jnp.full((n, pad), -jnp.inf, z.dtype)], axis=1)
  return jnp.max(z.reshape(n, -1, group), axis=-1)


def _logits_group_maxima(x, group: int, block: int) -> jax.Array:
  """``[N, V] -> [N, ceil(V / group)]`` maxima of logits in their own dtype: one
  reduction of a bit view when ``group`` divides V (XLA shares, and materialises,
  an upcast of a narrow dtype between its consumers otherwise), else a sweep of
  column blocks."""
  n, v = x.shape
  if v % group == 0:
    return jnp.max(chunk_rows(x, group), axis=-1).reshape(n, v // group)
  width = max(group, min(block, v) // group * group)

  def step(out, lo, wd):
    return lax.dynamic_update_slice_in_dim(
      out, _group_maxima(block_of(x, lo, wd, 1), group), lo // group, 1
    )

  return sweep(step, jnp.full((n, -(-v // group)), -jnp.inf, x.dtype), v, width)


def _pool_columns(
  maxima: jax.Array, k: int, group: int, vocab_size: int, lanes: int = 1
) -> jax.Array:
  """int32[N, K' * group]: the columns of each row's ``K'`` groups with the largest
  maxima (``K' = min(K, groups)``); columns past V are ``vocab_size`` (absent).

  Group ``j`` holds columns ``(j // lanes) * lanes * group + lanes * c + j % lanes``
  for ``c < group``: ``group`` contiguous columns with ``lanes = 1``; with
  ``lanes = 128``, one lane's columns of a ``128 * group``-column TPU tile."""
  _, ids = lax.top_k(maxima, min(k, maxima.shape[1]))
  c = jnp.arange(group, dtype=jnp.int32) * lanes
  cols = (ids // lanes * (lanes * group) + ids % lanes)[:, :, None] + c
  cols = cols.reshape(ids.shape[0], -1)
  return jnp.where(cols < vocab_size, cols, vocab_size)


def _pool_top(values, cols, k: int, vocab_size: int, chunk: int) -> jax.Array:
  """float32[N, K]: each row's ``K`` largest capped values among its pool columns
  ``cols [N, P]``, ``chunk`` tokens at a time (``values(lo, width, cols_chunk)``
  gives their capped values ``[width, P]``), so no ``[N, P]`` temporary."""
  n = cols.shape[0]

  def step(out, lo, width):
    cc = lax.dynamic_slice_in_dim(cols, lo, width, 0)
    pool = jnp.where(cc < vocab_size, values(lo, width, jnp.minimum(cc, vocab_size - 1)), -jnp.inf)
    # The barrier keeps XLA:CPU's top-k a top-k: with its consumers in view it was
    # rewritten as a sort of the pool, 15x slower (N = 4096, 2048 columns: 1.18 s).
    top = lax.optimization_barrier(lax.top_k(pool, k)[0])
    return lax.dynamic_update_slice_in_dim(out, top, lo, 0)

  return sweep(step, jnp.zeros((n, k), _F32), n, chunk)


def _chunk(config: ProcessedConfig, n: int, vocab_size: int, token_bytes: int) -> int:
  """Tokens per chunk of the candidates' pass: ``token_bytes`` each, within
  ``gather_bytes`` and 1% of the float32 logits' bytes."""
  budget = min(config.gather_bytes, n * vocab_size * 4 // 100)
  return max(1, min(n, budget // max(token_bytes, 1)))


def logits_rows(x, softcap, width: int) -> S.Rows:
  """The capped logits ``x [N, V]`` as sweepable :class:`~select.Rows`."""
  return S.Rows(
    block=lambda lo, w: P.capped(block_of(x, lo, w, 1), softcap),
    vocab_size=x.shape[1],
    width=min(width, x.shape[1]),
  )


@dataclasses.dataclass(frozen=True)
class XlaProcessed:
  """The processed logits path's passes over the logits in XLA, on every backend
  (:class:`lpkernel.ops.base.ProcessedImplementation`)."""

  op = "processed"
  name = "xla"
  platforms = None
  lanes = 1

  def partials_and_group_maxima(self, x, targets, tau, softcap, config: ProcessedConfig):
    """The plain forward's partials, then the group maxima in a second read."""
    parts = XlaLogits().partials(x, targets, tau, softcap)
    maxima = _logits_group_maxima(lax.stop_gradient(x), config.group, config.sweep_block)
    return parts, P.capped(maxima, softcap)

  def processed_grads(self, x, targets, params, kappa, log_s, log_sk, g, softcap, tau_grad):
    return logits_grads(x, targets, params, kappa, log_s, log_sk, g, softcap, tau_grad)

  def hidden_partials_and_group_maxima(
    self, h, w, targets, tau, softcap, vocab_axis, precision, config, fused
  ):
    """One sweep over the unembedding's blocks (``fused``'s tiling)."""
    return _hidden_sweep(h, w, targets, tau, softcap, vocab_axis, precision, config.group, fused)

  def hidden_processed_grads(
    self, h, w, targets, params, kappa, log_s, log_sk, g, softcap, vocab_axis, precision, fused,
    tau_grad,
  ):  # fmt: skip
    """One sweep over the unembedding's blocks (``fused``'s tiling)."""
    return hidden_grads(
      h, w, targets, params, kappa, log_s, log_sk, g, softcap, vocab_axis, precision, fused,
      tau_grad,
    )  # fmt: skip


def logits_forward(x, targets, tau, softcap, k: int, config: ProcessedConfig, impl):
  """(RowPartials of whole rows, float32[N, K] largest capped values, the rows as
  sweepable :class:`~select.Rows` for a search) of logits ``x [N, V]``; ``impl``'s
  first pass (:class:`lpkernel.ops.base.ProcessedImplementation`)."""
  parts, maxima = impl.partials_and_group_maxima(x, targets, tau, softcap, config)
  xs = lax.stop_gradient(x)
  n, v = x.shape
  cols = _pool_columns(maxima, k, config.group, v, impl.lanes)

  def values(lo, width, cc):
    rows = block_of(xs, lo, width, 0)  # a convert never moves onto all of x
    return P.capped(jax.vmap(gather, in_axes=(None, 1), out_axes=1)(rows, cc), softcap)

  chunk = _chunk(config, n, v, cols.shape[1] * 4 * 3)
  return parts, _pool_top(values, cols, k, v, chunk), logits_rows(xs, softcap, config.sweep_block)


def hidden_rows(h, w, softcap, vocab_axis: int, precision, width: int, dot_dtype) -> S.Rows:
  """The capped logits ``h @ w`` as sweepable :class:`~select.Rows` (never formed whole)."""
  v = w.shape[vocab_axis]
  return S.Rows(
    block=lambda lo, wd: block_logits(h, w, lo, wd, softcap, precision, vocab_axis, dot_dtype)[1],
    vocab_size=v,
    width=min(width, v),
  )


def _pool_values(h, w, vocab_axis: int, precision, softcap, dot_dtype):
  """``values(lo, width, cols) -> float32[width, P]``: ``h[i] . w_row[cols[i, j]]``
  capped, for tokens ``[lo, lo + width)`` (gathering ``width * P`` rows of ``w``,
  upcast to ``dot_dtype`` if given), from the table as ``[V, D]`` (a ``[D, V]``
  matrix transposed once: :func:`~lpkernel.ops.processed.replay.rows_major`)."""
  w_rows = rows_major(w, vocab_axis)

  def values(lo, width, cc):
    hc = lax.dynamic_slice_in_dim(h, lo, width, 0)
    # The barrier keeps a convert of the gathered rows from moving onto all of w
    # and out of the loop (a float32 copy of the table).
    wb, _ = lax.optimization_barrier((w_rows, lo))
    rows = jnp.take(wb, cc, axis=0)  # [C, P, D]
    if dot_dtype is not None:
      rows = rows.astype(dot_dtype)
    dots = jnp.einsum("cd,cpd->cp", hc, rows, precision=precision, preferred_element_type=_F32)
    return P.capped(dots, softcap)

  return values


def _hidden_sweep(h, w, targets, tau, softcap, vocab_axis: int, precision, group: int, fused):
  """(RowPartials, float32 ``[N, ceil(V / group)]`` group maxima) of ``h @ w``: one
  sweep over the unembedding's blocks (``h`` already in the dot dtype)."""
  n = h.shape[0]
  v = w.shape[vocab_axis]
  tau_col = None if tau is None else tau[:, None]

  def forward(cpu: bool):
    width = fused.block(v, cpu)
    width = max(group, width // group * group) if width < v else width  # on group boundaries

    def step(carry, lo, wd):
      parts, maxima = carry
      _, z, _ = block_logits(h, w, lo, wd, softcap, precision, vocab_axis, fused.dot_dtype)
      cols = lo + lax.broadcasted_iota(jnp.int32, (1, wd), 1)
      parts = P.merge(parts, P.block_partials(z, cols, targets, tau_col, with_entropy=False), tau)
      bm = lax.stop_gradient(_group_maxima(z, group))
      return parts, lax.dynamic_update_slice_in_dim(maxima, bm, lo // group, 1)

    init = (P.empty(n), jnp.full((n, -(-v // group)), -jnp.inf, _F32))
    return sweep(step, init, v, width)

  with jax.named_scope("processed_sweep"):
    return on_cpu_or(lambda: forward(True), lambda: forward(False))


def hidden_forward(
  h, w, targets, tau, softcap, vocab_axis: int, precision, k: int, config, fused: FusedConfig, impl
):
  """(RowPartials of whole rows, float32[N, K] largest capped values, the rows as
  sweepable :class:`~select.Rows` for a search) of ``h @ w``: ``impl``'s pass over
  the unembedding (:class:`lpkernel.ops.base.ProcessedHidden`), then the
  candidates' dot products. ``h`` is upcast to the dot dtype once, for all three."""
  n = h.shape[0]
  v = w.shape[vocab_axis]
  g = config.group
  h = h if fused.dot_dtype is None else h.astype(fused.dot_dtype)
  parts, maxima = impl.hidden_partials_and_group_maxima(
    h, w, targets, tau, softcap, vocab_axis, precision, config, fused
  )
  cols = _pool_columns(maxima, k, g, v, impl.lanes)
  hs, ws = lax.stop_gradient(h), lax.stop_gradient(w)
  token_bytes = cols.shape[1] * (h.shape[1] * w.dtype.itemsize + 3 * 4)
  values = _pool_values(hs, ws, vocab_axis, precision, softcap, fused.dot_dtype)
  rows = hidden_rows(hs, ws, softcap, vocab_axis, precision, fused.block(v, True), fused.dot_dtype)
  return parts, _pool_top(values, cols, k, v, _chunk(config, n, v, token_bytes)), rows


def logits_grads(x, targets, params, kappa, log_s, log_sk, g, softcap, tau_grad: bool):
  """(d x in x's dtype, d tau [N] or None): one elementwise pass, and with
  ``tau_grad`` a row reduction of its own (sharing ``d y`` with it made XLA
  materialise a float32 ``[N, V]`` buffer)."""
  cols = lax.broadcasted_iota(jnp.int32, (1, x.shape[1]), 1)

  def dy_and_dtau(tau_grad):
    # The barrier keeps XLA from sharing this pass's upcast of x, and its
    # broadcasts of the rows' statistics, with the forward's (CSE): shared, a
    # broadcast temperature was materialised as a float32 [N, V] buffer.
    xb, pb = lax.optimization_barrier((x, params))
    dy, dtau = row_grads(
      P.capped(xb, softcap), cols, targets, pb, kappa, log_s, log_sk, g, tau_grad
    )
    return xb, pb, dy, dtau

  xb, pb, dy, _ = dy_and_dtau(False)
  dx = P.grad_x(dy, xb, pb.col(pb.tau), softcap)
  dx = jnp.where(live_rows(g)[:, None], dx, 0.0).astype(x.dtype)  # softcap's factor at NaN x
  dtau = dy_and_dtau(True)[3] if tau_grad else None
  return dx, dtau


def hidden_grads(
  h, w, targets, params, kappa, log_s, log_sk, g, softcap, vocab_axis, precision, fused, tau_grad
):
  """(d h float32 [N, D], d w in w's layout and dtype, d tau [N] or None): one sweep
  over the unembedding's blocks."""
  tau_col = params.col(params.tau)
  v = w.shape[vocab_axis]
  # Dead rows hold anything (padding, NaN): zeros keep them out of d w's contraction.
  h = jnp.where(live_rows(g)[:, None], h, 0)
  h = h if fused.dot_dtype is None else h.astype(fused.dot_dtype)

  def backward(cpu: bool):
    dw_out = UnembedGrad(w.shape, w.dtype, vocab_axis, UnembedGrad.bits_for(w.dtype, cpu))

    def step(carry, lo, wd, fresh):
      dh, dw, dtau = carry
      x, z, wb = block_logits(h, w, lo, wd, softcap, precision, vocab_axis, fused.dot_dtype)
      cols = lo + lax.broadcasted_iota(jnp.int32, (1, wd), 1)
      fresh = cols >= fresh
      dy, dtau_b = row_grads(z, cols, targets, params, kappa, log_s, log_sk, g, tau_grad, fresh)
      dz = P.grad_x(dy, x, tau_col, softcap).astype(h.dtype)  # h as the matmuls take it
      dh = add_rows(dh, dz, fresh_rows(wb, fresh, vocab_axis), vocab_axis, precision)
      dwb = grad_unembed(h, dz, vocab_axis, precision).astype(w.dtype)  # overlap: the same again
      dtau = None if dtau is None else dtau + dtau_b
      return dh, dw_out.put(dw, dwb, lo), dtau

    init = (
      jnp.zeros(h.shape, _F32),
      dw_out.zeros(),
      jnp.zeros((h.shape[0],), _F32) if tau_grad and params.tau is not None else None,
    )
    dh, dw, dtau = sweep_in_place(step, init, v, fused.block(v, cpu))
    return dh, dw_out.value(dw), dtau

  with jax.named_scope("processed_sweep_backward"):
    return on_cpu_or(lambda: backward(True), lambda: backward(False))
