"""Replay of a recorded kept set: log-probabilities renormalised over given ids.

An engine that returns its sampling mask (the kept set of each position,
``kept_ids: int[..., K]``, ``-1`` padded) lets the trainer renormalise over
exactly those ids. From logits that is a gather of ``K`` columns; from hidden
states it needs only ``K`` rows of the unembedding per token (a gather and
``K`` dot products, never the ``[N, V]`` matmul), and the gradient reaches
exactly those rows. On the CPU the rows are read in table order, each once per
block of tokens, by compiled kernels (:mod:`.cpu_replay`); elsewhere XLA gathers
them in token chunks, or an implementation's own kernels do
(:class:`lpkernel.ops.base.ReplayRows`: :class:`lpkernel.ops.PallasGpuProcessed`),
from a ``[D, V]`` unembedding one transposed slab of ``D`` at a time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lpkernel import checks, ops
from lpkernel import partials as P
from lpkernel.ops.base import ProcessedImplementation, ReplayRows
from lpkernel.ops.blocks import (
  block_of,
  stores_columns,
  sweep,
  sweep_in_place,
  tokens_per_chunk,
)
from lpkernel.ops.fused.matmuls import materialised_logits
from lpkernel.ops.platform import on_cpu_or
from lpkernel.ops.processed import cpu_replay
from lpkernel.ops.staged import staged
from lpkernel.sampling import replay_temperature_rows

_F32 = jnp.float32


def checked_ids(kept_ids, targets_shape, name="kept_ids") -> jax.Array:
  """``kept_ids`` as int32 ``[..., K]`` beside ``targets_shape``, or ``ValueError``."""
  # An id beyond int32 becomes -2: out of range (NaN), never -1 padding.
  kept_ids = checks.as_ids(name, kept_ids, fill=-2)
  if kept_ids.shape[:-1] != tuple(targets_shape) or kept_ids.ndim < 1:
    raise ValueError(
      f"{name} must be [..., K] with leading dims equal to targets' {tuple(targets_shape)}, "
      f"got {kept_ids.shape}"
    )
  if kept_ids.shape[-1] == 0:
    raise ValueError(
      f"{name} must hold at least one id per position (K >= 1), got {kept_ids.shape}"
    )
  return kept_ids


def _kept_logprobs(x_kept, ids, repeated, targets, tau, softcap, vocab_size):
  """float32[N]: the target's log-probability over its row's kept ids (plain jnp).

  ``x_kept [N, K]`` holds the raw logits at ``ids`` (anything where ``ids == -1``);
  ``-inf`` when the target is not among them or its logit is ``-inf`` (also
  where every kept logit is: no mass); NaN for an id outside ``[-1, V)``, an id
  ``repeated [N]`` in its row (a kept set counts an id once), a target outside
  ``[0, V)`` (these with a NaN derivative) or a NaN among the kept logits (with
  none; NaN wins; the columns outside the kept ids are not read).
  """
  z = P.capped(x_kept, softcap)
  nan = jnp.any((ids >= 0) & jnp.isnan(z), axis=-1)
  finite = (ids >= 0) & (z > -jnp.inf)
  shift = P.shift_of(lax.stop_gradient(jnp.max(jnp.where(finite, z, -jnp.inf), axis=-1)))
  tau_col = None if tau is None else tau[:, None]
  y = P.scaled_where(finite, z - shift[:, None], tau_col)
  log_s = jax.nn.logsumexp(y, axis=-1)
  at_target = ids == targets[:, None]
  y_t = jnp.max(jnp.where(at_target, y, -jnp.inf), axis=-1)
  lp = jnp.where(jnp.any(at_target, axis=-1) & (y_t > -jnp.inf), y_t - log_s, -jnp.inf)
  bad = checks.kept_ids_outside(ids, vocab_size) | (targets < 0) | (targets >= vocab_size)
  bad |= repeated
  if tau is not None:
    bad |= ~(jnp.isfinite(tau) & (tau > 0))
  # NaN logits: NaN, with no derivative (as the processed op's NaN rows).
  return checks.poison(jnp.where(nan, jnp.nan, lp), bad)


def replay_token_logprobs(
  logits: jax.Array,
  targets: jax.Array,
  kept_ids: jax.Array,
  *,
  temperature: float | jax.Array = 1.0,
  softcap: float | None = None,
) -> jax.Array:
  """Each target's log-probability renormalised over its position's ``kept_ids``.

  Args:
    logits: float[..., V].
    targets: int[...] ids in ``[0, V)``.
    kept_ids: int[..., K], the recorded kept set of each position (distinct ids,
      ``-1`` padded); an id outside ``[-1, V)``, or one repeated in a position,
      gives NaN (:func:`lpkernel.check_kept_ids` names it eagerly).
    temperature: a Python number or an array broadcastable to ``targets``; as
      :class:`lpkernel.Sampling`'s, below 1e-5 (0 included) is a greedy request,
      replayed at temperature 1.
    softcap: None or ``c > 0``, applied before the temperature.

  Returns:
    float32[...]; ``-inf`` where the target is not among the kept ids (or its
    logit, or every kept logit, is ``-inf``); NaN where a kept logit is NaN
    (only the kept ids' logits are read). Equal to
    :func:`lpkernel.processed_token_stats`' ``logprobs`` when ``kept_ids`` is the
    processed kept set.
  """
  logits, targets, _ = checks.logits_arguments(logits, targets, 1.0, softcap)
  tau = replay_temperature_rows(temperature, targets.shape)
  kept_ids = checked_ids(kept_ids, targets.shape)
  x = logits.reshape(-1, logits.shape[-1])
  ids = kept_ids.reshape(x.shape[0], -1)
  lp = rows_replay_token_logprobs(x, targets.reshape(-1), ids, tau, softcap=softcap)
  return lp.reshape(targets.shape)


def rows_replay_token_logprobs(
  x: jax.Array,
  targets: jax.Array,
  kept_ids: jax.Array,
  tau: jax.Array | None,
  *,
  softcap: float | None,
  axis_name: str | None = None,
  vocab_size: int | None = None,
) -> jax.Array:
  """float32[N]: the replay of checked rows (``x [N, V]``, ``targets [N]``,
  ``kept_ids [N, K]``, ``tau`` float32[N] or None), the per-shard building block
  of :func:`replay_token_logprobs` and its vocab-parallel form: with
  ``axis_name``, ``x`` is this device's block of a vocabulary of ``vocab_size``
  sharded over that axis, each device gathers the kept ids in its block and
  one ``psum`` of the ``[N, K]`` kept logits gives every device the same
  numbers (differentiated by JAX, with no collective in the backward)."""
  block = x.shape[1]
  v = vocab_size or block
  block_ids, mine = _block_ids(kept_ids, block, axis_name)
  x_kept = jnp.take_along_axis(x, jnp.clip(block_ids, 0, block - 1), axis=-1)
  x_kept = _over_blocks(x_kept, mine, axis_name)
  return _kept_logprobs(x_kept, kept_ids, _repeated(kept_ids, v), targets, tau, softcap, v)


def _over_blocks(x_kept, mine, axis_name) -> jax.Array:
  """The kept logits ``[N, K]`` of the whole vocabulary from each device's, whose
  ids outside its block (``mine`` False) hold anything: summed over the axis
  (every id is in one block), or as given without an axis."""
  if axis_name is None:
    return x_kept
  return _summed_over(jnp.where(mine, x_kept, 0), axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _summed_over(x, axis_name):
  """``psum`` of each device's share of a value then replicated over the axis;
  its backward multiplies back the cotangent that shard_map splits over the
  axis (each device's share of it is the whole), where JAX's transpose of the
  ``psum`` would all-reduce it."""
  return lax.psum(x, axis_name)


_summed_over.defvjp(
  lambda x, axis_name: (lax.psum(x, axis_name), None),
  lambda axis_name, _, g: (g * lax.axis_size(axis_name),),
)


def slab_width(n: int, d: int) -> int:
  """Columns of ``D`` per slab of a ``[D, V]`` table transposed at a time for
  XLA's gathers and a :class:`~lpkernel.ops.base.ReplayRows`' kernels: the
  slab (``[V, width]``; XLA holds about two and a half such arrays in the
  forward, three and a half with the float32 gradient's) about 1% of the
  ``N`` tokens' float32 logits (``V x width`` against ``N x V``), at least
  16 columns and ``D / 128`` (each slab one more sweep over the tokens), a
  power of two, at most ``D``.
  Transposed whole, the table was 50% of the logits at N 4096, D 2048; its
  columns gathered in place (a kept id's ``D`` values ``V`` apart) were 13x
  slower than rows on 2 CPU cores (N 1024, D 512, V 32000, K 512: 1.06 s
  against 0.08 s)."""
  width = max(16, -(-d // 128), n // 100)
  return min(d, 1 << (width - 1).bit_length())


def _slab(w, lo, width: int) -> jax.Array:
  """``[V, width]``: columns ``[lo, lo + width)`` of ``D`` of a ``[D, V]``
  table as rows (a transposed copy of one slab)."""
  return lax.optimization_barrier(block_of(w, lo, width, 0).T)


def _gather_rows(w_rows, ids) -> jax.Array:
  """``[C, K, D]``: rows of a ``[V, D]`` table at ``ids [C, K]``."""
  return jnp.take(w_rows, ids, axis=0)


def _repeated(ids, vocab_size: int) -> jax.Array:
  """bool[N]: whether row ``i`` of ``ids [N, K]`` names an id twice: on the CPU
  the compiled kernel (a bit set per row: 2 ms at N 4096, K 512, where the
  sort takes 33 ms), else each row's ids sorted."""
  if not cpu_replay.available():
    return checks.repeated_ids(ids)
  return on_cpu_or(lambda: cpu_replay.repeated(ids, vocab_size), lambda: checks.repeated_ids(ids))


def _row_dots(ids, precision, gather_bytes: int, kernels):
  """``dots(h [N, W], w_rows [V, W]) -> float32[N, K]``: ``h[i] . w_rows[ids[i, j]]``
  (anything where an id is outside ``[0, V)``): ``kernels``' if given, else
  the rows gathered in token chunks (at most ``gather_bytes`` and 1% of the
  float32 logits' bytes at a time)."""

  def dots(h, w_rows):
    if kernels is not None:
      return kernels.kept_dots(h, w_rows, ids)
    (n, k), v = ids.shape, w_rows.shape[0]
    safe = jnp.clip(ids, 0, v - 1)

    def step(out, lo, width):
      hc = lax.dynamic_slice_in_dim(h, lo, width, 0)
      rows = _gather_rows(w_rows, lax.dynamic_slice_in_dim(safe, lo, width, 0))
      x = jnp.einsum("cd,ckd->ck", hc, rows, precision=precision, preferred_element_type=_F32)
      return lax.dynamic_update_slice_in_dim(out, x, lo, 0)

    chunk = tokens_per_chunk(n, v, k * h.shape[1] * 4, gather_bytes)
    return sweep(step, jnp.zeros(ids.shape, _F32), n, chunk)

  return dots


def _row_grads(ids, dx, precision, gather_bytes: int, kernels):
  """``grads(h [N, W], w_rows [V, W]) -> (d h in h's type, d w_rows float32)``
  of :func:`_row_dots`' ``dots`` for ``dx float32 [N, K]`` (0 where an id is
  outside ``[0, V)``)."""

  def grads(h, w_rows):
    if kernels is not None:
      return kernels.kept_grads(h, w_rows, ids, dx)
    (n, k), (v, d) = ids.shape, w_rows.shape
    safe = jnp.clip(ids, 0, v - 1)

    def step(carry, lo, width):
      dh, dw = carry
      hc = lax.dynamic_slice_in_dim(h, lo, width, 0)
      ic = lax.dynamic_slice_in_dim(safe, lo, width, 0)
      dc = lax.dynamic_slice_in_dim(dx, lo, width, 0)
      rows = _gather_rows(w_rows, ic)
      dhc = jnp.einsum("ck,ckd->cd", dc, rows, precision=precision, preferred_element_type=_F32)
      d_rows = jnp.einsum("ck,cd->ckd", dc, hc, precision=precision, preferred_element_type=_F32)
      dw = dw.at[ic.reshape(-1)].add(d_rows.reshape(-1, d))  # [V, W]
      return lax.dynamic_update_slice_in_dim(dh, dhc.astype(h.dtype), lo, 0), dw

    chunk = tokens_per_chunk(n, v, k * d * 4, gather_bytes)  # the float32 rows' products
    init = (jnp.zeros(h.shape, h.dtype), jnp.zeros(w_rows.shape, _F32))
    return sweep(step, init, n, chunk)

  return grads


def _kept_logits(h, w, vocab_axis, ids, precision, gather_bytes: int, kernels) -> jax.Array:
  """float32[N, K]: ``h[i] . (row ids[i, j] of the table w)`` (anything where an
  id is outside ``[0, V)``): on the CPU the compiled kernel where it takes the
  types and no ``kernels`` (a :class:`~lpkernel.ops.base.ReplayRows`) are
  given (each table row read once, a ``[D, V]`` matrix in place); else
  ``kernels``' or XLA's gathers (:func:`_row_dots`) of a ``[V, D]`` table as
  stored, of a ``[D, V]`` one a transposed slab of ``D`` at a time
  (:func:`slab_width`; the slabs' dot products summed)."""
  dots = _row_dots(ids, precision, gather_bytes, kernels)

  def gathered():
    if not stores_columns(w, vocab_axis):
      return dots(h, w)
    d, n = w.shape[0], h.shape[0]

    def step(x, lo, width):
      return x + dots(block_of(h, lo, width, 1), _slab(w, lo, width))

    return sweep(step, jnp.zeros(ids.shape, _F32), d, slab_width(n, d))

  if kernels is not None or not cpu_replay.takes(h, w):
    return gathered()
  return on_cpu_or(lambda: cpu_replay.kept_dots(h, w, ids, vocab_axis=vocab_axis), gathered)


def _kept_grads(
  h, w, vocab_axis, ids, dx, precision, gather_bytes: int, kernels
) -> tuple[jax.Array, jax.Array]:
  """``(dh [N, D] in h's type, dw in w's layout and type)`` of :func:`_kept_logits`
  for ``dx float32 [N, K]`` (0 where an id is outside ``[0, V)``); a ``[D, V]``
  table's slab by slab, each slab's ``d hidden`` columns and ``d w`` rows
  written whole (rounded once from their float32 sums)."""
  grads = _row_grads(ids, dx, precision, gather_bytes, kernels)

  def gathered():
    if not stores_columns(w, vocab_axis):
      dh, dw = grads(h, w)
      return dh, dw.astype(w.dtype)
    d, n = w.shape[0], h.shape[0]

    def step(carry, lo, width, fresh):
      del fresh  # an overlapping last slab writes the same columns again
      dh, dw = carry
      dh_slab, dw_slab = grads(block_of(h, lo, width, 1), _slab(w, lo, width))
      dh = lax.dynamic_update_slice_in_dim(dh, dh_slab.astype(h.dtype), lo, 1)
      return dh, lax.dynamic_update_slice_in_dim(dw, dw_slab.T.astype(w.dtype), lo, 0)

    init = (jnp.zeros(h.shape, h.dtype), jnp.zeros(w.shape, w.dtype))
    return sweep_in_place(step, init, d, slab_width(n, d))

  def compiled():
    dh, dw = cpu_replay.kept_grads(h, w, ids, dx, vocab_axis=vocab_axis)
    return dh.astype(h.dtype), dw.astype(w.dtype)

  if kernels is not None or not cpu_replay.takes(h, w):
    return gathered()
  return on_cpu_or(compiled, gathered)


def _block_ids(ids, block_size: int, axis_name):
  """(``ids`` as rows of this device's vocabulary block, ``-1`` for every id
  outside it; bool[N, K] where an id is in it, or None without ``axis_name``:
  the whole vocabulary, ids as given)."""
  if axis_name is None:
    return ids, None
  local = ids - lax.axis_index(axis_name) * block_size
  mine = (ids >= 0) & (local >= 0) & (local < block_size)
  return jnp.where(mine, local, -1), mine


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10, 11))
def _fused_replay(h, w, ids, targets, tau, *options):
  return _fused_replay_fwd(h, w, ids, targets, tau, *options)[0]


def _fused_replay_fwd(
  h,
  w,
  ids,
  targets,
  tau,
  softcap,
  vocab_axis,
  precision,
  gather_bytes,
  kernels,
  axis_name,
  vocab_size,
):
  """With ``axis_name``, ``w`` is this device's block of a vocabulary of
  ``vocab_size`` sharded over that axis: each device's dot products of the ids
  in its block, summed over the axis (one ``psum`` of ``[N, K]``); the rest
  (the same numbers on every device) as without it."""
  block_ids, mine = _block_ids(ids, w.shape[vocab_axis], axis_name)
  x_kept = _over_blocks(
    _kept_logits(h, w, vocab_axis, block_ids, precision, gather_bytes, kernels), mine, axis_name
  )
  repeated = _repeated(ids, vocab_size)
  lp, vjp = jax.vjp(
    lambda x, t: _kept_logprobs(x, ids, repeated, targets, t, softcap, vocab_size), x_kept, tau
  )
  return lp, (h, w, ids, vjp)


def _fused_replay_bwd(
  softcap, vocab_axis, precision, gather_bytes, kernels, axis_name, vocab_size, residuals, g
):
  """Each device's ``d hidden`` and ``d temperature`` are its share (shard_map's
  transpose sums them over the axis): ``d hidden`` from the ids in its block,
  ``d temperature`` on the axis' first device."""
  h, w, ids, vjp = residuals
  if axis_name is not None:  # shard_map hands each device 1 / (axis size) of the cotangent
    g = g * lax.axis_size(axis_name)
  dx, dtau = vjp(g)  # d logits at the kept ids [N, K]; d tau
  # Rows without a cotangent hold anything (padding, NaN): they give nothing.
  live = (g != 0)[:, None]
  dx = jnp.where((ids >= 0) & (ids < vocab_size) & live, dx, 0.0)
  h = jnp.where(live, h, 0)
  block_ids, mine = _block_ids(ids, w.shape[vocab_axis], axis_name)
  if mine is not None:
    dx = jnp.where(mine, dx, 0.0)
    first = lax.axis_index(axis_name) == 0
    dtau = None if dtau is None else jnp.where(first, dtau, 0.0)
  dh, dw = _kept_grads(h, w, vocab_axis, block_ids, dx, precision, gather_bytes, kernels)
  return dh, dw, None, None, dtau


_fused_replay.defvjp(_fused_replay_fwd, _fused_replay_bwd)
_fused_replay = staged(_fused_replay, (5, 6, 7, 8, 9, 10, 11))


def rows_fused_replay_token_logprobs(
  h: jax.Array,
  w: jax.Array,
  targets: jax.Array,
  kept_ids: jax.Array,
  tau: jax.Array | None,
  *,
  softcap: float | None,
  vocab_axis: int,
  precision=None,
  gather_bytes: int = 32 << 20,
  implementation: str | ProcessedImplementation | None = None,
  axis_name: str | None = None,
  vocab_size: int | None = None,
) -> jax.Array:
  """float32[N]: the replay of checked rows (``h [N, D]``, ``targets [N]``,
  ``kept_ids [N, K]``, ``tau`` float32[N] or None from
  :func:`~lpkernel.sampling.replay_temperature_rows`), the per-shard building
  block of :func:`fused_replay_token_logprobs` and its vocab-parallel form
  (``w`` the block of a vocabulary of ``vocab_size`` sharded over
  ``axis_name``; its ``d hidden`` and ``d temperature`` are each device's
  share)."""
  impl = ops.processed_implementation(implementation)
  kernels = impl if isinstance(impl, ReplayRows) else None
  block = w.shape[vocab_axis]
  if h.shape[0] == 0:
    return jnp.zeros((0,), _F32)
  if precision is None:
    precision = jax.config.jax_default_matmul_precision  # type: ignore[attr-defined]
  options = (softcap, vocab_axis, precision, gather_bytes, kernels, axis_name, vocab_size or block)
  return _fused_replay(h, w, kept_ids, targets, tau, *options)


def fused_replay_token_logprobs(
  hidden: jax.Array,
  unembed: jax.Array,
  targets: jax.Array,
  kept_ids: jax.Array,
  *,
  temperature: float | jax.Array = 1.0,
  softcap: float | None = None,
  vocab_axis: int = -1,
  precision=None,
  gather_bytes: int = 32 << 20,
  implementation: str | ProcessedImplementation | None = None,
) -> jax.Array:
  """:func:`replay_token_logprobs` of ``hidden @ unembed``, from the ``K`` kept rows
  of the unembedding per token, never the ``[N, V]`` logits. XLA gathers them
  in token chunks (at most ``gather_bytes`` at a time, and 1% of the float32
  logits' bytes, at least one token's), from a ``[D, V]`` matrix transposed
  a slab of ``D`` at a time (about 1% of the logits, :func:`slab_width`); on
  the CPU compiled kernels read each row once per block of tokens instead, a
  ``[D, V]`` matrix in place (a tile of rows copied at a time). A tied
  ``[V, D]`` table is read as stored.

  Args:
    hidden: float[..., D]; unembed: float[D, V] or a tied table ``[V, D]`` with
      ``vocab_axis=0``.
    targets, kept_ids, temperature, softcap: as for :func:`replay_token_logprobs`.
    precision: the dot products' precision (the Pallas kernels' are float32
      products of the stored values, as ``"highest"``).
    implementation: a processed implementation (:func:`lpkernel.processed_token_stats`'):
      None or ``"xla"`` (the steps above), ``"pallas_gpu"`` (opt-in: one Triton
      kernel gathers each token's kept rows and another writes ``d hidden`` and
      adds ``d unembed`` atomically, :class:`lpkernel.ops.PallasGpuProcessed`,
      or that object with its tiling, ``interpret=True`` on the CPU), any
      processed implementation object with :class:`lpkernel.ops.base.ReplayRows`'
      two methods (one without them, ``"pallas_tpu"`` say, runs the steps
      above), or ``"reference"`` (the logits materialised, then
      :func:`replay_token_logprobs`).
  """
  hidden, unembed, targets, axis, _ = checks.fused_arguments(
    hidden, unembed, targets, 1.0, softcap, vocab_axis
  )
  if ops.is_reference(implementation):
    logits = materialised_logits(hidden, unembed, axis, precision)
    return replay_token_logprobs(
      logits, targets, kept_ids, temperature=temperature, softcap=softcap
    )
  tau = replay_temperature_rows(temperature, targets.shape)
  kept_ids = checked_ids(kept_ids, targets.shape)
  h = hidden.reshape(-1, hidden.shape[-1])
  lp = rows_fused_replay_token_logprobs(
    h, unembed, targets.reshape(-1), kept_ids.reshape(h.shape[0], -1), tau, softcap=softcap,
    vocab_axis=axis, precision=precision, gather_bytes=gather_bytes, implementation=implementation,
  )  # fmt: skip
  return lp.reshape(targets.shape)
