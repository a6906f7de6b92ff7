"""Scoring on many devices with JAX's own SPMD machinery.

Everything in lpkernel runs under ``jax.jit`` with ``NamedSharding`` inputs
(batch sharded over a data axis): XLA partitions it. This module adds the
**vocab-parallel** forms, for logits sharded along V or an ``unembed`` sharded
along V over a model axis, written with ``jax.shard_map`` around the public
per-shard building blocks of each op's ``api`` (``lpkernel.ops.logprobs.api``:
:func:`~lpkernel.ops.logprobs.api.rows_logprobs_and_greedy`,
:func:`~lpkernel.ops.logprobs.api.rows_nll_loss`; ``lpkernel.ops.fused.api``:
:func:`~lpkernel.ops.fused.api.rows_fused_token_stats`,
:func:`~lpkernel.ops.fused.api.rows_fused_nll_loss`), so any implementation runs
on each shard. Each device reduces its vocabulary block to
:class:`lpkernel.partials.RowPartials`, merged across the model axis by the same
:func:`lpkernel.partials.combine` as everywhere else, with collectives:

* logits path: one ``pmax`` of (max, target logit), one ``psum`` of the
  rescaled sum of exp, one ``pmin`` of the first-argmax column: 16 bytes per token;
* fused path: the same plus the entropy's sum in the ``psum``: 20 bytes per token;
* replay of recorded kept ids (from logits, or hidden states): each device's
  kept logits (gathered, or dot products) of the ids in its block, one
  ``psum`` of the ``[N, K]`` kept logits;
* processed paths (``sampling=``, the rollout engine's distribution): the same
  merge, an ``all_gather`` of each device's ``K`` largest values per row (the
  whole row's ``K`` largest are among them), and for rows whose kept set those
  do not settle, one ``psum`` (or ``pmax``) of two numbers per row per search
  sweep, each device sweeping its own block.

NaN wins across devices (``pmax`` keeps NaN; the ``psum`` of a NaN is NaN). The
``[N, V]`` logits are never gathered; the project's tests check the compiled
programs for exactly this. The backward pass of the logits needs no
collective; shard_map's transpose ``psum``-s the fused path's ``d hidden`` and an
array temperature's gradient over the model axis.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lpkernel import checks, ops
from lpkernel.ops.fused.api import TokenStats, rows_fused_nll_loss, rows_fused_token_stats
from lpkernel.ops.logprobs.api import rows_logprobs_and_greedy, rows_nll_loss
from lpkernel.ops.processed.api import (
  DEFAULT_CONFIG,
  SamplingRows,
  hidden_implementation,
  rows_fused_processed_token_stats,
  rows_processed_token_stats,
  sampling_rows,
)
from lpkernel.ops.processed.candidates import ProcessedConfig
from lpkernel.ops.processed.replay import (
  checked_ids,
  rows_fused_replay_token_logprobs,
  rows_replay_token_logprobs,
)
from lpkernel.sampling import ProcessedStats, Sampling, replay_temperature_rows
from lpkernel.scoring import Scores, one_temperature, score_rows


def _check_mesh(
  mesh: Mesh, model_axis: str, batch_axis: str | None, vocab_size: int, n: int, names
):
  """Clear errors naming the user's arrays and the mesh axes."""
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  for role, axis in (("model_axis", model_axis), ("batch_axis", batch_axis)):
    if axis is not None and axis not in mesh.shape:
      raise ValueError(f"{role}={axis!r} is not an axis of the mesh {dict(mesh.shape)}")
  model = mesh.shape[model_axis]
  if vocab_size % model:
    raise ValueError(
      f"{names[0]} has V={vocab_size}, which must divide by the {model_axis!r} axis size {model}"
    )
  if batch_axis is not None and n % mesh.shape[batch_axis]:
    raise ValueError(
      f"{names[1]} has {n} rows (tokens), which must divide by the {batch_axis!r} axis size "
      f"{mesh.shape[batch_axis]}"
    )


def _per_token(local, mesh: Mesh, in_specs, out_specs, batch_shape, *args):
  """``local`` under ``shard_map`` over token rows, each per-token output
  reshaped to ``batch_shape``."""
  out = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(
    *args
  )
  return jax.tree.map(lambda a: a.reshape(batch_shape), out)


def vocab_parallel_token_logprobs_and_greedy(
  logits: jax.Array,
  targets: jax.Array,
  mesh: Mesh,
  *,
  model_axis: str = "model",
  batch_axis: str | None = None,
  temperature: float | jax.Array = 1.0,
  softcap: float | None = None,
  implementation: str | ops.LogitsImplementation | None = None,
) -> tuple[jax.Array, jax.Array]:
  """``token_logprobs_and_greedy`` for logits sharded along V over ``model_axis``.

  Args:
    logits: float[..., V] (leading dims are flattened to tokens) sharded as
      ``P(batch_axis, model_axis)``; V must divide by the model axis size.
    targets: int[...] global ids.
    mesh: the device mesh.
    model_axis: mesh axis over which V is split.
    batch_axis: mesh axis (or None) over which tokens are split.
    temperature, softcap, implementation: as for ``token_logprobs``; the
      implementation runs on each device's block.
  Returns:
    (float32[...] log-probabilities, bool[...] greedy flags), sharded over tokens.
  """
  logits, targets, tau = _logits_arguments(
    logits, targets, mesh, model_axis, batch_axis, temperature, softcap
  )
  batch_shape, v = targets.shape, logits.shape[-1]
  row = P(batch_axis)

  def local(x, t, tau):
    return rows_logprobs_and_greedy(
      x,
      t,
      tau,
      softcap=softcap,
      implementation=implementation,
      axis_name=model_axis,
      vocab_size=v,
    )

  in_specs = (P(batch_axis, model_axis), row, None if tau is None else row)
  args = (logits.reshape(-1, v), targets.reshape(-1), tau)
  return _per_token(local, mesh, in_specs, (row, row), batch_shape, *args)


def vocab_parallel_nll_loss(
  logits: jax.Array,
  targets: jax.Array,
  mesh: Mesh,
  weights: jax.Array | None = None,
  *,
  z_loss: float = 0.0,
  model_axis: str = "model",
  batch_axis: str | None = None,
  temperature: float | jax.Array = 1.0,
  softcap: float | None = None,
  implementation: str | ops.LogitsImplementation | None = None,
) -> jax.Array:
  """:func:`lpkernel.nll_loss` for logits sharded along V over ``model_axis``
  (shardings as for :func:`vocab_parallel_token_logprobs_and_greedy`).

  Each device writes its block of ``d logits`` in the forward pass from the
  rows' statistics merged across the model axis (Megatron's vocab-parallel
  cross-entropy, with z-loss, softcap and temperature).
  """
  logits, targets, tau = _logits_arguments(
    logits, targets, mesh, model_axis, batch_axis, temperature, softcap
  )
  checks.check_z_loss(z_loss)
  v = logits.shape[-1]
  weights = checks.loss_weights(weights, targets.shape)
  row = P(batch_axis)

  local = functools.partial(
    rows_nll_loss,
    z_loss=z_loss,
    softcap=softcap,
    implementation=implementation,
    axis_name=model_axis,
    vocab_size=v,
  )
  in_specs = (P(batch_axis, model_axis), row, row, None if tau is None else row)
  args = (logits.reshape(-1, v), targets.reshape(-1), weights, tau)
  return _summed_over_batch_shards(local, mesh, in_specs, batch_axis, *args)


def _summed_over_batch_shards(local, mesh, in_specs, batch_axis, *args):
  """A loss under ``shard_map``: ``local`` gives each batch shard's partial sum
  (the same on every model shard), added up outside."""
  losses = jax.shard_map(
    lambda *a: local(*a)[None],
    mesh=mesh,
    in_specs=in_specs,
    out_specs=P(batch_axis),
    check_vma=False,
  )(*args)
  return losses.sum()


def vocab_parallel_score(
  logits: jax.Array,
  tokens: jax.Array,
  response_mask: jax.Array,
  mesh: Mesh,
  *,
  segment_ids: jax.Array | None = None,
  num_segments: int | None = None,
  model_axis: str = "model",
  batch_axis: str | None = None,
  temperature: float | jax.Array = 1.0,
  softcap: float | None = None,
  implementation: str | ops.LogitsImplementation | ops.ProcessedImplementation | None = None,
  sampling: Sampling | None = None,
) -> Scores:
  """``score`` for ``logits [B, T, V]`` sharded as ``P(batch_axis, None, model_axis)``;
  under ``sampling`` the processed log-probabilities
  (:func:`vocab_parallel_processed_token_stats`)."""
  logits = checks.as_model_rows("logits", logits, "V")
  one_temperature(temperature, sampling)

  def per_token(targets):
    if sampling is not None:
      stats = vocab_parallel_processed_token_stats(
        logits,
        targets,
        sampling,
        mesh,
        model_axis=model_axis,
        batch_axis=batch_axis,
        softcap=softcap,
        implementation=implementation,
      )
      return stats.logprobs, stats.greedy, None
    lp, greedy = vocab_parallel_token_logprobs_and_greedy(
      logits,
      targets,
      mesh,
      model_axis=model_axis,
      batch_axis=batch_axis,
      temperature=temperature,
      softcap=softcap,
      implementation=implementation,
    )
    return lp, greedy, None

  return score_rows(
    tokens, response_mask, segment_ids, num_segments, per_token, ("logits", logits.shape)
  )[0]


def vocab_parallel_fused_token_stats(
  hidden: jax.Array,
  unembed: jax.Array,
  targets: jax.Array,
  mesh: Mesh,
  *,
  model_axis: str = "model",
  batch_axis: str | None = None,
  temperature: float | jax.Array = 1.0,
  softcap: float | None = None,
  implementation: str | ops.FusedImplementation | None = None,
  vocab_axis: int = -1,
) -> TokenStats:
  """``fused_token_stats`` with ``unembed [D, V]`` sharded as ``P(None, model_axis)``
  (a tied table ``[V, D]`` with ``vocab_axis=0``: ``P(model_axis, None)``).

  ``hidden [..., D]`` is sharded over tokens (``batch_axis``) and replicated over
  the model axis; V must divide by the model axis size.
  """
  hidden, unembed, targets, vocab_axis, tau = _fused_arguments(
    hidden, unembed, targets, mesh, model_axis, batch_axis, temperature, softcap, vocab_axis
  )
  v, batch_shape, row = unembed.shape[vocab_axis], targets.shape, P(batch_axis)

  def local(h, w, t, tau):
    return rows_fused_token_stats(
      h,
      w,
      t,
      tau,
      softcap=softcap,
      implementation=implementation,
      axis_name=model_axis,
      vocab_size=v,
      vocab_axis=vocab_axis,
    )

  out_specs = TokenStats(row, row, row, row)  # type: ignore[arg-type]  # a spec per field
  in_specs = _fused_specs(model_axis, batch_axis, vocab_axis, tau)
  args = (hidden.reshape(-1, hidden.shape[-1]), unembed, targets.reshape(-1), tau)
  return _per_token(local, mesh, in_specs, out_specs, batch_shape, *args)


def _logits_arguments(logits, targets, mesh, model_axis, batch_axis, temperature, softcap):
  """``checks.logits_arguments``, then the mesh: V must divide by the model axis."""
  logits, targets, tau = checks.logits_arguments(logits, targets, temperature, softcap)
  _check_mesh(mesh, model_axis, batch_axis, logits.shape[-1], targets.size, ("logits", "logits"))
  return logits, targets, tau


def _fused_arguments(
  hidden, unembed, targets, mesh, model_axis, batch_axis, temperature, softcap, vocab_axis
):
  """``checks.fused_arguments``, then the mesh: V must divide by the model axis."""
  args = checks.fused_arguments(hidden, unembed, targets, temperature, softcap, vocab_axis)
  v, n = args[1].shape[args[3]], args[2].size
  _check_mesh(mesh, model_axis, batch_axis, v, n, ("unembed", "hidden"))
  return args


def _fused_specs(model_axis, batch_axis, vocab_axis, tau, extra_rows=0):
  """shard_map in_specs of (h [N, D], w, targets [N], *extra [N], tau [N] | None)."""
  row = P(batch_axis)
  return (
    P(batch_axis, None),
    P(None, model_axis) if vocab_axis == 1 else P(model_axis, None),
    row,
    *([row] * extra_rows),
    None if tau is None else row,
  )


def vocab_parallel_fused_nll_loss(
  hidden: jax.Array,
  unembed: jax.Array,
  targets: jax.Array,
  mesh: Mesh,
  weights: jax.Array | None = None,
  *,
  z_loss: float = 0.0,
  model_axis: str = "model",
  batch_axis: str | None = None,
  temperature: float | jax.Array = 1.0,
  softcap: float | None = None,
  implementation: str | ops.FusedImplementation | None = None,
  vocab_axis: int = -1,
) -> jax.Array:
  """:func:`lpkernel.fused_nll_loss` with ``unembed`` sharded along V over
  ``model_axis`` (shardings as for :func:`vocab_parallel_fused_token_stats`).

  Each device writes its block of ``d unembed`` in the forward pass from the
  rows' merged statistics; ``d hidden`` is summed over the model axis by
  shard_map's transpose.
  """
  hidden, unembed, targets, vocab_axis, tau = _fused_arguments(
    hidden, unembed, targets, mesh, model_axis, batch_axis, temperature, softcap, vocab_axis
  )
  checks.check_z_loss(z_loss)
  weights = checks.loss_weights(weights, targets.shape)
  v = unembed.shape[vocab_axis]

  local = functools.partial(
    rows_fused_nll_loss,
    z_loss=z_loss,
    softcap=softcap,
    implementation=implementation,
    axis_name=model_axis,
    vocab_size=v,
    vocab_axis=vocab_axis,
  )
  in_specs = _fused_specs(model_axis, batch_axis, vocab_axis, tau, extra_rows=1)
  args = (hidden.reshape(-1, hidden.shape[-1]), unembed, targets.reshape(-1), weights, tau)
  return _summed_over_batch_shards(local, mesh, in_specs, batch_axis, *args)


def vocab_parallel_score_hidden(
  hidden: jax.Array,
  unembed: jax.Array,
  tokens: jax.Array,
  response_mask: jax.Array,
  mesh: Mesh,
  *,
  segment_ids: jax.Array | None = None,
  num_segments: int | None = None,
  model_axis: str = "model",
  batch_axis: str | None = None,
  temperature: float | jax.Array = 1.0,
  softcap: float | None = None,
  implementation: str | ops.FusedImplementation | None = None,
  vocab_axis: int = -1,
  sampling: Sampling | None = None,
) -> Scores:
  """``score_hidden`` with ``unembed`` sharded along V over ``model_axis``; under
  ``sampling`` the processed log-probabilities
  (:func:`vocab_parallel_fused_processed_token_stats`)."""
  hidden = checks.as_model_rows("hidden", hidden, "D")
  one_temperature(temperature, sampling)

  def per_token(targets):
    if sampling is not None:
      stats = vocab_parallel_fused_processed_token_stats(
        hidden,
        unembed,
        targets,
        sampling,
        mesh,
        model_axis=model_axis,
        batch_axis=batch_axis,
        softcap=softcap,
        vocab_axis=vocab_axis,
      )
      return stats.logprobs, stats.greedy, None
    stats = vocab_parallel_fused_token_stats(
      hidden,
      unembed,
      targets,
      mesh,
      model_axis=model_axis,
      batch_axis=batch_axis,
      temperature=temperature,
      softcap=softcap,
      implementation=implementation,
      vocab_axis=vocab_axis,
    )
    return stats.logprobs, stats.greedy, None

  return score_rows(
    tokens, response_mask, segment_ids, num_segments, per_token, ("hidden", hidden.shape)
  )[0]


def _processed_rows(sampling: Sampling, targets, v: int, config: ProcessedConfig, batch_axis):
  """(SamplingRows [N], K, tau_grad, its shard_map spec: rows over ``batch_axis``)."""
  rows, k, tau_grad = sampling_rows(sampling.check(), targets, v, config)
  row = P(batch_axis)
  spec = SamplingRows(None if rows.tau is None else row, row, row, row, row)  # type: ignore[arg-type]
  return rows, k, tau_grad, spec


def _processed_out(row) -> ProcessedStats:
  return ProcessedStats(row, row, row, row, row, row)


def vocab_parallel_processed_token_stats(
  logits: jax.Array,
  targets: jax.Array,
  sampling: Sampling,
  mesh: Mesh,
  *,
  model_axis: str = "model",
  batch_axis: str | None = None,
  softcap: float | None = None,
  config: ProcessedConfig = DEFAULT_CONFIG,
  implementation: str | ops.ProcessedImplementation | None = None,
) -> ProcessedStats:
  """:func:`lpkernel.processed_token_stats` for logits sharded along V over
  ``model_axis`` (shardings as for :func:`vocab_parallel_token_logprobs_and_greedy`).

  Each device finds its block's softmax partials and ``K`` largest values (by
  ``implementation``'s passes, as for :func:`lpkernel.processed_token_stats`);
  the rows' statistics are merged across the model axis and every device then
  holds the same kept-set threshold (searched, where needed, by sweeps of its
  own block reduced over the axis). The backward pass needs no collective.
  """
  logits, targets, _ = _logits_arguments(
    logits, targets, mesh, model_axis, batch_axis, 1.0, softcap
  )
  v, row = logits.shape[-1], P(batch_axis)
  rows, k, tau_grad, rows_spec = _processed_rows(sampling, targets, v, config, batch_axis)

  impl = ops.processed_implementation(implementation)

  def local(x, t, r):
    return rows_processed_token_stats(
      x, t, r, k, tau_grad, softcap=softcap, config=config, axis_name=model_axis, vocab_size=v,
      implementation=impl,
    )  # fmt: skip

  in_specs = (P(batch_axis, model_axis), row, rows_spec)
  args = (logits.reshape(-1, v), targets.reshape(-1), rows)
  return _per_token(local, mesh, in_specs, _processed_out(row), targets.shape, *args)


def vocab_parallel_fused_processed_token_stats(
  hidden: jax.Array,
  unembed: jax.Array,
  targets: jax.Array,
  sampling: Sampling,
  mesh: Mesh,
  *,
  model_axis: str = "model",
  batch_axis: str | None = None,
  softcap: float | None = None,
  vocab_axis: int = -1,
  config: ProcessedConfig = DEFAULT_CONFIG,
  implementation: str | ops.ProcessedImplementation | None = None,
) -> ProcessedStats:
  """:func:`lpkernel.fused_processed_token_stats` with ``unembed`` sharded along V
  over ``model_axis`` (shardings as for :func:`vocab_parallel_fused_token_stats`;
  ``implementation`` as there); ``d hidden`` is summed over the model axis by
  shard_map's transpose."""
  hidden, unembed, targets, vocab_axis, _ = _fused_arguments(
    hidden, unembed, targets, mesh, model_axis, batch_axis, 1.0, softcap, vocab_axis
  )
  v, row = unembed.shape[vocab_axis], P(batch_axis)
  rows, k, tau_grad, rows_spec = _processed_rows(sampling, targets, v, config, batch_axis)

  local = functools.partial(
    rows_fused_processed_token_stats,
    k=k,
    tau_grad=tau_grad,
    softcap=softcap,
    vocab_axis=vocab_axis,
    config=config,
    axis_name=model_axis,
    vocab_size=v,
    implementation=hidden_implementation(implementation),
  )

  in_specs = (*_fused_specs(model_axis, batch_axis, vocab_axis, None)[:3], rows_spec)
  args = (hidden.reshape(-1, hidden.shape[-1]), unembed, targets.reshape(-1), rows)
  return _per_token(local, mesh, in_specs, _processed_out(row), targets.shape, *args)


def vocab_parallel_replay_token_logprobs(
  logits: jax.Array,
  targets: jax.Array,
  kept_ids: jax.Array,
  mesh: Mesh,
  *,
  model_axis: str = "model",
  batch_axis: str | None = None,
  temperature: float | jax.Array = 1.0,
  softcap: float | None = None,
) -> jax.Array:
  """:func:`lpkernel.replay_token_logprobs` for logits sharded along V over
  ``model_axis`` (shardings as for :func:`vocab_parallel_token_logprobs_and_greedy`;
  ``kept_ids [..., K]`` and ``temperature`` as ``targets``): each device gathers
  the kept ids in its block, one ``psum`` of the ``[N, K]`` kept logits gives
  every device the same log-probabilities; ``d logits`` stays on its shard."""
  logits, targets, _ = _logits_arguments(
    logits, targets, mesh, model_axis, batch_axis, 1.0, softcap
  )
  tau = replay_temperature_rows(temperature, targets.shape)
  kept_ids = checked_ids(kept_ids, targets.shape)
  v, n, row = logits.shape[-1], targets.size, P(batch_axis)

  def local(x, t, ids, tau):
    return rows_replay_token_logprobs(
      x, t, ids, tau, softcap=softcap, axis_name=model_axis, vocab_size=v
    )

  in_specs = (P(batch_axis, model_axis), row, P(batch_axis, None), None if tau is None else row)
  args = (logits.reshape(n, v), targets.reshape(-1), kept_ids.reshape(n, -1), tau)
  return _per_token(local, mesh, in_specs, row, targets.shape, *args)


def vocab_parallel_fused_replay_token_logprobs(
  hidden: jax.Array,
  unembed: jax.Array,
  targets: jax.Array,
  kept_ids: jax.Array,
  mesh: Mesh,
  *,
  model_axis: str = "model",
  batch_axis: str | None = None,
  temperature: float | jax.Array = 1.0,
  softcap: float | None = None,
  vocab_axis: int = -1,
  implementation: str | ops.ProcessedImplementation | None = None,
) -> jax.Array:
  """:func:`lpkernel.fused_replay_token_logprobs` with ``unembed`` sharded along V
  over ``model_axis`` (shardings as for :func:`vocab_parallel_fused_token_stats`;
  ``kept_ids [..., K]`` and ``temperature`` as ``targets``). Each device takes
  the dot products of the kept ids in its block (by ``implementation``'s
  kernels where it has them), one ``psum`` of the ``[N, K]`` kept logits gives
  every device the same log-probabilities; ``d unembed`` stays on its shard,
  ``d hidden`` and ``d temperature`` are summed over the model axis by
  shard_map's transpose."""
  hidden, unembed, targets, vocab_axis, _ = _fused_arguments(
    hidden, unembed, targets, mesh, model_axis, batch_axis, 1.0, softcap, vocab_axis
  )
  tau = replay_temperature_rows(temperature, targets.shape)
  kept_ids = checked_ids(kept_ids, targets.shape)
  v, row = unembed.shape[vocab_axis], P(batch_axis)

  def local(h, w, t, ids, tau):
    return rows_fused_replay_token_logprobs(
      h, w, t, ids, tau, softcap=softcap, vocab_axis=vocab_axis, implementation=implementation,
      axis_name=model_axis, vocab_size=v,
    )  # fmt: skip

  in_specs = (
    *_fused_specs(model_axis, batch_axis, vocab_axis, None)[:3],
    P(batch_axis, None),
    None if tau is None else row,
  )
  n = targets.size
  args = (hidden.reshape(n, -1), unembed, targets.reshape(-1), kept_ids.reshape(n, -1), tau)
  return _per_token(local, mesh, in_specs, row, targets.shape, *args)


__all__ = [
  "vocab_parallel_fused_nll_loss",
  "vocab_parallel_fused_processed_token_stats",
  "vocab_parallel_fused_replay_token_logprobs",
  "vocab_parallel_fused_token_stats",
  "vocab_parallel_nll_loss",
  "vocab_parallel_processed_token_stats",
  "vocab_parallel_replay_token_logprobs",
  "vocab_parallel_score",
  "vocab_parallel_score_hidden",
  "vocab_parallel_token_logprobs_and_greedy",
]
