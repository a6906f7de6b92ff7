"""The logits path in XLA: chunked two-pass row partials through an integer bit view.

Two habits of XLA shape it (measured with jax 0.10.2 on XLA:CPU):

* XLA shares one upcast between every consumer of a narrow-dtype tensor and then
  materialises it. Every consumer here reads the logits through an integer bit
  view (``bitcast_convert_type``), which no convert can be moved through, so each
  fused reduction upcasts privately inside its own loop.
* XLA:CPU's fused ``exp`` row reduction slowed about 10x past 32768 columns, so
  on the CPU the vocabulary is split into ``chunk`` columns viewed as extra rows
  (``[N, V] -> [N * K, V / K]``, a free reshape of the bit view); each chunk's
  partials are merged per row by :func:`lpkernel.partials.combine`. A vocabulary
  that no chunk width (with argmax blocks) divides is swept in column blocks
  instead (each a sliced copy, merged online). Elsewhere whole rows are reduced
  (the accelerator branch, tested on the CPU too).

Each chunk costs two fused reductions: a max in the logits' own dtype, then one
``exp`` per element. The greedy flag's first-argmax rule adds, on the CPU, a
plain max over small column blocks and a re-read of the target's block (a
masked max over the row, the accelerators' way, is not fused by XLA:CPU). A
one-pass variadic online reduction was 2-20x slower on XLA:CPU and 1.45x slower
than two passes on an H200.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from lpkernel import partials as P
from lpkernel.ops import tuning
from lpkernel.ops.blocks import block_of, map_row_chunks, slice_width, sweep
from lpkernel.ops.platform import on_cpu_or
from lpkernel.ops.processed import cpu_top_k

_F32 = jnp.float32
_BITS = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


@dataclasses.dataclass(frozen=True)
class ChunkConfig:
  """How the vocabulary axis is split for the row reductions on the CPU.

  Attributes:
    max_chunk: the longest vocabulary chunk reduced as one row. XLA:CPU's fused
      row reduction of ``exp`` slowed down about 10x past 32768 float32 elements
      (measured with jax 0.10.2); chunks at or under it stay fast on every core.
    min_chunk: the shortest chunk worth splitting into (a divisor of V).
    sweep_block: columns per step of the loop that reduces a vocabulary with no
      chunk (a divisor in ``[min_chunk, max_chunk]`` with argmax blocks, e.g.
      V = 100277, a prime): each step slices (copies) a ``[N, sweep_block]``
      block (at most a sixteenth of a row, :meth:`sweep_width`) and merges its
      partials online, so its temporaries are under 5% of the logits' bytes
      for any V past ``max_chunk``. On 2 cores at N = 1024,
      V = 100277 the forward took 73-86 ms in float32 with 512-4096 columns
      (bfloat16 60-68 ms), against 320-470 ms for whole rows, and 60-72 ms
      (bfloat16 51) for V = 100352 in chunks.
    argmax_block: the widest block of columns whose maxima locate a row's first
      argmax (the greedy flag; :meth:`argmax_block_for`): the max pass reduces
      such blocks (as fast as whole chunks down to 32 columns) and only the
      target's block is read again. XLA:CPU does not fuse a masked max (a
      compare in the reduction's prologue): it materialised the select, a
      float32 copy of the logits (4x bfloat16 logits' bytes), and ran 3-4x
      slower than the plain max (N = 4096, V = 32000 float32: the greedy flags
      took the forward from about 110 ms to 350-410 ms). So a chunk must have
      such blocks: a vocabulary with none (V = 32003, 50257, 151936) is swept,
      and only a sweep's short tail takes the masked max. 0: never (every
      chunk takes the masked max, as the accelerators' whole rows do).
  """

  max_chunk: int = 32768
  min_chunk: int = 1024
  sweep_block: int = 512
  argmax_block: int = 1024

  def __post_init__(self):
    sizes = (self.max_chunk, self.min_chunk, self.sweep_block, self.argmax_block + 1)
    if min(sizes) < 1:
      raise ValueError(
        f"ChunkConfig sizes must be positive, got {self.max_chunk=}, {self.min_chunk=}, "
        f"{self.sweep_block=}, {self.argmax_block=}"
      )

  def argmax_block_for(self, chunk: int) -> int | None:
    """The width of the blocks whose maxima locate the first argmax in a chunk,
    or None (a masked max over the chunk). The target's block is read again
    and the blocks' maxima kept: ``d + chunk / d`` values per row for blocks of
    ``d`` columns (a 1024-column block of V = 4096 was a quarter of the
    logits' bytes). So: the widest divisor ``d`` of the chunk in
    ``[max(2, min(argmax_block // 32, sqrt(chunk) / 2)), min(argmax_block,
    chunk // 2)]`` whose ``d + chunk / d`` is at most a sixteenth of the chunk,
    or, where none is, the least of them."""
    lo = max(2, min(self.argmax_block // 32, math.isqrt(chunk) // 2))
    hi = min(self.argmax_block, chunk // 2)
    blocks = [d for d in range(lo, hi + 1) if chunk % d == 0]
    if not blocks:
      return None
    budget = max(chunk // 16, min(d + chunk // d for d in blocks))
    return max(d for d in blocks if d + chunk // d <= budget)

  def _fits(self, chunk: int) -> bool:
    """A chunk is reduced as such if it has argmax blocks (or is short, or blocks are off)."""
    if self.argmax_block == 0 or chunk <= self.sweep_block:
      return True
    return self.argmax_block_for(chunk) is not None

  def sweep_width(self, vocab_size: int) -> int:
    """Columns per step of a swept vocabulary
    (:func:`~lpkernel.ops.blocks.slice_width` of ``sweep_block``)."""
    return slice_width(self.sweep_block, vocab_size)

  def chunk(self, vocab_size: int) -> int | None:
    """The chunk width used for ``vocab_size`` (a divisor of it with argmax blocks),
    or None when the vocabulary is swept in ``sweep_block`` column blocks."""
    if vocab_size <= self.max_chunk:
      return vocab_size if self._fits(vocab_size) else None
    for num_chunks in range(2, vocab_size // self.min_chunk + 1):
      chunk = vocab_size // num_chunks
      if vocab_size % num_chunks == 0 and chunk <= self.max_chunk and self._fits(chunk):
        return chunk
    return None


def _bits(x: jax.Array) -> jax.Array:
  return lax.bitcast_convert_type(x, _BITS[x.dtype.itemsize])


def _from_bits(bits: jax.Array, dtype) -> jax.Array:
  return lax.bitcast_convert_type(bits, dtype)


# A bit view has no derivative (its tangent would be silently zero), so the two
# helpers that read x through one carry their own rule: the reshape or gather of
# the tangent. With them this module is plain differentiable jnp at any order,
# the derivatives every implementation's VJP rules are given (lpkernel.ops.higher_order).


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def chunk_rows(x: jax.Array, chunk: int) -> jax.Array:
  """``float[N, V] -> float[N * V / chunk, chunk]``, reshaped through the bit view."""
  n, v = x.shape
  return _from_bits(_bits(x).reshape(n * (v // chunk), chunk), x.dtype)


@chunk_rows.defjvp
def _chunk_rows_jvp(chunk, primals, tangents):
  (x,), (dx,) = primals, tangents
  return chunk_rows(x, chunk), dx.reshape(-1, chunk)


def _per_chunk(row_values: jax.Array, num_chunks: int) -> jax.Array:
  """``[N] -> [N * K]``: repeat a per-row value for each of its chunks."""
  return jnp.repeat(row_values, num_chunks) if num_chunks > 1 else row_values


def _safe_ids(targets: jax.Array, v: int) -> jax.Array:
  return jnp.where((targets >= 0) & (targets < v), targets, 0)


@jax.custom_jvp
def gather(x: jax.Array, targets: jax.Array) -> jax.Array:
  """``x[i, targets[i]]`` through the bit view; out-of-range ids read column 0."""
  picked = jnp.take_along_axis(_bits(x), _safe_ids(targets, x.shape[-1])[:, None], axis=-1)
  return _from_bits(picked[:, 0], x.dtype)


@gather.defjvp
def _gather_jvp(primals, tangents):
  (x, targets), (dx, _) = primals, tangents
  safe = _safe_ids(targets, x.shape[-1])
  return gather(x, targets), jnp.take_along_axis(dx, safe[:, None], axis=-1)[:, 0]


def target_z(x, targets, softcap) -> jax.Array:
  """float32[N]: the target's capped logit, ``-inf`` for ids outside this block."""
  in_block = (targets >= 0) & (targets < x.shape[-1])
  return jnp.where(in_block, P.capped(gather(x, targets), softcap), -jnp.inf)


def _before_in_blocks(x, targets, block: int, maxima=None) -> jax.Array:
  """The max of each row's columns before its target ``[N]``, from one plain max
  over ``block``-column blocks (``block`` divides V; or their ``maxima
  [N, V // block]`` where the caller has them) and one re-read of the target's
  block: the first-argmax rule's input.

  XLA:CPU's fast reductions take no compare in their prologue: a masked max over
  the whole row (the fallback in :func:`partials`) materialised its select, a
  float32 copy of the logits, and ran 3-4x slower than the plain max; here the
  mask only meets the blocks' maxima and one block. Only the greedy flag reads
  it (a compiled program without flags drops this pass). A column of an earlier
  chunk that ties the target's chunk's max decides that flag the same way
  through the merge, so the row's columns can stand for the chunk's.
  """
  n, v = x.shape
  fine = jnp.max(chunk_rows(x, block), axis=-1).reshape(n, v // block) if maxima is None else maxima
  safe = _safe_ids(targets, v)
  own = safe // block  # the target's block
  # Many blocks (the processed path's 32-column groups): their masked max was
  # materialised (17 ms at [4096, 4008]); the same rule one level up.
  coarse = [c for c in range(2, 65) if fine.shape[1] % c == 0] if fine.shape[1] > 1024 else []
  if coarse:
    before = _before_in_blocks(fine, own, coarse[-1])
  else:
    j = lax.broadcasted_iota(jnp.int32, fine.shape, 1)
    before = jnp.max(jnp.where(j < own[:, None], fine, -jnp.inf), axis=-1)
  # The target's block [N, block], taken through the bit view (a bfloat16 take
  # was upcast whole: a float32 copy of the logits). It only decides a flag.
  cols = own[:, None] * block + lax.broadcasted_iota(jnp.int32, (n, block), 1)
  rows = _from_bits(jnp.take_along_axis(_bits(lax.stop_gradient(x)), cols, axis=-1), x.dtype)
  within = jnp.max(jnp.where(cols < safe[:, None], rows, -jnp.inf), axis=-1)
  return jnp.maximum(before, within)


def partials(
  x, targets, tau, softcap, chunk: int, block: int | None = None, maxima=None, stats=False
) -> P.RowPartials:
  """Row partials of ``x [N, V]`` (block-local ``targets``), ``chunk`` columns at a time.

  With ``block`` (a divisor of ``chunk``) the first argmax is located from the
  maxima of ``block``-column blocks (:func:`_before_in_blocks`); without, by a
  masked max over each chunk, or with ``stats`` (and no ``block``: the CPU's
  compiled kernels; float32 or bfloat16 ``x``, no softcap) by the first column of each chunk's
  max, one read of it in place
  (:func:`~lpkernel.ops.processed.cpu_top_k.block_stats`: XLA:CPU's masked max
  materialised its select, a float32 copy of the logits, two of bfloat16 ones,
  at V = 257). Given those ``maxima [N, V // block]`` (in x's dtype), the
  chunks' maxima come from them too, and ``x`` is read once more only for the
  sums of ``exp``.
  """
  n, v = x.shape
  k = v // chunk
  xc = chunk_rows(x, chunk)
  tau_c = None if tau is None else _per_chunk(tau, k)
  starts = jnp.tile(jnp.arange(k, dtype=jnp.int32) * chunk, n)
  local_t = _per_chunk(targets, k) - starts
  with jax.named_scope("chunk_max"):
    # The max commutes with the monotone softcap: reduce in x's own dtype.
    if stats:
      max_x = jnp.max(xc, axis=-1)
      # The max's first column, one read (dropped, as XLA's passes, where no flag is asked for).
      at_first = cpu_top_k.block_stats(xc, local_t).arg == local_t
    else:
      if maxima is None:
        max_x = jnp.max(xc, axis=-1)
      else:
        max_x = jnp.max(maxima.reshape(n * k, -1), axis=-1)
        if k > 1:  # XLA:CPU moved the chunks' reshape after the sums' upcast: materialised
          xc = lax.optimization_barrier(xc)
      if block is None:
        cols = lax.broadcasted_iota(jnp.int32, xc.shape, 1)
        before_x = jnp.max(jnp.where(cols < local_t[:, None], xc, -jnp.inf), axis=-1)
      else:  # before_x holds only for the target's chunk, the one that reads it
        before_x = _per_chunk(_before_in_blocks(x, targets, block, maxima), k)
    m = P.capped(max_x, softcap)
  with jax.named_scope("chunk_sumexp"):
    z = P.capped(xc, softcap)
    tau_col = None if tau_c is None else tau_c[:, None]
    s = jnp.sum(jnp.exp(P.scaled(z - P.shift_of(m)[:, None], tau_col)), axis=-1)
  t = target_z(x, targets, softcap)
  holds = (local_t >= 0) & (local_t < chunk)
  # The target's chunk says whether the target is its first argmax (see
  # RowPartials.arg): it attains the chunk's max and no column before it does
  # (an impossible target is never greedy: P.finish).
  if stats:
    first = at_first & (_per_chunk(t, k) == m)
  else:
    first = (P.capped(before_x, softcap) < m) & (_per_chunk(t, k) == m)
  arg = jnp.where(holds, jnp.where(first, starts + local_t, -1), starts)
  if k == 1:
    return P.RowPartials(m, s, t, arg)
  with jax.named_scope("combine_chunks"):
    merged = P.combine(
      P.RowPartials(m.reshape(n, k), s.reshape(n, k), t[:, None], arg.reshape(n, k)),
      P.over_axis(1),
      tau,
      expand=lambda r: r[:, None],
    )
  return merged._replace(t=t)


def centred_expected_y(x, tau, softcap, shift, log_s, chunk: int) -> jax.Array:
  """float32[N]: ``E_p[(z - shift) / tau]`` over the finite terms of each row
  (chunked like the forward)."""
  n, v = x.shape
  k = v // chunk
  xc = chunk_rows(x, chunk)
  tau_c = None if tau is None else _per_chunk(tau, k)[:, None]
  zc = P.capped(xc, softcap)
  shift_c = _per_chunk(shift, k)[:, None]
  p = P.softmax(zc, shift_c, _per_chunk(log_s, k)[:, None], tau_c)
  return jnp.sum(p * P.centred_y(zc, shift_c, tau_c), axis=-1).reshape(n, k).sum(-1)


def swept_partials(reduce, x, targets, tau, block: int) -> P.RowPartials:
  """Row partials of ``x [N, V]`` by a loop over ``block``-column slices merged
  online, for a V that no chunk width divides; ``reduce(x, lo, width, targets,
  tau)`` gives the partials of x's columns ``[lo, lo + width)`` (its
  ``targets`` slice-local)."""

  def step(carry, lo, width):
    block = P.at_offset(reduce(x, lo, width, targets - lo, tau), lo)
    return P.merge(carry, block, tau)

  return sweep(step, P.empty(x.shape[0]), x.shape[1], block)


def swept_centred_expected_y(x, tau, softcap, shift, log_s, block: int) -> jax.Array:
  """:func:`centred_expected_y` by a loop over ``block``-column slices."""

  def step(total, lo, width):
    return total + centred_expected_y(block_of(x, lo, width, 1), tau, softcap, shift, log_s, width)

  return sweep(step, jnp.zeros(x.shape[:1], _F32), x.shape[1], block)


def grad_logits(x, targets, tau, softcap, shift, log_s, g, g_lse=None) -> jax.Array:
  """``d logits = (g * (onehot - p) + g_lse * p) * dy/dx`` in one elementwise pass;
  ``x``'s dtype.

  ``g`` (and ``g_lse``, the log-sum-exp's cotangent, or None) is zero on dead
  rows (the caller makes their ``tau`` safe); its rows are exactly zero there
  whatever ``x`` holds.
  """
  n, v = x.shape
  # The selects (here and in P.softmax) keep XLA:CPU from sharing the forward's
  # broadcast shift and sum-exp reduction with this pass's fusion: shared, it
  # materialised them (or the one-hot and the row mask) as [N, V] float32 buffers.
  shift = P.finite_or_zero(shift)
  # And a barrier keeps this pass's upcast of x from being merged with the
  # forward's (CSE): where the forward reads x itself (one vocabulary chunk, 2-D
  # logits), the shared upcast was materialised as a float32 [N, V] copy.
  x = lax.optimization_barrier(x)
  tau_col = None if tau is None else tau[:, None]
  z = P.capped(x, softcap)
  onehot = lax.broadcasted_iota(jnp.int32, (n, v), 1) == targets[:, None]
  p = P.softmax(z, shift[:, None], log_s[:, None], tau_col)
  dy = P.grad_y(onehot, p, g[:, None], None if g_lse is None else g_lse[:, None], z=z)
  dx = P.grad_x(dy, x, tau_col, softcap)
  return dx.astype(x.dtype)


# Elements of one row block's float32 temporaries (2 MiB) when rows are reduced in blocks.
_ROW_BLOCK_ELEMENTS = 1 << 19


def _needs_row_blocks(x, softcap) -> bool:
  """XLA:CPU's fast reductions (YNNPACK fusions) take neither ``tanh`` nor a float16
  upcast in their prologue: it materialised either as a float32 ``[N, V]`` copy
  (jax 0.10.2). Then the forward's rows are reduced in blocks, bounding that
  copy to a block (the elementwise backward needs none)."""
  return softcap is not None or x.dtype == jnp.float16


def _in_row_blocks(fn, x, *rows, width: int, vocab_size: int):
  """``fn(x, *rows)`` over blocks of rows (:func:`blocks.map_row_chunks`) of
  ``x``, rows of ``vocab_size`` of which ``fn`` reads ``width`` columns; results
  have N leading rows.

  A block holds at most ``_ROW_BLOCK_ELEMENTS`` and 2% of the logits' elements
  (but not under ``_ROW_BLOCK_ELEMENTS // 32``: rows too few to weigh are not
  split), its float32 temporaries three or four times that: blocks of 2 MiB
  alone were the whole of V = 256's float32 logits under a softcap (4096 rows),
  and a quarter of V = 1000's.
  """
  n = x.shape[0]
  elements = min(_ROW_BLOCK_ELEMENTS, max(_ROW_BLOCK_ELEMENTS // 32, n * vocab_size // 50))
  return map_row_chunks(fn, (x, *rows), max(1, min(n, elements // width)))


@dataclasses.dataclass(frozen=True)
class XlaLogits(tuning.Configured):
  """The XLA implementation: chunked on the CPU, whole rows elsewhere.

  Attributes:
    chunks: the CPU's vocabulary chunking.
  """

  chunks: ChunkConfig = ChunkConfig()
  op = "logits"
  name = "xla"
  platforms = None  # every backend
  differentiable = True  # plain jnp at any order (lpkernel.ops.higher_order)

  def partials(self, x, targets, tau, softcap, maxima=None) -> P.RowPartials:
    """``maxima``: the maxima of each row's ``block``-column blocks ``[N, V // block]``
    in x's dtype, where the caller has them (the processed path's group maxima):
    on the CPU they stand for the max pass and the argmax blocks' where ``block``
    divides the chunk."""
    v = x.shape[1]

    def cpu():
      chunk = self.chunks.chunk(v)
      if chunk is not None and maxima is not None and chunk % (v // maxima.shape[1]) == 0:
        fn = lambda x, t, tau, mx: partials(x, t, tau, softcap, chunk, v // mx.shape[1], mx)  # noqa: E731
        if _needs_row_blocks(x, softcap):
          return _in_row_blocks(fn, x, targets, tau, maxima, width=v, vocab_size=v)
        return fn(x, targets, tau, maxima)

      def reduce(x, lo, cols, t, tau):  # x's columns [lo, lo + cols): all, or a slice
        width = chunk or cols
        block = self.chunks.argmax_block_for(width)
        # A short row's blocks and maxima weigh against it (V = 256: 14% of
        # the float32 logits), and a row without them was copied: the kernel.
        short = block is None or width <= self.chunks.sweep_block
        read = x.dtype in (jnp.float32, jnp.bfloat16) and softcap is None  # in place, as is
        stats = short and read and cpu_top_k.available()
        block = None if stats else block
        fn = lambda x, t, tau: partials(x, t, tau, softcap, width, block, stats=stats)  # noqa: E731
        if not _needs_row_blocks(x, softcap):
          return fn(x if cols == v else block_of(x, lo, cols, 1), t, tau)

        # Each block of rows slices its rows and columns of x at once: a slice
        # of all the rows was copied whole (V = 4099: 256 columns, 6% of the
        # logits), and a block's rows, sliced, then their columns, were
        # widened whole from bfloat16 (V = 32771: 65 -> 550 ms).
        def sliced(ids, t, tau):  # ids: the block's rows
          xs, r0, c0 = lax.optimization_barrier((x, ids[0], jnp.asarray(lo, jnp.int32)))
          return fn(lax.dynamic_slice(xs, (r0, c0), (ids.shape[0], cols)), t, tau)

        ids = jnp.arange(x.shape[0], dtype=jnp.int32)
        return _in_row_blocks(sliced, ids, t, tau, width=cols, vocab_size=v)

      if chunk is None:
        return swept_partials(reduce, x, targets, tau, self.chunks.sweep_width(v))
      return reduce(x, 0, v, targets, tau)

    return on_cpu_or(cpu, lambda: partials(x, targets, tau, softcap, v))

  def grad_logits(self, x, targets, tau, softcap, shift, log_s, g, g_lse=None) -> jax.Array:
    # One elementwise pass on every backend, whole: in row blocks (as the
    # forward's softcap reductions) a bfloat16 softcap backward took 505 ms
    # against 120 ms (N = 1024, V = 32000), its [N, V] carry copied per block.
    return grad_logits(x, targets, tau, softcap, shift, log_s, g, g_lse)

  def centred_expected_y(self, x, tau, softcap, shift, log_s) -> jax.Array:
    def cpu():
      chunk = self.chunks.chunk(x.shape[1])
      if chunk is None:
        width = self.chunks.sweep_width(x.shape[1])
        return swept_centred_expected_y(x, tau, softcap, shift, log_s, width)
      return centred_expected_y(x, tau, softcap, shift, log_s, chunk)

    default = lambda: centred_expected_y(x, tau, softcap, shift, log_s, x.shape[1])  # noqa: E731
    return on_cpu_or(cpu, default)
