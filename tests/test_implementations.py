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

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lpkernel as lpk
from lpkernel import reference
from lpkernel.ops import tiling
from tests.helpers import (
  GRAD_TOLERANCES,
  LOGITS_IMPLEMENTATIONS,
  assert_close,
  oracle_token_logprobs,
)

IMPLEMENTATIONS = {
  **LOGITS_IMPLEMENTATIONS,
  "pallas_tpu": lpk.PallasTpuLogits(block_rows=16, block_v=256, interpret=True),
}


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


# TPU interpret mode is about 20x slower than GPU interpret mode: its softcap +
# temperature cases run at V=4097 only (17 tiles of 256 and a tail).
CASES = [
  pytest.param(name, v, dtype, options, id=f"{name}-{v}-{jnp.dtype(dtype).name}-{options}")
  for name in IMPLEMENTATIONS
  for v in (1000, 4097, 32003)
  for dtype in (jnp.float32, jnp.bfloat16)
  for options in ("plain", "softcap+temperature")
  if not (name == "pallas_tpu" and options != "plain" and v != 4097)
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

  def loss(x, impl):
    lp = lpk.token_logprobs(x, t, implementation=impl, **opts)
    return jnp.sum(jnp.where(scored & jnp.isfinite(lp), w * lp, 0.0))

  lp, greedy = lpk.token_logprobs_and_greedy(x, t, implementation=impl, **opts)
  want_lp, want_greedy = reference.token_logprobs_and_greedy(x, t, **opts)
  assert_close(lp, want_lp, rtol=2e-5, atol=2e-5, what=f"{name} vs reference")
  oracle = oracle_token_logprobs(x, t, opts.get("temperature", 1.0), opts.get("softcap"))
  assert_close(lp, oracle, rtol=2e-5, atol=2e-5, what=f"{name} vs oracle")
  np.testing.assert_array_equal(greedy, want_greedy)
  assert not bool(greedy[4]) and bool(greedy[5])  # the first of two tied maxima
  g = jax.grad(loss)(x, impl)
  g_ref = jax.grad(loss)(x, "reference")
  assert g.dtype == x.dtype
  # Row 0 (all -inf, masked out) is exactly zero here; autodiff of the plain
  # reference puts 0 * NaN there.
  assert (g[0] == 0).all()
  assert_close(g[1:], g_ref[1:], **GRAD_TOLERANCES[jnp.dtype(dtype)], what=f"{name} d logits")


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


def test_reference_implementation_is_the_plain_definition():
  x, t = _batch(100, jnp.float32)
  np.testing.assert_array_equal(
    lpk.token_logprobs(x, t, implementation="reference"), reference.token_logprobs(x, t)
  )


# --- the fused path ------------------------------------------------------------------------


@pytest.mark.parametrize("block", [None, 3, 256])
@pytest.mark.parametrize("options", ["plain", "softcap+temperature"])
def test_fused_implementation_matches_reference(block, options):
  impl = lpk.XlaFused(lpk.FusedConfig(vocab_block=block))
  h = jax.random.normal(jax.random.key(4), (9, 16))
  w = jax.random.normal(jax.random.key(5), (16, 1000)) / 2
  t = jax.random.randint(jax.random.key(6), (9,), 0, 1000).at[2].set(999)
  opts = {} if options == "plain" else dict(softcap=20.0, temperature=jnp.linspace(0.5, 2, 9))
  c = jax.random.normal(jax.random.key(7), (3, 9))

  def loss(h, w, impl):
    s = lpk.fused_token_stats(h, w, t, implementation=impl, **opts)
    return jnp.sum(c[0] * s.logprobs + c[1] * s.lse + c[2] * s.entropy)

  with jax.default_matmul_precision("highest"):
    got = lpk.fused_token_stats(h, w, t, implementation=impl, **opts)
    want = lpk.fused_token_stats(h, w, t, implementation="reference", **opts)
    g = jax.grad(loss, argnums=(0, 1))(h, w, impl)
    g_ref = jax.grad(loss, argnums=(0, 1))(h, w, "reference")
  for field in ("logprobs", "lse", "entropy"):
    assert_close(getattr(got, field), getattr(want, field), rtol=1e-5, atol=2e-5, what=field)
  np.testing.assert_array_equal(got.greedy, want.greedy)
  for a, b in zip(g, g_ref, strict=True):
    assert_close(a, b, rtol=1e-4, atol=1e-5, what="fused gradients")


# --- static block validation ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_every_kernel_configuration_tiles_the_hardware(dtype):
  for impl in [lpk.PallasGpuLogits(), IMPLEMENTATIONS["pallas_gpu"]]:
    tiling.check_gpu_block("forward", (impl.block_rows, impl.block_v), dtype)
    tiling.check_gpu_block("backward", (impl.bwd_block_rows, impl.bwd_block_v), dtype)
  for impl in [lpk.PallasTpuLogits(), IMPLEMENTATIONS["pallas_tpu"]]:
    for shape in [(13, 1000), (4096, 128256), (16, 32003)]:
      x = jax.ShapeDtypeStruct(shape, dtype)
      impl._blocks(x)  # validates (rows, columns) against the array and dtype


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
  from lpkernel import logprobs

  x = jax.ShapeDtypeStruct((64, 1000), dtype)
  t = jax.ShapeDtypeStruct((64,), jnp.int32)
  tau = jax.ShapeDtypeStruct((64,), jnp.float32) if options != "plain" else None
  softcap = 30.0 if options != "plain" else None

  def loss(x, t, tau):
    return jnp.sum(logprobs._logprobs(x, t, tau, softcap, impl, None, 1000)[0])

  text = jax.jit(jax.grad(loss)).trace(x, t, tau).lower(lowering_platforms=(platform,)).as_text()
  assert text.count(f"custom_call @{call}") == 2  # the forward partials and the backward


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_nan_anywhere_in_a_row_wins_in_every_implementation(name):
  x = jnp.zeros((3, 300)).at[0, 7].set(-jnp.inf).at[0, 290].set(jnp.nan).at[1, 3].set(-jnp.inf)
  lp, greedy = lpk.token_logprobs_and_greedy(
    x, jnp.array([7, 3, 0]), implementation=IMPLEMENTATIONS[name]
  )
  assert np.isnan(lp[0]) and np.isneginf(lp[1]) and np.isfinite(lp[2])
  np.testing.assert_array_equal(greedy, [False, False, True])
