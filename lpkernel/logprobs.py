"""Aligned log-softmax gather: ``logits[..., target] - logsumexp(logits[...])``.

The fast path never builds a float32 copy or a log-softmax of the logits. Two
habits of XLA shape it (see ``shared/MEASUREMENTS.md``):

* XLA shares one upcast between every consumer of a narrow-dtype tensor and then
  materialises it. Every consumer here reads the logits through an integer bit
  view (``bitcast_convert_type``), which no convert can be moved through, so each
  fused reduction upcasts privately inside its own loop.
* Row reductions over very long rows lose their parallelism on some backends, so
  the vocabulary is split into ``chunk`` columns viewed as extra rows
  (``[N, V] -> [N * K, V / K]``, a free reshape of the bit view); each chunk keeps
  its own max and sum-exp, and the ``K`` partials are combined per row.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from lpkernel import checks

_F32 = jnp.float32
_BITS = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


@dataclasses.dataclass(frozen=True)
class ChunkConfig:
  """How the vocabulary axis is split for the row reductions (the CPU path).

  Attributes:
    max_chunk: the longest vocabulary chunk reduced as one row. XLA:CPU's fused
      row reduction of ``exp`` slowed down about 10x past 32768 float32 elements
      (measured with jax 0.10.2); chunks at or under it stay fast on every core.
    min_chunk: the shortest chunk worth splitting into; a vocabulary with no
      divisor in ``[min_chunk, max_chunk]`` is reduced as one row.
  """

  max_chunk: int = 32768
  min_chunk: int = 1024

  def chunk(self, vocab_size: int) -> int:
    """The chunk width used for ``vocab_size`` (a divisor of it)."""
    if vocab_size <= self.max_chunk:
      return vocab_size
    for num_chunks in range(2, vocab_size // self.min_chunk + 1):
      if vocab_size % num_chunks == 0 and vocab_size // num_chunks <= self.max_chunk:
        return vocab_size // num_chunks
    return vocab_size


DEFAULT_CHUNKS = ChunkConfig()


def _bits(x: jax.Array) -> jax.Array:
  return lax.bitcast_convert_type(x, _BITS[x.dtype.itemsize])


def _chunk_rows(x: jax.Array, chunk: int) -> jax.Array:
  """``float[N, V] -> float[N * V / chunk, chunk]``, reshaped through the bit view."""
  n, v = x.shape
  return lax.bitcast_convert_type(_bits(x).reshape(n * (v // chunk), chunk), x.dtype)


def _per_chunk(row_values: jax.Array, num_chunks: int) -> jax.Array:
  """``[N] -> [N * K]``: repeat a per-row value for each of its chunks."""
  return jnp.repeat(row_values, num_chunks) if num_chunks > 1 else row_values


def _transform(x: jax.Array, tau: jax.Array | None, softcap: float | None) -> jax.Array:
  """``softcap(x) / tau`` in float32; ``tau`` broadcasts against ``x``'s rows."""
  y = x.astype(_F32)
  if softcap is not None:
    y = softcap * jnp.tanh(y / softcap)
  if tau is not None:
    y = y / tau
  return y


def _transform_grad(
  x: jax.Array, tau: jax.Array | None, softcap: float | None
) -> jax.Array | float:
  """``d transform / dx``, elementwise."""
  d = 1.0
  if softcap is not None:
    d = 1.0 - jnp.square(jnp.tanh(x.astype(_F32) / softcap))
  if tau is not None:
    d = d / tau
  return d


def _finite_or_zero(x: jax.Array) -> jax.Array:
  return jnp.where(jnp.isfinite(x), x, 0.0)


def _chunk_partials_two_pass(xc, tau_c, softcap):
  """Per-chunk (max x, shift, sum exp(y - shift)) by two fused reductions.

  The max is taken in ``x``'s own dtype (it commutes with the monotone
  transform), then one ``exp`` per element: XLA:CPU vectorises both, and not
  the one-pass combiner.
  """
  with jax.named_scope("chunk_max"):
    max_x = jnp.max(xc, axis=-1)
    shift = _finite_or_zero(_transform(max_x, None if tau_c is None else tau_c[:, 0], softcap))
  with jax.named_scope("chunk_sumexp"):
    sumexp = jnp.sum(jnp.exp(_transform(xc, tau_c, softcap) - shift[:, None]), axis=-1)
  return max_x, shift, sumexp


def _online_combine(a, b):
  """Merges two (max x, max y, sum of exp(y - max y)) partials of a softmax normaliser."""
  (xa, ma, sa), (xb, mb, sb) = a, b
  m = jnp.maximum(ma, mb)
  shift = _finite_or_zero(m)
  return jnp.maximum(xa, xb), m, sa * jnp.exp(ma - shift) + sb * jnp.exp(mb - shift)


def _chunk_partials_one_pass(xc, tau_c, softcap):
  """Per-chunk partials in one read of the logits (a variadic online reduction).

  Accelerators are bound by memory bandwidth, not ``exp``: one pass instead of
  two nearly halves the forward time there.
  """
  y = _transform(xc, tau_c, softcap)
  init = (jnp.array(-jnp.inf, _F32),) * 2 + (jnp.array(0.0, _F32),)
  # x is carried in float32 (a variadic reduce takes one precision), exactly.
  max_x, m, sumexp = lax.reduce((xc.astype(_F32), y, jnp.ones_like(y)), init, _online_combine, (1,))
  return max_x.astype(xc.dtype), _finite_or_zero(m), sumexp


def _chunked_stats(x, tau, softcap, chunk: int, partials):
  """Reduces ``chunk``-column pieces of each row to partials, then combines them per row."""
  n, v = x.shape
  k = v // chunk
  xc = _chunk_rows(x, chunk)
  tau_c = None if tau is None else _per_chunk(tau, k)[:, None]
  max_x, shift, sumexp = partials(xc, tau_c, softcap)
  if k == 1:
    return max_x, jnp.log(sumexp) + shift
  with jax.named_scope("combine_chunks"):
    shift, sumexp = shift.reshape(n, k), sumexp.reshape(n, k)
    row_shift = _finite_or_zero(jnp.max(jnp.where(sumexp > 0, shift, -jnp.inf), axis=-1))
    total = jnp.sum(sumexp * jnp.exp(shift - row_shift[:, None]), axis=-1)
    return jnp.max(max_x.reshape(n, k), axis=-1), jnp.log(total) + row_shift


def _row_stats(x, tau, softcap, chunks: ChunkConfig):
  """Row max and float32 log-sum-exp of ``y = softcap(x) / tau``, by backend.

  On the CPU: two-pass partials over ``chunks`` (exp-bound, long rows slow).
  Elsewhere: one pass over whole rows (bandwidth-bound). On an H200 with jax
  0.11.2, the one pass over whole rows took 7.1 ms at (8, 4096, 128256)
  bfloat16, and over 32064-column chunks 9.5 ms.

  Args:
    x: float[N, V] logits.
    tau: float32[N] temperatures, or None.
  Returns:
    (max_x[N] in x's dtype, for exact greedy flags; lse[N] float32).
  """
  v = x.shape[1]
  return lax.platform_dependent(
    cpu=lambda: _chunked_stats(x, tau, softcap, chunks.chunk(v), _chunk_partials_two_pass),
    default=lambda: _chunked_stats(x, tau, softcap, v, _chunk_partials_one_pass),
  )


def _gather(x: jax.Array, targets: jax.Array) -> jax.Array:
  """``x[i, targets[i]]`` through the bit view; out-of-range ids read column 0."""
  v = x.shape[-1]
  safe = jnp.where((targets >= 0) & (targets < v), targets, 0)
  picked = jnp.take_along_axis(_bits(x), safe[:, None], axis=-1)[:, 0]
  return lax.bitcast_convert_type(picked, x.dtype)


def finish(targets, vocab_size, target_x, target_y, row_max, lse):
  """(logprob[N], target_is_max[N]) from the target's raw and transformed logit,
  the raw row max and the log-sum-exp; NaN for ids outside ``[0, vocab_size)``."""
  # -inf at the target is probability zero, even when the whole row is -inf.
  logprob = jnp.where(target_y == -jnp.inf, -jnp.inf, target_y - lse)
  in_range = (targets >= 0) & (targets < vocab_size)
  return jnp.where(in_range, logprob, jnp.nan), in_range & (target_x == row_max)


def _forward(x, targets, tau, softcap, chunks):
  """Returns (logprob[N], target_is_max[N], lse[N])."""
  row_max, lse = _row_stats(x, tau, softcap, chunks)
  target_x = _gather(x, targets)
  target_y = _transform(target_x, tau, softcap)
  return (*finish(targets, x.shape[-1], target_x, target_y, row_max, lse), lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _logprobs(x, targets, tau, softcap, chunks):
  logprob, is_max, _ = _forward(x, targets, tau, softcap, chunks)
  return logprob, is_max


def _logprobs_fwd(x, targets, tau, softcap, chunks):
  logprob, is_max, lse = _forward(x, targets, tau, softcap, chunks)
  # Residuals: the inputs and the log-sum-exp; softmax is recomputed.
  return (logprob, is_max), (x, targets, tau, lse)


def _logprobs_bwd(softcap, chunks, residuals, cotangents):
  x, targets, tau, lse = residuals
  g = cotangents[0]
  n, v = x.shape
  live = g != 0  # masked rows stay exactly zero, even over NaN or +inf logits
  safe_lse = _finite_or_zero(lse)[:, None]
  tau_col = None if tau is None else tau[:, None]
  with jax.named_scope("dlogits"):
    y = _transform(x, tau_col, softcap)
    onehot = lax.broadcasted_iota(jnp.int32, (n, v), 1) == targets[:, None]
    dy = jnp.where(onehot, 1.0, 0.0) - jnp.exp(y - safe_lse)
    dx = jnp.where(live[:, None], g[:, None] * dy * _transform_grad(x, tau_col, softcap), 0.0)
  dtau = None
  if tau is not None:
    with jax.named_scope("dtemperature"):
      # lp = y_t - lse(y), y = s(x) / tau  =>  d lp / d tau = (E_p[y] - y_t) / tau.
      chunk = chunks.chunk(v)
      k = v // chunk
      xc = _chunk_rows(x, chunk)
      tau_c = _per_chunk(tau, k)[:, None]
      yc = _transform(xc, tau_c, softcap)
      lse_c = _per_chunk(safe_lse[:, 0], k)[:, None]
      expected = jnp.sum(jnp.exp(yc - lse_c) * _finite_or_zero(yc), axis=-1).reshape(n, k).sum(-1)
      in_block = (targets >= 0) & (targets < v)  # a vocab shard may not hold the target
      target_y = jnp.where(
        in_block, _finite_or_zero(_transform(_gather(x, targets), tau, softcap)), 0.0
      )
      dtau = jnp.where(live, g * (expected - target_y) / tau, 0.0)
  targets_ct = jnp.zeros(targets.shape, jax.dtypes.float0)
  return dx.astype(x.dtype), targets_ct, dtau


_logprobs.defvjp(_logprobs_fwd, _logprobs_bwd)


def _temperature_rows(temperature, batch_shape) -> jax.Array | None:
  """Broadcasts ``temperature`` to ``batch_shape`` and flattens; None for 1.0."""
  if isinstance(temperature, (int, float)) and temperature == 1.0:
    return None
  temperature = jnp.asarray(temperature)
  checks.check_broadcastable("temperature", temperature.shape, batch_shape)
  return jnp.broadcast_to(temperature.astype(_F32), batch_shape).reshape(-1)


def token_logprobs_and_greedy(
  logits: jax.Array,
  targets: jax.Array,
  *,
  temperature=1.0,
  softcap: float | None = None,
  chunks: ChunkConfig = DEFAULT_CHUNKS,
) -> tuple[jax.Array, jax.Array]:
  """Like :func:`token_logprobs`, also returning whether each target is an argmax.

  Returns:
    (float32[...] log-probabilities, bool[...] target logit equals the row max).
  """
  checks.check_logits_and_targets(logits, targets)
  checks.check_softcap(softcap)
  batch_shape = targets.shape
  v = logits.shape[-1]
  tau = _temperature_rows(temperature, batch_shape)
  x = logits.reshape(-1, v)
  logprob, is_max = _logprobs(x, targets.reshape(-1).astype(jnp.int32), tau, softcap, chunks)
  return logprob.reshape(batch_shape), is_max.reshape(batch_shape)


def token_logprobs(
  logits: jax.Array,
  targets: jax.Array,
  *,
  temperature=1.0,
  softcap: float | None = None,
  chunks: ChunkConfig = DEFAULT_CHUNKS,
) -> jax.Array:
  r"""Log-probability of each target under the softmax of its logits row.

  .. math::
    \log p_i = y_{i, t_i} - \log \sum_j e^{y_{i, j}},\qquad
    y = \mathrm{softcap}(\text{logits}) / \text{temperature}

  Only the normaliser is reduced over the vocabulary; the target's logit is
  gathered, so no ``[..., V]`` log-softmax is formed. The custom VJP saves only
  the log-sum-exp and recomputes the softmax (``onehot - softmax``) backwards.

  Args:
    logits: float[..., V] in float32, bfloat16 or float16.
    targets: int[...] ids in ``[0, V)``. An id outside that range (negative
      included, which never wraps) gives NaN.
    temperature: positive scalar or array broadcastable to ``targets``; divides
      the (soft-capped) logits. Differentiable when an array.
    softcap: None, or ``c > 0`` to apply ``c * tanh(logits / c)`` first.
    chunks: how the vocabulary axis is split for the reductions.

  Returns:
    float32[...] log-probabilities; ``-inf`` where the target's logit is ``-inf``.

  Raises:
    TypeError / ValueError: on mismatched shapes or dtypes.

  Example:
    >>> import jax.numpy as jnp, lpkernel as lpk
    >>> lpk.token_logprobs(jnp.log(jnp.array([[0.25, 0.75]])), jnp.array([1]))
    Array([-0.2876821], dtype=float32)
  """
  return token_logprobs_and_greedy(
    logits, targets, temperature=temperature, softcap=softcap, chunks=chunks
  )[0]
