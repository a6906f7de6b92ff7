"""Every implementation of each op held to the reference and the float64 oracle.

Logits path: XLA (whole rows: the accelerator branch's code; 8-column chunks:
the CPU branch's), the Pallas GPU kernels (``interpret=True``) and the Pallas TPU
kernels (``pltpu.InterpretParams``), on values, greedy flags and gradients. The
inputs put every case in one batch: V not a multiple of the tile, three or more
tiles, a target in the tail tile, rows not a multiple of the row block, an
all-``-inf`` row, a +1e4 common offset, an out-of-range id, bfloat16 and
float32, with and without softcap and per-example temperature. Interpret mode
does not check block shapes: the static validators do (last tests).
"""

import dataclasses
import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import lpkernel as lpk
from lpkernel import reference
from lpkernel.ops import tiling
from lpkernel.ops.processed import cpu_top_k
from tests.helpers import (
  GRAD_TOLERANCES,
  LOGITS_IMPLEMENTATIONS,
  assert_close,
  gradient_derivatives,
  jitted,
  oracle_token_logprobs,
  pairwise,
)

IMPLEMENTATIONS = LOGITS_IMPLEMENTATIONS  # one registry for every test file (tests/helpers.py)


def _batch(v, dtype, n=19):
  """n rows (not a multiple of the 4- or 16-row blocks) holding every special case."""
  k1, k2 = jax.random.split(jax.random.key(v))
  x = 3 * jax.random.normal(k1, (n, v))
  t = jax.random.randint(k2, (n,), 0, v)
  x = x.at[0].set(-jnp.inf)  # all -inf: -inf, never NaN
  x = x.at[1].add(1e4)  # a common offset
  t = t.at[2].set(v - 1).at[3].set(v)  # the tail tile's last column; out of range
  x = x.at[4, v // 2].set(40.0).at[4, v - 3].set(40.0)  # a tie: first wins
  t = t.at[4].set(v - 3)
  x = x.at[5, v // 2].set(40.0).at[5, v - 3].set(40.0)
  t = t.at[5].set(v // 2)
  return x.astype(dtype), t


# Each implementation meets every pair of vocabulary, dtype and options. TPU
# interpret mode is about 20x slower than GPU interpret mode: its softcap +
# temperature cases run at V=4097 only (17 tiles of 256 and a tail).
CASES = [
  pytest.param(name, v, dtype, options, id=f"{name}-{v}-{jnp.dtype(dtype).name}-{options}")
  for name in IMPLEMENTATIONS
  for v, dtype, options in (
    pairwise((1000, 4097, 32003), (jnp.float32, jnp.bfloat16), ("plain", "softcap+temperature"))
    if name != "pallas_tpu"
    else [
      *itertools.product((1000, 4097, 32003), (jnp.float32, jnp.bfloat16), ("plain",)),
      *itertools.product((4097,), (jnp.float32, jnp.bfloat16), ("softcap+temperature",)),
    ]
  )
]


@pytest.mark.parametrize("name,v,dtype,options", CASES)
def test_logits_implementation_matches_reference_and_oracle(name, v, dtype, options):
  impl = IMPLEMENTATIONS[name]
  if name == "pallas_tpu" and v > 4097:
    impl = lpk.PallasTpuLogits(block_rows=16, block_v=4096, interpret=True)  # 8 tiles, bounded time
  x, t = _batch(v, dtype)
  n = t.shape[0]
  opts = {}
  if options != "plain":
    opts = dict(softcap=30.0, temperature=jnp.linspace(0.5, 2.0, n))
  w = jax.random.normal(jax.random.key(1), (n,))
  scored = jnp.arange(n) != 3  # the poisoned row's gradient is NaN (tested in test_policy)

  def loss(x, tau, impl):
    with_tau = {} if options == "plain" else dict(temperature=tau)  # plain: no temperature
    lp = lpk.token_logprobs(x, t, implementation=impl, **opts | with_tau)
    return jnp.sum(jnp.where(scored & jnp.isfinite(lp), w * lp, 0.0))

  @jax.jit
  def everything(x, tau):  # one program: values, greedy flags and gradients of both
    fixed = opts | ({} if options == "plain" else dict(temperature=tau))
    grads = jax.grad(loss, argnums=(0, 1))
    return (
      lpk.token_logprobs_and_greedy(x, t, implementation=impl, **fixed),
      reference.token_logprobs_and_greedy(x, t, **fixed),
      grads(x, tau, impl),
      grads(x, tau, "reference"),
    )

  tau = opts.get("temperature", jnp.ones(n))
  (lp, greedy), (want_lp, want_greedy), (g, g_tau), (g_ref, g_tau_ref) = everything(x, tau)
  assert_close(lp, want_lp, rtol=2e-5, atol=2e-5, what=f"{name} vs reference")
  oracle = oracle_token_logprobs(x, t, opts.get("temperature", 1.0), opts.get("softcap"))
  assert_close(lp, oracle, rtol=2e-5, atol=2e-5, what=f"{name} vs oracle")
  np.testing.assert_array_equal(greedy, want_greedy)
  assert not bool(greedy[4]) and bool(greedy[5])  # the first of two tied maxima
  assert g.dtype == x.dtype
  # Row 0 (all -inf, masked out) is exactly zero here; autodiff of the plain
  # reference puts 0 * NaN there.
  assert (g[0] == 0).all() and g_tau[0] == 0
  assert_close(g[1:], g_ref[1:], **GRAD_TOLERANCES[jnp.dtype(dtype)], what=f"{name} d logits")
  if options != "plain":  # rows 1 (+1e4 offset) and 3 (poisoned, unscored) apart
    keep = (jnp.arange(n) > 1) & scored
    assert_close(g_tau[keep], g_tau_ref[keep], rtol=1e-4, atol=1e-4, what=f"{name} d tau")


@pytest.mark.parametrize("name", ["xla-rows", "pallas_gpu", "pallas_tpu"])
def test_score_runs_every_implementation(name):
  logits = 2 * jax.random.normal(jax.random.key(2), (3, 7, 300))
  tokens = jax.random.randint(jax.random.key(3), (3, 7), 0, 300)
  mask = jnp.broadcast_to(jnp.arange(7) >= 3, (3, 7))
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 0], [1] * 7, [0, 0, 1, 1, 1, 1, 1]])
  got = lpk.score(
    logits, tokens, mask, segment_ids=seg, num_segments=2, implementation=IMPLEMENTATIONS[name]
  )
  want = lpk.score(
    logits, tokens, mask, segment_ids=seg, num_segments=2, implementation="reference"
  )
  for field in ("prompt_logprob", "response_logprob", "token_logprobs"):
    assert_close(getattr(got, field), getattr(want, field), rtol=1e-5, atol=1e-5, what=field)
  np.testing.assert_array_equal(got.response_greedy, want.response_greedy)


def test_the_reference_is_held_to_the_float64_oracle_values_and_gradients():
  """The yardstick itself, against NumPy in float64 (not against itself): values
  on every special row, and d logits and d temperature by finite differences."""
  x, t = _batch(100, jnp.float32)
  tau = jnp.linspace(0.5, 2.0, x.shape[0])
  lp = lpk.token_logprobs(x, t, temperature=tau, softcap=30.0, implementation="reference")
  oracle = oracle_token_logprobs(x, t, np.asarray(tau), 30.0)
  assert_close(lp, oracle, rtol=2e-6, atol=2e-6, what="reference vs oracle")
  # Gradients on finite rows, by central differences of the float64 oracle.
  rows = np.array([6, 7, 8])
  xs, ts, taus = x[rows], t[rows], tau[rows]
  w = jnp.array([0.3, -1.0, 2.0])

  def loss(x, tau):
    lp = lpk.token_logprobs(x, ts, temperature=tau, softcap=30.0, implementation="reference")
    return jnp.sum(w * lp)

  dx, dtau = jax.grad(loss, argnums=(0, 1))(xs, taus)
  x64, tau64, w64 = (np.asarray(a, np.float64) for a in (xs, taus, w))

  def oracle_loss(x, tau):  # in float64 throughout (the shared oracle reads float32)
    y = 30.0 * np.tanh(x / 30.0) / tau[:, None]
    m = y.max(-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(y - m).sum(-1))
    return float(np.sum(w64 * (y[np.arange(3), np.asarray(ts)] - lse)))

  eps = 1e-4
  for i, j in [(0, 3), (1, int(ts[1])), (2, 50)]:
    e = np.zeros_like(x64)
    e[i, j] = eps
    fd = (oracle_loss(x64 + e, tau64) - oracle_loss(x64 - e, tau64)) / (2 * eps)
    np.testing.assert_allclose(dx[i, j], fd, rtol=1e-4, atol=1e-6)
  for i in range(3):
    e = np.zeros_like(tau64)
    e[i] = eps
    fd = (oracle_loss(x64, tau64 + e) - oracle_loss(x64, tau64 - e)) / (2 * eps)
    np.testing.assert_allclose(dtau[i], fd, rtol=1e-4, atol=1e-6)


# --- the fused path ------------------------------------------------------------------------


FUSED = {
  # The XLA sweep in 256-column blocks: three or more, and a tail, at every V.
  "xla": lpk.XlaFused(lpk.FusedConfig(vocab_block=256)),
  # Token chunks of 8 (two and a tail of 3) through the GPU row kernels.
  "pallas_gpu": lpk.PallasGpuFused(
    chunk_tokens=8,
    logits=lpk.PallasGpuLogits(block_rows=4, block_v=256, splits=2, bwd_block_v=512),
    interpret=True,
  ),
  # Mosaic TPU tiles: 16 tokens (a block and a tail of 3) x 256 columns.
  "pallas_tpu": lpk.PallasTpuFused(block_rows=16, block_v=256, interpret=True),
}


def _fused_batch(v, dtype, n=19, d=16):
  """hidden [n, d], unembed [d, v] on dyadic grids, so every logit is exact in
  float32 whatever the order of accumulation; every special case in one batch:
  row 0 all -inf, row 1 offset by +8192, row 2's target the last column, row
  3's out of range."""
  kh, kw, kt = jax.random.split(jax.random.key(v), 3)
  h = jnp.round(4 * jax.random.normal(kh, (n, d))) / 4
  w = jnp.round(32 * jax.random.normal(kw, (d, v))) / 64
  h = h.at[:, :2].set(0.0).at[1, 0].set(1.0).at[0, 1].set(jnp.inf)
  w = w.at[0].set(8192.0).at[1].set(-1.0)
  t = jax.random.randint(kt, (n,), 0, v).at[2].set(v - 1).at[3].set(v)
  return h.astype(dtype), w.astype(dtype), t


FUSED_CASES = [
  pytest.param(name, v, dtype, options, 1, id=f"{name}-{v}-{jnp.dtype(dtype).name}-{options}")
  for name in FUSED
  for v in (1000, 4097, 32003)
  for dtype in (jnp.float32, jnp.bfloat16)
  for options in ["softcap+temperature" if v == 4097 else "plain"]
  if dtype == jnp.float32 or v == 4097  # bfloat16 with every option, at one V
  # XLA's sweep is also held to the materialised form in tests/test_fused.py; the
  # Pallas kernels meet V=1000 in the tied case below.
  if (name == "xla") == (v == 1000) or (v == 4097 and dtype == jnp.bfloat16)
] + [
  pytest.param(name, 1000, jnp.float32, "softcap+temperature", 0, id=f"{name}-1000-tied")
  for name in FUSED
]


@pytest.mark.parametrize("name,v,dtype,options,vocab_axis", FUSED_CASES)
def test_fused_implementation_matches_reference_and_oracle(name, v, dtype, options, vocab_axis):
  impl = FUSED[name]
  if v > 4097 and name == "pallas_gpu":  # 8 tiles per row, bounded interpret time
    impl = dataclasses.replace(impl, logits=lpk.PallasGpuLogits(block_v=4096, splits=2))
  elif v > 4097 and name == "pallas_tpu":
    impl = lpk.PallasTpuFused(block_rows=16, block_v=4096, interpret=True)
  h, w, t = _fused_batch(v, dtype)
  n = t.shape[0]
  tau = jnp.linspace(0.5, 2.0, n) if options != "plain" else jnp.ones(n)
  softcap = 30.0 if options != "plain" else None
  c = jax.random.normal(jax.random.key(7), (3, n))
  keep = (jnp.arange(n) != 0) & (jnp.arange(n) != 3)  # the -inf row and the poisoned one
  table = w if vocab_axis == 1 else w.T

  def stats(h, table, tau, impl, t=t):
    return lpk.fused_token_stats(
      h, table, t, temperature=tau, softcap=softcap, implementation=impl, vocab_axis=vocab_axis
    )

  def loss(h, table, tau, impl, t=t, c=c):
    s = stats(h, table, tau, impl, t)
    return jnp.sum(c[0] * s.logprobs + c[1] * s.lse + c[2] * s.entropy)

  with jax.default_matmul_precision("highest"):
    got = jitted(stats, h, table, tau, impl=impl)
    want = jitted(stats, h, table, tau, impl="reference")
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    g = grad(jnp.where(keep[:, None], h, 0), table, tau, impl, t, jnp.where(keep, c, 0.0))
    # The reference on the kept rows alone: autodiff of the plain form puts 0 * inf in row 0.
    g_ref = grad(h[keep], table, tau[keep], "reference", t[keep], c[:, keep])
  for field in ("logprobs", "lse", "entropy"):  # the all -inf row: -inf, -inf, 0
    assert_close(getattr(got, field), getattr(want, field), rtol=2e-5, atol=2e-5, what=field)
  assert got.entropy[0] == 0
  np.testing.assert_array_equal(got.greedy, want.greedy)
  z = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
  oracle = oracle_token_logprobs(z, t, tau, softcap)
  assert_close(got.logprobs, oracle, rtol=2e-5, atol=2e-5, what=f"{name} vs oracle")
  assert np.isneginf(got.logprobs[0]) and np.isnan(got.logprobs[3])
  tol = dict(rtol=1e-4, atol=1e-5) if dtype == jnp.float32 else GRAD_TOLERANCES[jnp.dtype(dtype)]
  assert g[0].dtype == h.dtype and g[1].dtype == w.dtype and g[1].shape == table.shape
  assert (g[0][~keep] == 0).all() and (g[2][~keep] == 0).all()
  g = [g[0][keep], g[1], g[2][keep]]
  if dtype == jnp.bfloat16:
    # d logits are rounded to bfloat16 for the matmuls (the plain form keeps them in
    # float32): against the 8192 column of row 1 that is a few units of d hidden[:, 0].
    g[0], g_ref = g[0][:, 1:], (g_ref[0][:, 1:], *g_ref[1:])
  for what, a, b in zip(("d hidden", "d unembed", "d tau"), g, g_ref, strict=True):
    assert_close(a, b, **tol, what=f"{name} {what}")


LOSS_IMPLEMENTATIONS = {
  # Token chunks of 8 (two and a tail of 3), each chunk's logits made once.
  "xla-chunks": lpk.XlaFused(
    lpk.FusedConfig(vocab_block=256, loss_chunks=True, loss_chunk_tokens=8)
  ),
  # The forward sweep, then the backward sweep from its statistics.
  "xla-sweeps": lpk.XlaFused(lpk.FusedConfig(vocab_block=256, loss_chunks=False)),
  "pallas_gpu": FUSED["pallas_gpu"],
  # No one-pass loss: the Mosaic forward kernel, then the two gradient kernels.
  "pallas_tpu": FUSED["pallas_tpu"],
}


def _loss_rows(n):
  """(tau, weights, dead) of a loss test's n rows: rows 0, 3, 7 and 11 weigh 0 (the
  all -inf row, the out-of-range id, a NaN row, and a zero temperature on row 11,
  which stays out)."""
  dead = jnp.zeros(n, bool).at[jnp.array([0, 3, 7, 11])].set(True)
  weights = jax.random.uniform(jax.random.key(3), (n,), minval=0.5, maxval=1.5)
  tau = jnp.linspace(0.5, 2.0, n).at[11].set(0.0)
  return tau, jnp.where(dead, 0.0, weights), dead


def _oracle_lse(z, tau, softcap):
  y = np.where(np.isneginf(z), -np.inf, softcap * np.tanh(z / softcap)) / tau[:, None]
  m = np.max(y, axis=-1, keepdims=True)
  return (np.log(np.sum(np.exp(y - m), axis=-1, keepdims=True)) + m)[:, 0]


@pytest.mark.parametrize(
  "name,dtype",
  [pytest.param(name, jnp.float32, id=f"{name}-float32") for name in LOSS_IMPLEMENTATIONS]
  # bfloat16 where the gradients are written in the forward pass.
  + [
    pytest.param(name, jnp.bfloat16, id=f"{name}-bfloat16") for name in ("xla-chunks", "pallas_gpu")
  ],
)
def test_fused_loss_matches_reference_and_oracle(name, dtype):
  """``fused_nll_loss`` with z-loss, softcap and per-token temperature at V = 1000
  (three 256-column tiles and a tail):
  the value against the reference and the float64 oracle, the gradients (written
  in the forward pass where the implementation does) against the reference's
  autodiff. Zero-weight rows hold the all -inf row, the out-of-range id and NaN."""
  impl = LOSS_IMPLEMENTATIONS[name]
  h, w, t = _fused_batch(1000, dtype)
  n = t.shape[0]
  tau, weights, dead = _loss_rows(n)
  h = h.at[7].set(jnp.nan)

  def loss(h, w, tau, impl, keep=slice(None)):
    return lpk.fused_nll_loss(
      h[keep],
      w,
      t[keep],
      weights[keep],
      z_loss=1e-3,
      temperature=tau[keep],
      softcap=30.0,
      implementation=impl,
    )

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=(3, 4))
  with jax.default_matmul_precision("highest"):
    value, g = grad(h, w, tau, impl)
    # The reference on the live rows alone (its autodiff puts 0 * NaN in dead rows).
    keep = tuple(int(i) for i in np.flatnonzero(~dead))
    ref_value, g_ref = jax.jit(
      jax.value_and_grad(
        lambda h, w, tau: loss(h, w, tau, "reference", jnp.array(keep)), argnums=(0, 1, 2)
      )
    )(h, w, tau)
  assert_close(value, ref_value, rtol=2e-6, atol=0, what=f"{name} loss")
  z = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
  live = ~np.asarray(dead)
  tau64 = np.asarray(tau, np.float64)[live]
  lp = oracle_token_logprobs(z[live], np.asarray(t)[live], tau64, 30.0)
  want = np.sum(
    np.asarray(weights, np.float64)[live] * (1e-3 * _oracle_lse(z[live], tau64, 30.0) ** 2 - lp)
  )
  assert_close(value, want, rtol=2e-6, atol=0, what=f"{name} vs oracle")
  assert g[0].dtype == h.dtype and g[1].dtype == w.dtype
  assert (g[0][~live] == 0).all() and (g[2][~live] == 0).all()
  tol = dict(rtol=1e-4, atol=1e-5) if dtype == jnp.float32 else GRAD_TOLERANCES[jnp.dtype(dtype)]
  g, g_ref = ([a[0][live], a[1], a[2][live]] for a in (g, g_ref))
  # d hidden[:, 0] is 8192 times the row's sum of d logits, which the z-loss term
  # keeps away from 0: float32 rounding of that sum (about 1e-7 of its 1-norm)
  # comes out 8192 times larger, whatever the order of summation; in bfloat16 the
  # d logits themselves are rounded (as in the test above).
  if dtype == jnp.float32:
    assert_close(g[0][:, 0], g_ref[0][:, 0], rtol=1e-4, atol=8192 * 2e-6, what="d hidden[:, 0]")
  g[0], g_ref = g[0][:, 1:], (g_ref[0][:, 1:], *g_ref[1:])
  for what, a, b in zip(("d hidden", "d unembed", "d tau"), g, g_ref, strict=True):
    assert_close(a, b, **tol, what=f"{name} {what}")


LOGITS_LOSS_IMPLEMENTATIONS = {
  # The forward pass, then d logits from its statistics (two Pallas GPU kernels:
  # vocabulary splits; two Mosaic kernels).
  **IMPLEMENTATIONS,
  # One kernel per row block: the online pass, the cotangents, then d logits.
  "pallas_gpu-one-kernel": dataclasses.replace(
    IMPLEMENTATIONS["pallas_gpu"], splits=1, loss_kernel=True
  ),
  # One Mosaic kernel over blocks of whole rows (16 rows: a block and a tail).
  "pallas_tpu-one-kernel": dataclasses.replace(IMPLEMENTATIONS["pallas_tpu"], loss_kernel=True),
}


@pytest.mark.parametrize(
  "name,dtype",
  [pytest.param(name, jnp.float32, id=f"{name}-float32") for name in LOGITS_LOSS_IMPLEMENTATIONS]
  + [
    pytest.param(name, jnp.bfloat16, id=f"{name}-bfloat16")
    for name in ("xla-chunked", "pallas_gpu-one-kernel")
  ],
)
def test_logits_loss_matches_reference_and_oracle(name, dtype):
  """``nll_loss`` with z-loss, softcap and per-token temperature at V = 1000 (tiles
  and a tail, a target in the tail, a +1e4 offset, ties): the value against the
  reference and the float64 oracle, d logits and d tau (written in the forward
  pass) against the reference's autodiff. Zero-weight rows hold the all -inf row,
  the out-of-range id, a NaN row and a zero temperature; their gradients are 0."""
  impl = LOGITS_LOSS_IMPLEMENTATIONS[name]
  x, t = _batch(1000, dtype)
  n = t.shape[0]
  tau, weights, dead = _loss_rows(n)
  x = x.at[7].set(jnp.nan)
  live = np.flatnonzero(~dead)

  def loss(x, tau, impl, keep=slice(None)):
    return lpk.nll_loss(
      x[keep],
      t[keep],
      weights[keep],
      z_loss=1e-3,
      temperature=tau[keep],
      softcap=30.0,
      implementation=impl,
    )

  value, g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)(x, tau, impl)
  # The reference on the live rows alone (its autodiff puts 0 * NaN in dead rows).
  ref_value, g_ref = jax.jit(
    jax.value_and_grad(lambda x, tau: loss(x, tau, "reference", jnp.array(live)), argnums=(0, 1))
  )(x, tau)
  assert_close(value, ref_value, rtol=2e-6, atol=0, what=f"{name} loss")
  tau64 = np.asarray(tau, np.float64)[live]
  z = np.asarray(x.astype(jnp.float32), np.float64)[live]
  lp = oracle_token_logprobs(z, np.asarray(t)[live], tau64, 30.0)
  want = np.sum(np.asarray(weights)[live] * (1e-3 * _oracle_lse(z, tau64, 30.0) ** 2 - lp))
  assert_close(value, want, rtol=2e-6, atol=0, what=f"{name} vs oracle")
  assert g[0].dtype == x.dtype
  assert (g[0][np.asarray(dead)] == 0).all() and (g[1][np.asarray(dead)] == 0).all()
  tol = GRAD_TOLERANCES[jnp.dtype(dtype)]
  assert_close(g[0][live], g_ref[0][live], **tol, what=f"{name} d logits")
  assert_close(g[1][live], g_ref[1][live], rtol=1e-4, atol=1e-5, what=f"{name} d tau")


# --- static block validation ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_every_kernel_configuration_tiles_the_hardware(dtype):
  for impl in [lpk.PallasGpuLogits(), IMPLEMENTATIONS["pallas_gpu"]]:
    tiling.check_gpu_block("forward", (impl.block_rows, impl.block_v), dtype)
    tiling.check_gpu_block("backward", (impl.bwd_block_rows, impl.bwd_block_v), dtype)
  for impl in [lpk.PallasTpuLogits(), IMPLEMENTATIONS["pallas_tpu"]]:
    for shape in [(13, 1000), (4096, 128256), (16, 32003)]:
      x = jax.ShapeDtypeStruct(shape, dtype)
      impl.blocks(x)  # validates (rows, columns) against the array and dtype
  for impl in [lpk.PallasGpuFused(), FUSED["pallas_gpu"]]:
    for tiles in [impl.logits, FUSED["pallas_gpu"].logits]:
      tiling.check_gpu_block("forward", (tiles.block_rows, tiles.block_v), dtype)
      tiling.check_gpu_block("backward", (tiles.bwd_block_rows, tiles.bwd_block_v), dtype)
  for impl in [lpk.PallasTpuFused(), FUSED["pallas_tpu"]]:
    for n, d, v in [(13, 64, 1000), (32768, 4096, 128256), (16, 640, 32003)]:
      h = jax.ShapeDtypeStruct((n, d), dtype)
      impl.blocks(h, jax.ShapeDtypeStruct((d, v), dtype), 1)  # validates every tile
      impl.blocks(h, jax.ShapeDtypeStruct((v, d), dtype), 0)


def test_validators_reject_untileable_blocks():
  with pytest.raises(ValueError, match="power of two"):
    tiling.check_gpu_block("forward", (3, 1024), jnp.float32)
  with pytest.raises(ValueError, match="more than"):
    tiling.check_gpu_block("forward", (64, 4096), jnp.float32)
  with pytest.raises(ValueError, match="multiple of 16 for bfloat16"):
    tiling.check_tpu_block("logits", (8, 256), (64, 1000), jnp.bfloat16)
  with pytest.raises(ValueError, match="multiple of 128"):
    tiling.check_tpu_block("logits", (8, 100), (64, 1000), jnp.float32)
  tiling.check_tpu_block("logits", (5, 1000), (5, 1000), jnp.float32)  # whole axes are fine
  with pytest.raises(ValueError, match="multiples of \\(8, 128\\)"):
    lpk.PallasTpuLogits(block_rows=4)
  with pytest.raises(ValueError, match="multiples of \\(8, 128\\)"):
    lpk.PallasTpuFused(block_v=200)
  with pytest.raises(ValueError, match="hidden block rows=8 must be a multiple of 16"):
    lpk.PallasTpuFused(block_rows=8).blocks(
      jax.ShapeDtypeStruct((64, 128), jnp.bfloat16),
      jax.ShapeDtypeStruct((128, 1000), jnp.bfloat16),
      1,
    )
  with pytest.raises(ValueError, match="chunk_tokens"):
    lpk.PallasGpuFused(chunk_tokens=0)


# --- the kernels compile for their hardware ------------------------------------------------------


@pytest.mark.parametrize(
  "impl,platform,call",
  [
    (lpk.PallasGpuLogits(), "cuda", "__gpu$xla.gpu.triton"),
    (lpk.PallasGpuLogits(block_rows=4, block_v=512, splits=3), "cuda", "__gpu$xla.gpu.triton"),
    (lpk.PallasTpuLogits(), "tpu", "tpu_custom_call"),
  ],
  ids=["gpu-default", "gpu-split", "tpu-default"],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("options", ["plain", "softcap+temperature"])
def test_kernels_lower_for_their_hardware(impl, platform, call, dtype, options):
  """Interpret mode runs primitives a GPU or TPU compiler may lack: lowering the
  real kernels (Triton, Mosaic) here catches those, forward and backward."""
  x = jax.ShapeDtypeStruct((64, 1000), dtype)
  t = jax.ShapeDtypeStruct((64,), jnp.int32)
  tau = jax.ShapeDtypeStruct((64,), jnp.float32) if options != "plain" else None
  softcap = 30.0 if options != "plain" else None

  def loss(x, t, tau):
    temperature = 1.0 if tau is None else tau
    lp = lpk.token_logprobs(x, t, temperature=temperature, softcap=softcap, implementation=impl)
    return jnp.sum(lp)

  argnums = (0,) if tau is None else (0, 2)
  lowered = jax.jit(jax.grad(loss, argnums)).trace(x, t, tau)
  text = lowered.lower(lowering_platforms=(platform,)).as_text()
  assert text.count(f"custom_call @{call}") == 2  # the forward partials and the backward
  assert not _xla_reductions_of(text, x.shape)  # d temperature too comes from the kernel


def _xla_reductions_of(stablehlo: str, shape) -> list[str]:
  """The XLA (not kernel) reductions that read an array of ``shape``."""
  tensor = "tensor<" + "x".join(map(str, shape)) + "x"
  return [line for line in stablehlo.splitlines() if "stablehlo.reduce" in line and tensor in line]


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_nan_anywhere_in_a_row_wins_in_every_implementation(name):
  x = jnp.zeros((3, 300)).at[0, 7].set(-jnp.inf).at[0, 290].set(jnp.nan).at[1, 3].set(-jnp.inf)
  lp, greedy = lpk.token_logprobs_and_greedy(
    x, jnp.array([7, 3, 0]), implementation=IMPLEMENTATIONS[name]
  )
  assert np.isnan(lp[0]) and np.isneginf(lp[1]) and np.isfinite(lp[2])
  np.testing.assert_array_equal(greedy, [False, False, True])


@pytest.mark.parametrize(
  "impl,platform,call,count",
  [
    (lpk.PallasGpuFused(), "cuda", "__gpu$xla.gpu.triton", 2),
    (lpk.PallasGpuFused(chunk_tokens=24), "cuda", "__gpu$xla.gpu.triton", 4),
    (lpk.PallasTpuFused(), "tpu", "tpu_custom_call", 3),
    (lpk.PallasTpuFused(256, 512, vmem_limit_bytes=64 << 20), "tpu", "tpu_custom_call", 3),
  ],
  ids=["gpu-one-chunk", "gpu-chunks", "tpu-default", "tpu-wide-vmem"],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("vocab_axis", [1, 0], ids=["unembed", "tied"])
def test_fused_kernels_lower_for_their_hardware(impl, platform, call, count, dtype, vocab_axis):
  """The fused kernels, forward and backward (temperature and softcap on), lowered
  for their hardware: GPU one row kernel per pass (in the chunk loop, and once
  more for a tail chunk), TPU the forward, d hidden and d unembed kernels."""

  n, d, v = 64, 128, 1000
  h = jax.ShapeDtypeStruct((n, d), dtype)
  w = jax.ShapeDtypeStruct((d, v) if vocab_axis == 1 else (v, d), dtype)
  t = jax.ShapeDtypeStruct((n,), jnp.int32)
  tau = jax.ShapeDtypeStruct((n,), jnp.float32)

  def loss(h, w, t, tau):
    s = lpk.fused_token_stats(
      h, w, t, temperature=tau, softcap=30.0, implementation=impl, vocab_axis=vocab_axis
    )
    return jnp.sum(s.logprobs + s.lse + s.entropy)

  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 3))).trace(h, w, t, tau)
  text = lowered.lower(lowering_platforms=(platform,)).as_text()
  assert text.count(f"custom_call @{call}") == count


@pytest.mark.parametrize(
  "impl,platform,call,count",
  [
    (lpk.PallasGpuFused(), "cuda", "__gpu$xla.gpu.triton", 2),
    (lpk.PallasGpuFused(chunk_tokens=24), "cuda", "__gpu$xla.gpu.triton", 4),
    (lpk.PallasTpuFused(), "tpu", "tpu_custom_call", 3),
  ],
  ids=["gpu-one-chunk", "gpu-chunks", "tpu"],
)
def test_fused_loss_lowers_for_their_hardware(impl, platform, call, count):
  """The training loss's forward pass with its gradients: on GPUs the row kernel's
  forward and gradient passes once per chunk shape (no recompute in the backward),
  on TPUs the forward kernel then the two gradient kernels."""

  n, d, v = 64, 128, 1000
  h = jax.ShapeDtypeStruct((n, d), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((d, v), jnp.bfloat16)
  t = jax.ShapeDtypeStruct((n,), jnp.int32)
  tau, weights = (jax.ShapeDtypeStruct((n,), jnp.float32),) * 2

  def loss(h, w, t, tau, weights):
    return lpk.fused_nll_loss(
      h, w, t, weights, z_loss=1e-4, temperature=tau, softcap=30.0, implementation=impl
    )

  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 3))).trace(h, w, t, tau, weights)
  assert lowered.lower(lowering_platforms=(platform,)).as_text().count(f"@{call}") == count


@pytest.mark.parametrize(
  "impl,platform,call,count",
  [
    (lpk.PallasGpuLogits(loss_kernel=True), "cuda", "__gpu$xla.gpu.triton", 1),
    (lpk.PallasGpuLogits(), "cuda", "__gpu$xla.gpu.triton", 2),
    (
      lpk.PallasGpuLogits(block_rows=4, block_v=512, splits=3, loss_kernel=True),
      "cuda",
      "__gpu$xla.gpu.triton",
      2,
    ),
    (lpk.PallasTpuLogits(), "tpu", "tpu_custom_call", 2),
    (lpk.PallasTpuLogits(loss_kernel=True), "tpu", "tpu_custom_call", 1),
  ],
  ids=["gpu-one-kernel", "gpu-default", "gpu-split", "tpu", "tpu-one-kernel"],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_logits_loss_lowers_for_their_hardware(impl, platform, call, count, dtype):
  """The logits loss's forward pass with its gradient (z-loss, softcap, temperature):
  on GPUs with ``loss_kernel`` one kernel per row block (its cotangents computed
  inside); by default, or with vocabulary splits, the forward kernel then the
  gradient kernel; on TPUs the forward then the gradient kernel, or with
  ``loss_kernel`` one kernel over whole rows. Nothing runs in the backward."""
  x = jax.ShapeDtypeStruct((64, 1000), dtype)
  t = jax.ShapeDtypeStruct((64,), jnp.int32)
  tau, weights = (jax.ShapeDtypeStruct((64,), jnp.float32),) * 2

  def loss(x, t, tau, weights):
    return lpk.nll_loss(
      x, t, weights, z_loss=1e-4, temperature=tau, softcap=30.0, implementation=impl
    )

  lowered = jax.jit(jax.grad(loss, argnums=(0, 2))).trace(x, t, tau, weights)
  text = lowered.lower(lowering_platforms=(platform,)).as_text()
  assert text.count(f"@{call}") == count
  assert not _xla_reductions_of(text, x.shape)  # d temperature too comes from the kernels


@pytest.mark.parametrize(
  "impl",
  [
    lpk.PallasGpuFused(chunk_tokens=128, logits=lpk.PallasGpuLogits(block_v=512), interpret=True),
    lpk.PallasTpuFused(block_rows=128, block_v=512, interpret=True),
  ],
  ids=["pallas_gpu", "pallas_tpu"],
)
def test_pallas_fused_kernels_never_hold_the_logits(impl):
  """Compiled temporaries (interpret mode) against the [N, V] float32 logits: the
  GPU path holds one 128-token chunk of the 2048 (6%) and its d logits, plus a
  float32 d unembed; the TPU kernels only tiles."""
  n, d, v = 2048, 64, 4096
  h, w = jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32)
  t = jnp.zeros(n, jnp.int32)

  def loss(h, w):
    return jnp.sum(lpk.fused_token_stats(h, w, t, implementation=impl).logprobs)

  for fn, bound in [(loss, 0.10), (jax.grad(loss, argnums=(0, 1)), 0.15)]:
    temp = jax.jit(fn).lower(h, w).compile().memory_analysis().temp_size_in_bytes
    assert temp < bound * n * v * 4, f"{temp / (n * v * 4):.3f} of the logits' bytes"


def test_gpu_fused_chunks_follow_their_budget():
  impl = lpk.PallasGpuFused()  # 1 GiB of float32 logits per chunk
  assert impl.chunk(32768, 128256) == 2048 and impl.chunk(32768, 32000) == 8320
  assert impl.chunk(100, 128256) == 100  # fewer tokens than a chunk: one chunk
  assert impl.chunk(32768, 10**7) == 128  # at least 128 tokens
  assert lpk.PallasGpuFused(chunk_tokens=4096).chunk(1000, 50) == 1000


# --- derivatives of derivatives and empty inputs -----------------------------------


def _second_order_rows(n=6, v=300):
  """n rows over V = 300 (two 256-column tiles, a tail), a dead row (weight 0)."""
  k1, k2 = jax.random.split(jax.random.key(7))
  t = jax.random.randint(k2, (n,), 0, v)
  weights = jnp.linspace(0.5, 2.0, n).at[1].set(0.0)
  return k1, t, weights, jnp.linspace(0.5, 2.0, n)


def _second_order_inputs(path):
  """The arguments differentiated: (logits, tau) or (hidden, unembed, tau)."""
  key, t, weights, tau = _second_order_rows()
  if path == "logits":
    return (2 * jax.random.normal(key, (t.shape[0], 300)), tau)
  kh, kw = jax.random.split(key)
  return (jax.random.normal(kh, (t.shape[0], 8)), jax.random.normal(kw, (8, 300)), tau)


def _objective(op, impl):
  """A scalar of the op's outputs (softcap, temperature; z-loss for the losses;
  every ``TokenStats`` field for the fused stats)."""
  _, t, weights, _ = _second_order_rows()
  opts = dict(softcap=5.0, implementation=impl)
  if op == "token_logprobs":
    return lambda x, tau: jnp.sum(weights * lpk.token_logprobs(x, t, temperature=tau, **opts))
  if op == "nll_loss":
    return lambda x, tau: lpk.nll_loss(x, t, weights, z_loss=0.1, temperature=tau, **opts)
  if op == "fused_nll_loss":
    return lambda h, w, tau: lpk.fused_nll_loss(
      h, w, t, weights, z_loss=0.1, temperature=tau, **opts
    )

  def stats(h, w, tau):
    s = lpk.fused_token_stats(h, w, t, temperature=tau, **opts)
    return jnp.sum(weights * s.logprobs + 0.1 * s.lse + 0.3 * s.entropy)

  return stats


@functools.cache
def _reference_derivatives(path, op):
  return gradient_derivatives(_objective(op, "reference"), _second_order_inputs(path))


SECOND_ORDER = [
  *(
    pytest.param("logits", name, op, id=f"{name}-{op}")
    for name in LOGITS_LOSS_IMPLEMENTATIONS
    for op in ("token_logprobs", "nll_loss")
    # The per-token rules are shared by every implementation: the chunked bit
    # views and a kernel cover them (the one-kernel loss exists for the loss only).
    if op == "nll_loss" or name in ("xla-chunked", "pallas_gpu")
  ),
  *(
    pytest.param("fused", name, op, id=f"fused-{name}-{op}")
    for name in LOSS_IMPLEMENTATIONS
    for op in ("fused_token_stats", "fused_nll_loss")
    # The per-token rules are shared by every implementation (the sweeps and a
    # kernel cover them); each loss path has its own.
    if op == "fused_nll_loss" or name in ("xla-sweeps", "pallas_gpu")
  ),
]


@pytest.mark.parametrize("path,name,op", SECOND_ORDER)
def test_second_derivatives_are_the_reference_s(path, name, op):
  """Second derivatives w.r.t. every input (logits or hidden and unembed, and
  temperature; with softcap and z-loss) equal the reference's on every
  implementation: the custom VJP's rules are differentiated as the XLA
  implementation's (a kernel has no derivative; the XLA bit views carry their
  own), never with a term silently dropped."""
  impl = (LOGITS_LOSS_IMPLEMENTATIONS if path == "logits" else LOSS_IMPLEMENTATIONS)[name]
  args = _second_order_inputs(path)
  got = gradient_derivatives(_objective(op, impl), args)
  want = _reference_derivatives(path, op)
  names = ("logits", "temperature") if path == "logits" else ("hidden", "unembed", "temperature")
  for what, a, b in zip(("rev-rev", "fwd-rev"), got, want, strict=True):
    for arg, ga, gb in zip(names, a, b, strict=True):
      scale = float(jnp.max(jnp.abs(gb)))
      assert_close(ga, gb, rtol=1e-4, atol=1e-5 * scale, what=f"{name} {op} {what} {arg}")


def test_bfloat16_fused_second_derivatives():
  """The CPU's bfloat16 backward sweep carries ``d unembed`` as uint16 bits (see
  ``XlaFused.grads``), which have no derivative: its derivatives come from a
  bfloat16 carry. Held to the float32 reference within bfloat16's rounding (a
  dropped term is off by the derivative's whole size)."""
  impl = LOSS_IMPLEMENTATIONS["xla-sweeps"]
  h, w, tau = _second_order_inputs("fused")
  args = (h.astype(jnp.bfloat16), w.astype(jnp.bfloat16), tau)
  got = gradient_derivatives(_objective("fused_token_stats", impl), args)[0]
  want = _reference_derivatives("fused", "fused_token_stats")[0]
  for arg, a, b in zip(("hidden", "unembed", "temperature"), got, want, strict=True):
    scale = float(jnp.max(jnp.abs(b)))
    assert_close(a.astype(jnp.float32), b, rtol=0, atol=0.1 * scale, what=f"rev-rev {arg}")


def test_third_derivatives_are_the_reference_s():
  """The rules' derivative rule calls the op again for its values, so a third
  derivative meets the same rule: exact at every order (Pallas GPU kernels)."""
  key, t, weights, _ = _second_order_rows()
  x = 2 * jax.random.normal(key, (t.shape[0], 300))

  def third(impl):
    def lp(x):
      return jnp.sum(weights * lpk.token_logprobs(x, t, implementation=impl))

    def nested(f):
      return lambda x: jnp.sum(jnp.sin(jax.grad(f)(x)))

    return jax.jit(jax.grad(nested(nested(lp))))(x)

  want = third("reference")
  got = third(IMPLEMENTATIONS["pallas_gpu"])
  assert_close(got, want, rtol=1e-3, atol=1e-3 * float(jnp.max(jnp.abs(want))), what="d3")


EMPTY_CASES = [
  # Kernels see no dtype-specific code for no rows; the XLA loss path does.
  *(
    pytest.param("logits", name, jnp.float32, id=f"logits-{name}")
    for name in LOGITS_LOSS_IMPLEMENTATIONS
  ),
  *(
    pytest.param("fused", name, dtype, id=f"fused-{name}-{jnp.dtype(dtype).name}")
    for name in LOSS_IMPLEMENTATIONS
    for dtype in (jnp.float32, jnp.bfloat16)
  ),
]


@pytest.mark.parametrize("path,name,dtype", EMPTY_CASES)
def test_every_implementation_takes_no_rows(path, name, dtype):
  """N = 0 (an empty batch): empty per-token results, a zero loss and zero
  gradients on every implementation (no kernel is launched over no rows)."""
  t = jnp.zeros((0,), jnp.int32)
  if path == "logits":
    impl = LOGITS_LOSS_IMPLEMENTATIONS[name]
    x = jnp.zeros((0, 300), dtype)
    lp, dx = jax.value_and_grad(lambda x: lpk.nll_loss(x, t, z_loss=0.1, implementation=impl))(x)
    assert lpk.token_logprobs(x, t, implementation=impl).shape == (0,)
    assert float(lp) == 0.0 and dx.shape == (0, 300) and dx.dtype == dtype
    return
  impl = LOSS_IMPLEMENTATIONS[name]
  h, w = jnp.zeros((0, 8), dtype), jnp.ones((8, 300), dtype)
  loss, (dh, dw) = jax.value_and_grad(
    lambda h, w: lpk.fused_nll_loss(h, w, t, z_loss=0.1, implementation=impl), (0, 1)
  )(h, w)
  dh2, dw2 = jax.grad(
    lambda h, w: jnp.sum(lpk.fused_token_logprobs(h, w, t, implementation=impl)), (0, 1)
  )(h, w)
  assert float(loss) == 0.0 and dh.shape == dh2.shape == (0, 8)
  assert dw.dtype == dw2.dtype == dtype
  chex.assert_trees_all_equal((dw, dw2), (jnp.zeros_like(w), jnp.zeros_like(w)))


# Every kernel (their index arithmetic is written by hand) and one XLA path per op.
X64_CASES = [
  *(
    pytest.param("logits", name, id=f"logits-{name}")
    for name in ("xla-rows", "pallas_gpu", "pallas_gpu-one-kernel", "pallas_tpu-one-kernel")
  ),
  *(
    pytest.param("fused", name, id=f"fused-{name}")
    for name in ("xla-chunks", "pallas_gpu", "pallas_tpu")
  ),
]


@pytest.mark.parametrize("path,name", X64_CASES)
def test_implementations_run_under_x64(path, name):
  """``jax_enable_x64`` (64-bit default ints and floats) changes no number: the
  per-token values, the loss and the gradients (temperature included) equal the
  32-bit run's. (The GPU kernels' index arithmetic defaulted to int64 and
  raised a ``TypeError`` there.)"""
  x, t = _batch(300, jnp.float32, n=9)
  tau = jnp.linspace(0.5, 2.0, 9)
  w = jnp.ones((9,)).at[0].set(0.0).at[3].set(0.0)  # the all -inf row, the bad id

  if path == "logits":
    impl, args = LOGITS_LOSS_IMPLEMENTATIONS[name], (x,)

    def run(x, tau):
      lp = lpk.token_logprobs(x, t, temperature=tau, implementation=impl)
      loss = lpk.nll_loss(x, t, w, z_loss=0.1, temperature=tau, implementation=impl)
      return loss + jnp.sum(jnp.where(w != 0, lp, 0.0)), lp
  else:
    impl = LOSS_IMPLEMENTATIONS[name]
    args = (
      jax.random.normal(jax.random.key(1), (9, 8)),
      jax.random.normal(jax.random.key(2), (8, 300)),
    )

    def run(h, u, tau):
      lp = lpk.fused_token_logprobs(h, u, t, temperature=tau, implementation=impl)
      loss = lpk.fused_nll_loss(h, u, t, w, z_loss=0.1, temperature=tau, implementation=impl)
      return loss + jnp.sum(jnp.where(w != 0, lp, 0.0)), lp

  step = jax.value_and_grad(run, tuple(range(len(args) + 1)), has_aux=True)
  want = jax.jit(step)(*args, tau)
  with jax.enable_x64(True):
    got = jax.jit(step)(*args, tau)
  chex.assert_trees_all_equal_dtypes(got, want)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)


def test_tpu_kernels_lower_under_vmap():
  """``jax.vmap`` of the TPU kernels (each op and its gradient) lowers to Mosaic
  calls with the batch as an extra grid axis. (JAX's TPU interpreter cannot run
  a vmapped kernel: it ignores the batch's grid axis; the GPU kernels run vmapped
  in interpret mode, below.)"""
  x = jax.ShapeDtypeStruct((3, 64, 1024), jnp.float32)
  t = jax.ShapeDtypeStruct((3, 64), jnp.int32)
  h = jax.ShapeDtypeStruct((3, 64, 128), jnp.float32)
  w, weights = jnp.zeros((128, 1024)), jnp.ones((64,))

  def lowered(f, *args):
    text = jax.jit(jax.vmap(f)).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    return text.count("@tpu_custom_call")

  for impl, count in ((lpk.PallasTpuLogits(), 2), (lpk.PallasTpuLogits(loss_kernel=True), 1)):
    loss = jax.value_and_grad(
      lambda a, b, impl=impl: lpk.nll_loss(a, b, weights, implementation=impl)
    )
    assert lowered(loss, x, t) == count
  stats = jax.grad(
    lambda a, b: jnp.sum(lpk.fused_token_logprobs(a, w, b, implementation=lpk.PallasTpuFused()))
  )
  assert lowered(stats, h, t) == 3


def test_gpu_kernels_run_under_vmap():
  """``jax.vmap`` of the Pallas GPU kernels (interpreted), values and gradients,
  equals the reference on the unbatched rows."""
  k1, k2, k3 = jax.random.split(jax.random.key(11), 3)
  x, t = 3 * jax.random.normal(k1, (3, 5, 300)), jax.random.randint(k2, (3, 5), 0, 300)
  h, w = jax.random.normal(k3, (3, 5, 8)), jax.random.normal(k1, (8, 300))

  def both(impl, fused_impl):
    def lp(x, t):
      return jnp.sum(jnp.sin(lpk.token_logprobs(x, t, implementation=impl)))

    def fused(h, t):
      return jnp.sum(jnp.sin(lpk.fused_token_logprobs(h, w, t, implementation=fused_impl)))

    return jax.jit(jax.vmap(jax.value_and_grad(lp)))(x, t), jax.jit(
      jax.vmap(jax.value_and_grad(fused))
    )(h, t)

  got = both(IMPLEMENTATIONS["pallas_gpu"], FUSED["pallas_gpu"])
  want = both("reference", "reference")
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert_close(a, b, rtol=1e-5, atol=1e-5, what="vmapped")


# --- backend paths: chosen for the platform a program is lowered for -----------------


def _lowered_text(fn, platform, *args, custom_calls=()):
  """The StableHLO of ``fn`` exported for ``platform`` (no device of it needed),
  holding the named custom calls (the CPU kernels': no compatibility
  guarantee, so ``jax.export`` asks for them by name)."""
  checks = [export.DisabledSafetyCheck.custom_call(name) for name in custom_calls]
  return export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(
    *args
  ).mlir_module()


def test_backend_paths_follow_the_platform_lowered_for_not_the_host():
  """A program exported for a GPU from this CPU host holds the accelerator paths
  (whole rows, 2048-column fused blocks, no bit-view carry); exported for the CPU,
  the CPU's (argmax blocks, 256-column blocks, each block's statistics from the
  compiled kernel where it is built, a uint16 d unembed carry)."""
  n, d, v = 8, 16, 1 << 19  # abstract shapes: nothing is allocated
  x = jax.ShapeDtypeStruct((n, v), jnp.float32)
  h = jax.ShapeDtypeStruct((n, d), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((d, v), jnp.bfloat16)
  t = jax.ShapeDtypeStruct((n,), jnp.int32)

  def logits_path(x, t):
    return lpk.token_logprobs_and_greedy(x, t, implementation=lpk.XlaLogits())

  def fused_grads(h, w, t):
    return jax.grad(
      lambda h, w: jnp.sum(lpk.fused_token_logprobs(h, w, t, implementation=lpk.XlaFused())),
      argnums=(0, 1),
    )(h, w)

  # The CPU's first-argmax blocks (1024 columns), its fused blocks (256 columns
  # against 2048 elsewhere at this V) and its bit-view d unembed carry.
  argmax_blocks = f"tensor<{n * v // 1024}x1024xf32>"
  for platform, on_cpu in [("cpu", True), ("cuda", False), ("tpu", False)]:
    text = _lowered_text(logits_path, platform, x, t)
    assert (argmax_blocks in text) == on_cpu, platform
    text = _lowered_text(fused_grads, platform, h, w, t, custom_calls=["lpkernel_cpu_block_stats"])
    assert (f"tensor<{n}x256xf32>" in text) == on_cpu, platform
    assert ("lpkernel_cpu_block_stats" in text) == (on_cpu and cpu_top_k.available()), platform
    assert (f"tensor<{n}x2048xf32>" in text) != on_cpu, platform
    assert (f"tensor<{d}x{v}xui16>" in text) == on_cpu, platform


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize(
  "impl,platform,call",
  [
    (lpk.PallasGpuProcessed(lpk.PallasGpuLogits(block_v=512)), "cuda", "__gpu$xla.gpu.triton"),
    (
      lpk.PallasGpuProcessed(lpk.PallasGpuLogits(block_v=512, splits=3)),
      "cuda",
      "__gpu$xla.gpu.triton",
    ),
    (lpk.PallasTpuProcessed(), "tpu", "tpu_custom_call"),
  ],
  ids=["gpu-default", "gpu-split", "tpu"],
)
def test_processed_kernels_lower_for_their_hardware(dtype, impl, platform, call):
  """The processed logits path (softcap, per-example temperature, min-p, top-k,
  top-p), forward and backward: the row kernel with its group maxima, then the
  gradient kernel with ``d temperature``; no XLA reduction reads the logits (the
  candidates' pass gathers ``K * group`` columns per row)."""
  x = jax.ShapeDtypeStruct((64, 5000), dtype)
  t = jax.ShapeDtypeStruct((64,), jnp.int32)
  tau = jax.ShapeDtypeStruct((64,), jnp.float32)

  def loss(x, t, tau):
    sampling = lpk.Sampling(temperature=tau, top_k=20, top_p=0.9, min_p=0.01)
    s = lpk.processed_token_stats(x, t, sampling, softcap=30.0, implementation=impl)
    return jnp.sum(jnp.where(s.kept, s.logprobs, 0.0)) + jnp.sum(s.raw_logprobs)

  lowered = jax.jit(jax.grad(loss, (0, 2))).trace(x, t, tau)
  text = lowered.lower(lowering_platforms=(platform,)).as_text()
  assert text.count(f"custom_call @{call}") == 2
  assert not _xla_reductions_of(text, x.shape)


@pytest.mark.parametrize("vocab_axis", [1, 0], ids=["unembed", "tied"])
@pytest.mark.parametrize(
  "impl,platform,call,count",
  [
    (lpk.PallasGpuProcessed(), "cuda", "__gpu$xla.gpu.triton", 2),
    (
      lpk.PallasGpuProcessed(fused=lpk.PallasGpuFused(chunk_tokens=24)),
      "cuda",
      "__gpu$xla.gpu.triton",
      4,
    ),
    (lpk.PallasTpuProcessed(), "tpu", "tpu_custom_call", 3),
  ],
  ids=["gpu-one-chunk", "gpu-chunks", "tpu"],
)
def test_processed_hidden_kernels_lower_for_their_hardware(vocab_axis, impl, platform, call, count):
  """The processed path from hidden states, forward and backward: on GPUs per
  chunk shape the row kernel's partials (the record of each group's largest
  values is XLA's), then the gradient kernel (a tail chunk adds one of each); on
  TPUs the fused forward kernel with its lane maxima, then the d hidden and d
  unembed kernels."""
  n, d, v = 64, 128, 1000
  h = jax.ShapeDtypeStruct((n, d), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((d, v) if vocab_axis == 1 else (v, d), jnp.bfloat16)
  t = jax.ShapeDtypeStruct((n,), jnp.int32)
  tau = jax.ShapeDtypeStruct((n,), jnp.float32)

  def loss(h, w, t, tau):
    sampling = lpk.Sampling(temperature=tau, top_k=20, top_p=0.9)
    s = lpk.fused_processed_token_stats(
      h, w, t, sampling, softcap=30.0, vocab_axis=vocab_axis, implementation=impl
    )
    return jnp.sum(jnp.where(s.kept, s.logprobs, 0.0)) + jnp.sum(s.raw_logprobs)

  lowered = jax.jit(jax.grad(loss, (0, 1, 3))).trace(h, w, t, tau)
  text = lowered.lower(lowering_platforms=(platform,)).as_text()
  assert text.count(f"custom_call @{call}") == count
