"""Fused path: token statistics from ``hidden @ unembed`` without ``[N, V]`` logits.

The public entry of the fused op. An implementation (``lpkernel.ops``) sweeps
the vocabulary to :class:`lpkernel.partials.RowPartials` and writes the
gradients from the saved row statistics; the custom VJP, the merge across
vocabulary shards, :func:`lpkernel.partials.finish` and the bad-input policy
are here, once. Residuals: the inputs and, per row, the shift, ``log(sum exp)``
and the centred ``E_p[y]``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from lpkernel import checks, ops
from lpkernel import partials as P
from lpkernel.ops import base, higher_order
from lpkernel.ops.fused import reference
from lpkernel.ops.staged import staged
from lpkernel.types import TokenStats

_F32 = jnp.float32


def _plain(impl) -> ops.XlaFused:
  """The implementation whose derivatives each rule that runs ``impl`` takes (a
  gradient of a gradient differentiates the rules; kernels have no derivative)."""
  return ops.XlaFused(precision=getattr(impl, "precision", None))


def _forward(h, w, targets, tau, softcap, impl, axis, vocab_size, vocab_axis):
  def rule(impl, h, w, targets, tau):
    offset = P.block_offset(axis, w.shape[vocab_axis])
    local = targets - offset
    partials = impl.partials(h, w, local, tau, softcap, vocab_axis)
    f = P.finish(P.combine_shards(partials, axis, offset, tau), targets, vocab_size, tau)
    stats, bads = _poisoned_stats(f, targets, tau, vocab_size)
    return stats, (h, w, local, tau, f, bads)

  return higher_order.differentiated_as(rule, impl, _plain(impl))(h, w, targets, tau)


def _poisoned_stats(f: P.Finished, targets, tau, vocab_size):
  """``TokenStats`` of finished rows with the bad-input policy applied, and the
  (bad id, bad temperature) masks. The log-sum-exp and entropy do not depend on
  the target; all depend on tau."""
  bad_id, bad_tau = P.poisoned_rows(targets, tau, vocab_size)
  stats = TokenStats(
    logprobs=jnp.where(bad_id | bad_tau, jnp.nan, f.logprob),
    lse=jnp.where(bad_tau, jnp.nan, f.lse),
    entropy=jnp.where(bad_tau, jnp.nan, f.entropy),
    greedy=f.greedy & ~(bad_id | bad_tau),
  )
  return stats, (bad_id, bad_tau)


def _live_hidden(h, live):
  """Dead rows hold anything (padding, NaN, inf): zeros keep them out of every matmul."""
  return jnp.where(live[:, None], h, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _fused(h, w, targets, tau, softcap, impl, axis, vocab_size, vocab_axis):
  return _forward(h, w, targets, tau, softcap, impl, axis, vocab_size, vocab_axis)[0]


def _fused_bwd(softcap, impl, axis, vocab_size, vocab_axis, residuals, ct: TokenStats):
  def rule(impl, residuals, g):
    h, w, local, tau, f, (bad_id, bad_tau) = residuals
    g = [c.astype(_F32) for c in g]
    if axis is not None:  # see lpkernel.ops.logprobs.api: shard_map splits a replicated cotangent
      g = [c * lax.axis_size(axis) for c in g]
    live = (g[0] != 0) | (g[1] != 0) | (g[2] != 0)
    # A poisoned value has a NaN gradient: the log-prob's for an id out of range,
    # every field's for a bad temperature.
    bads = (bad_id | bad_tau, bad_tau, bad_tau)
    g = [jnp.where(live & bad, jnp.nan, c) for c, bad in zip(g, bads, strict=True)]
    safe_h, safe_tau = _live_hidden(h, live), P.safe_tau(tau, live, bad_tau)
    dh, dw, dtau = impl.grads(safe_h, w, local, safe_tau, softcap, f, g, vocab_axis)
    if dtau is not None:
      dtau = jnp.where(live, dtau, 0.0)
    return dh.astype(h.dtype), dw, dtau

  g = (ct.logprobs, ct.lse, ct.entropy)
  dh, dw, dtau = higher_order.differentiated_as(rule, impl, _plain(impl))(residuals, g)
  return dh, dw, jnp.zeros(residuals[2].shape, jax.dtypes.float0), dtau


_fused.defvjp(_forward, _fused_bwd)
_fused = staged(_fused, (4, 5, 6, 7, 8))


def rows_fused_token_stats(
  h: jax.Array,
  w: jax.Array,
  targets: jax.Array,
  tau: jax.Array | None,
  *,
  softcap: float | None = None,
  implementation: str | ops.FusedImplementation | None = None,
  axis_name: str | None = None,
  vocab_size: int | None = None,
  vocab_axis: int = -1,
) -> TokenStats:
  """The per-shard building block: ``TokenStats`` of ``h [N, D] @ w [D, Vb]``.

  Args:
    h: float[N, D] hidden states.
    w: float[D, Vb] (or ``[Vb, D]`` with ``vocab_axis=0``): the whole
      unembedding, or (inside ``shard_map`` with ``axis_name``) this device's
      block of the vocabulary.
    targets: int32[N] global ids.
    tau: float32[N] temperatures, or None.
    implementation: as for :func:`fused_token_stats`.
    axis_name: the mesh axis over which the columns are split, or None.
    vocab_size: the global V (default ``w``'s vocabulary axis).
    vocab_axis: ``w``'s vocabulary axis: -1 / 1 for ``[D, V]``, 0 / -2 for a
      tied embedding table ``[V, D]`` (read as stored, never transposed).
  """
  vocab_axis = checks.vocab_axis(vocab_axis)
  impl = _implementation(implementation, h, w, vocab_axis)
  if h.shape[0] == 0:  # no rows, nothing to compute (and no kernel over a grid of 0 programs)
    empty = jnp.zeros((0,), _F32)
    return TokenStats(empty, empty, empty, jnp.zeros((0,), bool))
  v = w.shape[vocab_axis] if vocab_size is None else vocab_size
  return _fused(h, w, targets, tau, softcap, impl, axis_name, v, vocab_axis)


def _implementation(implementation, h, w, vocab_axis: int) -> ops.FusedImplementation:
  """The implementation for ``h @ w``: a name (or None) configured for its shape and
  dtype (:func:`lpkernel.ops.fused_implementation`)."""
  like = ((h.shape[0], h.shape[1], w.shape[vocab_axis]), h.dtype)
  impl: ops.FusedImplementation = ops.fused_implementation(implementation, like)
  if getattr(impl, "precision", "") is None:  # the caller's matmul precision, captured here
    precision = jax.config.jax_default_matmul_precision  # type: ignore[attr-defined]
    impl = dataclasses.replace(impl, precision=precision)  # type: ignore[type-var]
  return impl


def _reference_stats(h, unembed, targets, tau, softcap, vocab_axis) -> TokenStats:
  """``TokenStats`` of the materialised reference (a ``[V, D]`` table transposed)."""

  w = unembed if vocab_axis == 1 else unembed.T
  return reference.fused_token_stats(h, w, targets, tau, softcap)


def fused_token_stats(
  hidden: jax.Array,
  unembed: jax.Array,
  targets: jax.Array,
  *,
  temperature: float | jax.Array = 1.0,
  softcap: float | None = None,
  implementation: str | ops.FusedImplementation | None = None,
  vocab_axis: int = -1,
) -> TokenStats:
  """Log-probability, log-sum-exp, entropy and greedy flag of each target, in one sweep.

  Args:
    hidden: float[..., D] final hidden states (float32, bfloat16 or float16).
    unembed: float[D, V] unembedding matrix, same dtype as ``hidden``; or a
      tied embedding table float[V, D] as stored, with ``vocab_axis=0``.
    targets: int[...] ids in ``[0, V)`` (NaN outside, as for ``token_logprobs``).
    temperature: a finite positive Python number or an array broadcastable to
      ``targets``.
    softcap: None or a finite ``c > 0``: logits become ``c * tanh(logits / c)``.
    implementation: None (the measured best for this backend), a name
      (``"xla"``, ``"reference"``) or an object from ``lpkernel.ops``
      (e.g. ``XlaFused(FusedConfig(vocab_block=512))``).
    vocab_axis: ``unembed``'s vocabulary axis: -1 for ``[D, V]``, 0 for a
      tied table ``[V, D]`` (no transposed copy is made; its gradient is
      ``[V, D]`` too).

  Returns:
    ``TokenStats`` of float32 ``[...]`` arrays (``greedy`` bool); gradients flow
    to ``hidden``, ``unembed`` and an array ``temperature`` from every field.

  Example:
    >>> import jax.numpy as jnp, lpkernel as lpk
    >>> h, w = jnp.ones((2, 4)), jnp.zeros((4, 8))        # uniform over 8 tokens
    >>> lpk.fused_token_stats(h, w, jnp.array([0, 7])).entropy
    Array([2.0794415, 2.0794415], dtype=float32)
  """
  hidden, unembed, targets, vocab_axis, tau = checks.fused_arguments(
    hidden, unembed, targets, temperature, softcap, vocab_axis
  )
  batch_shape = targets.shape
  h = hidden.reshape(-1, hidden.shape[-1])
  if ops.is_reference(implementation):
    stats = _reference_stats(h, unembed, targets.reshape(-1), tau, softcap, vocab_axis)
  else:
    stats = rows_fused_token_stats(
      h,
      unembed,
      targets.reshape(-1),
      tau,
      softcap=softcap,
      implementation=implementation,
      vocab_axis=vocab_axis,
    )
  return jax.tree.map(lambda x: x.reshape(batch_shape), stats)


def fused_token_logprobs(
  hidden: jax.Array,
  unembed: jax.Array,
  targets: jax.Array,
  *,
  temperature: float | jax.Array = 1.0,
  softcap: float | None = None,
  implementation: str | ops.FusedImplementation | None = None,
  vocab_axis: int = -1,
) -> jax.Array:
  """``log_softmax(hidden @ unembed)[..., target]`` without the ``[N, V]`` logits.

  Same arguments as :func:`fused_token_stats`; returns float32 ``[...]``.

  Example:
    >>> import jax.numpy as jnp, lpkernel as lpk
    >>> h, w = jnp.ones((2, 4)), jnp.zeros((4, 8))        # uniform over 8 tokens
    >>> lpk.fused_token_logprobs(h, w, jnp.array([0, 7]))
    Array([-2.0794415, -2.0794415], dtype=float32)
  """
  return fused_token_stats(
    hidden,
    unembed,
    targets,
    temperature=temperature,
    softcap=softcap,
    implementation=implementation,
    vocab_axis=vocab_axis,
  ).logprobs


# --- the training loss: gradients written in the forward pass ----------------


def _loss_inputs(h, w, targets, tau, weights, z_loss, axis, vocab_size, vocab_axis):
  """(``LossRows``, safe h, safe tau) of the loss on this shard: dead rows' h is 0."""
  args = (targets, tau, weights, z_loss, vocab_size, axis, w.shape[vocab_axis])
  rows, safe_tau = P.nll_inputs(*args)
  return rows, _live_hidden(h, weights != 0), safe_tau


def _nll_value(h, w, targets, tau, weights, z_loss, softcap, impl, axis, vocab_size, vocab_axis):
  """The loss without gradients: one forward sweep."""
  args = (h, w, targets, tau, weights, z_loss, axis, vocab_size, vocab_axis)
  rows, safe_h, safe_tau = _loss_inputs(*args)
  p = impl.partials(safe_h, w, rows.targets, safe_tau, softcap, vocab_axis)
  return jnp.sum(rows.cotangents(p, 0, h.shape[0])[2])


def _nll_fwd(h, w, targets, tau, weights, z_loss, softcap, impl, axis, vocab_size, vocab_axis):
  def rule(impl, h, w, targets, tau, weights):
    args = (h, w, targets, tau, weights, z_loss, axis, vocab_size, vocab_axis)
    rows, safe_h, safe_tau = _loss_inputs(*args)
    n = h.shape[0]
    one_pass = None
    if isinstance(impl, base.FusedLossGrads):
      out_init = jnp.zeros((n,), _F32)
      one_pass = impl.loss_grads(safe_h, w, safe_tau, softcap, rows, out_init, vocab_axis)
    if one_pass is None:  # the forward sweep, then the backward sweep from its statistics
      p = impl.partials(safe_h, w, rows.targets, safe_tau, softcap, vocab_axis)
      f, g, terms = rows.cotangents(p, 0, n)
      dh, dw, dtau = impl.grads(safe_h, w, rows.targets, safe_tau, softcap, f, g, vocab_axis)
    else:
      terms, dh, dw, dtau = one_pass
    if dtau is not None:
      dtau = jnp.where(weights != 0, dtau, 0.0)
    return jnp.sum(terms), dh.astype(h.dtype), dw, dtau

  plain = _plain(impl)
  loss, *grads = higher_order.differentiated_as(rule, impl, plain)(h, w, targets, tau, weights)
  return loss, (*grads, weights)


def _nll_bwd(z_loss, softcap, impl, axis, vocab_size, vocab_axis, residuals, ct):
  dh, dw, dtau, weights = residuals
  if axis is not None:  # see lpkernel.ops.logprobs.api: shard_map splits a replicated cotangent
    ct = ct * lax.axis_size(axis)

  def scale(x):
    return None if x is None else (x.astype(_F32) * ct).astype(x.dtype)

  return (
    scale(dh),
    scale(dw),
    jnp.zeros(weights.shape, jax.dtypes.float0),
    scale(dtau),
    jnp.zeros_like(weights),
  )


_nll = jax.custom_vjp(_nll_value, nondiff_argnums=(5, 6, 7, 8, 9, 10))
_nll.defvjp(_nll_fwd, _nll_bwd)
_nll = staged(_nll, (5, 6, 7, 8, 9, 10))


def rows_fused_nll_loss(
  h: jax.Array,
  w: jax.Array,
  targets: jax.Array,
  weights: jax.Array,
  tau: jax.Array | None,
  *,
  z_loss: float = 0.0,
  softcap: float | None = None,
  implementation: str | ops.FusedImplementation | None = None,
  axis_name: str | None = None,
  vocab_size: int | None = None,
  vocab_axis: int = -1,
) -> jax.Array:
  """The per-shard building block of :func:`fused_nll_loss` on rows ``h [N, D]``.

  Args:
    weights: float32[N] (constants: differentiating w.r.t. them raises).
    Others as for :func:`rows_fused_token_stats`.
  """
  vocab_axis = checks.vocab_axis(vocab_axis)
  impl = _implementation(implementation, h, w, vocab_axis)
  v = w.shape[vocab_axis] if vocab_size is None else vocab_size
  weights = checks.constant_weights(weights)
  if h.shape[0] == 0:  # no rows: a loss of 0 (no kernel over a grid of 0 programs)
    return jnp.zeros((), _F32)
  return _nll(h, w, targets, tau, weights, float(z_loss), softcap, impl, axis_name, v, vocab_axis)


def fused_nll_loss(
  hidden: jax.Array,
  unembed: jax.Array,
  targets: jax.Array,
  weights: jax.Array | None = None,
  *,
  z_loss: float = 0.0,
  temperature: float | jax.Array = 1.0,
  softcap: float | None = None,
  implementation: str | ops.FusedImplementation | None = None,
  vocab_axis: int = -1,
) -> jax.Array:
  """The training loss ``sum_n w_n * (z_loss * lse_n ** 2 - log Pr(target_n))`` from hidden states.

  Its cotangents are known as soon as each row's statistics are, so under
  ``jax.grad`` the forward pass writes the gradients while the logits are at
  hand (where the implementation measures faster that way, e.g. three matmuls
  instead of four on token chunks) and the backward pass only scales them.
  Without differentiation it is one forward sweep.

  Args:
    hidden, unembed, targets, temperature, softcap, implementation, vocab_axis:
      as for :func:`fused_token_stats`.
    weights: float or bool ``[...]`` broadcastable to ``targets`` (e.g. a
      response mask divided by its token count), or None for 1 everywhere.
      Tokens of weight 0 contribute exactly 0 to the loss and the gradients,
      whatever they hold. Weights are constants: differentiating w.r.t.
      them raises ``TypeError`` (never a silent zero gradient).
    z_loss: the weight of the squared log-sum-exp (PaLM's z-loss, 1e-4 there).

  Returns:
    float32 scalar; ``+inf`` if a weighted target is impossible (``-inf`` logit),
    NaN if a weighted target id is outside ``[0, V)``; gradients flow to
    ``hidden``, ``unembed`` and an array ``temperature``.

  Example:
    >>> import jax.numpy as jnp, lpkernel as lpk
    >>> h, w = jnp.ones((2, 4)), jnp.zeros((4, 8))        # uniform over 8 tokens
    >>> lpk.fused_nll_loss(h, w, jnp.array([0, 7]), jnp.array([0.5, 0.5]))  # log 8
    Array(2.0794415, dtype=float32)
  """
  hidden, unembed, targets, vocab_axis, tau = checks.fused_arguments(
    hidden, unembed, targets, temperature, softcap, vocab_axis
  )
  checks.check_z_loss(z_loss)
  weights = checks.loss_weights(weights, targets.shape)
  h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
  if ops.is_reference(implementation):
    stats = _reference_stats(h, unembed, t, tau, softcap, vocab_axis)
    return reference.nll_loss(stats, checks.constant_weights(weights), z_loss)
  return rows_fused_nll_loss(
    h,
    unembed,
    t,
    weights,
    tau,
    z_loss=z_loss,
    softcap=softcap,
    implementation=implementation,
    vocab_axis=vocab_axis,
  )
