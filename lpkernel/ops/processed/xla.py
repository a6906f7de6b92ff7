"""Processed log-probabilities in XLA, from logits or from hidden states.

The forward pass reads the row twice at most in the common case, never sorting
it and never forming an ``[N, V]`` temporary:

1. the row's softmax partials (max, sum of exp, target, first argmax: the plain
   forward pass) and the maxima of its ``group``-column groups (from hidden
   states, each ``hidden_group``-column group's ``group_values`` largest values);
2. the ``K`` largest values, exactly. From logits, from the ``K`` groups with
   the largest maxima (:mod:`lpkernel.ops.processed.candidates`; on the CPU a
   compiled kernel reads them in place, and from float32 logits it takes the
   maxima itself, from each row as it reads it, and they stand for the
   partials' max pass). From hidden states, from the recorded values: only a
   group whose last recorded value exceeds the ``K``-th largest recorded one
   may hold more of them, and only such groups are gathered (a dot product with
   their unembedding rows; a few per token, for the few tokens that have one),
   else the ``K`` groups with the largest maxima whole;
3. :func:`lpkernel.ops.processed.select.decide`, then for the rows it leaves
   open a search, a chunk of rows at a time (:func:`lpkernel.ops.processed.select.threshold`).

The backward pass is one elementwise pass over the logits (or one sweep over
the unembedding's blocks), the kept set given by each row's threshold key.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from lpkernel import partials as P
from lpkernel.ops.blocks import block_of, slice_width, sweep, sweep_in_place
from lpkernel.ops.fused.matmuls import UnembedGrad
from lpkernel.ops.fused.xla import FusedConfig, backward_sweep, block_logits
from lpkernel.ops.logprobs.xla import XlaLogits, chunk_rows
from lpkernel.ops.platform import on_cpu_or
from lpkernel.ops.processed import candidates as C
from lpkernel.ops.processed import record
from lpkernel.ops.processed import select as S
from lpkernel.ops.processed.cpu_top_k import (
  add_block,
  block_stats,
  compiled,
  maxima_and_top_k,
  running_top_k,
  running_values,
)
from lpkernel.ops.processed.grads import live_rows, row_grads

_F32 = jnp.float32


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
  width = max(group, slice_width(block, v) // group * group)

  def step(out, lo, wd):
    return lax.dynamic_update_slice_in_dim(
      out, _group_maxima(block_of(x, lo, wd, 1), group), lo // group, 1
    )

  return sweep(step, jnp.full((n, -(-v // group)), -jnp.inf, x.dtype), v, width)


def search_chunk(n: int) -> int:
  """Rows per step of a search (:func:`~lpkernel.ops.processed.select.threshold`)
  of ``n`` rows: their capped logits, weights, keys and gathered rows (16 bytes
  per value) within 4% of the float32 logits' bytes, so ``n // 100``. From
  hidden states each step reads the whole unembedding: under about 64 rows per
  step (``n`` under 6400) the search reads it more often than its matmuls need."""
  return max(1, n // 100)


def forward_chunk(n: int, v: int, k: int, dtype, softcap) -> int:
  """Rows per chunk of the processed forward from logits ``[n, v]`` of ``dtype``
  (capped by ``softcap``, or None) with ``k`` candidates: all ``n`` where the
  candidates' float32 ``[N, K]`` are within 4% of the logits' float32 bytes
  (``25 K <= V``), else as many as keep a chunk's copy of its rows and its
  candidates within 3% of them. Whole, the forward held 33% of them at V = 256
  with top-k 50 (``K`` = 64), 15% at V = 640 and 9.9% at V = 1280; in chunks
  6.7%, 4.7% and 3.9% (B8 T512, float32), as fast at V = 256 and 1000 and
  10-18% slower at V = 1280 (N = 16384, 2 CPU cores).

  Candidates the CPU's kernel does not take (float16) are gathered by XLA, and
  capped ones are copied: they weigh as twice as many (V = 2048: float16 15%
  -> 4.6% of the logits, float32 under a softcap 9.9% -> 5.9%)."""
  if not compiled(dtype) or softcap is not None:
    k = 2 * k
  if 25 * k <= v:
    return n
  return max(1, min(n, n * v // (33 * (v + 2 * k))))


def logits_rows(x, softcap, chunk: int) -> S.Rows:
  """The capped logits ``x [N, V]`` as :class:`~select.Rows` of ``chunk`` rows
  (read in place by the CPU's search where they are float32 and uncapped)."""

  def take(idx):
    xb, idx = lax.optimization_barrier((x, idx))  # no convert of all of x out of a loop
    return P.capped(jnp.take(xb, idx, axis=0), softcap)

  # bfloat16 rows are gathered and widened once per chunk: read in place, the
  # kernel's passes widened them each time (56 ms against 44 + 8.6 for the
  # gather at B8 T512 V32000, top-p alone).
  whole = x if softcap is None and x.dtype == jnp.float32 else None
  return S.Rows(take=take, vocab_size=x.shape[1], chunk=chunk, whole=whole)


@dataclasses.dataclass(frozen=True)
class XlaProcessed:
  """The processed logits path's passes over the logits in XLA, on every backend
  (:class:`lpkernel.ops.base.ProcessedImplementation`)."""

  op = "processed"
  name = "xla"
  platforms = None
  lanes = 1

  def partials_and_candidates(self, x, targets, tau, softcap, k: int, config: C.ProcessedConfig):
    """The group maxima, then the plain forward's partials (where the group
    divides V, their max and argmax blocks from the group maxima: one more read
    for the sums of ``exp``, where the plain forward's own max and argmax-block
    passes would make two), then the candidates
    (:func:`~lpkernel.ops.processed.candidates.from_group_maxima`). On the CPU,
    from float32 logits, a compiled kernel takes the group maxima and the
    candidates in one read of each row."""
    xs = lax.stop_gradient(x)
    whole = x.shape[1] % config.group == 0

    def partials(maxima):
      return XlaLogits().partials(x, targets, tau, softcap, maxima if whole else None)

    def one_read():
      # Maxima the partials cannot use are not written (3% of the logits at V 1000).
      maxima, top = maxima_and_top_k(xs, config.group, k, with_maxima=whole)
      return partials(maxima), P.capped(top, softcap)

    def two_reads():
      n, v = x.shape
      if not whole and -(-v // config.group) <= k:
        # Every group is read where there are no more than K: the row is one,
        # and no maxima are taken (their float32 sweep was 3% of the logits at
        # V 1000 in bfloat16; the partials cannot use them).
        row = dataclasses.replace(config, group=v)
        return partials(None), C.from_group_maxima(x, jnp.zeros((n, 1), _F32), softcap, k, row)
      maxima = _logits_group_maxima(xs, config.group, config.sweep_block)
      capped = P.capped(maxima, softcap)
      return partials(maxima), C.from_group_maxima(x, capped, softcap, k, config)

    if x.dtype == jnp.float32 and compiled(x.dtype):
      return on_cpu_or(one_read, two_reads)
    return two_reads()

  def processed_grads(self, x, targets, params, kappa, log_s, log_sk, g, softcap, tau_grad):
    return logits_grads(x, targets, params, kappa, log_s, log_sk, g, softcap, tau_grad)

  def hidden_partials_and_candidates(
    self, h, w, targets, tau, softcap, vocab_axis, precision, k, config, fused
  ):
    """One sweep over the unembedding's blocks (``fused``'s tiling), recording
    each group's ``config.group_values`` largest values, then the candidates
    from the record (:func:`~lpkernel.ops.processed.candidates.from_hidden_record`).
    On the CPU the sweep keeps each row's running ``K`` largest values instead
    (a compiled kernel)."""

    def recorded():
      parts, tops = _hidden_sweep(h, w, targets, tau, softcap, vocab_axis, precision, config, fused)
      args = (softcap, vocab_axis, precision, k, config, fused.dot_dtype)
      return parts, C.from_hidden_record(h, w, tops, *args)

    if not compiled(jnp.float32):
      return recorded()
    args = (h, w, targets, tau, softcap, vocab_axis, precision, k, fused)
    return on_cpu_or(lambda: _hidden_sweep_top(*args), recorded)

  def hidden_processed_grads(
    self, h, w, targets, params, kappa, log_s, log_sk, g, softcap, vocab_axis, precision, fused,
    tau_grad,
  ):  # fmt: skip
    """One sweep over the unembedding's blocks (``fused``'s tiling)."""
    return hidden_grads(
      h, w, targets, params, kappa, log_s, log_sk, g, softcap, vocab_axis, precision, fused,
      tau_grad,
    )  # fmt: skip


def logits_forward(x, targets, tau, softcap, k: int, config: C.ProcessedConfig, impl, search: int):
  """(RowPartials of whole rows, float32[N, K] largest capped values, the rows as
  :class:`~select.Rows` for a search, at most ``search`` rows a step: the
  :func:`search_chunk` of all the rows, of which ``x`` may be a chunk) of
  logits ``x [N, V]``; ``impl``'s first pass
  (:class:`lpkernel.ops.base.ProcessedImplementation`)."""
  parts, top = impl.partials_and_candidates(x, targets, tau, softcap, k, config)
  return parts, top, logits_rows(lax.stop_gradient(x), softcap, min(x.shape[0], search))


def rows_width(chunk: int, d: int, v: int, fused: FusedConfig) -> int:
  """Columns per matmul of a search's chunk of rows from hidden states
  (:func:`hidden_rows`): all ``v`` where the table is read as stored (one
  ``[chunk, D] x [D, V]`` matmul: the chunk's logits are whole anyway), else
  as many as keep the upcast block of the table within the chunk's logits'
  size (at least the sweep's block). The sweep's 256-column blocks made each
  chunk 125 small matmuls at V 32000: top-p alone on flat rows (every row
  searched) at N 4096, D 512 in bfloat16 took 1.95 s on 2 CPU cores."""
  if fused.dot_dtype is None:
    return v
  block = fused.block(v, True)
  return min(v, max(block, chunk * v // max(1, d) // block * block))


def hidden_rows(
  h, w, softcap, vocab_axis: int, precision, width: int, dot_dtype, chunk: int
) -> S.Rows:
  """The capped logits ``h @ w`` as :class:`~select.Rows` of ``chunk`` rows,
  formed ``width`` columns at a time (never all rows at once)."""
  v = w.shape[vocab_axis]

  def take(idx):
    hc = jnp.take(h, idx, axis=0)

    def step(z, lo, wd, fresh):
      block = block_logits(hc, w, lo, wd, softcap, precision, vocab_axis, dot_dtype)[1]
      return lax.dynamic_update_slice_in_dim(z, block, lo, 1)

    return sweep_in_place(step, jnp.zeros((idx.shape[0], v), _F32), v, width)

  return S.Rows(take=take, vocab_size=v, chunk=chunk)


def _partials_sweep(
  h, w, targets, tau, softcap, vocab_axis: int, precision, fused, width, init, take
):
  """(RowPartials, carry) of ``h @ w``: one sweep over the unembedding's blocks of
  ``width`` columns, ``take(carry, z, lo)`` folding in what else each block's
  capped logits ``z [N, wd]`` (starting at column ``lo``; constants of the
  carry) give: (the carry, the block's
  :class:`~lpkernel.ops.processed.cpu_top_k.BlockStats` where its kernel took
  them, else None)."""
  v = w.shape[vocab_axis]
  tau_col = None if tau is None else tau[:, None]

  def step(carry, lo, wd):
    parts, extra = carry
    _, z, _ = block_logits(h, w, lo, wd, softcap, precision, vocab_axis, fused.dot_dtype)
    cols = lo + lax.broadcasted_iota(jnp.int32, (1, wd), 1)
    extra, stats = take(extra, z, lo)
    block = P.block_partials(z, cols, targets, tau_col, with_entropy=False, stats=stats)
    return P.merge(parts, block, tau), extra

  with jax.named_scope("processed_sweep"):
    return sweep(step, (P.empty(h.shape[0]), init), v, width)


def _hidden_sweep(h, w, targets, tau, softcap, vocab_axis: int, precision, config, fused):
  """(RowPartials, float32 ``[N, G, c]``: the ``c = config.group_values`` largest
  values of each group of ``config.hidden_group`` columns) of ``h @ w``: one
  sweep over the unembedding's blocks (``h`` already in the dot dtype)."""
  v = w.shape[vocab_axis]
  group, c = config.hidden_group, config.group_values

  def record_block(maxima, z, lo):
    tops = record.group_tops(lax.stop_gradient(z), group, c)
    return lax.dynamic_update_slice_in_dim(maxima, tops, lo // group, 1), None

  def forward(cpu: bool):
    width = fused.block(v, cpu)
    width = max(group, width // group * group) if width < v else width  # on group boundaries
    init = jnp.full((h.shape[0], -(-v // group), c), -jnp.inf, _F32)
    args = (h, w, targets, tau, softcap, vocab_axis, precision, fused, width, init)
    return _partials_sweep(*args, record_block)

  return on_cpu_or(lambda: forward(True), lambda: forward(False))


def _hidden_sweep_top(h, w, targets, tau, softcap, vocab_axis: int, precision, k: int, fused):
  """(RowPartials, float32[N, K]: each row's ``K`` largest capped values,
  descending) of ``h @ w``: one sweep over the unembedding's blocks, each
  block's values merged into the row's running ``K`` largest by the compiled
  kernel (:func:`~lpkernel.ops.processed.cpu_top_k.add_block`). A program for
  the CPU only; XLA:CPU's own steps record each group's largest values instead
  (:func:`_hidden_sweep`), a third of the logits' size carried through the
  sweep, then a top-k of them and the gathers they may need. With ``K`` 1 (a
  sampler that truncates nothing) the row's largest value is the maximum its
  blocks' statistics take: no candidates are offered (their buffer was once 4
  values, with no room for a vector of offers: every value went through the
  kernel one at a time, 2.3x the fused forward at N 4096, D 512, V 32000 in
  bfloat16; :func:`~lpkernel.ops.processed.cpu_top_k.running_capacity` now
  leaves room, but the offers would still cost a pass the maximum does not)."""
  v = w.shape[vocab_axis]
  ops = (h, w, targets, tau, softcap, vocab_axis, precision, fused, fused.block(v, True))
  if k == 1:
    parts, _ = _partials_sweep(*ops, (), lambda _, z, lo: ((), block_stats(z, targets - lo)))
    return parts, lax.stop_gradient(parts.m)[:, None]
  init = running_top_k(h.shape[0], k, v)
  parts, top = _partials_sweep(*ops, init, lambda top, z, lo: add_block(top, z, k, targets - lo))
  return parts, running_values(top, k)


def hidden_forward(
  h, w, targets, tau, softcap, vocab_axis: int, precision, k: int, config, fused: FusedConfig, impl
):
  """(RowPartials of whole rows, float32[N, K] largest capped values, the rows as
  :class:`~select.Rows` for a search) of ``h @ w``: ``impl``'s first pass
  (:class:`lpkernel.ops.base.ProcessedHidden`). ``h`` is upcast to the dot
  dtype once, for both."""
  h = h if fused.dot_dtype is None else h.astype(fused.dot_dtype)
  hs, ws = lax.stop_gradient(h), lax.stop_gradient(w)
  chunk = search_chunk(h.shape[0])
  width = rows_width(chunk, h.shape[1], w.shape[vocab_axis], fused)
  rows = hidden_rows(hs, ws, softcap, vocab_axis, precision, width, fused.dot_dtype, chunk)
  args = (h, w, targets, tau, softcap, vocab_axis, precision, k, config, fused)
  return (*impl.hidden_partials_and_candidates(*args), rows)


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
  # Dead rows hold anything (padding, NaN): zeros keep them out of d w's contraction.
  h = jnp.where(live_rows(g)[:, None], h, 0)
  h = h if fused.dot_dtype is None else h.astype(fused.dot_dtype)

  def backward(cpu: bool):
    dw_out = UnembedGrad(w.shape, w.dtype, vocab_axis, UnembedGrad.bits_for(w.dtype, cpu))

    def grad(x, z, cols, fresh):
      dy, dtau_b = row_grads(z, cols, targets, params, kappa, log_s, log_sk, g, tau_grad, fresh)
      return P.grad_x(dy, x, tau_col, softcap).astype(h.dtype), dtau_b  # h as the matmuls take it

    with_tau = tau_grad and params.tau is not None
    ops = (softcap, precision, vocab_axis)
    return backward_sweep(h, w, grad, dw_out, with_tau, fused, cpu, ops)

  with jax.named_scope("processed_sweep_backward"):
    return on_cpu_or(lambda: backward(True), lambda: backward(False))
