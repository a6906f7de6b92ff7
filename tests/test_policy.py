"""The bad-input and numerics policy (README "Bad input"), on every public path.

Each test names the policy item it guards: precision at large magnitudes, NaN
wins, -inf stays impossible, masked positions never poison gradients, 64-bit
ids never wrap, contiguous segments, temperature and softcap, NaN gradients of
poisoned values, clear errors.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.experimental import checkify
from jax.sharding import Mesh

import lpkernel as lpk
from lpkernel import reference, sharding
from tests.helpers import (
  FUSED_IMPLEMENTATIONS,
  LOGITS_IMPLEMENTATIONS,
  assert_close,
  jitted,
  oracle_logits_grad,
  oracle_token_logprobs,
)

# The reference too: the yardstick obeys the policy it holds the others to.
IMPLS = pytest.mark.parametrize(
  "impl",
  [*LOGITS_IMPLEMENTATIONS.values(), "reference"],
  ids=[*LOGITS_IMPLEMENTATIONS, "reference"],
)
FUSED_SMALL = FUSED_IMPLEMENTATIONS["xla"]
# The default XLA sweep, and its opt-in per-token backward in token chunks of 2.
ALL_FUSED = [
  *FUSED_IMPLEMENTATIONS.values(),
  lpk.XlaFused(),
  lpk.XlaFused(lpk.FusedConfig(grad_chunks=True, loss_chunk_tokens=2)),
]
# The training loss's one-kernel paths (GPU, interpreted; TPU, its interpreter).
_LOSS_KERNELS = [
  lpk.PallasGpuLogits(block_rows=2, block_v=8, splits=1, loss_kernel=True, interpret=True),
  lpk.PallasTpuLogits(loss_kernel=True, interpret=True),
]
SCORE_FIELDS = ("prompt_logprob", "response_logprob", "joint_logprob", "token_logprobs")


def _mesh():
  return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))


needs_8_devices = pytest.mark.skipif(
  jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets 8 CPU devices)"
)


# --- precision at large logit magnitudes ------------------------------------------


@IMPLS
@pytest.mark.parametrize("offset", [1e4, 1e6, 1e8])
def test_large_common_offset_keeps_values_and_gradients(impl, offset):
  x = jax.random.normal(jax.random.key(0), (6, 37)) * 2 + offset
  t = jnp.arange(6) * 5
  w = jnp.linspace(-1.0, 1.0, 6)
  lp = lpk.token_logprobs(x, t, implementation=impl)
  assert_close(lp, oracle_token_logprobs(x, t), rtol=1e-6, atol=2e-6, what="values")
  g = jax.grad(lambda x: jnp.sum(w * lpk.token_logprobs(x, t, implementation=impl)))(x)
  # optax's error against float64 at +1e4 is about 4e-8; the old lse-only residual gave 1.8e-4.
  np.testing.assert_allclose(g, oracle_logits_grad(x, t, w), atol=2e-7)


def test_uniform_row_of_1e8_scores_minus_log_v():
  for impl in [*LOGITS_IMPLEMENTATIONS.values(), "reference"]:
    lp = lpk.token_logprobs(jnp.full((2, 10), 1e8), jnp.array([0, 9]), implementation=impl)
    np.testing.assert_allclose(lp, -np.log(10), rtol=1e-6)
  h, w = jnp.ones((2, 4)), jnp.full((4, 10), 2.5e7)  # logits 1e8
  for impl in [*ALL_FUSED, "reference"]:
    lp = jitted(lpk.fused_token_logprobs, h, w, jnp.array([0, 9]), implementation=impl)
    np.testing.assert_allclose(lp, -np.log(10), rtol=1e-6)


def test_fused_gradients_keep_precision_at_large_offsets():
  h = jax.random.normal(jax.random.key(1), (5, 4))
  w = jax.random.normal(jax.random.key(2), (4, 9))
  h = jnp.concatenate([h, jnp.full((5, 1), 1.0)], 1)
  w = jnp.concatenate([w, jnp.full((1, 9), 1e4)], 0)  # adds 1e4 to every logit
  t = jnp.arange(5)
  with jax.default_matmul_precision("highest"):
    logits = h @ w
  dlogits = oracle_logits_grad(logits, t, np.ones(5))
  want = dlogits @ np.asarray(w, np.float64).T
  for impl in ALL_FUSED:
    with jax.default_matmul_precision("highest"):
      dh_fused = jax.jit(
        jax.grad(
          lambda h, impl=impl: jnp.sum(lpk.fused_token_logprobs(h, w, t, implementation=impl))
        )
      )(h)
    # The last hidden column meets the 1e4 weights in dz @ w.T itself (float32
    # rounding of 1e4 * sum(dz) ~ 1e-3 on any path); the others keep their precision.
    np.testing.assert_allclose(dh_fused[:, :4], want[:, :4], atol=2e-5)


# Rows of bfloat16 logits near the format's maximum M (y = x / tau overflows
# float32 at tau < 1): all M; M twice, the next value below (2^120 lower) and
# 0; M and -M. Their log-probabilities: -log 11; -log 2 and about -5.3e36;
# below -float32 max (-inf). The temperatures: 0.5, 0.25, 0.25.
_M = float(jnp.finfo(jnp.bfloat16).max)
_BELOW_M = float(np.nextafter(jnp.bfloat16(_M), jnp.bfloat16(0)))
_HUGE = np.array(
  [[_M] * 11, [_M, _M, _BELOW_M, 0.0] + [-_M] * 7, [_M, -_M] + [0.0] * 9], np.float64
)
_HUGE_TAU = np.array([0.5, 0.25, 0.25])


def _huge_oracle(targets):
  """float64 log-probabilities, log-sum-exps, entropies and their derivatives
  (d/dx, d/d tau of the log-probabilities) of the rows above."""
  y = _HUGE / _HUGE_TAU[:, None]
  m = y.max(-1, keepdims=True)
  p = np.exp(y - m)
  p /= p.sum(-1, keepdims=True)
  log_s = np.log(np.exp(y - m).sum(-1))
  y_t = y[np.arange(3), targets]
  lp = (y_t - m[:, 0]) - log_s  # shifted first: float64 too rounds 2.4 away at 6.8e38
  centred = (p * (y - m)).sum(-1)
  onehot = np.arange(11) == targets[:, None]
  d_tau = (centred - (y_t - m[:, 0])) / _HUGE_TAU
  return lp, m[:, 0] + log_s, log_s - centred, (onehot - p) / _HUGE_TAU[:, None], d_tau


@IMPLS
def test_bfloat16_logits_near_the_maximum_under_temperature_give_finite_results(impl):
  x = jnp.asarray(_HUGE, jnp.bfloat16)
  assert np.array_equal(np.asarray(x, np.float64), _HUGE)  # every value exact in bfloat16
  t = jnp.array([2, 2, 1])
  tau = jnp.asarray(_HUGE_TAU, jnp.float32)
  # The call, as written.
  lp = lpk.token_logprobs(x[:1], jnp.array([2]), temperature=0.5, implementation=impl)
  np.testing.assert_allclose(lp, [-np.log(11)], rtol=1e-6)
  want_lp, *_, want_dx, want_dtau = _huge_oracle(np.asarray(t))
  lp = jax.jit(lambda x, tau: lpk.token_logprobs(x, t, temperature=tau, implementation=impl))(
    x, tau
  )
  np.testing.assert_allclose(lp[:2], want_lp[:2], rtol=1e-6)
  assert lp[2] == -np.inf and want_lp[2] < -np.finfo(np.float32).max  # rounds to -inf
  first_two = jnp.array([1.0, 1.0, 0.0])
  dx, dtau = jax.jit(
    jax.grad(
      lambda x, tau: jnp.sum(
        first_two * lpk.token_logprobs(x, t, temperature=tau, implementation=impl)
      ),
      argnums=(0, 1),
    )
  )(x, tau)
  np.testing.assert_allclose(np.asarray(dx[:2], np.float64), want_dx[:2], atol=1e-2)
  np.testing.assert_allclose(dtau[:2], want_dtau[:2], rtol=1e-5)
  assert dx[2].tolist() == [0.0] * 11 and dtau[2] == 0


def test_bfloat16_logits_near_the_maximum_under_temperature_on_the_fused_path():
  # Hidden rows 2^63 times one-hot read the rows above out of a table scaled by
  # 2^-63, exactly (so that d hidden = d logits @ table^T stays in range).
  scale = 2.0**63
  h, w = jnp.asarray(np.eye(3) * scale, jnp.bfloat16), jnp.asarray(_HUGE / scale, jnp.bfloat16)
  t, tau = jnp.array([2, 2, 1]), jnp.asarray(_HUGE_TAU, jnp.float32)
  want_lp, want_lse, want_entropy, *_ = _huge_oracle(np.asarray(t))
  for impl in [*ALL_FUSED, "reference"]:

    def stats(h, w, tau, impl=impl):
      return lpk.fused_token_stats(h, w, t, temperature=tau, implementation=impl)

    s = jax.jit(stats)(h, w, tau)
    np.testing.assert_allclose(s.logprobs[:2], want_lp[:2], rtol=1e-6)
    assert s.logprobs[2] == -np.inf
    np.testing.assert_allclose(s.entropy, want_entropy, rtol=1e-6, atol=1e-6)
    # Past float32, in both the oracle and the result.
    assert np.all(want_lse > np.finfo(np.float32).max) and np.all(s.lse == np.inf)

    def objective(h, w, tau):
      s = stats(h, w, tau)
      return jnp.sum(s.logprobs[:2]) + jnp.sum(s.entropy)

    grads = jax.jit(jax.grad(objective, argnums=(0, 1, 2)))(h, w, tau)
    assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in grads), impl


# --- NaN wins --------------------------------------------------------------------


@IMPLS
def test_nan_anywhere_in_a_row_wins_over_a_neg_inf_target(impl):
  x = jnp.zeros((3, 20)).at[0, 3].set(-jnp.inf).at[0, 15].set(jnp.nan)
  x = x.at[1, 15].set(jnp.nan).at[2, 4].set(-jnp.inf)
  lp, greedy = lpk.token_logprobs_and_greedy(x, jnp.array([3, 0, 4]), implementation=impl)
  assert np.isnan(lp[0]) and np.isnan(lp[1]) and np.isneginf(lp[2])
  assert not greedy.any()


@needs_8_devices
def test_nan_wins_on_the_fused_and_vocab_parallel_paths():
  h = jnp.ones((2, 3))
  w = jnp.zeros((3, 8)).at[:, 2].set(-jnp.inf).at[0, 6].set(jnp.nan)
  lp = jitted(lpk.fused_token_logprobs, h, w, jnp.array([2, 0]), implementation=FUSED_SMALL)
  assert np.isnan(lp).all()
  mesh = _mesh()
  x = jnp.zeros((4, 8)).at[:2, 1].set(-jnp.inf).at[0, 6].set(jnp.nan)  # NaN in another shard
  lp, _ = jitted(
    sharding.vocab_parallel_token_logprobs_and_greedy, x, jnp.array([1, 1, 0, 0]), mesh=mesh
  )
  assert np.isnan(lp[0]) and np.isneginf(lp[1]) and np.isfinite(lp[2:]).all()
  stats = jitted(sharding.vocab_parallel_fused_token_stats, h, w, jnp.array([2, 0]), mesh=mesh)
  assert np.isnan(stats.logprobs).all()


# --- -inf stays impossible under every option --------------------------------------


@IMPLS
def test_softcap_keeps_neg_inf_impossible(impl):
  x = jax.random.normal(jax.random.key(3), (3, 12)).at[:, 5].set(-jnp.inf)
  lp = lpk.token_logprobs(x, jnp.array([5, 0, 1]), softcap=2.0, implementation=impl)
  assert np.isneginf(lp[0])
  assert_close(
    lp, oracle_token_logprobs(x, jnp.array([5, 0, 1]), softcap=2.0), rtol=1e-5, atol=1e-5
  )
  # No probability leaks to the impossible column: the rest still sums to one.
  full = jitted(
    lambda x: jnp.stack(
      [
        lpk.token_logprobs(x, jnp.full((3,), j), softcap=2.0, implementation=impl)
        for j in range(12)
      ]
    ),
    x,
  )
  np.testing.assert_allclose(jnp.sum(jnp.exp(full), 0), 1.0, rtol=1e-5)


def test_fused_neg_inf_target_and_all_neg_inf_rows_are_neg_inf():
  h = jnp.ones((3, 2))
  w = jnp.zeros((2, 6)).at[:, 4].set(-jnp.inf)
  w_all = jnp.full((2, 6), -jnp.inf)
  for impl in [*ALL_FUSED, "reference"]:
    lp = jitted(lpk.fused_token_logprobs, h, w, jnp.array([4, 0, 1]), implementation=impl)
    assert np.isneginf(lp[0]) and np.isfinite(lp[1:]).all()
    stats = jitted(lpk.fused_token_stats, h, w_all, jnp.array([4, 0, 1]), implementation=impl)
    assert np.isneginf(stats.logprobs).all() and np.isneginf(stats.lse).all()
    assert (stats.entropy == 0).all(), impl  # no possible token: 0 log 0 = 0


# --- masked positions never poison gradients -------------------------------------------


def _rows(b=2, t=6):
  tokens = jnp.arange(b * t).reshape(b, t) % 7
  seg = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
  return tokens, jnp.ones((b, t), bool), seg


@needs_8_devices
def test_garbage_in_unscored_hidden_rows_leaves_fused_gradients_finite():
  tokens, mask, seg = _rows()
  hidden = jax.random.normal(jax.random.key(4), (2, 6, 3))
  hidden = hidden.at[0, 4].set(jnp.nan).at[0, 5].set(jnp.inf).at[1, 5].set(jnp.nan)  # pad, last
  unembed = jax.random.normal(jax.random.key(5), (3, 8))
  tau = jnp.ones((2, 6)).at[0, 4].set(0.0).at[0, 5].set(jnp.nan).at[1, 5].set(0.0)
  mesh = _mesh()

  def loss(h, w, tau, fn):
    return fn(h, w, tokens, mask, segment_ids=seg, temperature=tau).joint_logprob.sum()

  vp = lambda h, w, *a, **k: sharding.vocab_parallel_score_hidden(h, w, *a, mesh=mesh, **k)  # noqa: E731
  for fn in (lpk.score_hidden, vp):
    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    value, grads = value_and_grad(hidden, unembed, tau, fn)
    assert np.isfinite(value)
    for g in grads:
      assert np.isfinite(g).all()


@IMPLS
def test_bad_temperature_at_padding_leaves_logits_gradients_finite(impl):
  tokens, mask, seg = _rows()
  logits = jax.random.normal(jax.random.key(6), (2, 6, 7)).at[0, 4:].set(jnp.nan)
  tau = jnp.ones((2, 6)).at[0, 4].set(0.0).at[0, 5].set(jnp.nan).at[1, 5].set(-1.0)
  value, grads = jax.value_and_grad(
    lambda x, tau: lpk.score(
      x, tokens, mask, segment_ids=seg, temperature=tau, implementation=impl
    ).joint_logprob.sum(),
    argnums=(0, 1),
  )(logits, tau)
  assert np.isfinite(value) and all(np.isfinite(g).all() for g in grads)


def test_extreme_bfloat16_logits_with_zero_entropy_cotangent_give_finite_gradients():
  big = float(jnp.finfo(jnp.bfloat16).max) ** 0.5  # h * w reaches +-3.39e38
  h = jnp.array([[big, 0.0], [1.0, 1.0]], jnp.bfloat16)
  w = jnp.array([[big, -big, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]], jnp.bfloat16)
  t = jnp.array([0, 2])
  for impl in ALL_FUSED:
    dh, dw = jax.jit(
      jax.grad(
        lambda h, w, impl=impl: jnp.sum(
          lpk.fused_token_stats(h, w, t, implementation=impl).logprobs
        ),
        argnums=(0, 1),
      )
    )(h, w)
    assert np.isfinite(np.asarray(dh, np.float32)).all()
    assert np.isfinite(np.asarray(dw, np.float32)).all()


# --- 64-bit ids never wrap --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_64_bit_numpy_ids_are_range_checked_before_the_cast(dtype):
  logits = jax.random.normal(jax.random.key(7), (1, 4, 9))
  tokens = np.array([[1, 2, 2**32 + 3, 4]], dtype)
  mask = np.ones((1, 4), bool)
  s = lpk.score(logits, tokens, mask)
  assert np.isnan(s.token_logprobs[0, 2]) and np.isnan(s.joint_logprob[0])
  assert np.isfinite(np.asarray(s.token_logprobs)[0, [1, 3]]).all()
  lp = lpk.token_logprobs(logits[0], tokens[0])
  assert np.isnan(lp[2]) and np.isfinite(np.asarray(lp)[[0, 1, 3]]).all()
  h, w = jnp.ones((4, 2)), jnp.zeros((2, 9))
  assert np.isnan(lpk.fused_token_logprobs(h, w, tokens[0])[2])
  with pytest.raises(ValueError, match="ids"):
    lpk.check_inputs(logits, tokens, mask)
  seg = np.array([[1, 1, 2**32 + 1, 2**32 + 1]], np.int64)  # would wrap to segment 1
  assert np.isnan(lpk.score(logits, tokens % 9, mask, segment_ids=seg).joint_logprob[0])
  with pytest.raises(ValueError, match="segment_ids"):
    lpk.check_inputs(logits, tokens % 9, mask, seg)


def test_64_bit_ids_under_x64_and_checkify():
  with jax.enable_x64(True):
    logits = jax.random.normal(jax.random.key(8), (1, 4, 9), jnp.float32)
    tokens = jnp.array([[1, 2, 2**32 + 3, 4]], jnp.int64)
    mask = jnp.ones((1, 4), bool)
    s = jax.jit(lpk.score)(logits, tokens, mask)
    assert np.isnan(s.token_logprobs[0, 2])

    def checked(logits, tokens, mask):
      lpk.checkify_inputs(logits, tokens, mask)
      return lpk.score(logits, tokens, mask)

    err, _ = jax.jit(checkify.checkify(checked))(logits, tokens, mask)
    with pytest.raises(checkify.JaxRuntimeError, match="ids"):
      err.throw()


# --- segments are contiguous runs ---------------------------------------------------------


@pytest.mark.parametrize(
  "seg", [[1, 1, 2, 2, 1, 1], [1, 1, 0, 0, 1, 1], [2, 1, 1, 2, 0, 0]], ids=["121", "101", "212"]
)
def test_reappearing_segment_ids_poison_the_row(seg):
  logits = jax.random.normal(jax.random.key(9), (2, 6, 5))
  tokens = jnp.ones((2, 6), jnp.int32)
  mask = jnp.zeros((2, 6), bool).at[:, 3:].set(True)
  segs = jnp.array([seg, [1, 1, 1, 2, 2, 0]])
  for num_segments in (None, 3):
    s = lpk.score(logits, tokens, mask, segment_ids=segs, num_segments=num_segments)
    r = reference.score(logits, tokens, mask, segment_ids=segs, num_segments=num_segments)
    for name in SCORE_FIELDS:
      assert np.isnan(getattr(s, name)[0]).all(), name
      assert np.isfinite(getattr(s, name)[1]).all(), name
      assert np.isnan(getattr(r, name)[0]).all(), name
    assert not np.asarray(s.response_greedy[0]).any()
  with pytest.raises(ValueError, match=r"contiguous run.*\[b=0, t="):
    lpk.check_inputs(logits, tokens, mask, segs)
  err, _ = jax.jit(checkify.checkify(lambda s: lpk.checkify_inputs(5, tokens, mask, s)))(segs)
  with pytest.raises(checkify.JaxRuntimeError, match="contiguous"):
    err.throw()


def test_padding_between_and_around_sequences_is_contiguous():
  seg = jnp.array([[0, 1, 1, 0, 2, 2, 0], [1, 1, 1, 1, 1, 0, 0]])
  lpk.check_inputs(5, jnp.ones((2, 7), jnp.int32), jnp.ones((2, 7), bool), seg)


# --- temperature and softcap ---------------------------------------------------------------


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_python_temperature_and_softcap_raise(bad):
  x, t = jnp.zeros((2, 4)), jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match="temperature"):
    lpk.token_logprobs(x, t, temperature=bad)
  with pytest.raises(ValueError, match="softcap"):
    lpk.token_logprobs(x, t, softcap=bad)
  with pytest.raises(ValueError, match="temperature"):
    lpk.fused_token_logprobs(jnp.ones((2, 3)), jnp.ones((3, 4)), t, temperature=bad)


@IMPLS
def test_bad_array_temperature_poisons_its_position_and_its_gradient(impl):
  x = jax.random.normal(jax.random.key(10), (4, 9))
  t = jnp.arange(4)
  tau = jnp.array([1.0, 0.0, jnp.nan, -2.0])
  lp = lpk.token_logprobs(x, t, temperature=tau, implementation=impl)
  assert np.isfinite(lp[0]) and np.isnan(lp[1:]).all()
  dx, dtau = jax.grad(
    lambda x, tau: jnp.sum(lpk.token_logprobs(x, t, temperature=tau, implementation=impl)),
    argnums=(0, 1),
  )(x, tau)
  assert np.isfinite(dx[0]).all() and np.isnan(dx[1:]).all(axis=1).all()
  assert np.isfinite(dtau[0]) and np.isnan(dtau[1:]).all()


# --- gradients of poisoned values are NaN ------------------------------------------------------


@IMPLS
def test_out_of_range_ids_have_nan_gradients(impl):
  x = jax.random.normal(jax.random.key(11), (3, 9))
  t = jnp.array([1, 9, -1])
  dx = jax.grad(lambda x: jnp.sum(lpk.token_logprobs(x, t, implementation=impl)))(x)
  assert np.isfinite(dx[0]).all() and np.isnan(dx[1:]).all()
  h, w = (
    jax.random.normal(jax.random.key(12), (3, 4)),
    jax.random.normal(jax.random.key(13), (4, 9)),
  )
  dh = jax.grad(lambda h: jnp.sum(lpk.fused_token_logprobs(h, w, t, implementation=FUSED_SMALL)))(h)
  assert np.isfinite(dh[0]).all() and np.isnan(dh[1:]).all()


def test_invalid_segment_rows_have_nan_gradients_and_valid_rows_do_not():
  logits = jax.random.normal(jax.random.key(14), (2, 6, 5))
  tokens, mask = jnp.ones((2, 6), jnp.int32), jnp.ones((2, 6), bool)
  seg = jnp.array([[1, 1, 2, 2, 1, 1], [1, 1, 1, 0, 0, 0]])
  for field in ("joint_logprob", "token_logprobs"):
    g = jax.grad(lambda x, f=field: getattr(lpk.score(x, tokens, mask, segment_ids=seg), f).sum())(
      logits
    )
    assert np.isnan(g[0, 0]).all()  # a scored position of the bad row
    assert np.isfinite(g[1]).all() and (g[1, 2:] == 0).all()  # masked positions: exact zeros


# --- clear errors ------------------------------------------------------------------------------


def test_configs_reject_non_positive_sizes():
  with pytest.raises(ValueError, match="vocab_block"):
    lpk.FusedConfig(vocab_block=0)
  with pytest.raises(ValueError, match="ChunkConfig"):
    lpk.ChunkConfig(max_chunk=0)
  with pytest.raises(ValueError, match="ChunkConfig"):
    lpk.ChunkConfig(min_chunk=-4)
  with pytest.raises(ValueError, match="power of two"):
    lpk.PallasGpuLogits(block_v=1000)


def test_zero_width_hidden_names_d_and_transposed_table_is_suggested():
  with pytest.raises(ValueError, match="D=0"):
    lpk.score_hidden(
      jnp.zeros((1, 3, 0)), jnp.zeros((0, 5)), jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 3), bool)
    )
  with pytest.raises(ValueError, match="pass vocab_axis=0"):
    lpk.fused_token_logprobs(jnp.zeros((2, 4)), jnp.zeros((7, 4)), jnp.zeros((2,), jnp.int32))
  with pytest.raises(ValueError, match="pass vocab_axis=1"):
    lpk.fused_token_logprobs(
      jnp.zeros((2, 4)), jnp.zeros((4, 7)), jnp.zeros((2,), jnp.int32), vocab_axis=0
    )
  with pytest.raises(ValueError, match="vocab_axis=2"):
    lpk.fused_token_logprobs(jnp.zeros((2, 4)), jnp.zeros((4, 7)), jnp.zeros(2, int), vocab_axis=2)


def test_python_lists_are_arrays_and_other_objects_are_type_errors():
  logits = jax.random.normal(jax.random.key(15), (1, 3, 4))
  a = lpk.score(logits, [[0, 1, 2]], [[False, True, True]], segment_ids=[[1, 1, 1]])
  b = lpk.score(logits, jnp.array([[0, 1, 2]]), jnp.array([[False, True, True]]))
  np.testing.assert_array_equal(a.joint_logprob, b.joint_logprob)
  np.testing.assert_array_equal(
    lpk.token_logprobs(logits[0], [0, 1, 2]), lpk.token_logprobs(logits[0], jnp.arange(3))
  )
  with pytest.raises(TypeError, match="tokens must be an array"):
    lpk.score(logits, {"ids": 1}, [[False, True, True]])
  with pytest.raises(TypeError, match="integer"):
    lpk.score(logits, [[0.0, 1.0, 2.0]], [[False, True, True]])


@needs_8_devices
def test_vocab_parallel_errors_name_the_array_and_the_axis():
  mesh = _mesh()
  x, t = jnp.zeros((3, 8)), jnp.zeros((3,), jnp.int32)
  with pytest.raises(ValueError, match=r"logits has 3 rows.*'data' axis size 2"):
    sharding.vocab_parallel_token_logprobs_and_greedy(x, t, mesh, batch_axis="data")
  with pytest.raises(ValueError, match=r"model_axis='vocab' is not an axis"):
    sharding.vocab_parallel_token_logprobs_and_greedy(x, t, mesh, model_axis="vocab")
  with pytest.raises(ValueError, match=r"unembed has V=6.*'model' axis size 4"):
    sharding.vocab_parallel_fused_token_stats(
      jnp.zeros((4, 2)), jnp.zeros((2, 6)), t[:1].repeat(4), mesh
    )


def test_implementation_names_are_checked():
  x, t = jnp.zeros((2, 4)), jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match="unknown logits implementation"):
    lpk.token_logprobs(x, t, implementation="triton")
  with pytest.raises(ValueError, match="runs on \\['gpu'\\]"):
    lpk.token_logprobs(x, t, implementation="pallas_gpu")  # the CPU suite has no GPU
  # An implementation of the other op: which op takes which, not a missing argument.
  tokens, mask = jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 3), bool)
  with pytest.raises(TypeError, match="fused implementation: the logits op .*score"):
    lpk.score(jnp.zeros((1, 3, 4)), tokens, mask, implementation=lpk.XlaFused())
  with pytest.raises(TypeError, match="logits implementation: the fused op .*score_hidden"):
    h, w = jnp.zeros((1, 3, 2)), jnp.zeros((2, 4))
    lpk.score_hidden(h, w, tokens, mask, implementation=lpk.XlaLogits())
  with pytest.raises(TypeError, match="is not one"):
    lpk.token_logprobs(x, t, implementation=object())


# --- hypothesis: the policy holds on drawn bad inputs ---------------------------------

_SPECIAL = st.sampled_from([0.0, 1.5, -2.0, 30.0, -jnp.inf, jnp.inf, jnp.nan])


_ROWS = 3  # rows per drawn example, 9 columns each: one shape, one compile per implementation


@functools.cache
def _values_and_grads(impl, softcap):
  """jitted (lp, d lp, d tau, nll, d nll, d nll / d tau) of ``g * lp`` and of the z-loss
  loss, with respect to the logits and the temperature, for ``impl``."""

  def lp_sum(x, t, tau, g):
    lp = lpk.token_logprobs(x, t, temperature=tau, softcap=softcap, implementation=impl)
    return jnp.sum(g * lp), lp

  def nll(x, t, tau, g):
    return lpk.nll_loss(x, t, g, z_loss=0.01, temperature=tau, softcap=softcap, implementation=impl)

  def run(x, t, tau, g):
    (_, lp), (dx, dtau) = jax.value_and_grad(lp_sum, (0, 2), has_aux=True)(x, t, tau, g)
    loss, (dl_dx, dl_dtau) = jax.value_and_grad(nll, (0, 2))(x, t, tau, jnp.abs(g))
    return lp, dx, dtau, loss, dl_dx, dl_dtau

  return jax.jit(run)


@pytest.mark.long
@given(
  rows=st.lists(st.lists(_SPECIAL, min_size=9, max_size=9), min_size=_ROWS, max_size=_ROWS),
  targets=st.lists(st.integers(-3, 12), min_size=_ROWS, max_size=_ROWS),
  taus=st.lists(
    st.sampled_from([1.0, 0.5, 0.0, -1.0, jnp.nan, jnp.inf]), min_size=_ROWS, max_size=_ROWS
  ),
  softcap=st.sampled_from([None, 3.0]),
  dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),  # every value drawn is exact in both
)
def test_drawn_special_values_follow_the_oracle(rows, targets, taus, softcap, dtype):
  """Rows of 0, 1.5, -2, 30, -inf, +inf and NaN: values as the oracle on every
  implementation; derivatives (of ``g * lp`` and of the z-loss training loss,
  w.r.t. the logits and the temperature) as the reference's autodiff, NaN where
  the value is poisoned (a bad id or temperature); a ``-inf`` logit is a
  constant, which no derivative reaches."""
  x, t, tau = jnp.array(rows, dtype), jnp.array(targets), jnp.array(taus, jnp.float32)
  g = jnp.array([1.0, -0.5, 2.0])
  poisoned = ~((t >= 0) & (t < 9) & jnp.isfinite(tau) & (tau > 0))
  oracle = oracle_token_logprobs(x, t, temperature=np.asarray(tau), softcap=softcap)
  oracle = np.where(poisoned, np.nan, oracle)
  lp, dx, dtau, loss, dl_dx, dl_dtau = _values_and_grads("reference", softcap)(x, t, tau, g)
  assert_close(lp, oracle, rtol=1e-5, atol=1e-5, what="reference vs oracle")
  # The reference's derivatives at a poisoned value are autodiff's zeros; the
  # policy's are NaN (but for the -inf logits, constants).
  nan_x = poisoned[:, None] & (x != -jnp.inf)
  want = (
    oracle,
    jnp.where(nan_x, jnp.nan, dx),
    jnp.where(poisoned, jnp.nan, dtau),
    jnp.where(poisoned.any(), jnp.nan, loss),
    jnp.where(nan_x, jnp.nan, dl_dx),
    jnp.where(poisoned, jnp.nan, dl_dtau),
  )
  names = ("lp", "d x", "d tau", "loss", "d loss / d x", "d loss / d tau")
  for impl in [*LOGITS_IMPLEMENTATIONS.values(), *_LOSS_KERNELS]:
    got = _values_and_grads(impl, softcap)(x, t, tau, g)
    for name, a, b in zip(names, got, want, strict=True):
      # d tau cancels terms of size |y| / tau (up to 60 here) in float32; a
      # bfloat16 d x is rounded to 8 bits.
      tol = dict(rtol=1e-4, atol=1e-3 if "tau" in name else 1e-4)
      if a.dtype == jnp.bfloat16:
        tol = dict(rtol=1e-2, atol=1e-2)
      assert_close(a, b, **tol, what=f"{impl} {name}")


@given(
  seg=st.lists(st.lists(st.integers(0, 3), min_size=6, max_size=6), min_size=1, max_size=3),
  ids=st.lists(st.sampled_from([0, 3, 4, 5, -1, 2**31 - 1, 2**32 + 3]), min_size=6, max_size=6),
)
def test_drawn_segments_and_ids_follow_the_oracle_or_raise(seg, ids):
  from tests.helpers import oracle_score

  seg = np.array(seg)
  tokens = np.broadcast_to(np.array(ids, np.int64), seg.shape)  # 64-bit NumPy ids
  logits = jax.random.normal(jax.random.key(16), (*seg.shape, 5))
  mask = np.zeros(seg.shape, bool)
  mask[:, 3:] = True
  s = lpk.score(logits, tokens, mask, segment_ids=seg, num_segments=3)
  want = oracle_score(logits, tokens, mask, seg, num_segments=3)
  for name in SCORE_FIELDS:
    assert_close(getattr(s, name), want[name], rtol=1e-5, atol=1e-4, what=name)
  for name in ("prompt_tokens", "response_tokens", "response_greedy"):
    np.testing.assert_array_equal(getattr(s, name), want[name].astype(getattr(s, name).dtype), name)
  valid = all(lpk.checks.contiguous_segments(seg, np)) and not (
    ((seg > 0) & ((tokens < 0) | (tokens >= 5))).any()
  )
  if valid:
    lpk.check_inputs(logits, tokens, mask, seg, num_segments=3)
  else:
    with pytest.raises(ValueError):
      lpk.check_inputs(logits, tokens, mask, seg, num_segments=3)


# --- greedy is the first argmax on every path ----------------------------------------


@needs_8_devices
def test_first_argmax_rule_on_the_fused_and_vocab_parallel_paths():
  # Ties between columns 1 and 6 (in different model shards of size 2): only id 1 is greedy.
  x = jnp.zeros((4, 8)).at[:, 1].set(3.0).at[:, 6].set(3.0)
  t = jnp.array([1, 6, 1, 6])
  want = np.array([True, False, True, False])
  _, greedy = jitted(
    sharding.vocab_parallel_token_logprobs_and_greedy, x, t, mesh=_mesh(), batch_axis="data"
  )
  np.testing.assert_array_equal(greedy, want)
  h = jnp.ones((4, 1))
  for impl in [*ALL_FUSED, "reference"]:
    np.testing.assert_array_equal(
      jitted(lpk.fused_token_stats, h, x[:1], t, implementation=impl).greedy, want
    )
  stats = jitted(
    sharding.vocab_parallel_fused_token_stats, h, x[:1], t, mesh=_mesh(), batch_axis="data"
  )
  np.testing.assert_array_equal(stats.greedy, want)
  for impl in [*LOGITS_IMPLEMENTATIONS.values(), "reference"]:
    got = jitted(lpk.token_logprobs_and_greedy, x, t, implementation=impl)[1]
    np.testing.assert_array_equal(got, want)


def test_tied_table_keeps_the_policy():
  """``vocab_axis=0`` (a [V, D] table read as stored) against the policy: first-argmax
  ties, NaN wins over -inf, -inf targets, finite gradients past garbage in unscored
  rows; equal to the ``[D, V]`` path field by field."""
  ones = jnp.ones((2, 1))
  cases = [  # (unembed [1, 8], targets, check of the tied path's stats)
    (jnp.zeros((1, 8)).at[0, 1].set(3.0).at[0, 6].set(3.0), [1, 6], "tie"),
    (jnp.zeros((1, 8)).at[0, 2].set(-jnp.inf).at[0, 6].set(jnp.nan), [2, 0], "nan"),
    (jnp.zeros((1, 8)).at[0, 3].set(-jnp.inf), [3, 0], "-inf"),
  ]
  for w, t, kind in cases:
    t = jnp.array(t)
    for impl in [*ALL_FUSED, "reference"]:

      def both(ones, w, t, impl=impl):
        flat = lpk.fused_token_stats(ones, w, t, implementation=impl)
        return flat, lpk.fused_token_stats(ones, w.T, t, implementation=impl, vocab_axis=0)

      flat, tied = jax.jit(both)(ones, w, t)
      for name in ("logprobs", "lse", "entropy", "greedy"):
        np.testing.assert_array_equal(getattr(tied, name), getattr(flat, name), err_msg=name)
      if kind == "tie":
        np.testing.assert_array_equal(tied.greedy, [True, False])
      elif kind == "nan":
        assert np.isnan(tied.logprobs).all()
      else:
        assert np.isneginf(tied.logprobs[0]) and np.isfinite(tied.logprobs[1])
  tokens, mask, seg = _rows()
  hidden = (
    jax.random.normal(jax.random.key(4), (2, 6, 3)).at[0, 4].set(jnp.nan).at[1, 5].set(jnp.inf)
  )
  table = jax.random.normal(jax.random.key(5), (8, 3))

  def loss(hh, tt):
    s = lpk.score_hidden(hh, tt, tokens, mask, segment_ids=seg, vocab_axis=0)
    return s.joint_logprob.sum()

  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(hidden, table)
  assert np.isfinite(value) and all(np.isfinite(g).all() for g in grads)
