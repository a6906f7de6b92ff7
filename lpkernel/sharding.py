"""Scoring on many devices with JAX's own SPMD machinery.

Everything in lpkernel runs under ``jax.jit`` with ``NamedSharding`` inputs
(batch sharded over a data axis): XLA partitions it. This module adds the
**vocab-parallel** forms, for logits sharded along V or an ``unembed`` sharded
along V over a model axis, written with ``jax.shard_map``. Each device reduces
its own vocabulary block to per-token partials; the partials are combined with
two collectives over the model axis per token:

* one ``pmax`` of 3 float32 values (block log-sum-exp, block max logit, target
  logit or -inf), and
* one ``psum`` of 1 float32 value (block sum-exp rescaled to the global max),

so 16 bytes per token are all-reduced. The fused path sends 4 values, also 16
bytes: ``pmax`` of (block max, target logit), ``psum`` of (sum-exp, sum of
exp * y, for the entropy). The ``[N, V]`` logits are never gathered. The
compiled programs are checked for exactly this in ``tests/test_sharding.py``.

The backward pass needs no collective for the logits (each block's
gradient depends on its own logits and the global log-sum-exp); shard_map's
transpose ``psum``-s the fused path's ``d hidden`` and an array temperature's
gradient over the model axis.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lpkernel import checks
from lpkernel import fused as fused_lib
from lpkernel import logprobs as lp_lib
from lpkernel.scoring import Scores, row_layout, sum_scores

_F32 = jnp.float32


def _check_vocab_divides(vocab_size: int, mesh: Mesh, model_axis: str) -> None:
  if vocab_size % mesh.shape[model_axis]:
    raise ValueError(
      f"{vocab_size=} must divide by the {model_axis!r} axis size {mesh.shape[model_axis]}"
    )


def _block_offset(axis: str, block: int):
  return lax.axis_index(axis) * block


# --- logits sharded along V ---------------------------------------------------


def _vp_forward(x, targets, tau, softcap, chunks, axis, vocab_size):
  """Inside shard_map: x is this device's [N, V / M] block; targets are global ids."""
  local_v = x.shape[1]
  local_t = targets - _block_offset(axis, local_v)
  in_block = (local_t >= 0) & (local_t < local_v)
  max_x, block_lse = lp_lib._row_stats(x, tau, softcap, chunks)
  target_x = jnp.where(in_block, lp_lib._gather(x, local_t).astype(_F32), -jnp.inf)
  with jax.named_scope("vocab_parallel_combine"):
    maxes = lax.pmax(jnp.stack([block_lse, max_x.astype(_F32), target_x]), axis)
    top, row_max, target_x = maxes
    shift = lp_lib._finite_or_zero(top)
    lse = jnp.log(lax.psum(jnp.exp(block_lse - shift), axis)) + shift
  # The target's logit is exact in float32, so its transform is the same everywhere.
  target_y = lp_lib._transform(target_x, tau, softcap)
  logprob, greedy = lp_lib.finish(targets, vocab_size, target_x, target_y, row_max, lse)
  return logprob, greedy, lse, local_t


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _vp_logprobs(x, targets, tau, softcap, chunks, axis, vocab_size):
  return _vp_forward(x, targets, tau, softcap, chunks, axis, vocab_size)[:2]


def _vp_fwd(x, targets, tau, softcap, chunks, axis, vocab_size):
  logprob, greedy, lse, local_t = _vp_forward(x, targets, tau, softcap, chunks, axis, vocab_size)
  return (logprob, greedy), (x, local_t, tau, lse)


def _whole_cotangent(ct, axis):
  """The cotangent of an output replicated over ``axis``.

  shard_map (with ``check_vma=False``) hands each device ``1 / axis size`` of an
  unmapped output's cotangent, and sums the cotangents of unmapped inputs
  (hidden, temperature) over the axis itself, so the local backward rescales.
  """
  size = lax.psum(1, axis)
  return jax.tree.map(lambda c: c * size if jnp.issubdtype(c.dtype, jnp.floating) else c, ct)


def _vp_bwd(softcap, chunks, axis, vocab_size, residuals, cotangents):
  cotangents = _whole_cotangent(cotangents, axis)
  dx, _, dtau = lp_lib._logprobs_bwd(softcap, chunks, residuals, cotangents)
  return dx, jnp.zeros(residuals[1].shape, jax.dtypes.float0), dtau


_vp_logprobs.defvjp(_vp_fwd, _vp_bwd)


def vocab_parallel_token_logprobs_and_greedy(
  logits,
  targets,
  mesh: Mesh,
  *,
  model_axis="model",
  batch_axis=None,
  temperature=1.0,
  softcap=None,
  chunks=lp_lib.DEFAULT_CHUNKS,
):
  """``token_logprobs_and_greedy`` for logits sharded along V over ``model_axis``.

  Args:
    logits: float[N, V] (or [..., V]: leading dims are flattened) sharded as
      ``P(batch_axis, model_axis)``; V must divide by the model axis size.
    targets: int[N] global ids.
    mesh: the device mesh.
    model_axis: mesh axis over which V is split.
    batch_axis: mesh axis (or None) over which tokens are split.
  Returns:
    (float32[...] log-probabilities, bool[...] greedy flags), sharded over tokens.
  """
  checks.check_logits_and_targets(logits, targets)
  checks.check_softcap(softcap)
  batch_shape, v = targets.shape, logits.shape[-1]
  _check_vocab_divides(v, mesh, model_axis)
  tau = lp_lib._temperature_rows(temperature, batch_shape)
  x = logits.reshape(-1, v)
  t = targets.reshape(-1).astype(jnp.int32)
  row = P(batch_axis)

  def local(x, t, tau):
    return _vp_logprobs(x, t, tau, softcap, chunks, model_axis, v)

  out = jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(P(batch_axis, model_axis), row, None if tau is None else row),
    out_specs=(row, row),
    check_vma=False,
  )(x, t, tau)
  return tuple(o.reshape(batch_shape) for o in out)


def vocab_parallel_score(
  logits,
  tokens,
  response_mask,
  mesh: Mesh,
  *,
  segment_ids=None,
  num_segments=None,
  model_axis="model",
  batch_axis=None,
  temperature=1.0,
  softcap=None,
) -> Scores:
  """``score`` for ``logits [B, T, V]`` sharded as ``P(batch_axis, None, model_axis)``."""
  checks.check_score_shapes(logits, tokens, response_mask, segment_ids, num_segments)
  layout = row_layout(tokens, response_mask, segment_ids, num_segments)
  lp, greedy = vocab_parallel_token_logprobs_and_greedy(
    logits,
    layout.targets,
    mesh,
    model_axis=model_axis,
    batch_axis=batch_axis,
    temperature=temperature,
    softcap=softcap,
  )
  return sum_scores(lp, greedy, layout, num_segments)


# --- unembedding sharded along V (fused) ----------------------------------------


def _vpf_forward(h, w, targets, tau, softcap, config, axis, vocab_size):
  local_v = w.shape[1]
  local_t = targets - _block_offset(axis, local_v)
  m, s, sy, ty = fused_lib._sweep_partials(h, w, local_t, tau, softcap, config)
  with jax.named_scope("vocab_parallel_combine"):
    top, ty = lax.pmax(jnp.stack([m, ty]), axis)
    shift = lp_lib._finite_or_zero(top)
    scale = jnp.exp(m - shift)
    s, sy = lax.psum(jnp.stack([s * scale, sy * scale]), axis)
  stats, expected_y = fused_lib.finish_stats(top, s, sy, ty, targets, vocab_size)
  return stats, expected_y, local_t


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _vp_fused(h, w, targets, tau, softcap, config, axis, vocab_size):
  return _vpf_forward(h, w, targets, tau, softcap, config, axis, vocab_size)[0]


def _vp_fused_fwd(h, w, targets, tau, softcap, config, axis, vocab_size):
  stats, expected_y, local_t = _vpf_forward(h, w, targets, tau, softcap, config, axis, vocab_size)
  return stats, (h, w, local_t, tau, stats.lse, expected_y)


def _vp_fused_bwd(softcap, config, axis, vocab_size, residuals, ct):
  dh, dw, _, dtau = fused_lib._fused_bwd(softcap, config, residuals, _whole_cotangent(ct, axis))
  return dh, dw, jnp.zeros(residuals[2].shape, jax.dtypes.float0), dtau


_vp_fused.defvjp(_vp_fused_fwd, _vp_fused_bwd)


def vocab_parallel_fused_token_stats(
  hidden,
  unembed,
  targets,
  mesh: Mesh,
  *,
  model_axis="model",
  batch_axis=None,
  temperature=1.0,
  softcap=None,
  config=fused_lib.DEFAULT_FUSED,
) -> fused_lib.TokenStats:
  """``fused_token_stats`` with ``unembed [D, V]`` sharded as ``P(None, model_axis)``.

  ``hidden [..., D]`` is sharded over tokens (``batch_axis``) and replicated over
  the model axis; V must divide by the model axis size.
  """
  fused_lib._check_fused(hidden, unembed, targets)
  checks.check_softcap(softcap)
  v = unembed.shape[1]
  _check_vocab_divides(v, mesh, model_axis)
  batch_shape = targets.shape
  tau = lp_lib._temperature_rows(temperature, batch_shape)
  h = hidden.reshape(-1, hidden.shape[-1])
  t = targets.reshape(-1).astype(jnp.int32)
  row = P(batch_axis)

  def local(h, w, t, tau):
    return _vp_fused(h, w, t, tau, softcap, config, model_axis, v)

  out_specs = fused_lib.TokenStats(row, row, row, row)
  stats = jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(P(batch_axis, None), P(None, model_axis), row, None if tau is None else row),
    out_specs=out_specs,
    check_vma=False,
  )(h, unembed, t, tau)
  return jax.tree.map(lambda x: x.reshape(batch_shape), stats)


def vocab_parallel_score_hidden(
  hidden,
  unembed,
  tokens,
  response_mask,
  mesh: Mesh,
  *,
  segment_ids=None,
  num_segments=None,
  model_axis="model",
  batch_axis=None,
  temperature=1.0,
  softcap=None,
  config=fused_lib.DEFAULT_FUSED,
) -> Scores:
  """``score_hidden`` with ``unembed`` sharded along V over ``model_axis``."""
  checks.check_same_dims("hidden", hidden.shape, "tokens", tokens.shape)
  checks.check_rows(tokens, response_mask, segment_ids, num_segments)
  layout = row_layout(tokens, response_mask, segment_ids, num_segments)
  stats = vocab_parallel_fused_token_stats(
    hidden,
    unembed,
    layout.targets,
    mesh,
    model_axis=model_axis,
    batch_axis=batch_axis,
    temperature=temperature,
    softcap=softcap,
    config=config,
  )
  return sum_scores(stats.logprobs, stats.greedy, layout, num_segments)
