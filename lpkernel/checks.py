"""Input validation: static shape/dtype checks at call time, eager value checks,
the same value checks through ``jax.experimental.checkify``, and the chain-rule
consistency check on reported scores."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

if TYPE_CHECKING:
  from lpkernel.sampling import Sampling

LOGIT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_INT32_MAX = np.iinfo(np.int32).max


def _is_int(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.integer)


def as_array(name: str, x):
  """``x`` as an array: JAX and NumPy arrays (and shape structs) pass; Python
  lists and tuples become NumPy arrays; anything else is a ``TypeError``."""
  if isinstance(x, (list, tuple)):
    x = np.asarray(x)
    if x.dtype == object:
      raise TypeError(f"{name} must be a rectangular array, got a ragged {type(x).__name__}")
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name} must be an array (jax.Array, numpy.ndarray or a list), got {type(x)}")
  return x


def as_ids(name: str, x, *, fill: int = -1):
  """Integer ids as int32, range-checked *before* the cast.

  An id that does not fit in int32 (a 64-bit NumPy array, or a 64-bit JAX
  array under ``jax_enable_x64``) becomes ``fill`` (-1: out of range for every
  vocabulary and invalid as a segment id), never wraps around (``2**32 + 3``
  is not 3). Non-integer ids raise ``TypeError``.
  """
  x = as_array(name, x)
  check_int(name, x)
  if np.dtype(x.dtype).itemsize < 4 or x.dtype == np.int32:
    return x if x.dtype == np.int32 else (x.astype(np.int32) if isinstance(x, np.ndarray) else x)
  xp = np if isinstance(x, (np.ndarray, np.generic)) else jnp
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape, jnp.int32)
  fits = (
    x <= _INT32_MAX if np.dtype(x.dtype).kind == "u" else (x >= -_INT32_MAX) & (x <= _INT32_MAX)
  )
  # Cast the fitting ids first: NumPy refuses a negative fill beside uint64.
  return xp.where(fits, xp.where(fits, x, 0).astype(xp.int32), fill)


def check_float_logits(name: str, x) -> None:
  """TypeError unless ``x`` is float32, bfloat16 or float16."""
  if x.dtype not in [jnp.dtype(d) for d in LOGIT_DTYPES]:
    raise TypeError(f"{name} must be float32, bfloat16 or float16, got {name}.dtype={x.dtype}")


def check_int(name: str, x) -> None:
  if not _is_int(x):
    raise TypeError(f"{name} must hold integer ids, got {name}.dtype={x.dtype}")


def check_logits_and_targets(logits, targets) -> None:
  """``logits[..., V]`` against ``targets[...]``."""
  check_float_logits("logits", logits)
  check_int("targets", targets)
  if logits.ndim != targets.ndim + 1:
    raise ValueError(
      f"logits must have one more axis (V) than targets: {logits.shape=} vs {targets.shape=}"
    )
  if logits.shape[:-1] != targets.shape:
    raise ValueError(
      f"logits leading dims {logits.shape[:-1]} must equal targets.shape={targets.shape}"
    )
  if logits.shape[-1] < 1:
    raise ValueError(f"vocab_size V={logits.shape[-1]} must be at least 1")


def vocab_axis(axis) -> int:
  """``unembed``'s vocabulary axis as 1 (``[D, V]``) or 0 (a tied table ``[V, D]``)."""
  if (
    isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or axis not in (-2, -1, 0, 1)
  ):
    raise ValueError(f"vocab_axis={axis!r} must be -1 / 1 (unembed [D, V]) or 0 / -2 ([V, D])")
  return int(axis) % 2


def check_fused(hidden, unembed, targets, vocab_axis: int = 1) -> None:
  """``hidden[..., D]`` and ``unembed[D, V]`` (``[V, D]`` for ``vocab_axis=0``) against
  ``targets[...]``."""
  check_float_logits("hidden", hidden)
  check_float_logits("unembed", unembed)
  check_int("targets", targets)
  layout = "[D, V]" if vocab_axis == 1 else "[V, D] (vocab_axis=0)"
  if unembed.ndim != 2:
    raise ValueError(f"unembed must be {layout}, got {unembed.shape=}")
  if hidden.dtype != unembed.dtype:
    raise TypeError(f"hidden.dtype={hidden.dtype} and unembed.dtype={unembed.dtype} must match")
  d, v = unembed.shape[1 - vocab_axis], unembed.shape[vocab_axis]
  if hidden.shape[-1] != d:
    hint = (
      f" (for unembed {unembed.shape} laid out the other way, a tied embedding table, pass "
      f"vocab_axis={1 - vocab_axis}: it is read as stored, never transposed)"
      if hidden.shape[-1] == v
      else ""
    )
    raise ValueError(f"hidden has D={hidden.shape[-1]} but unembed {layout} has D={d}{hint}")
  if hidden.shape[-1] < 1:
    raise ValueError(f"model width D={hidden.shape[-1]} must be at least 1")
  if hidden.shape[:-1] != targets.shape:
    raise ValueError(f"hidden leading dims {hidden.shape[:-1]} must equal {targets.shape=}")
  if v < 1:
    raise ValueError(f"vocab_size V={v} must be at least 1")


def logits_arguments(logits, targets, temperature, softcap):
  """The checked arguments of every logits entry: (logits, targets int32,
  temperature rows float32[N] or None)."""
  logits, targets = as_array("logits", logits), as_ids("targets", targets)
  check_logits_and_targets(logits, targets)
  check_softcap(softcap)
  return logits, targets, temperature_rows(temperature, targets.shape)


def fused_arguments(hidden, unembed, targets, temperature, softcap, axis):
  """The checked arguments of every fused entry: (hidden, unembed, targets int32,
  vocab axis 0 / 1, temperature rows float32[N] or None)."""
  hidden, unembed = as_array("hidden", hidden), as_array("unembed", unembed)
  targets = as_ids("targets", targets)
  axis = vocab_axis(axis)
  check_fused(hidden, unembed, targets, axis)
  check_softcap(softcap)
  return hidden, unembed, targets, axis, temperature_rows(temperature, targets.shape)


def positive_finite_number(x) -> bool:
  """``x`` is a Python or NumPy number, finite and > 0."""
  return isinstance(x, (int, float, np.integer, np.floating)) and bool(np.isfinite(x) and x > 0)


def check_softcap(softcap) -> None:
  if softcap is not None and not positive_finite_number(softcap):
    raise ValueError(f"softcap must be None or a finite positive Python number, got {softcap=}")


def temperature_rows(temperature, batch_shape) -> jax.Array | None:
  """``temperature`` broadcast to ``batch_shape`` and flattened to float32[N]; None for 1.

  A Python (or NumPy scalar) temperature must be finite and positive
  (``ValueError``); an array's bad entries poison their positions downstream.
  """
  if isinstance(temperature, (int, float, np.integer, np.floating)):
    if not positive_finite_number(temperature):
      raise ValueError(f"temperature must be finite and positive, got {temperature=}")
    if temperature == 1:
      return None
  else:
    temperature = as_array("temperature", temperature)
  temperature = jnp.asarray(temperature)
  if not jnp.issubdtype(temperature.dtype, jnp.floating):
    temperature = temperature.astype(jnp.float32)
  check_broadcastable("temperature", temperature.shape, batch_shape)
  return jnp.broadcast_to(temperature.astype(jnp.float32), batch_shape).reshape(-1)


def loss_weights(weights, batch_shape) -> jax.Array:
  """Per-token loss weights broadcast to ``batch_shape`` and flattened to float32[N]
  (None: every token weighs 1; a bool mask is 1 / 0)."""
  if weights is None:
    return jnp.ones(math.prod(batch_shape), jnp.float32)
  weights = jnp.asarray(as_array("weights", weights))
  if not (jnp.issubdtype(weights.dtype, jnp.floating) or weights.dtype == jnp.bool_):
    raise TypeError(f"weights must be floats or a bool mask, got weights.dtype={weights.dtype}")
  check_broadcastable("weights", weights.shape, batch_shape)
  return jnp.broadcast_to(weights.astype(jnp.float32), batch_shape).reshape(-1)


@jax.custom_jvp
def constant_weights(weights: jax.Array) -> jax.Array:
  """The loss weights, which the losses treat as constants (where a plain
  ``stop_gradient`` would make their gradient a silent zero): differentiating
  w.r.t. them raises ``TypeError``."""
  return weights


def _constant_weights_jvp(primals, tangents):
  if not isinstance(tangents[0], jax.custom_derivatives.SymbolicZero):
    raise TypeError(
      "the loss weights are constants, but they are being differentiated: pass "
      "jax.lax.stop_gradient(weights), or differentiate the per-token values "
      "(token_logprobs / fused_token_stats) instead"
    )
  return primals[0], tangents[0]


constant_weights.defjvp(_constant_weights_jvp, symbolic_zeros=True)


@jax.custom_jvp
def poison(x: jax.Array, bad: jax.Array) -> jax.Array:
  """``x`` with NaN where ``bad``, and a NaN derivative there too (not a zero one)."""
  return jnp.where(bad, jnp.nan, x)


@poison.defjvp
def _poison_jvp(primals, tangents):
  x, bad = primals
  return poison(x, bad), tangents[0] * jnp.where(bad, jnp.nan, 1.0)


def check_z_loss(z_loss) -> None:
  if not isinstance(z_loss, (int, float, np.integer, np.floating)) or not (
    np.isfinite(z_loss) and z_loss >= 0
  ):
    raise ValueError(f"z_loss must be a finite Python number >= 0, got {z_loss=}")


def check_broadcastable(name: str, shape: Sequence[int], target: Sequence[int]) -> None:
  """ValueError unless ``shape`` broadcasts to ``target`` with the same rank (or is a scalar).

  NumPy would align a lower-rank array with the *last* axes: a per-example ``[B]``
  against ``[B, T]`` tokens would silently apply along T whenever ``B == T``.
  """
  if 0 < len(shape) < len(target):
    raise ValueError(
      f"{name}.shape={tuple(shape)} has fewer axes than the tokens' {tuple(target)}; "
      f"give it their rank, e.g. {name}[:, None] for one value per example "
      "(NumPy broadcasting would match its axis to the last one)"
    )
  try:
    ok = np.broadcast_shapes(tuple(shape), tuple(target)) == tuple(target)
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(f"{name}.shape={tuple(shape)} does not broadcast to {tuple(target)}")


def check_same_dims(name, shape, ref_name, ref_shape, letters="BT") -> None:
  """ValueError naming the first of ``letters`` where ``shape`` differs from ``ref_shape``."""
  if len(shape) < len(letters):
    raise ValueError(f"{name} must be [{', '.join(letters)}, ...], got {name}.shape={tuple(shape)}")
  for letter, a, b in zip(letters, shape, ref_shape, strict=False):
    if a != b:
      raise ValueError(f"{name} has {letter}={a} but {ref_name} has {letter}={b}")


def as_rows(tokens, response_mask, segment_ids):
  """The row arrays of ``score`` as arrays, ids as range-checked int32."""
  tokens = as_ids("tokens", tokens)
  response_mask = as_array("response_mask", response_mask)
  if segment_ids is not None:
    segment_ids = as_array("segment_ids", segment_ids)
    if segment_ids.dtype == np.bool_:  # a boolean attention mask (True = real): ids 1 / 0
      segment_ids = _as_int32(segment_ids)
    segment_ids = as_ids("segment_ids", segment_ids)
  return tokens, response_mask, segment_ids


def _as_int32(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape, jnp.int32)
  return x.astype(np.int32 if isinstance(x, (np.ndarray, np.generic)) else jnp.int32)


def check_rows(tokens, response_mask, segment_ids, num_segments) -> None:
  """Static checks on the ``[B, T]`` row arrays of ``score``."""
  check_int("tokens", tokens)
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [B, T], got {tokens.shape=}")
  if tokens.shape[1] < 1:
    raise ValueError(f"T={tokens.shape[1]} must be at least 1")
  if response_mask.ndim != 2:
    raise ValueError(f"response_mask must be [B, T], got {response_mask.shape=}")
  check_same_dims("response_mask", response_mask.shape, "tokens", tokens.shape)
  if not (response_mask.dtype == jnp.bool_ or _is_int(response_mask)):
    raise TypeError(f"response_mask must be bool (or 0/1 ints), got {response_mask.dtype=}")
  if segment_ids is not None:
    check_int("segment_ids", segment_ids)
    if segment_ids.ndim != 2:
      raise ValueError(f"segment_ids must be [B, T], got {segment_ids.shape=}")
    check_same_dims("segment_ids", segment_ids.shape, "tokens", tokens.shape)
  if num_segments is not None and (
    not isinstance(num_segments, (int, np.integer))
    or isinstance(num_segments, bool)
    or num_segments < 1
  ):
    raise ValueError(f"num_segments must be None or a positive Python int, got {num_segments=}")


def as_model_rows(name: str, x, last: str):
  """A model output ``float[B, T, last]`` (logits or hidden states) as an array."""
  x = as_array(name, x)
  check_float_logits(name, x)
  if x.ndim != 3:
    raise ValueError(f"{name} must be [B, T, {last}], got {name}.shape={tuple(x.shape)}")
  return x


def check_score_shapes(logits, tokens, response_mask, segment_ids, num_segments) -> None:
  """Static checks of ``score``'s arguments; raises naming the dimension."""
  as_model_rows("logits", logits, "V")
  check_int("tokens", tokens)
  check_same_dims("logits", logits.shape, "tokens", tokens.shape)
  check_rows(tokens, response_mask, segment_ids, num_segments)
  if logits.shape[2] < 1:
    raise ValueError(f"vocab_size V={logits.shape[2]} must be at least 1")


def _run_starts(seg, xp):
  prev = xp.concatenate([xp.zeros_like(seg[:, :1]), seg[:, :-1]], axis=1)
  return (seg > 0) & (seg != prev)


def contiguous_segments(seg, xp=jnp):
  """bool[B]: every segment id > 0 of the row is one contiguous run.

  ``1,1,2,2,1,1`` and ``1,1,0,0,1,1`` are not: a row has as many run starts as
  distinct positive ids exactly when no id reappears. ``xp`` is ``numpy``
  (eager) or ``jax.numpy`` (traced).
  """
  starts = xp.sum(_run_starts(seg, xp), axis=1)
  ordered = xp.sort(seg, axis=1)
  distinct = xp.sum(_run_starts(ordered, xp), axis=1)
  return starts == distinct


def _first_restart(seg_row) -> int:
  """The first position of a row where a segment id starts a second run."""
  seen = set()
  for t, s in enumerate(seg_row.tolist()):
    if s > 0 and (t == 0 or seg_row[t - 1] != s):
      if s in seen:
        return t
      seen.add(s)
  raise AssertionError("row has no restart")


_NOT_CONTIGUOUS = (
  "segment_ids reappear after another id in the row (each sequence must be one contiguous run)"
)


def _value_problems(vocab_size, tokens, segment_ids, num_segments, xp):
  """(bad, message, values) triples; ``bad`` is True where ``values`` are wrong."""
  seg = xp.ones_like(tokens) if segment_ids is None else segment_ids
  real = seg > 0
  problems = [
    (
      real & (tokens < 0),
      "tokens hold negative ids (ids never wrap; 64-bit ids beyond int32 count as -1)",
      tokens,
    ),
    (real & (tokens >= vocab_size), f"tokens hold ids >= {vocab_size=}", tokens),
    (
      seg < 0,
      "segment_ids hold negative values (0 is padding, 1..S are sequences; "
      "64-bit ids beyond int32 count as -1)",
      seg,
    ),
  ]
  if num_segments is not None:
    problems.append((seg > num_segments, f"segment_ids exceed {num_segments=}", seg))
  if segment_ids is not None:
    # Row-level: which rows break contiguity (check_inputs finds the position).
    problems.append((~contiguous_segments(seg, xp)[:, None], _NOT_CONTIGUOUS, seg))
  return problems


def _vocab_size(logits_or_vocab_size) -> int:
  if isinstance(logits_or_vocab_size, (int, np.integer)):
    return int(logits_or_vocab_size)
  return int(logits_or_vocab_size.shape[-1])


def check_inputs(
  logits_or_vocab_size: jax.Array | int,
  tokens: jax.Array,
  response_mask: jax.Array,
  segment_ids: jax.Array | None = None,
  num_segments: int | None = None,
  sampling: Sampling | None = None,
) -> None:
  """Eager validation of ``score``'s inputs with clear messages.

  Checks shapes and dtypes, token ids in ``[0, V)`` wherever ``segment_ids > 0``
  (64-bit ids are checked before any cast), segment ids in ``[0, S]`` and each
  segment one contiguous run, and a sampler's parameters (their shapes, and
  array values in range). Call it outside ``jit`` (it reads values).

  Args:
    logits_or_vocab_size: float[B, T, V] logits, or the vocabulary size V.
    tokens, response_mask, segment_ids, num_segments, sampling: as for ``score``.

  Raises:
    TypeError / ValueError naming the offending input, position and value.
  """
  tokens, response_mask, segment_ids = as_rows(tokens, response_mask, segment_ids)
  if isinstance(logits_or_vocab_size, (int, np.integer)):
    check_rows(tokens, response_mask, segment_ids, num_segments)
  else:
    check_score_shapes(logits_or_vocab_size, tokens, response_mask, segment_ids, num_segments)
  vocab_size = _vocab_size(logits_or_vocab_size)
  ids = np.asarray(tokens)
  segments = None if segment_ids is None else np.asarray(segment_ids)
  for bad, message, values in _value_problems(vocab_size, ids, segments, num_segments, np):
    if bad.any():
      b, t = map(int, np.argwhere(bad)[0])
      if message is _NOT_CONTIGUOUS:
        t = _first_restart(values[b])
      raise ValueError(f"{message}: first at [b={b}, t={t}] with value {values[b, t]}")
  if sampling is not None:
    _check_sampling(sampling, tokens.shape)


def _check_sampling(sampling: Sampling, batch_shape) -> None:
  """Python values, shapes and dtypes (as every processed op checks them), then
  array values out of range, the first named."""
  sampling.check_shapes(batch_shape)
  for bad, message, values in sampling.value_problems(np):
    if bad.any():
      where = tuple(int(i) for i in np.argwhere(bad)[0])
      names = ", ".join(f"{n}={i}" for n, i in zip("bt", where, strict=False))
      raise ValueError(f"{message}: first at [{names}] with value {values[where]}")


def checkify_inputs(
  logits_or_vocab_size: jax.Array | int,
  tokens: jax.Array,
  response_mask: jax.Array,
  segment_ids: jax.Array | None = None,
  num_segments: int | None = None,
  sampling: Sampling | None = None,
) -> None:
  """The value checks of :func:`check_inputs` as ``checkify.check`` calls.

  Use inside a function transformed by ``jax.experimental.checkify.checkify``;
  works under ``jit``. 64-bit ids are range-checked before any cast, as by
  every scoring function (pass them with ``jax_enable_x64``, or as NumPy arrays
  to the checkified function's caller unjitted). A sampler's Python values,
  shapes and dtypes raise at trace time, as in every processed op.
  """
  tokens, response_mask, segment_ids = as_rows(tokens, response_mask, segment_ids)
  vocab_size = _vocab_size(logits_or_vocab_size)
  tokens = jnp.asarray(tokens)
  segment_ids = None if segment_ids is None else jnp.asarray(segment_ids)
  problems = _value_problems(vocab_size, tokens, segment_ids, num_segments, jnp)
  if sampling is not None:
    problems += sampling.check_shapes(tokens.shape).value_problems(jnp)
  for bad, message, _ in problems:
    checkify.check(~jnp.any(bad), message)


def repeated_ids(kept_ids, xp=jnp):
  """bool[...]: an id ``>= 0`` appears twice among a position's ``kept_ids
  [..., K]`` (a kept set counts each id once; ``-1`` pads). ``xp`` is ``numpy``
  (eager) or ``jax.numpy`` (traced): a sort of each position's ids."""
  ordered = xp.sort(kept_ids, axis=-1)
  return xp.any((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0), axis=-1)


def kept_ids_outside(kept_ids, vocab_size: int, xp=jnp):
  """bool[...]: whether a position's kept ids ``[..., K]`` hold one outside
  ``[-1, V)`` (-1 pads)."""
  return xp.any((kept_ids < -1) | (kept_ids >= vocab_size), axis=-1)


def _kept_ids_problems(vocab_size: int, kept_ids, xp) -> list:
  """(bad [...], message) of each value rule of a recorded kept set."""
  return [
    (
      kept_ids_outside(kept_ids, vocab_size, xp),
      f"kept_ids hold ids outside [-1, V={vocab_size}) (-1 pads)",
    ),
    (repeated_ids(kept_ids, xp), "kept_ids repeat an id within a position (pad with -1)"),
  ]


def check_kept_ids(logits_or_vocab_size: jax.Array | int, kept_ids) -> None:
  """Eager validation of a recorded kept set ``int[..., K]`` for
  :func:`lpkernel.replay_token_logprobs`: ids in ``[-1, V)`` (64-bit ids checked
  before any cast) and no id twice in a position. The replay makes such a
  position's log-probability NaN; this names the first. Call it outside ``jit``.

  Raises:
    TypeError for ids that are not integers; ValueError naming the position
    and its ids.
  """
  ids = np.asarray(kept_ids)
  check_int("kept_ids", ids)
  if ids.ndim < 1:
    raise ValueError(f"kept_ids must be [..., K], got shape {ids.shape}")
  for bad, message in _kept_ids_problems(_vocab_size(logits_or_vocab_size), ids, np):
    if bad.any():
      where = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(f"{message}: first at {list(where)} with ids {ids[where].tolist()}")


def checkify_kept_ids(logits_or_vocab_size: jax.Array | int, kept_ids) -> None:
  """The value checks of :func:`check_kept_ids` as ``checkify.check`` calls
  (inside a function transformed by ``jax.experimental.checkify.checkify``;
  works under ``jit``)."""
  ids = jnp.asarray(as_ids("kept_ids", kept_ids, fill=-2))
  for bad, message in _kept_ids_problems(_vocab_size(logits_or_vocab_size), ids, jnp):
    checkify.check(~jnp.any(bad), message)


def check_chain_rule(
  joint_logprob: jax.Array | float, prompt_logprob: jax.Array | float, *, atol: float = 1e-4
) -> None:
  """Rejects reported ``(log Pr([x, y]), log Pr(x))`` pairs that break the chain rule.

  ``log Pr(y | x) = log Pr([x, y]) - log Pr(x)`` is a log-probability, so it is
  at most 0: a joint above its marginal signals a bug (a mis-shifted target, a
  mask that drops prompt tokens, scores from two different models...).

  Raises:
    ValueError if any joint exceeds its prompt marginal by more than ``atol``,
    or either is positive or NaN.
  """
  joint = np.asarray(joint_logprob, np.float64)
  prompt = np.asarray(prompt_logprob, np.float64)
  for name, value in (("joint_logprob", joint), ("prompt_logprob", prompt)):
    if np.isnan(value).any():
      raise ValueError(f"{name} holds NaN")
    if (value > atol).any():
      raise ValueError(f"{name} must be <= 0, got max {value.max()}")
  with np.errstate(invalid="ignore"):  # -inf - -inf: an impossible joint is consistent
    conditional = np.where(np.isneginf(joint), -np.inf, joint - prompt)
  if (conditional > atol).any():
    i = np.unravel_index(np.argmax(conditional), conditional.shape)
    raise ValueError(
      f"log Pr(y|x) = joint - prompt = {joint[i]} - ({prompt[i]}) = {conditional[i]} > 0 "
      f"at index {tuple(map(int, i))}: a conditional log-probability cannot be positive"
    )
