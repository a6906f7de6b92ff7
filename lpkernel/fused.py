"""Fused path: token log-probabilities from ``hidden @ unembed`` without ``[N, V]`` logits.

The vocabulary is swept in blocks of ``FusedConfig.vocab_block`` columns: each
block's logits ``[N, Vb]`` are made by one matmul (float32 accumulation), folded
into a running max / sum-exp / sum of ``p * y`` (for the entropy), and the target's
logit is picked from the block that holds it, so the greedy flag and the
log-probability see the very same rounded logit. The custom VJP saves only the
per-token log-sum-exp (and ``E_p[y]`` for the entropy) and sweeps the blocks
again backwards, emitting ``d unembed`` block by block in its own dtype; only the
``[N, D]`` float32 ``d hidden`` is accumulated across blocks.

Full blocks run in a ``fori_loop``; the ``V mod Vb`` tail columns are one more,
statically shaped step, so any ``V`` and ``N`` work without padding.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from lpkernel import checks
from lpkernel.logprobs import _finite_or_zero, _temperature_rows, _transform, _transform_grad
from lpkernel.scoring import Scores, row_layout, sum_scores

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class FusedConfig:
  """Tiling of the fused sweep.

  Attributes:
    vocab_block: columns of ``unembed`` per step, or None for the default:
      about ``V / 128`` columns (a multiple of 128), so each ``[N, block]``
      float32 temporary stays under 1% of the logits' bytes, within
      ``[256, 256]`` on the CPU and ``[256, 2048]`` elsewhere. On the CPU, 256
      kept N = 4096, D = 512, V = 32000 forward+backward under 5% of the float32
      logits' bytes in bfloat16 (512 took 8%) at about the same speed on 2
      cores; accelerators need wider matmuls (an H200 ran N = 32768, D = 4096,
      V = 128256 forward at 1.15x the bare matmul with 2048).
  """

  vocab_block: int | None = None

  def block(self, vocab_size: int) -> int:
    if self.vocab_block is not None:
      return min(self.vocab_block, vocab_size)
    widest = 256 if jax.default_backend() == "cpu" else 2048
    return min(max(256, min(widest, vocab_size // 128 // 128 * 128)), vocab_size)


DEFAULT_FUSED = FusedConfig()


@flax.struct.dataclass
class TokenStats:
  """Per-token results of one fused sweep, each float32/bool ``[...]``.

  Attributes:
    logprobs: log Pr(target); NaN for ids outside ``[0, V)``.
    lse: log-sum-exp of the (transformed) logits row (z-loss is ``lse ** 2``).
    entropy: entropy of the softmax, ``lse - E_p[y]``.
    greedy: the target's logit is the row maximum.
  """

  logprobs: jax.Array
  lse: jax.Array
  entropy: jax.Array
  greedy: jax.Array


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.dot(a, b, preferred_element_type=_F32)


def _block_logits(h, w, lo, width, tau, softcap):
  """Logits of columns ``[lo, lo + width)``: (z raw float32 [N, width], y transformed, w block)."""
  # XLA moves a dtype convert above a dynamic-slice and then out of the loop,
  # which would copy the whole matrix in float32 (bfloat16 dots are upcast on
  # the CPU). Slicing the output of a barrier over (matrix, offset) stops that.
  w, lo = lax.optimization_barrier((w, jnp.asarray(lo, jnp.int32)))
  wb = lax.dynamic_slice_in_dim(w, lo, width, axis=1)
  z = _dot(h, wb)
  return z, _transform(z, tau, softcap), wb


def _sweep(step, carry, vocab_size: int, vb: int):
  """Folds ``step(carry, lo, width)`` over full blocks, then the static tail block."""
  full, tail = divmod(vocab_size, vb)
  carry = lax.fori_loop(0, full, lambda k, c: step(c, k * vb, vb), carry)
  return step(carry, full * vb, tail) if tail else carry


def _sweep_partials(h, w, targets, tau, softcap, config):
  """One sweep over this ``unembed``'s columns: per-row running partials.

  Returns:
    (m, s, sy, ty), float32[N]: max of y, sum of exp(y - m), sum of
    exp(y - m) * y, and the target's y (-inf when no column here holds it).
  """
  n, v = h.shape[0], w.shape[1]
  tau_col = None if tau is None else tau[:, None]

  def step(carry, lo, width):
    m, s, sy, ty = carry
    _, y, _ = _block_logits(h, w, lo, width, tau_col, softcap)
    new_m = jnp.maximum(m, jnp.max(y, axis=-1))
    shift = _finite_or_zero(new_m)
    e = jnp.exp(y - shift[:, None])
    scale = jnp.exp(m - shift)
    s = s * scale + jnp.sum(e, axis=-1)
    sy = sy * scale + jnp.sum(e * _finite_or_zero(y), axis=-1)
    hit = (lo + lax.broadcasted_iota(jnp.int32, (1, width), 1)) == targets[:, None]
    ty = jnp.maximum(ty, jnp.max(jnp.where(hit, y, -jnp.inf), axis=-1))
    return new_m, s, sy, ty

  init = (
    jnp.full((n,), -jnp.inf, _F32),
    jnp.zeros((n,), _F32),
    jnp.zeros((n,), _F32),
    jnp.full((n,), -jnp.inf, _F32),
  )
  with jax.named_scope("fused_sweep"):
    return _sweep(step, init, v, config.block(v))


def finish_stats(m, s, sy, ty, targets, vocab_size):
  """``TokenStats`` and ``E_p[y]`` from a row's (combined) sweep partials."""
  shift = _finite_or_zero(m)
  lse = jnp.log(s) + shift
  expected_y = jnp.where(s > 0, sy / s, 0.0)
  in_range = (targets >= 0) & (targets < vocab_size)
  logprob = jnp.where(ty == -jnp.inf, -jnp.inf, ty - lse)
  stats = TokenStats(
    logprobs=jnp.where(in_range, logprob, jnp.nan),
    lse=lse,
    entropy=lse - expected_y,
    greedy=in_range & (ty == m),
  )
  return stats, expected_y


def _forward(h, w, targets, tau, softcap, config):
  m, s, sy, ty = _sweep_partials(h, w, targets, tau, softcap, config)
  return finish_stats(m, s, sy, ty, targets, w.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused(h, w, targets, tau, softcap, config):
  return _forward(h, w, targets, tau, softcap, config)[0]


def _fused_fwd(h, w, targets, tau, softcap, config):
  stats, expected_y = _forward(h, w, targets, tau, softcap, config)
  return stats, (h, w, targets, tau, stats.lse, expected_y)


def _fused_bwd(softcap, config, residuals, ct: TokenStats):
  h, w, targets, tau, lse, expected_y = residuals
  n, v = h.shape[0], w.shape[1]
  tau_col = None if tau is None else tau[:, None]
  g_lp, g_lse, g_ent = (c.astype(_F32) for c in (ct.logprobs, ct.lse, ct.entropy))
  live = ((g_lp != 0) | (g_lse != 0) | (g_ent != 0))[:, None]
  g_lp = jnp.where(live, g_lp[:, None], 0.0)  # a NaN cotangent on a dead row stays out
  g_lse, g_ent = g_lse[:, None], g_ent[:, None]
  safe_lse = _finite_or_zero(lse)[:, None]
  ey = expected_y[:, None]

  def step(carry, lo, width):
    dh, dw, dtau = carry
    z, y, wb = _block_logits(h, w, lo, width, tau_col, softcap)
    p = jnp.exp(y - safe_lse)
    onehot = (lo + lax.broadcasted_iota(jnp.int32, (1, width), 1)) == targets[:, None]
    # d/dy of lp, lse and entropy: (onehot - p), p and p * (E_p[y] - y).
    dy = (
      g_lp * (jnp.where(onehot, 1.0, 0.0) - p) + g_lse * p + g_ent * p * (ey - _finite_or_zero(y))
    )
    dy = jnp.where(live, dy, 0.0)
    if tau is not None:  # y = s(z) / tau  =>  dy/dtau = -y / tau
      dtau = dtau - jnp.sum(dy * _finite_or_zero(y), axis=-1) / tau
    dz = (dy * _transform_grad(z, tau_col, softcap)).astype(h.dtype)
    dh = dh + _dot(dz, wb.T)
    dwb = _dot(h.T, dz).astype(w.dtype)
    return dh, lax.dynamic_update_slice_in_dim(dw, dwb, lo, axis=1), dtau

  init = (
    jnp.zeros(h.shape, _F32),
    jnp.zeros(w.shape, w.dtype),
    None if tau is None else jnp.zeros((n,), _F32),
  )
  with jax.named_scope("fused_sweep_backward"):
    dh, dw, dtau = _sweep(step, init, v, config.block(v))
  return dh.astype(h.dtype), dw, jnp.zeros(targets.shape, jax.dtypes.float0), dtau


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_token_stats(
  hidden: jax.Array,
  unembed: jax.Array,
  targets: jax.Array,
  *,
  temperature=1.0,
  softcap: float | None = None,
  config: FusedConfig = DEFAULT_FUSED,
) -> TokenStats:
  """Log-probability, log-sum-exp, entropy and greedy flag of each target, in one sweep.

  Args:
    hidden: float[..., D] final hidden states (float32, bfloat16 or float16).
    unembed: float[D, V] unembedding matrix, same dtype as ``hidden``.
    targets: int[...] ids in ``[0, V)``.
    temperature: positive scalar or array broadcastable to ``targets``.
    softcap: None or ``c > 0``: logits become ``c * tanh(logits / c)``.
    config: the vocabulary tiling.

  Returns:
    ``TokenStats`` of float32 ``[...]`` arrays (``greedy`` bool); gradients flow
    to ``hidden``, ``unembed`` and an array ``temperature`` from every field.
  """
  _check_fused(hidden, unembed, targets)
  checks.check_softcap(softcap)
  batch_shape = targets.shape
  tau = _temperature_rows(temperature, batch_shape)
  h = hidden.reshape(-1, hidden.shape[-1])
  stats = _fused(h, unembed, targets.reshape(-1).astype(jnp.int32), tau, softcap, config)
  return jax.tree.map(lambda x: x.reshape(batch_shape), stats)


def fused_token_logprobs(
  hidden, unembed, targets, *, temperature=1.0, softcap=None, config: FusedConfig = DEFAULT_FUSED
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
    hidden, unembed, targets, temperature=temperature, softcap=softcap, config=config
  ).logprobs


def _check_fused(hidden, unembed, targets) -> None:
  checks.check_float_logits("hidden", hidden)
  checks.check_float_logits("unembed", unembed)
  checks.check_int("targets", targets)
  if unembed.ndim != 2:
    raise ValueError(f"unembed must be [D, V], got {unembed.shape=}")
  if hidden.dtype != unembed.dtype:
    raise TypeError(f"hidden.dtype={hidden.dtype} and unembed.dtype={unembed.dtype} must match")
  if hidden.shape[-1] != unembed.shape[0]:
    raise ValueError(f"hidden has D={hidden.shape[-1]} but unembed has D={unembed.shape[0]}")
  if hidden.shape[:-1] != targets.shape:
    raise ValueError(f"hidden leading dims {hidden.shape[:-1]} must equal {targets.shape=}")
  if unembed.shape[1] < 1:
    raise ValueError(f"vocab_size V={unembed.shape[1]} must be at least 1")


def score_hidden(
  hidden: jax.Array,
  unembed: jax.Array,
  tokens: jax.Array,
  response_mask: jax.Array,
  *,
  segment_ids: jax.Array | None = None,
  num_segments: int | None = None,
  temperature=1.0,
  softcap: float | None = None,
  config: FusedConfig = DEFAULT_FUSED,
  with_stats: bool = False,
):
  """``score(hidden @ unembed, ...)`` without materialising the logits.

  Args:
    hidden: float[B, T, D]; ``hidden[:, t] @ unembed`` predicts ``tokens[:, t + 1]``.
    unembed: float[D, V].
    tokens, response_mask, segment_ids, num_segments, temperature, softcap: as
      for :func:`lpkernel.score`.
    config: the vocabulary tiling.
    with_stats: also return the per-row ``TokenStats`` (log-sum-exp for z-loss,
      entropy), ``[B, T]`` aligned like the logits rows (row t predicts t + 1).

  Returns:
    ``Scores``, or ``(Scores, TokenStats)`` when ``with_stats``.
  """
  if hidden.ndim != 3:
    raise ValueError(f"hidden must be [B, T, D], got {hidden.shape=}")
  checks.check_int("tokens", tokens)
  checks.check_same_dims("hidden", hidden.shape, "tokens", tokens.shape)
  checks.check_rows(tokens, response_mask, segment_ids, num_segments)
  layout = row_layout(tokens, response_mask, segment_ids, num_segments)
  stats = fused_token_stats(
    hidden, unembed, layout.targets, temperature=temperature, softcap=softcap, config=config
  )
  scores: Scores = sum_scores(stats.logprobs, stats.greedy, layout, num_segments)
  return (scores, stats) if with_stats else scores
