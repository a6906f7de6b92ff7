"""The kept set as a threshold, found without sorting a row.

Every rule of the sampler (min-p, top-k with ties kept, top-p with the tie rule
of :mod:`lpkernel.sampling`) keeps an *upper set* of a row's capped logits
``z``: so the kept set is ``{z : min-p holds, key(z) >= kappa}`` for one
per-row threshold ``kappa`` on :func:`order_key` (the float's bits as an
ordered ``uint32``). This module finds ``kappa``:

* from the row's ``K`` largest values (:func:`decide`), which settles every row
  whose kept set lies among them (top-k with a smaller value than the k-th
  among them, so ``k < K``; a nucleus of fewer than ``K`` tokens, of a top-k
  set or min-p set among them or of the whole row; a min-p cut above the
  ``K``-th value) with no further read;
* otherwise by a search of the rows it leaves open (:func:`threshold`), a
  chunk of rows at a time: their capped logits are formed once (a gather of
  logits, or a matmul of those rows' hidden states), then a bisection
  (:func:`largest_key_within`) halves each row's bracket, its values (its keys
  once they are not finite), until at most one column lies in it, and the
  threshold is cut halfway to the next smaller column; about ``log2`` of the
  columns in the first bracket halvings. In XLA each halving is a masked sum
  over the chunk; on the CPU a compiled kernel halves a shrinking list.

A :class:`Rows` gives a chunk's capped logits (``take``). Under ``shard_map``
with the columns split over a mesh axis, each device holds its block of the
chunk's columns, and every sum and maximum is reduced over that axis (``psum``,
``pmax``: a few bytes per row per halving), so every device reaches the same
threshold.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from lpkernel import partials as P
from lpkernel.ops.blocks import map_row_chunks, tokens_per_chunk
from lpkernel.ops.platform import on_cpu_or
from lpkernel.ops.processed import cpu_search
from lpkernel.sampling import nucleus_floor

_F32 = jnp.float32
_U32 = jnp.uint32


class Rows(NamedTuple):
  """Rows of capped logits ``[N, V]`` that a search reads a chunk of rows at a time.

  Attributes:
    take: ``idx int32[chunk] -> float32[chunk, vocab_size]``, the capped logits
      of rows ``idx`` (a gather of logits, or a matmul of their hidden states
      with the unembedding).
    vocab_size: the columns held here (this device's block under ``axis_name``).
    chunk: rows per step of the search.
    axis_name: the mesh axis the row's columns are split over, or None.
    whole: the capped logits ``float32 [N, V]`` themselves where ``take`` only
      gathers them (no softcap, float32 logits), else None: the CPU's search
      then reads a chunk's rows in place, with no gather.
  """

  take: Callable[[jax.Array], jax.Array]
  vocab_size: int
  chunk: int
  axis_name: str | None = None
  whole: jax.Array | None = None


def _across(out, axis_name: str | None, reduce: str = "sum"):
  """Row sums (``reduce="sum"``) or maxima (``"max"``) of one device's columns
  made the whole row's over the mesh axis ``axis_name`` (unchanged for None)."""
  if axis_name is None:
    return out
  return (lax.psum if reduce == "sum" else lax.pmax)(out, axis_name)


def column(a: jax.Array) -> jax.Array:
  """Row values ``[N]`` as a column ``[N, 1]`` (given as one, e.g. a TPU kernel's
  row block, unchanged)."""
  return a if a.ndim == 2 else a[:, None]


class Params(NamedTuple):
  """The sampler's parameters and the row statistics, one value per row ``[N]``
  (or ``[N, 1]``: :func:`column`).

  Attributes:
    tau: float32 temperature, or None (1).
    top_k: int32, off when ``<= 0`` or ``>= V``.
    top_p: float32, off when ``>= 1``.
    min_p: float32, off at 0.
    shift: the row's shift (:func:`lpkernel.partials.shift_of` of its max).
  """

  tau: jax.Array | None
  top_k: jax.Array
  top_p: jax.Array
  min_p: jax.Array
  shift: jax.Array

  def col(self, a: jax.Array | None) -> jax.Array | None:
    return None if a is None else column(a)

  def e(self, z: jax.Array) -> jax.Array:
    """``exp((z - shift) / tau)`` of ``z [N, W]``: each column's probability
    relative to the row's largest (min-p compares it with ``min_p``)."""
    return jnp.exp(P.scaled(z - column(self.shift), self.col(self.tau)))

  def min_p_holds(self, e: jax.Array) -> jax.Array:
    return e >= column(self.min_p)

  def top_k_on(self, vocab_size: int) -> jax.Array:
    """bool[N]: top-k truncates (``0 < k < V``)."""
    return (self.top_k > 0) & (self.top_k < vocab_size)


def order_key(z: jax.Array) -> jax.Array:
  """uint32 keys ordered as the floats ``z`` (``-0.0`` as ``0.0``; NaN outside)."""
  z = jnp.where(z == 0, 0.0, z).astype(_F32)
  b = lax.bitcast_convert_type(z, _U32)
  return jnp.where(b >> 31 == 1, ~b, b | _U32(0x80000000))


def kept(z: jax.Array, params: Params, kappa: jax.Array) -> jax.Array:
  """bool[N, W]: the columns of ``z [N, W]`` in the kept set of threshold ``kappa [N]``."""
  return params.min_p_holds(params.e(z)) & (order_key(z) >= column(kappa))


class Decision(NamedTuple):
  """What :func:`decide` settles per row ``[N]``.

  Attributes:
    kappa: uint32 threshold key, final where ``settled``; else 0 (all).
    settled: the kept set, its mass and size are known.
    mass: the kept set's sum of :meth:`Params.e` where settled.
    size: int32, the kept set's size where settled.
    ceiling: uint32, one past the key of the row's largest value.
    total: the row's sum of :meth:`Params.e` (its mass).
  """

  kappa: jax.Array
  settled: jax.Array
  mass: jax.Array
  size: jax.Array
  ceiling: jax.Array
  total: jax.Array


def _cut_below(top: jax.Array, value: jax.Array) -> jax.Array:
  """The key halfway between ``value [N]`` and the next smaller value in ``top``:
  the threshold that keeps ``value`` and drops what is below it, robust to a
  recomputation of the same logits that rounds differently (a matmul blocked
  otherwise in the sweeps than in the candidates' dot products)."""
  hi = order_key(value)
  lo = order_key(jnp.max(jnp.where(top < value[:, None], top, -jnp.inf), axis=-1))
  return jnp.where(hi > lo, lo + (hi - lo + _U32(1)) // _U32(2), hi)


def decide(
  top: jax.Array, complete: bool, params: Params, vocab_size: int, total: jax.Array
) -> Decision:
  """The kept set from each row's ``K`` largest capped logits ``top [N, K]``
  (descending), where they settle it.

  ``complete``: ``top`` holds every column of the rows (``K == V``); ``total``:
  the whole row's sum of :meth:`Params.e` (the mass when nothing is truncated).
  """
  k_max = top.shape[1]
  k, p = params.top_k, params.top_p
  e = params.e(top)
  ok_min_p = params.min_p_holds(e)
  k_on = params.top_k_on(vocab_size)
  kth = jnp.take_along_axis(top, jnp.clip(k - 1, 0, k_max - 1)[:, None], axis=-1)[:, 0]
  # Top-k past K matters only where min-p keeps more than the K values (not settled).
  in_a = ok_min_p & ((~k_on | (k > k_max))[:, None] | (top >= kth[:, None]))
  last = top[:, -1]
  w = jnp.where(in_a, e, 0.0)
  # Without top-k and min-p, A is the whole row and its mass is the row's: the
  # columns past the K values weigh the rest, summed first (they are the least
  # likely), so the nucleus is decided here wherever it ends among the K values.
  whole = ~k_on & (params.min_p <= 0)
  held = jnp.sum(w, axis=-1)
  rest = jnp.where(whole, jnp.maximum(total - held, 0.0), 0.0)
  mass_a = (held + rest)[:, None]
  least = nucleus_floor(
    jnp.concatenate([w, rest[:, None]], axis=-1) / mass_a,
    jnp.concatenate([top, jnp.full_like(last[:, None], -jnp.inf)], axis=-1),
    p,
  )
  # Settled: min-p cuts inside the K values; top-k does with a smaller value
  # among them to cut above (the k-th value equal to the K-th, e.g. k == K or
  # ties to the end, leaves the next smaller value unknown: searched); or top-p
  # drops the K-th value of a whole row.
  within = ~ok_min_p[:, -1] | (k_on & (k <= k_max) & (last < kth)) | (whole & (last < least))
  if complete:
    within = jnp.ones_like(within)
  keep = in_a & (top >= least[:, None])
  thr = jnp.min(jnp.where(keep, top, jnp.inf), axis=-1)
  all_on = ~k_on & (p >= 1) & (params.min_p <= 0)  # nothing truncated
  kappa = jnp.where(within, _cut_below(top, thr), _U32(0))
  return Decision(
    kappa=jnp.where(all_on, _U32(0), kappa),
    settled=within | all_on,
    mass=jnp.where(all_on, total, jnp.sum(jnp.where(keep, e, 0.0), axis=-1)),
    size=jnp.where(all_on, vocab_size, jnp.sum(keep, axis=-1, dtype=jnp.int32)),
    ceiling=order_key(top[:, 0]) + _U32(1),
    total=total,
  )


def decide_in_row_chunks(
  top: jax.Array, complete: bool, params: Params, vocab_size: int, total: jax.Array
) -> Decision:
  """:func:`decide` a chunk of rows at a time, each chunk's ``[C, K]`` values
  within 1% of the rows' float32 logits (``C * K <= N * V / 100``), or half a
  percent where the candidates themselves pass 5% of them (``20 K > V``): its
  few ``[N, K]`` temporaries were 14% of the logits' bytes at V = 32000 with
  top-k 1000, and 15% at V = 2048 with top-k 50; at V = 1000, 1% chunks
  beside the candidates (6.4%) made 11.5% (half a percent everywhere cost 1-2
  ms of 18-26 at B32 T128 V8192, whose decision is whole at 1%). Whole where
  they fit; one loop over the chunks, the last overlapping its predecessor (a
  row decided twice gives the same decision)."""
  n, k = top.shape
  per_row = 4 * k if 20 * k <= vocab_size else 8 * k
  chunk = tokens_per_chunk(n, vocab_size, per_row, most_bytes=per_row * n)  # no other cap

  def rows(top, params, total):
    return decide(top, complete, params, vocab_size, total)

  return map_row_chunks(rows, (top, params, total), chunk)


class Chunk(NamedTuple):
  """Rows being searched, each value's weight and key formed once.

  Attributes:
    e: float32[C, W], :meth:`Params.e` of the capped logits.
    key: uint32[C, W], their :func:`order_key`.
    axis_name: the mesh axis the columns are split over, or None.
  """

  e: jax.Array
  key: jax.Array
  axis_name: str | None = None

  @classmethod
  def of(cls, z: jax.Array, params: Params, axis_name: str | None = None) -> Chunk:
    """The chunk of capped logits ``z [C, W]`` (this device's columns under ``axis_name``)."""
    return cls(params.e(z), order_key(z), axis_name)

  def in_a(self, params: Params, floor: jax.Array) -> jax.Array:
    """bool[C, W]: min-p holds and the key is at least ``floor [C]``."""
    return params.min_p_holds(self.e) & (self.key >= column(floor))


def masked_sums(c: Chunk, params: Params, kappa: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The kept set's mass (sum of :meth:`Params.e`) and size per row of the chunk."""
  keep = c.in_a(params, kappa)
  sums = (jnp.sum(jnp.where(keep, c.e, 0.0), axis=-1), jnp.sum(keep, axis=-1, dtype=jnp.int32))
  return _across(sums, c.axis_name)


def key_value(key: jax.Array) -> jax.Array:
  """The float32 of an :func:`order_key` (its inverse)."""
  b = jnp.where(key >> 31 == 1, key & _U32(0x7FFFFFFF), ~key)
  return lax.bitcast_convert_type(b, _F32)


def largest_key_within(
  c: Chunk,
  params: Params,
  floor: jax.Array,
  ceiling: jax.Array,
  by_count: bool,
  budget: jax.Array,
  count: jax.Array,
  active: jax.Array,
  start: jax.Array | None = None,
) -> jax.Array:
  """uint32[C]: the largest key ``kappa`` in ``[floor, ceiling)`` whose columns of
  A (min-p holds, key at least ``floor``) below it weigh at most ``budget``;
  ``floor`` for rows not ``active``, of the rows of chunk ``c``.

  The kept set ``key >= kappa`` then drops exactly the columns whose weight at
  or below them (ties included) is within the budget: top-k with each column
  weighing 1 (``by_count``) and ``budget = count - k``; top-p with each column
  weighing its :meth:`Params.e` and ``budget = (1 - p) S``.

  A bisection, one masked sum per step, halving the bracket's *values* while
  they are finite (its keys otherwise), until at most one column of A lies in it;
  then masked maxima give that column's key and the next smaller one's, and the
  threshold is halfway between (as :func:`_cut_below`: a recomputation of the
  logits that rounds otherwise, e.g. a ``tanh`` in another fusion, keeps the
  same set).

  Args:
    floor, ceiling: uint32[C]; ``ceiling`` is past the row's largest key.
    budget: float32[C].
    count: int32[C], the size of A.
    start: uint32[C] keys known to be within the budget (a tighter lower end), or None.
  """
  n = floor.shape[0]

  def weight(e):
    return jnp.ones_like(e) if by_count else e

  def below(mid):  # (weight, count) of A strictly below mid
    under = c.in_a(params, floor) & (c.key < mid[:, None])
    sums = (
      jnp.sum(jnp.where(under, weight(c.e), 0.0), axis=1),
      jnp.sum(under, axis=1, dtype=jnp.int32),
    )
    return _across(sums, c.axis_name)

  def open_(state):
    lo, hi, c_lo, c_hi = state
    return active & (hi - lo > 1) & (c_hi - c_lo > 1)

  def body(state):
    lo, hi, c_lo, c_hi = state
    v_lo, v_hi = key_value(lo), key_value(hi)
    by_value = order_key(v_lo / 2 + v_hi / 2)
    by_key = lo + (hi - lo) // _U32(2)
    finite = (jnp.abs(v_lo) < jnp.inf) & (jnp.abs(v_hi) < jnp.inf)
    mid = jnp.clip(jnp.where(finite, by_value, by_key), lo + _U32(1), hi - _U32(1))
    w_mid, c_mid = below(mid)
    fits = (w_mid <= budget) & open_(state)
    moves = open_(state)
    return (
      jnp.where(fits, mid, lo),
      jnp.where(moves & ~fits, mid, hi),
      jnp.where(fits, c_mid, c_lo),
      jnp.where(moves & ~fits, c_mid, c_hi),
    )

  lo = floor if start is None else jnp.maximum(floor, start)
  hi = jnp.where(active, jnp.maximum(ceiling, lo + _U32(1)), lo + _U32(1))
  c_lo = jnp.zeros((n,), jnp.int32) if start is None else below(lo)[1]
  state = lax.while_loop(lambda s: jnp.any(open_(s)), body, (lo, hi, c_lo, count))
  lo, hi, c_lo, c_hi = state

  def settle():  # the smallest kept key, then halfway down to the next smaller column of A
    in_a = c.in_a(params, floor)
    inside = in_a & (c.key >= lo[:, None]) & (c.key < hi[:, None])
    under = in_a & (c.key < lo[:, None])
    top, below = _across(
      (
        jnp.maximum(lo, jnp.max(jnp.where(inside, c.key, _U32(0)), axis=1)),
        jnp.max(jnp.where(under, c.key, _U32(0)), axis=1),
      ),
      c.axis_name,
      "max",
    )
    top = jnp.where(c_hi - c_lo == 1, top, lo)  # one column in the bracket, or ties at lo
    cut = jnp.maximum(below + (top - below + _U32(1)) // _U32(2), floor)
    return jnp.where(active & (top > below), cut, lo)

  return lax.cond(jnp.any(active), settle, lambda: lo)


def kept_within(
  c: Chunk,
  params: Params,
  floor: jax.Array,
  ceiling: jax.Array,
  by_count: bool,
  share: jax.Array,
  active: jax.Array,
  vocab_size: int,
  cpu: bool | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(kappa uint32, mass, count) ``[C]`` of the kept set of A (min-p holds, key at
  least ``floor``) in the rows of chunk ``c``: top-k ``by_count`` (``share`` the
  rows' ``k``: A's ``k`` largest values, ties kept) or top-p (``share`` the rows'
  ``p``: A's least likely columns weighing at most ``1 - p`` of A's mass are
  dropped); A whole where not ``active``. ``mass``: the kept set's sum of
  :meth:`Params.e`; ``vocab_size``: the whole row's V.

  In XLA: A's mass and size, :func:`largest_key_within` (for top-p from the key
  below which every column weighs under ``budget / V``), the kept set's mass
  and size. On the CPU without a mesh axis, the compiled
  :func:`~lpkernel.ops.processed.cpu_search.kept_set`, row by row in cache.
  ``cpu``: True or False inside a caller's branch of
  :func:`~lpkernel.ops.platform.on_cpu_or` already chosen for the CPU or for
  another platform (only that path is traced), None to choose here.
  """

  def swept():
    def search():  # only when some row is active
      mass_a, count_a = masked_sums(c, params, floor)
      if by_count:
        budget, start = (count_a - share).astype(_F32), None
      else:
        budget = (1 - share) * mass_a
        tau = 1.0 if params.tau is None else params.tau
        start = order_key(params.shift + tau * jnp.log(budget / vocab_size))
      return largest_key_within(c, params, floor, ceiling, by_count, budget, count_a, active, start)

    kappa = lax.cond(jnp.any(active), search, lambda: floor)
    return (kappa, *masked_sums(c, params, kappa))

  if c.axis_name is not None or not cpu_search.available() or cpu is False:
    return swept()

  def compiled():
    min_p = column(params.min_p)[:, 0]
    return tuple(cpu_search.kept_set(c.key, c.e, floor, ceiling, share, min_p, active, by_count))

  return compiled() if cpu else on_cpu_or(compiled, swept)


def _search(within: Callable, params: Params, d: Decision, vocab_size: int):
  """(kappa, mass, count) of a chunk's rows: :func:`decide`'s where it settled,
  else searched (top-k past ``K``, only when some row needs it, then top-p
  within that set) by ``within(floor, ceiling, by_count, share, active)``, as
  :func:`kept_within`."""
  search_k = ~d.settled & params.top_k_on(vocab_size)
  kappa = lax.cond(
    jnp.any(search_k),
    lambda: within(d.kappa, d.ceiling, True, params.top_k, search_k)[0],
    lambda: d.kappa,
  )
  search_p = ~d.settled & (params.top_p < 1)
  kappa, mass, count = within(kappa, d.ceiling, False, params.top_p, search_p)
  return (
    jnp.where(d.settled, d.kappa, kappa),
    jnp.where(d.settled, d.mass, mass),
    jnp.where(d.settled, d.size, count),
  )


def _search_chunk(idx, params: Params, d: Decision, rows: Rows, vocab_size: int):
  """:func:`_search` of the chunk of rows ``idx [C]`` (their capped logits
  ``rows.take(idx)``, formed where needed): in XLA (or the compiled
  :func:`~lpkernel.ops.processed.cpu_search.kept_set`) on its weights and keys;
  on the CPU without a mesh axis and without min-p, the compiled
  :func:`~lpkernel.ops.processed.cpu_search.kept_set_of_logits` on the capped
  logits themselves (no weights or keys formed for the chunk; rows read in
  place from ``rows.whole``), the rows it declines (to weigh mostly) on their
  weights."""

  def on_weights(cpu=None):
    return _search(
      functools.partial(
        kept_within, weighed(rows.take(idx)), params, vocab_size=vocab_size, cpu=cpu
      ),
      params,
      d,
      vocab_size,
    )

  def weighed(z):
    return Chunk.of(z, params, rows.axis_name)

  if rows.axis_name is not None or not cpu_search.available():
    return on_weights()
  row_values = [None if a is None else column(a)[:, 0] for a in (params.shift, params.tau)]

  def on_logits():
    in_place = rows.whole is not None
    z = rows.whole if in_place else rows.take(idx)

    def within(floor, ceiling, by_count, share, active):
      args = (z, idx if in_place else None, *row_values, d.total, floor, ceiling, share, active)
      got = tuple(cpu_search.kept_set_of_logits(*args, by_count))
      declined = got[2] < 0  # to weigh mostly: on XLA's weights

      def again():
        c = weighed(rows.take(idx) if in_place else z)
        return kept_within(
          c, params, floor, ceiling, by_count, share, active & declined, vocab_size, cpu=True
        )

      redone = lax.cond(jnp.any(declined), again, lambda: got)
      return tuple(jnp.where(declined, r, g) for r, g in zip(redone, got, strict=True))

    return _search(within, params, d, vocab_size)

  def on_cpu():
    return lax.cond(jnp.any(params.min_p > 0), lambda: on_weights(cpu=True), on_logits)

  return on_cpu_or(on_cpu, lambda: on_weights(cpu=False))


def threshold(rows: Rows, params: Params, d: Decision, vocab_size: int) -> tuple[jax.Array, ...]:
  """(kappa, mass, count) of every row: :func:`decide`'s where it settled, else
  searched. The rows it leaves open are taken first, ``rows.chunk`` at a time
  (their capped logits formed once per chunk), until none is left: a search
  costs in proportion to the open rows, not to the batch. ``vocab_size``: the
  whole row's V (every device's columns)."""
  n = d.kappa.shape[0]
  c = min(rows.chunk, n)
  steps = -(-n // c)

  def chunk(idx):
    def pick(a):
      return None if a is None else jnp.take(a, idx, axis=0)

    part = Params(*map(pick, params))
    return _search_chunk(idx, part, Decision(*map(pick, d)), rows, vocab_size)

  def unsettled(_):
    open_ = ~d.settled
    open_rows = jnp.sum(open_, dtype=jnp.int32)
    # The open rows first, then the others (each in order); past them, n (dropped when written).
    at = jnp.where(open_, jnp.cumsum(open_) - 1, open_rows + jnp.cumsum(~open_) - 1)
    order = jnp.full((steps * c,), n, jnp.int32).at[at].set(jnp.arange(n, dtype=jnp.int32))

    def body(state):
      i, out = state
      idx = lax.dynamic_slice_in_dim(order, i * c, c)
      got = chunk(jnp.minimum(idx, n - 1))
      return i + 1, tuple(o.at[idx].set(g, mode="drop") for o, g in zip(out, got, strict=True))

    init = (jnp.int32(0), (d.kappa, d.mass, d.size))
    return lax.while_loop(lambda s: s[0] * c < open_rows, body, init)[1]

  return lax.cond(jnp.all(d.settled), lambda _: (d.kappa, d.mass, d.size), unsettled, operand=None)
