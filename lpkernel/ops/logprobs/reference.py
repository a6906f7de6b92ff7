"""The logits op's plain definition, in straightforward ``jnp``: the yardstick
every logits implementation is held to (values and gradients by autodiff,
special values included); ``implementation="reference"`` runs it.

It materialises full float32 ``[..., V]`` temporaries on purpose; never use it
for speed. (The benchmarks' ``plain`` baseline is the literal
``jax.nn.log_softmax`` + gather.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lpkernel import partials as P
from lpkernel.checks import poison
from lpkernel.types import TokenStats

_F32 = jnp.float32


class _Rows(NamedTuple):
  """Logits rows ``[..., V]`` under ``y = softcap(logits) / temperature``, all float32.

  Attributes:
    z: the capped logits ``softcap(logits)`` (``-inf`` where the logit is).
    shift: each row's max ``z`` when finite, else 0; constant under differentiation.
    y_c: ``(z - shift) / temperature``: ``y`` less the row's constant
      ``shift / temperature``, scaled only after the shift, so that it cannot
      overflow where ``y`` itself would (bfloat16 logits near the format's
      maximum at a temperature below 1).
    log_s: ``log(sum exp(y_c))``: ``-inf`` for a row of ``-inf``, ``+inf`` for
      a row holding ``+inf``.
    scaled_shift: ``shift / temperature`` (``lse = scaled_shift + log_s``).
    bad_tau: bool, the temperature is not finite and positive.
  """

  z: jax.Array
  shift: jax.Array
  y_c: jax.Array
  log_s: jax.Array
  scaled_shift: jax.Array
  bad_tau: jax.Array


def _rows(logits, temperature, softcap) -> _Rows:
  """The rows' :class:`_Rows`. A ``-inf`` logit is impossible under every option:
  its ``y`` is ``-inf``, a constant through which no derivative passes (neither
  to the logit nor to the temperature)."""
  x = logits.astype(_F32)
  impossible = x == -jnp.inf
  x = jnp.where(impossible, 0.0, x)  # and again below: no 0 * inf in any derivative
  if softcap is not None:
    x = softcap * P.monotone_tanh(x / softcap)
  z = jnp.where(impossible, -jnp.inf, x)
  m = jnp.max(z, axis=-1)
  shift = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  tau = jnp.asarray(temperature, _F32)
  gap = x - shift[..., None]
  # A gap past float32 (-M - M) has no mass: a constant -inf as an impossible logit.
  none = impossible | (gap == -jnp.inf)
  y_c = jnp.where(none, -jnp.inf, jnp.where(none, 0.0, gap) / tau[..., None])
  log_s = jnp.log(jnp.sum(jnp.exp(y_c), axis=-1))
  return _Rows(z, shift, y_c, log_s, shift / tau, ~(jnp.isfinite(tau) & (tau > 0)))


def _dead_rows_get_no_gradient(rows: Callable, x: jax.Array, tau: jax.Array):
  """``rows(x, tau)``: a tuple of float32 ``[...]`` results of logits rows ``x [..., V]``,
  differentiated by autodiff, except that a row none of whose results receives
  a cotangent gets exactly zero derivatives, whatever it holds.

  The policy's rule for masked positions (their NaN or ``inf`` never reaches a
  gradient); autodiff alone would multiply the zero cotangent by the row's NaN
  softmax.
  """

  @jax.custom_vjp
  def guarded(x, tau):
    return rows(x, tau)

  def fwd(x, tau):
    return rows(x, tau), (x, tau)

  def bwd(residuals, cotangents):
    x, tau = residuals
    dx, dtau = jax.vjp(rows, x, tau)[1](cotangents)
    live = functools.reduce(jnp.logical_or, [c != 0 for c in cotangents])
    return jnp.where(live[..., None], dx, 0.0), jnp.where(live, dtau, 0.0)

  guarded.defvjp(fwd, bwd)
  return guarded(x, tau)


def token_logprobs_and_greedy(
  logits: jax.Array,
  targets: jax.Array,
  *,
  temperature: float | jax.Array = 1.0,
  softcap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
  """``log_softmax(softcap(logits) / temperature)[target]`` and first-argmax flags.

  Computed as ``(y_t - shift) - log(sum exp(y - shift))``: an impossible
  (``-inf``) target gives ``-inf`` (also in a row of ``-inf``, whose softmax
  has no mass), a row holding ``+inf`` gives ``-inf`` at its finite targets
  and NaN at its ``+inf`` ones, NaN anywhere in a row gives NaN; ids outside
  ``[0, V)`` and temperatures that are not finite and positive give NaN, with
  a NaN gradient. An impossible target is never greedy. A row whose value
  receives no cotangent (a masked position) gets a zero gradient.
  """
  v = logits.shape[-1]
  tau = jnp.broadcast_to(jnp.asarray(temperature, _F32), targets.shape)

  def logprobs(x, tau):
    r = _rows(x, tau, softcap)
    in_range = (targets >= 0) & (targets < v) & ~r.bad_tau
    safe = jnp.where(in_range, targets, 0)[..., None]
    target_y_c = jnp.take_along_axis(r.y_c, safe, axis=-1)[..., 0]
    # A row with no mass adds nothing to its -inf target (-inf - -inf would be NaN).
    lp = target_y_c - jnp.where(r.log_s == -jnp.inf, 0.0, r.log_s)
    return (poison(lp, ~in_range),)

  (lp,) = _dead_rows_get_no_gradient(logprobs, logits, tau)
  r = _rows(logits, tau, softcap)
  in_range = (targets >= 0) & (targets < v) & ~r.bad_tau
  target_z = jnp.take_along_axis(r.z, jnp.where(in_range, targets, 0)[..., None], axis=-1)[..., 0]
  # The first argmax of the capped row: a temperature never changes the greedy token.
  greedy = in_range & (jnp.argmax(r.z, axis=-1) == targets) & (target_z > -jnp.inf)
  return lp, greedy & ~jnp.isnan(lp)


def token_logprobs(
  logits: jax.Array,
  targets: jax.Array,
  *,
  temperature: float | jax.Array = 1.0,
  softcap: float | None = None,
) -> jax.Array:
  """``log_softmax(softcap(logits) / temperature)[target]``; NaN for ids outside [0, V)."""
  return token_logprobs_and_greedy(logits, targets, temperature=temperature, softcap=softcap)[0]


def logits_stats(logits, targets, tau=None, softcap=None):
  """``TokenStats`` (log-prob, log-sum-exp, entropy, greedy) of logits rows ``[..., V]``."""
  temperature = jnp.broadcast_to(jnp.asarray(1.0 if tau is None else tau, _F32), targets.shape)
  lp, greedy = token_logprobs_and_greedy(logits, targets, temperature=temperature, softcap=softcap)

  def lse_and_entropy(x, tau):
    r = _rows(x, tau, softcap)
    log_p = r.y_c - jnp.where(r.log_s == -jnp.inf, 0.0, r.log_s)[..., None]
    p = jnp.exp(log_p)
    # 0 * log 0 is 0, in the value and in the derivative.
    entropy = -jnp.sum(p * jnp.where(p > 0, log_p, 0.0), axis=-1)
    return poison(r.scaled_shift + r.log_s, r.bad_tau), poison(entropy, r.bad_tau)

  lse, entropy = _dead_rows_get_no_gradient(lse_and_entropy, logits, temperature)
  return TokenStats(logprobs=lp, lse=lse, entropy=entropy, greedy=greedy)


def nll_loss(stats, weights: jax.Array, z_loss: float = 0.0) -> jax.Array:
  """``sum_n w_n * (z_loss * lse_n ** 2 - lp_n)`` over ``TokenStats``; zero-weight terms
  are exactly 0."""
  term = z_loss * jnp.square(stats.lse) - stats.logprobs if z_loss else -stats.logprobs
  return jnp.sum(jnp.where(weights != 0, weights * term, 0.0))
