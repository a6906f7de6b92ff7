"""Processed log-probabilities: the rollout engine's truncated distribution, replayed.

The public entries from logits (:func:`processed_token_stats`) and from hidden
states (:func:`fused_processed_token_stats`), their custom VJPs and the
bad-input policy. The kept set is a constant of the rollout: the derivative of
a processed log-probability is ``onehot(target) - p_kept`` on the kept columns
(through temperature and softcap), 0 elsewhere.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lpkernel import checks, ops
from lpkernel import partials as P
from lpkernel.ops.base import ProcessedHidden
from lpkernel.ops.blocks import map_row_chunks
from lpkernel.ops.fused.matmuls import materialised_logits
from lpkernel.ops.fused.xla import FusedConfig
from lpkernel.ops.platform import on_cpu_or
from lpkernel.ops.processed import select as S
from lpkernel.ops.processed import xla
from lpkernel.ops.processed.candidates import ProcessedConfig
from lpkernel.ops.staged import staged
from lpkernel.sampling import (
  ProcessedStats,
  Sampling,
  defined_count,
  param_rows,
  processed_logprobs_reference,
)

_F32 = jnp.float32
DEFAULT_CONFIG = ProcessedConfig()


class SamplingRows(NamedTuple):
  """The sampler's parameters as one value per scored row ``[N]`` (a pytree, so it
  shards with the rows); bad rows are made safe and poisoned at the end.

  Attributes:
    tau: float32 temperature, or None (a Python 1).
    top_k: int32; top_p, min_p: float32.
    bad: bool, a parameter out of range or a target outside ``[0, V)``.
  """

  tau: jax.Array | None
  top_k: jax.Array
  top_p: jax.Array
  min_p: jax.Array
  bad: jax.Array


def sampling_rows(
  sampling: Sampling, targets: jax.Array, vocab_size: int, config: ProcessedConfig
) -> tuple[SamplingRows, int, bool]:
  """(the parameters per row of ``targets [...]``, flattened; ``K`` for the
  candidates (:meth:`ProcessedConfig.k_for`); whether the temperature has a
  derivative (an array one))."""
  tau, k, p, min_p, bad_knobs = param_rows(sampling, targets.shape)
  flat = targets.reshape(-1)
  bad = bad_knobs | (flat < 0) | (flat >= vocab_size)
  if tau is not None:
    tau = jnp.where(bad, 1.0, tau)
  rows = SamplingRows(
    tau, jnp.where(bad, 0, k), jnp.where(bad, 1.0, p), jnp.where(bad, 0.0, min_p), bad
  )
  return rows, config.k_for(sampling, vocab_size), not np.isscalar(sampling.temperature)


def _whole_rows(parts, top, rows: S.Rows, tau, k: int, axis):
  """(parts, top ``[N, K]``, rows) of whole rows from this device's block of
  columns: merged over the mesh axis (the partials as the plain path's; the ``K``
  largest of every device's ``K`` largest), the rows' search reduced over it."""
  if axis is None:
    return parts, top, rows
  with jax.named_scope("vocab_parallel_combine"):
    parts = P.combine_shards(parts, axis, P.block_offset(axis, rows.vocab_size), tau)
    top = lax.top_k(lax.all_gather(top, axis, axis=1, tiled=True), k)[0]
  return parts, top, rows._replace(axis_name=axis)


def _finish(
  parts, top, rows: S.Rows, targets, r: SamplingRows, k: int, axis, v: int, in_chunk: bool = False
):
  """(ProcessedStats, residual row statistics) of whole rows of ``v`` columns.

  ``parts``, ``top`` and ``rows`` are this device's block's under ``axis`` (else
  the whole rows'); ``targets`` are global ids. ``in_chunk``: the rows are a chunk
  sized for their candidates (:func:`~lpkernel.ops.processed.xla.forward_chunk`),
  decided at once (in chunks of their own: 50 of 35 rows each at V = 256, N = 65536)."""
  tau = r.tau
  parts, top, rows = _whole_rows(parts, top, rows, tau, k, axis)
  f = P.finish(parts, targets, v, tau)
  params = S.Params(tau, r.top_k, r.top_p, r.min_p, f.shift)
  decide = S.decide if in_chunk else S.decide_in_row_chunks
  d = decide(top, top.shape[1] == v, params, v, parts.s)
  kappa, mass, count = S.threshold(rows, params, d, v)
  log_sk = jnp.log(mass)
  # A row of -inf holds no possible token: it keeps none, its kept mass is -inf.
  no_mass = parts.s == 0
  count = jnp.where(no_mass, 0, count)
  kept = S.kept(parts.t[:, None], params, kappa)[:, 0] & ~no_mass
  impossible = ~(parts.t > -jnp.inf)  # a -inf target (NaN ones are NaN below)
  logprobs = jnp.where(kept & ~impossible, P.scaled(parts.t - f.shift, tau) - log_sk, -jnp.inf)
  logprobs = jnp.where(jnp.isnan(f.logprob), jnp.nan, logprobs)
  log_kept_mass = jnp.where(no_mass, -jnp.inf, log_sk - f.log_s)
  stats = ProcessedStats(logprobs, f.logprob, log_kept_mass, kept, count, f.greedy)
  return _poisoned(stats, r.bad), (params, kappa, f.log_s, log_sk, kept)


def _poisoned(stats: ProcessedStats, bad) -> ProcessedStats:
  logprobs = jnp.where(bad, jnp.nan, stats.logprobs)
  return stats._replace(
    logprobs=logprobs,
    kept_count=defined_count(stats.kept_count, logprobs),
    raw_logprobs=jnp.where(bad, jnp.nan, stats.raw_logprobs),
    log_kept_mass=jnp.where(bad, jnp.nan, stats.log_kept_mass),
    kept=stats.kept & ~jnp.isnan(logprobs),  # no kept set where the row is NaN
    greedy=stats.greedy & ~bad,
  )


def _cotangents(ct: ProcessedStats, kept, bad, axis):
  """(g_processed, g_raw, g_log_kept_mass): the processed term only where the target
  was kept; NaN on bad rows (their values are NaN)."""
  # shard_map hands each device 1 / (axis size) of a replicated output's cotangent.
  scale = 1 if axis is None else lax.axis_size(axis)

  def clean(c):
    return jnp.where(bad, jnp.nan, c.astype(_F32) * scale)

  return clean(jnp.where(kept, ct.logprobs, 0.0)), clean(ct.raw_logprobs), clean(ct.log_kept_mass)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8, 9))
def _logits_op(x, targets, r, softcap, k, config, tau_grad, axis, v, impl):
  return _logits_fwd(x, targets, r, softcap, k, config, tau_grad, axis, v, impl)[0]


def _logits_fwd(x, targets, r, softcap, k, config, tau_grad, axis, v, impl):
  local = targets - P.block_offset(axis, x.shape[1])
  k_here = min(k, x.shape[1])

  # Short rows (a few hundred columns) a chunk at a time: their candidates pass
  # the bound. Under a mesh axis every device takes its rows whole.
  chunk = x.shape[0]
  if axis is None:
    chunk = xla.forward_chunk(*x.shape, k_here, x.dtype, softcap)
  chunked = chunk < x.shape[0]
  search = xla.search_chunk(x.shape[0])  # a search's steps sized by all the rows

  def rows(x, local, targets, r):
    args = (x, local, r.tau, softcap, k_here, config, impl, search)
    return _finish(*xla.logits_forward(*args), targets, r, k, axis, v, chunked)

  stats, res = map_row_chunks(rows, (x, local, targets, r), chunk)
  return stats, (x, local, r.bad, res)


def _logits_bwd(softcap, k, config, tau_grad, axis, v, impl, residuals, ct):
  x, local, bad, (params, kappa, log_s, log_sk, kept) = residuals
  g = _cotangents(ct, kept, bad, axis)
  dx, dtau = impl.processed_grads(x, local, params, kappa, log_s, log_sk, g, softcap, tau_grad)
  return dx, None, _row_cotangents(params, dtau)


_logits_op.defvjp(_logits_fwd, _logits_bwd)
_logits_op = staged(_logits_op, (3, 4, 5, 6, 7, 8, 9))


def _row_cotangents(params: S.Params, dtau) -> SamplingRows:
  """The cotangent of a :class:`SamplingRows`: ``d tau`` (or zeros), nothing else."""
  if params.tau is not None and dtau is None:
    dtau = jnp.zeros_like(params.tau)
  return SamplingRows(dtau, None, None, None, None)  # type: ignore[arg-type]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9, 10, 11, 12, 13))
def _hidden_op(
  h, w, targets, r, softcap, vocab_axis, precision, k, config, fused, tau_grad, axis, v, impl
):
  args = (softcap, vocab_axis, precision, k, config, fused, tau_grad, axis, v, impl)
  return _hidden_fwd(h, w, targets, r, *args)[0]


def _hidden_fwd(
  h, w, targets, r, softcap, vocab_axis, precision, k, config, fused, tau_grad, axis, v, impl
):
  v_here = w.shape[vocab_axis]
  local = targets - P.block_offset(axis, v_here)
  parts, top, rows = xla.hidden_forward(
    h, w, local, r.tau, softcap, vocab_axis, precision, min(k, v_here), config, fused, impl
  )
  stats, res = _finish(parts, top, rows, targets, r, k, axis, v)
  return stats, (h, w, local, r.bad, res)


def _hidden_bwd(
  softcap, vocab_axis, precision, k, config, fused, tau_grad, axis, v, impl, residuals, ct
):
  h, w, local, bad, (params, kappa, log_s, log_sk, kept) = residuals
  g = _cotangents(ct, kept, bad, axis)
  dh, dw, dtau = impl.hidden_processed_grads(
    h, w, local, params, kappa, log_s, log_sk, g, softcap, vocab_axis, precision, fused, tau_grad
  )
  return dh.astype(h.dtype), dw, None, _row_cotangents(params, dtau)


_hidden_op.defvjp(_hidden_fwd, _hidden_bwd)
_hidden_op = staged(_hidden_op, (4, 5, 6, 7, 8, 9, 10, 11, 12, 13))


def rows_processed_token_stats(
  x: jax.Array,
  targets: jax.Array,
  rows: SamplingRows,
  k: int,
  tau_grad: bool,
  *,
  softcap: float | None = None,
  config: ProcessedConfig = DEFAULT_CONFIG,
  axis_name: str | None = None,
  vocab_size: int | None = None,
  implementation: str | ops.ProcessedImplementation | None = None,
) -> ProcessedStats:
  """The per-shard building block from logits: :class:`ProcessedStats` ``[N]`` of
  rows ``x [N, Vb]``: whole rows, or (inside ``shard_map`` with ``axis_name``)
  this device's block of columns of rows of ``vocab_size`` columns.

  ``targets`` int32[N] global ids; ``rows``, ``k``, ``tau_grad`` from
  :func:`sampling_rows`; ``implementation`` the passes over ``x``
  (:func:`lpkernel.ops.processed_implementation`).
  """
  if x.shape[0] == 0:
    return _empty()
  impl = ops.processed_implementation(implementation)
  v = x.shape[1] if vocab_size is None else vocab_size
  return _logits_op(x, targets, rows, softcap, k, config, tau_grad, axis_name, v, impl)


def rows_fused_processed_token_stats(
  h: jax.Array,
  w: jax.Array,
  targets: jax.Array,
  rows: SamplingRows,
  k: int,
  tau_grad: bool,
  *,
  softcap: float | None = None,
  vocab_axis: int = 1,
  precision=None,
  config: ProcessedConfig = DEFAULT_CONFIG,
  fused_config: FusedConfig | None = None,
  axis_name: str | None = None,
  vocab_size: int | None = None,
  implementation: str | ops.ProcessedImplementation | None = None,
) -> ProcessedStats:
  """The per-shard building block from hidden states ``h [N, D]`` and ``w`` (its
  vocabulary axis ``vocab_axis``, 0 or 1): whole, or this device's block of the
  vocabulary inside ``shard_map`` with ``axis_name``; as
  :func:`rows_processed_token_stats` otherwise."""
  impl = hidden_implementation(implementation)
  if h.shape[0] == 0:
    return _empty()
  if precision is None:
    precision = jax.config.jax_default_matmul_precision  # type: ignore[attr-defined]
  v_here = w.shape[vocab_axis]
  if fused_config is None:
    like = ((h.shape[0], h.shape[1], v_here), h.dtype)
    fused_config = ops.fused_implementation("xla", like).config  # type: ignore[attr-defined]
  v = v_here if vocab_size is None else vocab_size
  args = (softcap, vocab_axis, precision, k, config, fused_config, tau_grad, axis_name, v, impl)
  return _hidden_op(h, w, targets, rows, *args)


def hidden_implementation(implementation) -> ops.ProcessedImplementation:
  """The processed implementation for the path from hidden states, or ``ValueError``
  for one without its passes (:class:`lpkernel.ops.base.ProcessedHidden`)."""
  impl = ops.processed_implementation(implementation)
  if not isinstance(impl, ProcessedHidden):
    raise ValueError(
      f"implementation={impl.name!r} has no processed kernels from hidden states "
      "(the path from logits only): use 'xla', 'pallas_gpu', 'pallas_tpu' or 'reference'"
    )
  return impl


def processed_token_stats(
  logits: jax.Array,
  targets: jax.Array,
  sampling: Sampling,
  *,
  softcap: float | None = None,
  implementation: str | ops.ProcessedImplementation | None = None,
  config: ProcessedConfig = DEFAULT_CONFIG,
) -> ProcessedStats:
  """Each target's log-probability under the rollout engine's processed distribution.

  The sampler's order and rules are vLLM V1's: temperature, min-p, top-k (ties at
  the boundary kept), top-p (a token is kept iff the mass strictly more likely
  than it is below ``p``; tokens equal to the boundary share its fate), then
  renormalisation over the kept set (:mod:`lpkernel.sampling`).

  Args:
    logits: float[..., V] (``[B, ...]`` when a parameter is an array of ``[B]``).
    targets: int[...] ids in ``[0, V)``; others give NaN.
    sampling: :class:`lpkernel.Sampling` (Python numbers or per-example arrays;
      an array temperature is differentiable).
    softcap: None or ``c > 0``, applied before the temperature, as the model does.
    implementation: None or ``"xla"`` (no ``[N, V]`` temporary, no sort),
      ``"pallas_gpu"`` (opt-in; :class:`lpkernel.ops.PallasGpuProcessed`, or
      that object with its tiling, ``interpret=True`` on the CPU), or
      ``"reference"`` (materialised rows and a sort).
    config: the candidates and the searches' tiling (:class:`lpkernel.ProcessedConfig`).

  Returns:
    :class:`lpkernel.ProcessedStats`, each field shaped like ``targets``.

  Example:
    >>> import jax.numpy as jnp, lpkernel as lpk
    >>> logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    >>> s = lpk.processed_token_stats(logits, jnp.array([1]), lpk.Sampling(top_k=2))
    >>> round(float(s.logprobs[0]), 4), round(float(jnp.exp(s.log_kept_mass[0])), 4)
    (-0.9808, 0.8)
  """
  sampling = sampling.check()
  logits, targets, _ = checks.logits_arguments(logits, targets, 1.0, softcap)
  if ops.is_reference(implementation):
    return processed_logprobs_reference(logits, targets, sampling, softcap=softcap)
  impl = ops.processed_implementation(implementation)
  v = logits.shape[-1]
  rows, k, tau_grad = sampling_rows(sampling, targets, v, config)
  # On the CPU a barrier keeps the rows' reshape out of XLA's reductions: fused
  # into them (where the targets are constants of the program and the passes
  # simplify), the sum of exp over [8, 512, 32000] bfloat16 logits ran 5x slower.
  x = logits.reshape(-1, v)
  x = on_cpu_or(lambda: lax.optimization_barrier(x), lambda: x)
  stats = rows_processed_token_stats(
    x, targets.reshape(-1), rows, k, tau_grad, softcap=softcap, config=config, implementation=impl
  )
  return jax.tree.map(lambda a: a.reshape(targets.shape), stats)


def _empty() -> ProcessedStats:
  f = jnp.zeros((0,), _F32)
  return ProcessedStats(
    f, f, f, jnp.zeros((0,), bool), jnp.zeros((0,), jnp.int32), jnp.zeros((0,), bool)
  )


def fused_processed_token_stats(
  hidden: jax.Array,
  unembed: jax.Array,
  targets: jax.Array,
  sampling: Sampling,
  *,
  softcap: float | None = None,
  implementation: str | None = None,
  vocab_axis: int = -1,
  precision=None,
  config: ProcessedConfig = DEFAULT_CONFIG,
  fused_config: FusedConfig | None = None,
) -> ProcessedStats:
  """:func:`processed_token_stats` of ``hidden @ unembed`` without the logits.

  One sweep over the unembedding's vocabulary blocks (as the fused forward,
  recording each group's few largest values) plus, for a token whose ``K``
  largest crowd into a group, the dot products with that group's rows
  (:class:`lpkernel.ProcessedConfig`); the backward is one sweep.

  Args:
    hidden: float[..., D]; unembed: float[D, V], or a tied table ``[V, D]`` with
      ``vocab_axis=0`` (read as stored).
    targets, sampling, softcap, config: as for :func:`processed_token_stats`.
    implementation: None or ``"xla"`` (one sweep over the unembedding's blocks),
      ``"pallas_gpu"`` (opt-in: token chunks through the vendor matmul and the
      processed row kernels, :class:`lpkernel.ops.PallasGpuProcessed`),
      ``"pallas_tpu"`` (opt-in: the fused path's Mosaic kernels,
      :class:`lpkernel.ops.PallasTpuProcessed`), or ``"reference"``.
    precision: the matmuls' precision (None: ``jax.default_matmul_precision``).
    fused_config: the vocabulary tiling of the sweeps (:class:`lpkernel.FusedConfig`);
      None: the XLA fused path's for this shape, dtype and machine.
  """
  sampling = sampling.check()
  hidden, unembed, targets, axis, _ = checks.fused_arguments(
    hidden, unembed, targets, 1.0, softcap, vocab_axis
  )
  v = unembed.shape[axis]
  if ops.is_reference(implementation):
    logits = materialised_logits(hidden, unembed, axis, precision)
    return processed_logprobs_reference(logits, targets, sampling, softcap=softcap)
  rows, k, tau_grad = sampling_rows(sampling, targets, v, config)
  stats = rows_fused_processed_token_stats(
    hidden.reshape(-1, hidden.shape[-1]),
    unembed,
    targets.reshape(-1),
    rows,
    k,
    tau_grad,
    softcap=softcap,
    vocab_axis=axis,
    precision=precision,
    config=config,
    fused_config=fused_config,
    implementation=implementation,
  )
  return jax.tree.map(lambda a: a.reshape(targets.shape), stats)
