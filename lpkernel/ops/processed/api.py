"""Processed log-probabilities: the rollout engine's truncated distribution, replayed.

The public entries from logits (:func:`processed_token_stats`) and from hidden
states (:func:`fused_processed_token_stats`), their custom VJPs and the
bad-input policy. The kept set is a constant of the rollout: the derivative of
a processed log-probability is ``onehot(target) - p_kept`` on the kept columns
(through temperature and softcap), 0 elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lpkernel import checks, ops
from lpkernel import partials as P
from lpkernel.ops.fused.xla import FusedConfig
from lpkernel.ops.processed import select as S
from lpkernel.ops.processed import xla
from lpkernel.ops.processed.xla import ProcessedConfig
from lpkernel.sampling import ProcessedStats, Sampling, param_rows, processed_logprobs_reference

_F32 = jnp.float32
_IMPLEMENTATIONS = (None, "xla", "reference")
DEFAULT_CONFIG = ProcessedConfig()


def _finish(parts, top, rows: S.Rows, targets, tau, knobs, config: ProcessedConfig):
  """(ProcessedStats before poisoning, residual row statistics) of whole rows."""
  v = rows.vocab_size
  k, p, min_p = knobs
  f = P.finish(parts, targets, v, tau)
  params = S.Params(tau, k, p, min_p, f.shift)
  d = S.decide(top, top.shape[1] == v, params, v, parts.s)
  kappa, mass, count = S.threshold(rows, params, d)
  log_sk = jnp.log(mass)
  kept = S.kept(parts.t[:, None], params, kappa)[:, 0]
  logprobs = jnp.where(kept, P.scaled(parts.t - f.shift, tau) - log_sk, -jnp.inf)
  logprobs = jnp.where(jnp.isnan(f.logprob), jnp.nan, logprobs)
  stats = ProcessedStats(logprobs, f.logprob, log_sk - f.log_s, kept, count, f.greedy)
  return stats, (params, kappa, f.log_s, log_sk, kept)


def _poisoned(stats: ProcessedStats, bad) -> ProcessedStats:
  return stats._replace(
    logprobs=jnp.where(bad, jnp.nan, stats.logprobs),
    raw_logprobs=jnp.where(bad, jnp.nan, stats.raw_logprobs),
    log_kept_mass=jnp.where(bad, jnp.nan, stats.log_kept_mass),
    kept=stats.kept & ~bad,
    greedy=stats.greedy & ~bad,
  )


def _cotangents(ct: ProcessedStats, kept, bad):
  """(g_processed, g_raw, g_log_kept_mass): the processed term only where the target
  was kept; NaN on bad rows (their values are NaN)."""

  def clean(c):
    return jnp.where(bad, jnp.nan, c.astype(_F32))

  return clean(jnp.where(kept, ct.logprobs, 0.0)), clean(ct.raw_logprobs), clean(ct.log_kept_mass)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _logits_op(x, targets, tau, knobs, bad, softcap, k, config, tau_grad):
  return _logits_fwd(x, targets, tau, knobs, bad, softcap, k, config, tau_grad)[0]


def _logits_fwd(x, targets, tau, knobs, bad, softcap, k, config, tau_grad):
  parts, top, rows = xla.logits_forward(x, targets, tau, softcap, k, config)
  stats, res = _finish(parts, top, rows, targets, tau, knobs, config)
  return _poisoned(stats, bad), (x, targets, bad, res)


def _logits_bwd(softcap, k, config, tau_grad, residuals, ct):
  x, targets, bad, (params, kappa, log_s, log_sk, kept) = residuals
  g = _cotangents(ct, kept, bad)
  dx, dtau = xla.logits_grads(x, targets, params, kappa, log_s, log_sk, g, softcap, tau_grad)
  return dx, None, dtau, None, None


_logits_op.defvjp(_logits_fwd, _logits_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10, 11, 12))
def _hidden_op(
  h, w, targets, tau, knobs, bad, softcap, vocab_axis, precision, k, config, fused, tau_grad
):
  args = (softcap, vocab_axis, precision, k, config, fused, tau_grad)
  return _hidden_fwd(h, w, targets, tau, knobs, bad, *args)[0]


def _hidden_fwd(
  h, w, targets, tau, knobs, bad, softcap, vocab_axis, precision, k, config, fused, tau_grad
):
  parts, top, rows = xla.hidden_forward(
    h, w, targets, tau, softcap, vocab_axis, precision, k, config, fused
  )
  stats, res = _finish(parts, top, rows, targets, tau, knobs, config)
  return _poisoned(stats, bad), (h, w, targets, bad, res)


def _hidden_bwd(softcap, vocab_axis, precision, k, config, fused, tau_grad, residuals, ct):
  h, w, targets, bad, (params, kappa, log_s, log_sk, kept) = residuals
  g = _cotangents(ct, kept, bad)
  dh, dw, dtau = xla.hidden_grads(
    h, w, targets, params, kappa, log_s, log_sk, g, softcap, vocab_axis, precision, fused, tau_grad
  )
  return dh.astype(h.dtype), dw, None, dtau, None, None


_hidden_op.defvjp(_hidden_fwd, _hidden_bwd)


def _rows(sampling: Sampling, batch_shape, vocab_size, targets):
  """(tau [N] or None, (top_k, top_p, min_p) [N], bad [N]) with bad rows made safe."""
  tau, k, p, min_p, bad_knobs = param_rows(sampling, batch_shape)
  bad = bad_knobs | (targets < 0) | (targets >= vocab_size)
  if tau is not None:
    tau = jnp.where(bad, 1.0, tau)
  knobs = (jnp.where(bad, 0, k), jnp.where(bad, 1.0, p), jnp.where(bad, 0.0, min_p))
  return tau, knobs, bad


def _check_implementation(implementation):
  if implementation not in _IMPLEMENTATIONS:
    raise ValueError(
      f"implementation={implementation!r}: the processed paths have {_IMPLEMENTATIONS}"
    )


def processed_token_stats(
  logits: jax.Array,
  targets: jax.Array,
  sampling: Sampling,
  *,
  softcap: float | None = None,
  implementation: str | None = None,
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
    implementation: None or ``"xla"`` (no ``[N, V]`` temporary, no sort), or
      ``"reference"`` (materialised rows and a sort).
    config: the XLA path's tiling (:class:`lpkernel.ProcessedConfig`).

  Returns:
    :class:`lpkernel.ProcessedStats`, each field shaped like ``targets``.

  Example:
    >>> import jax.numpy as jnp, lpkernel as lpk
    >>> logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    >>> s = lpk.processed_token_stats(logits, jnp.array([1]), lpk.Sampling(top_k=2))
    >>> round(float(s.logprobs[0]), 4), round(float(jnp.exp(s.log_kept_mass[0])), 4)
    (-0.9808, 0.8)
  """
  _check_implementation(implementation)
  sampling = sampling.check()
  logits, targets, _ = checks.logits_arguments(logits, targets, 1.0, softcap)
  if implementation == "reference":
    return processed_logprobs_reference(logits, targets, sampling, softcap=softcap)
  batch_shape, v = targets.shape, logits.shape[-1]
  tau, knobs, bad = _rows(sampling, batch_shape, v, targets.reshape(-1))
  k = config.k_for(sampling.top_k, v)
  x = logits.reshape(-1, v)
  if x.shape[0] == 0:
    return jax.tree.map(lambda a: a.reshape(batch_shape), _empty())
  tau_grad = not np.isscalar(sampling.temperature)  # a Python temperature has no derivative
  stats = _logits_op(x, targets.reshape(-1), tau, knobs, bad, softcap, k, config, tau_grad)
  return jax.tree.map(lambda a: a.reshape(batch_shape), stats)


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

  One sweep over the unembedding's vocabulary blocks (as the fused forward) plus
  the dot products of each token with the ``K * group`` rows of its candidate
  groups (:class:`lpkernel.ProcessedConfig`); the backward is one sweep.

  Args:
    hidden: float[..., D]; unembed: float[D, V], or a tied table ``[V, D]`` with
      ``vocab_axis=0`` (read as stored).
    targets, sampling, softcap, implementation, config: as for
      :func:`processed_token_stats`.
    precision: the matmuls' precision (None: ``jax.default_matmul_precision``).
    fused_config: the vocabulary tiling of the sweeps (:class:`lpkernel.FusedConfig`);
      None: the XLA fused path's for this shape, dtype and machine.
  """
  _check_implementation(implementation)
  sampling = sampling.check()
  hidden, unembed, targets, axis, _ = checks.fused_arguments(
    hidden, unembed, targets, 1.0, softcap, vocab_axis
  )
  v = unembed.shape[axis]
  if implementation == "reference":
    w = unembed if axis == 1 else unembed.T
    logits = jnp.einsum(
      "...d,dv->...v", hidden, w, preferred_element_type=_F32, precision=precision
    )
    return processed_logprobs_reference(logits, targets, sampling, softcap=softcap)
  batch_shape = targets.shape
  tau, knobs, bad = _rows(sampling, batch_shape, v, targets.reshape(-1))
  h = hidden.reshape(-1, hidden.shape[-1])
  if h.shape[0] == 0:
    return jax.tree.map(lambda a: a.reshape(batch_shape), _empty())
  if precision is None:
    precision = jax.config.jax_default_matmul_precision  # type: ignore[attr-defined]
  k = config.k_for(sampling.top_k, v)
  if fused_config is None:
    like = ((h.shape[0], h.shape[1], v), h.dtype)
    fused_config = ops.fused_implementation("xla", like).config  # type: ignore[attr-defined]
  tau_grad = not np.isscalar(sampling.temperature)
  args = (softcap, axis, precision, k, config, fused_config, tau_grad)
  stats = _hidden_op(h, unembed, targets.reshape(-1), tau, knobs, bad, *args)
  return jax.tree.map(lambda a: a.reshape(batch_shape), stats)
