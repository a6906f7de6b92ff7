"""Input validation: static shape/dtype checks at call time, eager value checks,
the same value checks through ``jax.experimental.checkify``, and the chain-rule
consistency check on reported scores."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

LOGIT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _is_int(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.integer)


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
    raise ValueError(f"vocab_size={logits.shape[-1]} must be at least 1")


def check_softcap(softcap) -> None:
  if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
    raise ValueError(f"softcap must be None or a positive Python number, got {softcap=}")


def check_broadcastable(name: str, shape: Sequence[int], target: Sequence[int]) -> None:
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
  if num_segments is not None and (not isinstance(num_segments, int) or num_segments < 1):
    raise ValueError(f"num_segments must be None or a positive Python int, got {num_segments=}")


def check_score_shapes(logits, tokens, response_mask, segment_ids, num_segments) -> None:
  """Static checks of ``score``'s arguments; raises naming the dimension."""
  check_float_logits("logits", logits)
  if logits.ndim != 3:
    raise ValueError(f"logits must be [B, T, V], got {logits.shape=}")
  check_int("tokens", tokens)
  check_same_dims("logits", logits.shape, "tokens", tokens.shape)
  check_rows(tokens, response_mask, segment_ids, num_segments)
  if logits.shape[2] < 1:
    raise ValueError(f"vocab_size V={logits.shape[2]} must be at least 1")


def _value_problems(vocab_size, tokens, segment_ids, num_segments):
  """(bad, message, values) triples; ``bad`` is True where ``values`` are wrong."""
  seg = jnp.ones_like(tokens) if segment_ids is None else segment_ids
  real = seg > 0
  problems = [
    (real & (tokens < 0), "tokens hold negative ids (ids never wrap around)", tokens),
    (real & (tokens >= vocab_size), f"tokens hold ids >= {vocab_size=}", tokens),
    (seg < 0, "segment_ids hold negative values (0 is padding, 1..S are sequences)", seg),
  ]
  if num_segments is not None:
    problems.append((seg > num_segments, f"segment_ids exceed {num_segments=}", seg))
  return problems


def _vocab_size(logits_or_vocab_size) -> int:
  if isinstance(logits_or_vocab_size, (int, np.integer)):
    return int(logits_or_vocab_size)
  return int(logits_or_vocab_size.shape[-1])


def check_inputs(logits_or_vocab_size, tokens, response_mask, segment_ids=None, num_segments=None):
  """Eager validation of ``score``'s inputs with clear messages.

  Checks shapes and dtypes, token ids in ``[0, V)`` wherever ``segment_ids > 0``,
  and segment ids in ``[0, S]``. Call it outside ``jit`` (it reads values).

  Args:
    logits_or_vocab_size: float[B, T, V] logits, or the vocabulary size V.
    tokens, response_mask, segment_ids, num_segments: as for ``score``.

  Raises:
    TypeError / ValueError naming the offending input, position and value.
  """
  if isinstance(logits_or_vocab_size, (int, np.integer)):
    check_rows(tokens, response_mask, segment_ids, num_segments)
  else:
    check_score_shapes(logits_or_vocab_size, tokens, response_mask, segment_ids, num_segments)
  vocab_size = _vocab_size(logits_or_vocab_size)
  for bad, message, values in _value_problems(vocab_size, tokens, segment_ids, num_segments):
    bad = np.asarray(bad)
    if bad.any():
      b, t = map(int, np.argwhere(bad)[0])
      raise ValueError(f"{message}: first at [b={b}, t={t}] with value {np.asarray(values)[b, t]}")


def checkify_inputs(
  logits_or_vocab_size, tokens, response_mask, segment_ids=None, num_segments=None
):
  """The value checks of :func:`check_inputs` as ``checkify.check`` calls.

  Use inside a function transformed by ``jax.experimental.checkify.checkify``;
  works under ``jit``.
  """
  vocab_size = _vocab_size(logits_or_vocab_size)
  for bad, message, _ in _value_problems(vocab_size, tokens, segment_ids, num_segments):
    checkify.check(~jnp.any(bad), message)


def check_chain_rule(joint_logprob, prompt_logprob, *, atol: float = 1e-4) -> None:
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
