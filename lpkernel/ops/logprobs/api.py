"""Aligned log-softmax gather: ``logits[..., target] - logsumexp(logits[...])``.

The public entry of the logits op. An implementation (``lpkernel.ops``) reduces
blocks of each row to :class:`lpkernel.partials.RowPartials` and writes the
logits' gradient from the saved row statistics; everything else is here, once:
the custom VJP (residuals: the inputs, each row's shift and ``log(sum exp)``),
the merge across vocabulary shards, :func:`lpkernel.partials.finish`, and the
bad-input policy (NaN values *and* NaN gradients for out-of-range ids and bad
temperatures; exact zeros on dead rows whatever they hold).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lpkernel import checks, ops
from lpkernel import partials as P
from lpkernel.ops import base, higher_order
from lpkernel.ops.logprobs import reference, xla
from lpkernel.ops.staged import staged

_F32 = jnp.float32


# Each rule that runs the implementation is differentiated as the XLA one's (a
# gradient of a gradient differentiates the rules; kernels have no derivative).
_PLAIN = xla.XlaLogits()


def _implementation(implementation, x) -> ops.LogitsImplementation:
  """The implementation for logits rows ``x``: a name (or None) configured for
  their shape and dtype (:func:`lpkernel.ops.logits_implementation`)."""
  return ops.logits_implementation(implementation, (x.shape, x.dtype))


def _forward(x, targets, tau, softcap, impl, axis, vocab_size):
  def rule(impl, x, targets, tau):
    offset = P.block_offset(axis, x.shape[1])
    local = targets - offset
    p = P.combine_shards(impl.partials(x, local, tau, softcap), axis, offset, tau)
    f = P.finish(p, targets, vocab_size, tau)
    bad_id, bad_tau = P.poisoned_rows(targets, tau, vocab_size)
    bad = bad_id | bad_tau
    logprob = jnp.where(bad, jnp.nan, f.logprob)
    return (logprob, f.greedy & ~bad), (x, local, tau, f.shift, f.log_s, bad)

  return higher_order.differentiated_as(rule, impl, _PLAIN)(x, targets, tau)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _logprobs(x, targets, tau, softcap, impl, axis, vocab_size):
  return _forward(x, targets, tau, softcap, impl, axis, vocab_size)[0]


def _logprobs_bwd(softcap, impl, axis, vocab_size, residuals, cotangents):
  def rule(impl, residuals, g):
    x, local, tau, shift, log_s, bad = residuals
    g = g.astype(_F32)
    if axis is not None:
      # shard_map hands each device 1 / (axis size) of a replicated output's
      # cotangent and sums the unmapped inputs' cotangents (temperature) itself.
      g = g * lax.axis_size(axis)
    live = g != 0  # dead rows stay exactly zero, even over NaN or inf logits
    g = jnp.where(live & bad, jnp.nan, g)  # a poisoned value has a NaN gradient
    safe_tau = P.safe_tau(tau, live, bad)
    dx, dtau = _grads(impl, x, local, safe_tau, softcap, shift, log_s, g)
    return dx, None if dtau is None else jnp.where(live, dtau, 0.0)

  dx, dtau = higher_order.differentiated_as(rule, impl, _PLAIN)(residuals, cotangents[0])
  return dx, jnp.zeros(residuals[1].shape, jax.dtypes.float0), dtau


_logprobs.defvjp(_forward, _logprobs_bwd)
_logprobs = staged(_logprobs, (3, 4, 5, 6))


def _grads(impl, x, local, tau, softcap, shift, log_s, g, g_lse=None, mass=None):
  """(d x in x's dtype, d tau float32[N] or None): this block's gradients of
  ``g * lp + g_lse * lse`` (``tau`` safe; ``mass`` as for :func:`_grad_tau`).

  An implementation whose gradient kernel also sums each row's ``d tau``
  (``grad_logits_and_tau``: the Pallas ones) does both in one pass over
  ``x``; otherwise ``d tau`` takes :func:`_grad_tau`'s pass.
  """
  if tau is not None:
    # The gradient's [N, V] broadcast of tau is its own: XLA:CPU merged it with
    # the forward's (the loss's one pass) and stored it, a float32 copy of
    # bfloat16 logits (nll_loss at temperature 0.7: 315 -> 200 ms, V = 32000).
    tau = lax.optimization_barrier(tau)
  with jax.named_scope("dlogits"):
    if tau is not None and isinstance(impl, base.GradLogitsAndTau):
      return impl.grad_logits_and_tau(x, local, tau, softcap, shift, log_s, g, g_lse)
    dx = impl.grad_logits(x, local, tau, softcap, shift, log_s, g, g_lse)
  if tau is None:
    return dx, None
  return dx, _grad_tau(impl, x, local, tau, softcap, shift, log_s, g, g_lse, mass)


def _grad_tau(impl, x, local, tau, softcap, shift, log_s, g, g_lse=None, mass=None):
  """float32[N]: this block's part of d/d tau of ``g * lp + g_lse * lse`` (``tau`` safe).

  ``y = z / tau``, so ``d lse / d tau = -E_p[y] / tau`` and
  ``d lp / d tau = (E_p[y] - y_t) / tau``, each centred on the row's shift to
  keep its precision (``y - shift / tau = (z - shift) / tau``). On a
  vocabulary block the sums run over its columns and the parts add up over the
  blocks: ``mass`` is the block's share of the softmax (the lse term's shift
  weighs that much here); the lp term's shift parts cancel over the blocks.
  """
  with jax.named_scope("dtemperature"):
    centred = impl.centred_expected_y(x, tau, softcap, shift, log_s)
    # An impossible target's centred y is a constant (-inf): d lp / d tau =
    # E_p[y - shift / tau] / tau, as for P.grad_tau; the shift's parts cancel.
    t = P.centred_y(xla.target_z(x, local, softcap), shift, tau)
    d = jnp.where(g != 0, g * (centred - t), 0.0)
    if g_lse is not None:
      # A row with no mass (all -inf, lse = -inf) has nothing that moves with tau.
      live_lse = (g_lse != 0) & (log_s != -jnp.inf)
      d = d - jnp.where(live_lse, g_lse * (centred + P.lse_shift(mass, shift, tau)), 0.0)
    return d / tau


def rows_logprobs_and_greedy(
  x: jax.Array,
  targets: jax.Array,
  tau: jax.Array | None,
  *,
  softcap: float | None = None,
  implementation: str | ops.LogitsImplementation | None = None,
  axis_name: str | None = None,
  vocab_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The per-shard building block: log-probabilities of ``[N, V]`` rows.

  Args:
    x: float[N, Vb] logits: whole rows, or (inside ``shard_map`` with
      ``axis_name``) this device's block of columns.
    targets: int32[N] global ids.
    tau: float32[N] temperatures, or None.
    softcap: None or ``c > 0``.
    implementation: as for :func:`token_logprobs`.
    axis_name: the mesh axis over which the columns are split, or None.
    vocab_size: the global V (default ``x.shape[1]``).

  Returns:
    (float32[N] log-probabilities, bool[N] first-argmax greedy flags).
  """
  impl = _implementation(implementation, x)
  if x.shape[0] == 0:  # no rows, nothing to compute (and no kernel over a grid of 0 programs)
    return jnp.zeros((0,), _F32), jnp.zeros((0,), bool)
  v = x.shape[1] if vocab_size is None else vocab_size
  return _logprobs(x, targets, tau, softcap, impl, axis_name, v)


def token_logprobs_and_greedy(
  logits: jax.Array,
  targets: jax.Array,
  *,
  temperature: float | jax.Array = 1.0,
  softcap: float | None = None,
  implementation: str | ops.LogitsImplementation | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Like :func:`token_logprobs`, also returning whether each target is greedy.

  Returns:
    (float32[...] log-probabilities, bool[...] the target is the *first*
    argmax of its transformed logits row; False where the value is NaN).
  """
  logits, targets, tau = checks.logits_arguments(logits, targets, temperature, softcap)
  batch_shape, v = targets.shape, logits.shape[-1]
  if ops.is_reference(implementation):
    return reference.token_logprobs_and_greedy(
      logits, targets, temperature=1.0 if tau is None else tau.reshape(batch_shape), softcap=softcap
    )
  lp, greedy = rows_logprobs_and_greedy(
    logits.reshape(-1, v), targets.reshape(-1), tau, softcap=softcap, implementation=implementation
  )
  return lp.reshape(batch_shape), greedy.reshape(batch_shape)


def token_logprobs(
  logits: jax.Array,
  targets: jax.Array,
  *,
  temperature: float | jax.Array = 1.0,
  softcap: float | None = None,
  implementation: str | ops.LogitsImplementation | None = None,
) -> jax.Array:
  r"""Log-probability of each target under the softmax of its logits row.

  .. math::
    \log p_i = (y_{i, t_i} - m_i) - \log \sum_j e^{y_{i, j} - m_i},\qquad
    y = \mathrm{softcap}(\text{logits}) / \text{temperature},\ m_i = \max_j y_{i,j}

  Only the normaliser is reduced over the vocabulary; the target's logit is
  gathered, so no ``[..., V]`` log-softmax is formed. The custom VJP saves each
  row's max and ``log(sum exp)`` and recomputes the softmax backwards.

  Args:
    logits: float[..., V] in float32, bfloat16 or float16.
    targets: int[...] ids in ``[0, V)``. An id outside that range (negative
      included, which never wraps; 64-bit ids are range-checked before any
      cast) gives NaN, and a NaN gradient where it is used.
    temperature: a finite positive Python number, or an array broadcastable to
      ``targets`` (differentiable); a non-finite or non-positive entry gives NaN
      at its position.
    softcap: None, or a finite ``c > 0`` to apply ``c * tanh(logits / c)``
      first (a ``-inf`` logit stays ``-inf``).
    implementation: None (the measured best for this backend), a name
      (``"xla"``, ``"pallas_gpu"``, ``"pallas_tpu"``, ``"reference"``) or an
      implementation object from ``lpkernel.ops`` (with its tiling).

  Returns:
    float32[...] log-probabilities; ``-inf`` where the target's logit is
    ``-inf``; NaN if the row holds NaN anywhere.

  Raises:
    TypeError / ValueError: on mismatched shapes or dtypes, a bad softcap or
    Python temperature, or an implementation that cannot run on this backend.

  Example:
    >>> import jax.numpy as jnp, lpkernel as lpk
    >>> lp = lpk.token_logprobs(jnp.log(jnp.array([[0.25, 0.75]])), jnp.array([1]))
    >>> round(float(lp[0]), 6)  # log(0.75)
    -0.287682
  """
  return token_logprobs_and_greedy(
    logits, targets, temperature=temperature, softcap=softcap, implementation=implementation
  )[0]


# --- the training loss: gradients written in the forward pass ----------------


def _nll_value(x, targets, tau, weights, z_loss, softcap, impl, axis, vocab_size):
  """The loss without gradients: one forward pass."""
  rows, safe_tau = P.nll_inputs(targets, tau, weights, z_loss, vocab_size, axis, x.shape[1])
  p = impl.partials(x, rows.targets, safe_tau, softcap)
  return jnp.sum(rows.cotangents(p, 0, x.shape[0])[2])


def _nll_fwd(x, targets, tau, weights, z_loss, softcap, impl, axis, vocab_size):
  def rule(impl, x, targets, tau, weights):
    rows, safe_tau = P.nll_inputs(targets, tau, weights, z_loss, vocab_size, axis, x.shape[1])
    one_pass = None
    if isinstance(impl, base.LogitsLossGrads):
      one_pass = impl.loss_grads(x, safe_tau, softcap, rows)
    if one_pass is not None:
      terms, dx, dtau = one_pass
      return jnp.sum(terms), dx, dtau
    # The forward pass, then d logits from its statistics.
    p = impl.partials(x, rows.targets, safe_tau, softcap)
    f, (g_lp, g_lse, _), terms = rows.cotangents(p, 0, x.shape[0])
    mass = None  # d tau's: this block's share of the softmax mass (1 without shards)
    if tau is not None:
      share = jnp.exp(P.scaled(P.shift_of(p.m) - f.shift, safe_tau) - f.log_s)
      mass = jnp.where(p.s > 0, p.s * share, 0.0)
    args = (x, rows.targets, safe_tau, softcap, f.shift, f.log_s, g_lp, g_lse, mass)
    dx, dtau = _grads(impl, *args)
    return jnp.sum(terms), dx, None if dtau is None else jnp.where(weights != 0, dtau, 0.0)

  loss, dx, dtau = higher_order.differentiated_as(rule, impl, _PLAIN)(x, targets, tau, weights)
  return loss, (dx, dtau, weights)


def _nll_bwd(z_loss, softcap, impl, axis, vocab_size, residuals, ct):
  dx, dtau, weights = residuals
  if axis is not None:  # see _logprobs_bwd: shard_map splits a replicated cotangent
    ct = ct * lax.axis_size(axis)
  # A constant cotangent (jax.grad of the loss itself: 1) folds away, leaving d
  # logits as the forward pass wrote it. (A lax.cond on ct == 1 would not help:
  # XLA copies an operand returned by a branch.)
  dx = (dx.astype(_F32) * ct).astype(dx.dtype)
  return (
    dx,
    jnp.zeros(weights.shape, jax.dtypes.float0),
    None if dtau is None else dtau * ct,
    jnp.zeros_like(weights),
  )


_nll = jax.custom_vjp(_nll_value, nondiff_argnums=(4, 5, 6, 7, 8))
_nll.defvjp(_nll_fwd, _nll_bwd)
_nll = staged(_nll, (4, 5, 6, 7, 8))


def rows_nll_loss(
  x: jax.Array,
  targets: jax.Array,
  weights: jax.Array,
  tau: jax.Array | None,
  *,
  z_loss: float = 0.0,
  softcap: float | None = None,
  implementation: str | ops.LogitsImplementation | None = None,
  axis_name: str | None = None,
  vocab_size: int | None = None,
) -> jax.Array:
  """The per-shard building block of :func:`nll_loss` on rows ``x [N, Vb]``.

  Args:
    x: float[N, Vb] logits: whole rows, or (inside ``shard_map`` with
      ``axis_name``) this device's block of columns.
    targets: int32[N] global ids; ``weights``: float32[N] (constants:
      differentiating w.r.t. them raises); ``tau``: float32[N] temperatures or None.
    axis_name, vocab_size: as for :func:`rows_logprobs_and_greedy`.
  """
  impl = _implementation(implementation, x)
  v = x.shape[1] if vocab_size is None else vocab_size
  weights = checks.constant_weights(weights)
  if x.shape[0] == 0:  # no rows: a loss of 0 (no kernel over a grid of 0 programs)
    return jnp.zeros((), _F32)
  return _nll(x, targets, tau, weights, float(z_loss), softcap, impl, axis_name, v)


def nll_loss(
  logits: jax.Array,
  targets: jax.Array,
  weights: jax.Array | None = None,
  *,
  z_loss: float = 0.0,
  temperature: float | jax.Array = 1.0,
  softcap: float | None = None,
  implementation: str | ops.LogitsImplementation | None = None,
) -> jax.Array:
  """The training loss ``sum_n w_n * (z_loss * lse_n ** 2 - log Pr(target_n))`` from logits.

  Its cotangents are known as soon as each row's statistics are, so under
  ``jax.grad`` the forward pass writes ``d logits`` (with
  ``PallasGpuLogits(loss_kernel=True)`` in the kernel that reads the row, the
  second read mostly from L2) and the backward
  pass hands it on, scaled only if the loss's cotangent is not 1. Without
  differentiation it is one forward pass.

  Args:
    logits, targets, temperature, softcap, implementation: as for
      :func:`token_logprobs`.
    weights: float or bool ``[...]`` broadcastable to ``targets`` (e.g. a
      response mask divided by its token count), or None for 1 everywhere.
      Tokens of weight 0 contribute exactly 0 to the loss and the gradients,
      whatever their logits hold. Weights are constants: differentiating
      w.r.t. them raises ``TypeError`` (never a silent zero gradient).
    z_loss: the weight of the squared log-sum-exp (PaLM's z-loss, 1e-4 there).

  Returns:
    float32 scalar; ``+inf`` if a weighted target is impossible (``-inf``
    logit), NaN if a weighted target id is outside ``[0, V)``, its
    temperature is bad or its row holds NaN; gradients flow to ``logits`` and
    an array ``temperature``.

  Example:
    >>> import jax.numpy as jnp, lpkernel as lpk
    >>> logits = jnp.zeros((2, 8))                       # uniform over 8 tokens
    >>> lpk.nll_loss(logits, jnp.array([0, 7]), jnp.array([0.5, 0.5]))  # log 8
    Array(2.0794415, dtype=float32)
  """
  logits, targets, tau = checks.logits_arguments(logits, targets, temperature, softcap)
  checks.check_z_loss(z_loss)
  weights = checks.loss_weights(weights, targets.shape)
  x, t = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
  if ops.is_reference(implementation):
    stats = reference.logits_stats(x, t, tau, softcap)
    return reference.nll_loss(stats, checks.constant_weights(weights), z_loss)
  return rows_nll_loss(
    x, t, weights, tau, z_loss=z_loss, softcap=softcap, implementation=implementation
  )
