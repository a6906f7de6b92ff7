"""Shared test helpers: the float64 NumPy oracle, input builders, tolerances."""

from __future__ import annotations

import contextlib
import functools
import itertools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

import lpkernel as lpk
from lpkernel.ops.processed import cpu_replay, cpu_search, cpu_top_k

# Tolerances for float32 results computed from logits of each input dtype,
# compared against an oracle fed the *same* (already rounded) logits.
TOLERANCES = {
  # float32 accumulation over V terms: a few ulps of the log-sum-exp.
  jnp.dtype(jnp.float32): dict(rtol=2e-5, atol=2e-5),
  # Inputs are exact in float32 after the upcast; only accumulation order differs,
  # but gradients are rounded back to the 8-bit mantissa of bfloat16.
  jnp.dtype(jnp.bfloat16): dict(rtol=2e-5, atol=2e-5),
  # Likewise; float16 gradients keep a 10-bit mantissa.
  jnp.dtype(jnp.float16): dict(rtol=2e-5, atol=2e-5),
}
GRAD_TOLERANCES = {
  jnp.dtype(jnp.float32): dict(rtol=1e-5, atol=1e-6),
  jnp.dtype(jnp.bfloat16): dict(rtol=1e-2, atol=1e-2),  # one bf16 ulp of the result
  jnp.dtype(jnp.float16): dict(rtol=2e-3, atol=1e-3),  # one f16 ulp of the result
}


def pairwise(*factors):
  """Cases covering every pair of values of any two ``factors`` (each a sequence
  of values), greedily (the case covering most uncovered pairs first, ties to
  the earliest in product order): about the product of the two largest
  factors' sizes, in place of the product of all. A bug in one value or in the
  meeting of two is reached; the full products of many options cost the suite
  minutes (tests/conftest.py). Deterministic: the same cases in every run."""
  if len(factors) < 2:
    return list(itertools.product(*factors))
  indices = [range(len(f)) for f in factors]
  pairs = list(itertools.combinations(range(len(factors)), 2))
  uncovered = {(a, i, b, j) for a, b in pairs for i in indices[a] for j in indices[b]}

  def covers(case):
    return {(a, case[a], b, case[b]) for a, b in pairs}

  candidates = list(itertools.product(*indices))
  cases = []
  while uncovered:
    best = max(candidates, key=lambda case: len(covers(case) & uncovered))
    uncovered -= covers(best)
    cases.append(tuple(f[i] for f, i in zip(factors, best, strict=True)))
  return cases


def assert_close(actual, expected, *, rtol, atol, what=""):
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  np.testing.assert_array_equal(
    np.isnan(actual), np.isnan(expected), err_msg=f"{what}: NaN pattern"
  )
  np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected), err_msg=f"{what}: -inf")
  np.testing.assert_array_equal(np.isposinf(actual), np.isposinf(expected), err_msg=f"{what}: +inf")
  finite = np.isfinite(expected)
  diff = np.abs(actual[finite] - expected[finite])
  bound = atol + rtol * np.abs(expected[finite])
  worst = float(np.max(diff - bound, initial=-np.inf))
  assert worst <= 0, f"{what}: max |diff| = {float(np.max(diff, initial=0)):.3g} beyond tolerance"


def oracle_token_logprobs(logits, targets, temperature=1.0, softcap=None):
  """float64 NumPy log-softmax gather; NaN for ids outside [0, V)."""
  with np.errstate(all="ignore"):  # inf - inf, 0 / 0: the policy decides below
    return _oracle_token_logprobs(logits, targets, temperature, softcap)


def _oracle_token_logprobs(logits, targets, temperature, softcap):
  y = np.asarray(jnp.asarray(logits, jnp.float32), np.float64)
  if softcap is not None:
    y = np.where(np.isneginf(y), -np.inf, softcap * np.tanh(y / softcap))
  y = y / np.asarray(temperature, np.float64)[..., None]
  m = np.max(y, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  lse = np.log(np.sum(np.exp(y - m), axis=-1)) + m[..., 0]
  targets = np.asarray(targets)
  v = y.shape[-1]
  ok = (targets >= 0) & (targets < v)
  picked = np.take_along_axis(y, np.where(ok, targets, 0)[..., None], axis=-1)[..., 0]
  nan_row = np.isnan(y).any(axis=-1)
  lp = np.where(np.isneginf(picked) & ~nan_row, -np.inf, (picked - m[..., 0]) - (lse - m[..., 0]))
  return np.where(ok, lp, np.nan)


def oracle_logits_grad(logits, targets, weights, temperature=1.0, softcap=None):
  """float64 d/d logits of ``sum(weights * lp)`` (no softcap/temperature chain beyond y)."""
  y = np.asarray(jnp.asarray(logits, jnp.float32), np.float64)
  assert softcap is None and np.all(np.asarray(temperature) == 1.0)
  m = np.max(y, axis=-1, keepdims=True)
  p = np.exp(y - m)
  p /= p.sum(-1, keepdims=True)
  onehot = np.arange(y.shape[-1]) == np.asarray(targets)[..., None]
  return np.asarray(weights, np.float64)[..., None] * (onehot - p)


def oracle_score(logits, tokens, response_mask, segment_ids=None, num_segments=None):
  """float64 chain-rule sums by explicit loops over positions (position t scores
  token t + 1; a sum runs over one segment's prompt or response positions)."""
  logits = np.asarray(jnp.asarray(logits, jnp.float32), np.float64)
  tokens = np.asarray(tokens)
  response_mask = np.asarray(response_mask, bool)
  b, t, v = logits.shape
  seg = np.ones((b, t), int) if segment_ids is None else np.asarray(segment_ids)
  shape = (b,) if num_segments is None else (b, num_segments)
  out = {k: np.zeros(shape) for k in ("prompt", "response", "ptok", "rtok")}
  greedy = np.ones(shape, bool)
  token_lp = np.zeros((b, t))
  lp_all = oracle_token_logprobs(logits[:, :-1], tokens[:, 1:]) if t > 1 else np.zeros((b, 0))
  for i in range(b):
    bad = (seg[i] < 0).any() or (num_segments is not None and (seg[i] > num_segments).any())
    runs = [s for pos, s in enumerate(seg[i]) if s > 0 and (pos == 0 or seg[i, pos - 1] != s)]
    bad = bad or len(runs) != len(set(runs))  # a segment id reappears
    for pos in range(1, t):
      s = seg[i, pos]
      if s <= 0 or s != seg[i, pos - 1]:
        continue
      lp = lp_all[i, pos - 1]
      token_lp[i, pos] = lp
      if num_segments is not None and s > num_segments:
        continue
      k = i if num_segments is None else (i, s - 1)
      role = "response" if response_mask[i, pos] else "prompt"
      out["rtok" if role == "response" else "ptok"][k] += 1  # counted even in a bad row
      if bad:
        continue
      out[role][k] += lp
      tok = tokens[i, pos]
      row = logits[i, pos - 1]
      first_argmax = 0 <= tok < v and np.argmax(row) == tok and not np.isnan(row).any()
      if role == "response" and not (first_argmax and row[tok] > -np.inf):
        greedy[k] = False
    if bad:
      out["prompt"][i] = np.nan
      out["response"][i] = np.nan
      greedy[i] = False
      token_lp[i] = np.nan
  return dict(
    prompt_logprob=out["prompt"],
    response_logprob=out["response"],
    joint_logprob=out["prompt"] + out["response"],
    prompt_tokens=out["ptok"],
    response_tokens=out["rtok"],
    response_greedy=greedy,
    token_logprobs=token_lp,
  )


LOGITS_IMPLEMENTATIONS = {
  # The XLA path on the CPU: whole rows with a masked max for the first argmax
  # (the accelerator branch's code), and the CPU branch's: 8-column chunks with
  # 4-column argmax blocks, merged per row, where they divide V (1000), else a
  # sweep over 512-column slices with a static tail (4097: a 1-column tail).
  "xla-rows": lpk.XlaLogits(lpk.ChunkConfig(max_chunk=2**30, argmax_block=0)),
  "xla-chunked": lpk.XlaLogits(
    lpk.ChunkConfig(max_chunk=8, min_chunk=2, sweep_block=512, argmax_block=4)
  ),
  # Pallas GPU kernels in interpret mode: 64-column tiles (several per row and
  # a masked tail), 4 rows per program with a row tail, and vocabulary splits.
  "pallas_gpu": lpk.PallasGpuLogits(block_rows=4, block_v=64, splits=2, interpret=True),
  # Mosaic TPU kernels in TPU interpret mode: 16-row blocks, 256-column tiles.
  "pallas_tpu": lpk.PallasTpuLogits(block_rows=16, block_v=256, interpret=True),
}


FUSED_IMPLEMENTATIONS = {
  # The XLA sweep in 4-column blocks (many blocks and a tail on small vocabularies).
  "xla": lpk.XlaFused(lpk.FusedConfig(vocab_block=4)),
  # Token chunks of 8 (several and a tail) through the GPU row kernels, interpreted.
  "pallas_gpu": lpk.PallasGpuFused(
    chunk_tokens=8,
    logits=lpk.PallasGpuLogits(block_rows=4, block_v=64, splits=2, bwd_block_v=64),
    interpret=True,
  ),
  # Mosaic TPU tiles of 16 tokens x 128 columns, interpreted.
  "pallas_tpu": lpk.PallasTpuFused(block_rows=16, block_v=128, interpret=True),
}


def random_logits(key, shape, dtype=jnp.float32, scale=3.0):
  return _random_logits(key, tuple(shape), jnp.dtype(dtype), scale)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _random_logits(key, shape, dtype, scale):  # one program, not three
  return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def random_tokens(key, shape, vocab_size):
  return jax.random.randint(key, shape, 0, vocab_size, jnp.int32)


def pad_rows(lengths, t, left=False):
  """HF-style attention mask int32[B, T] for rows of the given lengths."""
  mask = np.zeros((len(lengths), t), np.int32)
  for i, n in enumerate(lengths):
    if left:
      mask[i, t - n :] = 1
    else:
      mask[i, :n] = 1
  return jnp.asarray(mask)


def jitted(fn, *args, **static):
  """``fn(*args, **static)`` compiled as one program: eager calls dispatch (and
  compile) every primitive on its own, which dominates a small test's time."""
  return jax.jit(lambda *a: fn(*a, **static))(*args)


def gradient_derivatives(f, args):
  """Derivatives of ``f``'s gradient: reverse over reverse (``jax.grad`` of a
  function of ``jax.grad``) and forward over reverse (``jax.jvp`` of ``jax.grad``,
  the Hessian-vector product), each w.r.t. every argument, in one program."""
  argnums = tuple(range(len(args)))
  grad = jax.grad(f, argnums)

  def derivatives(*args):
    rr = jax.grad(lambda *a: sum(jnp.sum(jnp.sin(g)) for g in grad(*a)), argnums)(*args)
    tangents = tuple(jnp.cos(jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape) for a in args)
    return rr, jax.jvp(grad, args, tangents)[1]

  return jax.jit(derivatives)(*args)


@contextlib.contextmanager
def without_cpu_kernels():
  """Within: the compiled CPU kernels off (top-k, search, replay), so ops trace
  XLA's own steps, as on a machine without a compiler and in the programs for a
  GPU or TPU. The ops are staged (``jax.jit`` inside), and a trace cached before
  would keep the kernels: JAX's caches are cleared on the way in and out."""
  with contextlib.ExitStack() as stack:
    for module in (cpu_replay, cpu_search, cpu_top_k):
      stack.enter_context(mock.patch.object(module, "available", lambda: False))
    jax.clear_caches()
    try:
      yield
    finally:
      jax.clear_caches()


def holds_cpu_kernels(fn, *args) -> bool:
  """Whether ``jax.jit(fn)``'s program for ``args`` calls a compiled CPU kernel."""
  return "lpkernel_cpu" in jax.jit(fn).lower(*args).as_text()
