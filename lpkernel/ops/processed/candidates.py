"""Each row's ``K`` largest values, the candidates of the processed paths, from
the maxima of its groups of columns: every column among a row's ``K`` largest
lies in one of the ``K`` groups with the largest maxima, so only those are read
(:class:`ProcessedConfig` tiles this); from hidden states, also from the
record of each group's few largest values, gathering only the groups that may
hold more of the ``K`` largest than they recorded."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lpkernel import partials as P
from lpkernel.ops.blocks import block_of, chunk_budget, stores_columns, sweep, tokens_per_chunk
from lpkernel.ops.logprobs.xla import gather
from lpkernel.ops.platform import on_cpu_or
from lpkernel.ops.processed.cpu_top_k import compiled, groups_top_k, top_k

if TYPE_CHECKING:
  from lpkernel.sampling import Sampling

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
    sweep_block: columns per step of the group maxima's pass over logits whose
      vocabulary the group does not divide.
    gather_bytes: the most bytes of the candidates' pass held at once (its token
      chunks: ``K * group`` columns, and from hidden states as many gathered
      unembedding rows, per token; also at most 1% of the float32 logits).
    hidden_group: columns per group of the XLA sweep from hidden states, which
      records each group's ``group_values`` largest values (``group_values /
      hidden_group`` of the logits): the ``K`` largest are then read from them,
      and only a group holding more of them than it recorded is gathered.
    group_values: values recorded per group from hidden states (1: only its max,
      and the ``K`` groups with the largest maxima are gathered whole).
    gathered_groups: the most such groups gathered per token (``gathered_groups
      * hidden_group`` unembedding rows), for at most a share ``gathered_rows``
      of the tokens; a batch with more of either gathers every token's ``K``
      groups with the largest maxima whole, exactly.
    gathered_rows: that share, in ``(0, 1]``.
  """

  candidates: int = 64
  group: int = 32
  sweep_block: int = 512
  gather_bytes: int = 32 << 20
  hidden_group: int = 64
  group_values: int = 3
  gathered_groups: int = 4
  gathered_rows: float = 0.25

  def __post_init__(self):
    for name in (
      "candidates",
      "group",
      "sweep_block",
      "gather_bytes",
      "hidden_group",
      "group_values",
      "gathered_groups",
    ):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"ProcessedConfig.{name}={getattr(self, name)!r} must be a positive int")
    if not 0 < self.gathered_rows <= 1:
      raise ValueError(f"ProcessedConfig.gathered_rows={self.gathered_rows!r} must be in (0, 1]")

  def k_for(self, sampling: Sampling, vocab_size: int) -> int:
    """``K`` for rows of ``vocab_size`` under ``sampling`` (its parameters Python
    numbers or traced arrays): ``candidates``, or one past a larger Python
    ``top_k``; 1 where the sampler truncates nothing, known before tracing
    (top-k, top-p and min-p Python numbers, all off): every row then keeps its
    whole row and its ``K`` largest are never read (one, the row's largest,
    keeps each implementation's candidates pass as it is; 64 cost 7-20% of the
    fused forward on the CPU)."""
    top_k, p, m = sampling.top_k, sampling.top_p, sampling.min_p
    if all(np.isscalar(a) for a in (top_k, p, m)) and not 0 < top_k < vocab_size:
      if p >= 1 and m == 0:
        return 1
    k = self.candidates
    if isinstance(top_k, int) and 0 < top_k < vocab_size:
      k = max(k, min(top_k + 1, 1024))  # one past the k-th: its next smaller value
    return min(k, vocab_size)


def _largest_groups(maxima: jax.Array, k: int) -> jax.Array:
  """int32[N, K']: each row's ``K' = min(K, groups)`` groups with the largest maxima."""
  return top_k(maxima, min(k, maxima.shape[1]))[1]


def _group_columns(ids: jax.Array, group: int, vocab_size: int, lanes: int = 1) -> jax.Array:
  """int32[M, B * group]: the columns of groups ``ids [M, B]`` (``-1``: none);
  ``vocab_size`` for none and past V.

  Group ``j`` holds columns ``(j // lanes) * lanes * group + lanes * c + j % lanes``
  for ``c < group``: ``group`` contiguous columns with ``lanes = 1``; with
  ``lanes = 128``, one lane's columns of a ``128 * group``-column TPU tile."""
  c = jnp.arange(group, dtype=jnp.int32) * lanes
  cols = (ids // lanes * (lanes * group) + ids % lanes)[:, :, None] + c
  cols = jnp.where((ids[:, :, None] >= 0) & (cols < vocab_size), cols, vocab_size)
  return cols.reshape(ids.shape[0], -1)


def _pool_top(
  values, ids, group: int, k: int, vocab_size: int, chunk: int, known=None, lanes: int = 1
) -> jax.Array:
  """float32[N, K]: each row's ``K`` largest capped values in the columns of its
  groups ``ids [N, B]`` (:func:`_group_columns`; and the values ``known [N, Q]``,
  if given), ``chunk`` tokens at a time (``values(lo, width, cols_chunk)`` gives
  their capped values ``[width, B * group]``), so no ``[N, B * group]`` temporary."""
  n = ids.shape[0]

  def step(out, lo, width):
    cc = _group_columns(lax.dynamic_slice_in_dim(ids, lo, width, 0), group, vocab_size, lanes)
    pool = jnp.where(cc < vocab_size, values(lo, width, jnp.minimum(cc, vocab_size - 1)), -jnp.inf)
    if known is not None:
      pool = jnp.concatenate([lax.dynamic_slice_in_dim(known, lo, width, 0), pool], axis=1)
    top = top_k(pool, k)[0]
    return lax.dynamic_update_slice_in_dim(out, top, lo, 0)

  return sweep(step, jnp.zeros((n, k), _F32), n, chunk)


def _from_groups(
  values, maxima, group: int, k: int, vocab_size: int, config, value_bytes: int, lanes: int = 1
) -> jax.Array:
  """float32[N, K]: each row's ``K`` largest values in the ``K`` groups with the
  largest maxima ``maxima [N, G]`` (:func:`_pool_top`'s ``values`` give them,
  ``value_bytes`` each at once), a chunk of tokens at a time within
  ``config.gather_bytes`` (:func:`~lpkernel.ops.blocks.tokens_per_chunk`)."""
  ids = _largest_groups(maxima, k)
  chunk = tokens_per_chunk(
    maxima.shape[0], vocab_size, ids.shape[1] * group * value_bytes, config.gather_bytes
  )
  return _pool_top(values, ids, group, k, vocab_size, chunk, lanes=lanes)


def from_group_maxima(x, maxima, softcap, k: int, config: ProcessedConfig, lanes: int = 1):
  """float32[N, K]: the ``K`` largest capped values of logits ``x [N, V]``, from
  the ``K`` groups with the largest (capped) maxima ``maxima [N, G]`` (grouped as
  ``lanes`` says, :func:`_group_columns`): on the CPU a compiled kernel reads them
  in place (``lanes`` 1), else a gather of ``K * group`` columns a chunk of
  tokens at a time."""
  xs = lax.stop_gradient(x)
  n, v = x.shape
  g = config.group

  def values(lo, width, cc):
    rows = block_of(xs, lo, width, 0)  # a convert never moves onto all of x
    return P.capped(jax.vmap(gather, in_axes=(None, 1), out_axes=1)(rows, cc), softcap)

  def gathered():
    return _from_groups(values, maxima, g, k, v, config, 4 * 3, lanes)

  if lanes != 1 or not compiled(x.dtype):
    return gathered()
  # The kernel chooses by raw values: capping keeps their order (P.monotone_tanh).
  held = softcap is None  # the maxima are the groups' own, not capped
  return on_cpu_or(lambda: P.capped(groups_top_k(xs, maxima, g, k, held), softcap), gathered)


def _table_values(w, cols, lo, width: int, columns: bool) -> jax.Array:
  """The table's values at columns ``cols [C, P]`` of ``h @ w`` for ``D`` in
  ``[lo, lo + width)``: ``[width, C, P]`` read in place from a ``[D, V]`` table
  (a group's columns are contiguous in each row of ``D``), ``[C, P, width]``
  from the rows of a ``[V, D]`` one. ``cols`` lie in ``[0, V)``."""
  start = jnp.full(cols.shape, lo, jnp.int32)
  if columns:
    index, offset, collapsed, sizes = (start, cols), 0, 1, (width, 1)
  else:
    index, offset, collapsed, sizes = (cols, start), 2, 0, (1, width)
  numbers = lax.GatherDimensionNumbers(
    offset_dims=(offset,), collapsed_slice_dims=(collapsed,), start_index_map=(0, 1)
  )
  mode = lax.GatherScatterMode.CLIP
  return lax.gather(w, jnp.stack(index, -1), numbers, sizes, mode=mode)


def _hidden_values(h, w, vocab_axis: int, precision, softcap, dot_dtype, budget: int):
  """``values(lo, width, cols) -> float32[width, P]``: ``h[i] . (column cols[i, j]
  of h @ w)`` capped, for tokens ``[lo, lo + width)``: ``width * P`` rows of a
  ``[V, D]`` table gathered, or as many columns of a ``[D, V]`` one read in
  place (:func:`_table_values`; a transposed copy of the table was 50% of the
  float32 logits at N 4096, D 2048), upcast to ``dot_dtype`` if given; in
  pieces of ``D`` where they would hold more than ``budget`` bytes (one
  token's ``P`` columns can outweigh 1% of every token's logits: 16.8 MB of
  1.3 MB at N 1024, D 2048, V 32000, ``P`` 2048), their dot products summed."""
  d = h.shape[1]
  columns = stores_columns(w, vocab_axis)
  spec = "cd,dcp->cp" if columns else "cd,cpd->cp"

  def values(lo, width, cc):
    hc = lax.dynamic_slice_in_dim(h, lo, width, 0)
    # The barrier keeps a convert of the gathered values from moving onto all of
    # w and out of the loop (a float32 copy of the table).
    wb, _ = lax.optimization_barrier((w, lo))

    def dots(j0, size):
      gathered = _table_values(wb, cc, j0, size, columns)
      if dot_dtype is not None:
        gathered = gathered.astype(dot_dtype)
      hp = lax.dynamic_slice_in_dim(hc, j0, size, 1)
      return jnp.einsum(spec, hp, gathered, precision=precision, preferred_element_type=_F32)

    piece = max(1, budget // max(1, cc.size * 4))  # float32 values
    if piece >= d:
      return P.capped(dots(0, d), softcap)
    init = jnp.zeros(cc.shape, _F32)
    return P.capped(sweep(lambda acc, j0, size: acc + dots(j0, size), init, d, piece), softcap)

  return values


def from_hidden_record(
  h, w, record, softcap, vocab_axis: int, precision, k: int, config, dot_dtype, lanes: int = 1
) -> jax.Array:
  """float32[N, K]: each row's ``K`` largest capped values of ``h @ w`` (``h``
  in the dot dtype, ``w`` ``[D, V]`` or ``[V, D]`` with ``vocab_axis=0``), from
  a first pass's ``record``, the gathered columns' values dot products with
  their unembedding rows (:func:`_hidden_values`):

  - group maxima ``[N, G]`` (of ``config.group`` columns, laid out as ``lanes``
    says): the ``K`` groups with the largest maxima, gathered whole;
  - each ``config.hidden_group``-column group's ``c`` largest values
    ``[N, G, c]``, descending: the ``K`` largest read from them, and only the
    groups that may hold more of them gathered (:func:`_recorded_top`); where a
    row needs more than ``config.gathered_groups`` such groups, or more than a
    share ``config.gathered_rows`` of the rows need any, every row's ``K``
    groups with the largest maxima whole."""
  hs, ws = lax.stop_gradient(h), lax.stop_gradient(w)
  v = w.shape[vocab_axis]
  budget = chunk_budget(h.shape[0], v, config.gather_bytes)
  values = _hidden_values(hs, ws, vocab_axis, precision, softcap, dot_dtype, budget)
  row_bytes = h.shape[1] * w.dtype.itemsize + 3 * 4

  def whole_groups(maxima, group: int, lanes: int):
    return _from_groups(values, maxima, group, k, v, config, row_bytes, lanes)

  if record.ndim == 2:
    return whole_groups(record, config.group, lanes)
  group = config.hidden_group
  if record.shape[1] * record.shape[2] < k:  # too few recorded values to hold the K largest
    return whole_groups(record[:, :, 0], group, 1)

  def values_of_rows(taken):  # the candidates' dot products of tokens hs[taken]
    return _hidden_values(hs[taken], ws, vocab_axis, precision, softcap, dot_dtype, budget)

  top, over = _recorded_and_gathered_top(record, k, group, config, v, row_bytes, values_of_rows)
  return lax.cond(over, lambda: whole_groups(record[:, :, 0], group, 1), lambda: top)


def _recorded_and_gathered_top(tops, k: int, group: int, config, v: int, row_bytes: int, values_of):
  """(float32[N, K] the ``K`` largest values from the record ``tops [N, G, c]``
  (:func:`_recorded_top`) and the groups it says to gather, bool: a row needs
  more than ``config.gathered_groups`` groups, or more than a share
  ``config.gathered_rows`` of the rows need any). The rows with groups to gather
  are taken apart (``values_of(rows [R])`` gives their ``_pool_top`` values)."""
  n = tops.shape[0]
  b = min(config.gathered_groups, tops.shape[1])
  known, ids, over = _recorded_top(tops, k, b)
  need = jnp.any(ids >= 0, axis=1)
  r = max(1, min(n, int(n * config.gathered_rows)))
  taken, live = _first_rows(need, r)
  ids = jnp.where(live[:, None], ids[taken], -1)
  chunk = tokens_per_chunk(n, v, b * group * row_bytes, config.gather_bytes)
  top_taken = _pool_top(values_of(taken), ids, group, k, v, chunk, known[taken])
  top = known.at[jnp.where(live, taken, n)].set(top_taken, mode="drop")
  return top, jnp.any(over) | (jnp.sum(need) > r)


def _first_rows(need: jax.Array, r: int) -> tuple[jax.Array, jax.Array]:
  """(int32[r] the indices of the first ``r`` rows where ``need [N]``, then 0;
  bool[r] which of them are such rows): a prefix count and a scatter."""
  n = need.shape[0]
  slot = jnp.where(need, jnp.cumsum(need, dtype=jnp.int32) - 1, r)
  taken = jnp.zeros((r,), jnp.int32).at[slot].set(jnp.arange(n, dtype=jnp.int32), mode="drop")
  return taken, jnp.arange(r) < jnp.sum(need, dtype=jnp.int32)


def _recorded_top(tops: jax.Array, k: int, b: int):
  """The ``K`` largest values from each group's ``c`` largest ``tops [N, G, c]``:
  (float32[N, K] the ``K`` largest recorded values, ``-inf`` where their group is
  to be gathered; int32[N, b] the groups to gather, ``-1`` for none; bool[N] a
  row with more than ``b`` groups to gather).

  A group whose ``c``-th value exceeds the ``K``-th largest recorded value may
  hold more of the row's ``K`` largest than it recorded: its columns are
  gathered. Any other group's unrecorded values are at most that ``K``-th value,
  so the ``K`` largest of the recorded values and the gathered groups' are the
  row's ``K`` largest (equal values tied at the ``K``-th)."""
  n, _, c = tops.shape
  vals, idx = top_k(tops.reshape(n, -1), k)
  kth = vals[:, -1:]
  last = tops[:, :, -1]
  full = last > kth  # may hold more than it recorded
  key, ids = top_k(jnp.where(full, last, -jnp.inf), b)
  ids = jnp.where(key > kth, ids, -1)
  gathered = jnp.any((idx // c)[:, :, None] == ids[:, None, :], axis=-1)
  over = jnp.sum(full, axis=1) > b
  return jnp.where(gathered, -jnp.inf, vals), ids, over
