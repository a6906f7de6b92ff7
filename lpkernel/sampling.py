"""The rollout's processed distribution: temperature, min-p, top-k and top-p as data.

Inference engines sample from a *processed* distribution; vLLM's V1 sampler
applies, in order: temperature (``y = z / T``); min-p (drop tokens whose
probability is below ``min_p`` times the largest); top-k (keep the tokens whose
``y`` is at least the k-th largest, ties at the boundary kept); top-p (over the
survivors' renormalised probabilities, drop the tokens whose ascending
cumulative probability is ``<= 1 - p``, never the most likely one); then it
renormalises over the kept set. A trainer that recomputes log-probabilities
over the full vocabulary is off by ``log S`` per token, ``S`` the kept mass.

**Tie rule at the top-p boundary.** vLLM's sort order decides between equal
logits there; lpkernel's rule is deterministic: a token is dropped iff the mass
of the tokens at most as likely as it, *its ties included*, is ``<= 1 - p``
(equivalently: kept iff the mass strictly more likely than it is below ``p``),
so tokens equal to the boundary logit share its fate. Without ties this is
vLLM's rule, summed in vLLM's order (ascending, from the least likely).

This module holds the parameters (:class:`Sampling`) and the plain definition
(:func:`processed_logprobs_reference`: materialised logits, a sort, masks);
the fast paths without ``[N, V]`` temporaries are :mod:`lpkernel.ops.processed`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lpkernel import partials as P
from lpkernel.checks import poison, positive_finite_number, temperature_rows

_F32 = jnp.float32
# vLLM's _SAMPLING_EPS: a request whose temperature is below it is decoded greedily.
GREEDY_BELOW = 1e-5


# Each array parameter's range (its examples are NaN outside it): the rule and
# what a value outside it is, for param_rows and Sampling.value_problems.
_IN_RANGE = {
  "temperature": (lambda t: (abs(t) < np.inf) & (t >= 0), "negative or not finite (0 is greedy)"),
  "top_p": (lambda p: (p > 0) & (p <= 1), "outside (0, 1] (1 for off)"),
  "min_p": (lambda m: (m >= 0) & (m <= 1), "outside [0, 1] (0 for off)"),
}


class Sampling(NamedTuple):
  """A sampler's parameters: Python numbers, or arrays of one value per example
  (``[B]``, broadcast over that example's tokens). A pytree.

  Attributes:
    temperature: ``> 0``; below 1e-5 (``GREEDY_BELOW``; 0 included) a greedy
      request, scored as vLLM reports one: at temperature 1, with min-p, top-k
      and top-p off (the engine resets them for such a request).
    top_k: keep the ``k`` most likely tokens (ties at the boundary kept); off
      when ``<= 0`` or ``>= V``.
    top_p: keep the nucleus of mass ``p`` in ``(0, 1]``; off at 1.
    min_p: drop tokens below ``min_p`` times the largest probability, in
      ``[0, 1]``; off at 0.
  """

  temperature: float | jax.Array = 1.0
  top_k: int | jax.Array = 0
  top_p: float | jax.Array = 1.0
  min_p: float | jax.Array = 0.0

  def check(self) -> Sampling:
    """``ValueError`` naming a Python value out of range (array values that are
    out of range make their examples' results NaN instead)."""
    t, k, p, m = self
    if np.isscalar(t):
      _check_temperature_number(t, "Sampling.temperature")
    if isinstance(k, (float, bool)):
      raise ValueError(f"Sampling.top_k={k!r} must be an int (<= 0 for off)")
    if isinstance(p, (int, float)) and not (0 < p <= 1):
      raise ValueError(f"Sampling.top_p={p!r} must be in (0, 1] (1 for off)")
    if isinstance(m, (int, float)) and not (0 <= m <= 1):
      raise ValueError(f"Sampling.min_p={m!r} must be in [0, 1] (0 for off)")
    return self

  def check_shapes(self, batch_shape) -> Sampling:
    """:meth:`check`, then ``TypeError`` / ``ValueError`` for an array of the wrong
    dtype or shape against the targets' ``batch_shape`` (as every processed op)."""
    for name, value in zip(self._fields, self.check(), strict=True):
      _checked(value, batch_shape, name)
    return self

  def value_problems(self, xp) -> list[tuple[Any, str, Any]]:
    """(bad, message, values) of each array parameter, ``bad`` True where a value
    is out of range (its examples' results are NaN); ``xp`` is ``numpy`` (eager,
    :func:`lpkernel.check_inputs`) or ``jax.numpy`` (:func:`lpkernel.checkify_inputs`)."""
    problems = []
    for name, (in_range, rule) in _IN_RANGE.items():
      value = getattr(self, name)
      if not np.isscalar(value):
        value = xp.asarray(value)
        problems.append((~in_range(value), f"Sampling.{name} holds values {rule}", value))
    return problems


class ProcessedStats(NamedTuple):
  """Per scored token, all shaped like the targets.

  Attributes:
    logprobs: log-probability under the processed distribution (renormalised
      over the kept set); ``-inf`` when the target was not kept.
    raw_logprobs: log-probability over the full vocabulary, temperature applied.
    log_kept_mass: ``log S``, the kept set's mass under the temperature-scaled
      distribution (``logprobs = raw_logprobs - log_kept_mass`` where kept).
    kept: bool, the target is in the kept set.
    kept_count: int32, the kept set's size; 0 where ``logprobs`` is NaN (an
      id outside ``[0, V)``, a parameter out of range, NaN in the row).
    greedy: bool, the target is the first argmax of its capped row (always kept).
  """

  logprobs: jax.Array
  raw_logprobs: jax.Array
  log_kept_mass: jax.Array
  kept: jax.Array
  kept_count: jax.Array
  greedy: jax.Array


def _checked(value, batch_shape, name: str):
  """``Sampling.<name>`` as an array, its dtype and shape checked against the
  targets' ``batch_shape``: a scalar, one value per example (``[B]``) or per
  position (``batch_shape``). ``TypeError`` for a top_k that does not hold
  integers, ``ValueError`` naming any other shape."""
  a = value if isinstance(value, jax.Array) else np.asarray(value)
  if name == "top_k" and not jnp.issubdtype(a.dtype, jnp.integer):
    raise TypeError(f"Sampling.top_k must hold integers (<= 0 for off), got {a.dtype}")
  per_example = tuple(batch_shape[:1])
  if a.ndim and a.shape not in (per_example, tuple(batch_shape)):
    raise ValueError(
      f"Sampling.{name} has shape {a.shape}: pass a Python number or one value per "
      f"example, shape {per_example} (the targets' leading dimension)"
    )
  return a


def _per_row(value, batch_shape, dtype, name: str) -> jax.Array:
  """``Sampling.<name>`` as one value per row: a scalar, or ``[B]`` broadcast over
  the remaining batch axes (:func:`_checked`)."""
  a = jnp.asarray(_checked(value, batch_shape, name), dtype)
  if a.ndim == 1 and len(batch_shape) > 1:
    a = a.reshape(a.shape + (1,) * (len(batch_shape) - 1))
  return jnp.broadcast_to(a, batch_shape)


def _check_temperature_number(t, name: str) -> None:
  """``ValueError`` for a Python temperature that is negative or not finite
  (below ``GREEDY_BELOW``, 0 included, is a greedy request)."""
  if not (positive_finite_number(t) or _greedy(t)):
    raise ValueError(f"{name}={t!r} must be finite and >= 0 (below {GREEDY_BELOW}: greedy)")


def _greedy(t):
  """Whether temperatures ``t`` (a Python number or an array) ask for greedy decoding."""
  return (t >= 0) & (t < GREEDY_BELOW)


def replay_temperature_rows(temperature, batch_shape) -> jax.Array | None:
  """Replay's temperature as float32[N] rows (None for a Python 1) under the
  sampler's rule: below ``GREEDY_BELOW`` (0 included) a greedy request, replayed
  at temperature 1 with no derivative into its temperature. A negative or
  non-finite Python value raises ``ValueError``; such array values poison their
  positions downstream."""
  if isinstance(temperature, (int, float, np.integer, np.floating)):
    _check_temperature_number(temperature, "temperature")
    if _greedy(temperature):
      return None
  tau = temperature_rows(temperature, batch_shape)
  return tau if tau is None else jnp.where(_greedy(tau), 1.0, tau)


def param_rows(
  sampling: Sampling, batch_shape
) -> tuple[jax.Array | None, jax.Array, jax.Array, jax.Array, jax.Array]:
  """The parameters flattened to one value per position ``[N]``: (temperature or
  None for a Python 1, top_k int32, top_p, min_p, bool bad: an array value out of
  range). A greedy request's row (temperature below ``GREEDY_BELOW``) gets
  temperature 1 and every truncation off, as vLLM scores it."""
  t = sampling.temperature
  k = _per_row(sampling.top_k, batch_shape, jnp.int32, "top_k").reshape(-1)
  p = _per_row(sampling.top_p, batch_shape, _F32, "top_p").reshape(-1)
  m = _per_row(sampling.min_p, batch_shape, _F32, "min_p").reshape(-1)
  bad = ~_IN_RANGE["top_p"][0](p) | ~_IN_RANGE["min_p"][0](m)  # out of range, greedy or not
  if np.isscalar(t):
    greedy = bool(_greedy(t))
    tau = None if (t == 1 or greedy) else _per_row(t, batch_shape, _F32, "temperature").reshape(-1)
  else:
    tau = _per_row(t, batch_shape, _F32, "temperature").reshape(-1)
    greedy = _greedy(tau)
    tau = jnp.where(greedy, 1.0, tau)  # no derivative reaches a greedy row's temperature
  if tau is not None:
    bad |= ~_IN_RANGE["temperature"][0](tau)  # greedy rows are 1 here: 0 < tau < inf
  if greedy is not False:
    k, p, m = jnp.where(greedy, 0, k), jnp.where(greedy, 1.0, p), jnp.where(greedy, 0.0, m)
  return tau, k, p, m, bad


def nucleus_floor(w: jax.Array, values: jax.Array, p: jax.Array) -> jax.Array:
  """``[...]``: top-p's least kept value, for columns ``[..., K]`` sorted descending
  by ``values`` with weights ``w`` (summing to 1) and ``p [...]``: the least value
  whose weight at or below it, its ties included, exceeds ``1 - p``, and at most
  the largest (never dropped, as the engine's), ``-inf`` where ``p >= 1``: top-p
  keeps every value at least it.

  The weights are summed from the smallest, as the engine's ascending cumulative
  sum. A run of ties holds its weight at or below it at its first column, and a
  later column of the run holds less; so the least value of any column whose own
  sum exceeds ``1 - p`` is the least kept run's, and no segmented scan is needed
  (which took 1.1 ms of 1.2 at ``[4096, 64]`` on XLA:CPU)."""
  tail = jnp.flip(jnp.cumsum(jnp.flip(w, -1), axis=-1), -1)
  least = jnp.min(jnp.where(tail > 1 - p[..., None], values, jnp.inf), axis=-1)
  return jnp.where(p >= 1, -jnp.inf, jnp.minimum(least, values[..., 0]))


def kept_mask(y: jax.Array, sampling: Sampling, order: jax.Array | None = None) -> jax.Array:
  """bool[..., V]: the kept set of temperature-scaled logits rows ``y`` under
  min-p, then top-k, then top-p (the tie rule above); a constant (no derivative).

  ``order`` (float[..., V], default ``y``): the values whose order and ties
  decide top-k and top-p, where ``y`` is computed from them by a rounding that
  may merge neighbours (the reference passes the capped logits ``z`` for ``y =
  (z - shift) / tau``: equal means equal capped logits).

  Sorts each row: the reference's way, with ``[..., V]`` temporaries.
  """
  y = jax.lax.stop_gradient(y)
  order = y if order is None else jax.lax.stop_gradient(order)
  v = y.shape[-1]
  batch = y.shape[:-1]
  k = _per_row(sampling.top_k, batch, jnp.int32, "top_k")[..., None]
  p = _per_row(sampling.top_p, batch, _F32, "top_p")[..., None]
  min_p = _per_row(sampling.min_p, batch, _F32, "min_p")[..., None]
  m = jnp.max(y, axis=-1, keepdims=True)
  prob = jnp.exp(y - m)  # relative to the largest: min-p compares these with min_p
  keep = prob >= min_p
  # top-k: at least the k-th largest value (ties at the boundary kept); off for k <= 0 or >= V.
  ranked = jnp.sort(jnp.where(keep, order, -jnp.inf), axis=-1)  # ascending
  kth = jnp.take_along_axis(ranked, jnp.clip(v - k, 0, v - 1), axis=-1)
  keep &= (k <= 0) | (k >= v) | (order >= kth)
  # top-p over the survivors' renormalised mass: dropped iff the mass at or below it is <= 1 - p.
  survivors = jnp.where(keep, prob, 0.0)
  mass = survivors / jnp.sum(survivors, axis=-1, keepdims=True)
  ranks = jnp.argsort(-order, axis=-1, stable=True)  # descending
  least = nucleus_floor(
    jnp.take_along_axis(mass, ranks, axis=-1), jnp.take_along_axis(order, ranks, axis=-1), p[..., 0]
  )
  return keep & (order >= least[..., None])


def processed_logprobs_reference(
  logits: jax.Array,
  targets: jax.Array,
  sampling: Sampling,
  *,
  softcap: float | None = None,
) -> ProcessedStats:
  """The plain definition of the processed log-probabilities (materialised float32
  rows, a sort per row): the yardstick for the fast paths.

  Args:
    logits: float[..., V] (``[B, ...]`` when a parameter is an array of ``[B]``).
    targets: int[...] ids in ``[0, V)``; others give NaN.
    sampling: the sampler's parameters (:class:`Sampling`); an array
      temperature that is not finite and positive, or another parameter out of
      range, makes its examples NaN.
    softcap: applied before the temperature, as the model does.

  >>> import jax.numpy as jnp
  >>> s = processed_logprobs_reference(
  ...   jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]])), jnp.array([1]), Sampling(top_k=2))
  >>> round(float(s.logprobs[0]), 4), round(float(jnp.exp(s.log_kept_mass[0])), 4)
  (-0.9808, 0.8)
  """
  sampling = sampling.check()
  v = logits.shape[-1]
  z = P.capped(logits, softcap)
  batch = targets.shape
  tau_rows, k, p, m, bad = param_rows(sampling, batch)  # greedy requests' rows untruncated
  tau = jnp.ones(batch, _F32) if tau_rows is None else tau_rows.reshape(batch)
  nan_rows = jnp.any(jnp.isnan(z), axis=-1, keepdims=True)
  bad = bad.reshape(batch) | nan_rows[..., 0]  # NaN wins: poisoned below, with no derivative
  shift = P.shift_of(jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True)))
  y = P.scaled_where((z != -jnp.inf) & ~nan_rows, z - shift, tau[..., None])  # shift, then scale
  rules = Sampling(1.0, k.reshape(batch), p.reshape(batch), m.reshape(batch))
  keep = kept_mask(y, rules, order=z)  # equal: equal capped logits
  in_range = (targets >= 0) & (targets < v)
  bad |= ~in_range
  safe = jnp.where(in_range, targets, 0)[..., None]
  # A row of -inf holds no possible token: every log-probability and its kept
  # mass -inf, and no derivative (its softmaxes see zeros in its place).
  no_mass = jnp.all(y == -jnp.inf, axis=-1, keepdims=True)
  y_safe = jnp.where(no_mass, 0.0, y)
  raw = jnp.where(no_mass, -jnp.inf, jax.nn.log_softmax(y_safe, axis=-1))
  processed = jax.nn.log_softmax(jnp.where(keep | no_mass, y_safe, -jnp.inf), axis=-1)
  processed = jnp.where(no_mass, -jnp.inf, processed)
  log_kept = jax.nn.logsumexp(jnp.where(keep, raw, -jnp.inf), axis=-1)
  keep &= ~no_mass
  kept = jnp.take_along_axis(keep, safe, axis=-1)[..., 0] & ~bad
  z_t = jnp.take_along_axis(z, safe, axis=-1)[..., 0]
  greedy = (jnp.argmax(z, axis=-1) == targets) & (z_t > -jnp.inf) & ~bad
  logprobs = poison(jnp.take_along_axis(processed, safe, axis=-1)[..., 0], bad)
  return ProcessedStats(
    logprobs=logprobs,
    raw_logprobs=poison(jnp.take_along_axis(raw, safe, axis=-1)[..., 0], bad),
    log_kept_mass=poison(log_kept, bad),
    kept=kept,
    kept_count=defined_count(jnp.sum(keep, axis=-1, dtype=jnp.int32), logprobs),
    greedy=greedy & ~jnp.isnan(z_t),
  )


def defined_count(count: jax.Array, logprobs: jax.Array) -> jax.Array:
  """The kept sets' sizes, 0 where the log-probability is NaN (no kept set is defined)."""
  return jnp.where(jnp.isnan(logprobs), 0, count)
