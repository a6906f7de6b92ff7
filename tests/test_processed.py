"""The processed paths beyond the engine's kept sets (tests/test_sampling.py):
gradients in bfloat16 with softcap and per-example temperatures against a
float64 oracle, -inf and NaN, awkward shapes, replay of recorded kept ids,
``score`` under a sampler, and the temporaries of every path."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import lpkernel as lpk
from lpkernel.sampling import kept_mask
from tests.helpers import holds_cpu_kernels, without_cpu_kernels
from tests.test_sampling import IMPLEMENTATIONS, PALLAS_GPU_HIDDEN, PALLAS_TPU_HIDDEN, processed

FAST = [i for i in IMPLEMENTATIONS if i != "reference"]


def _oracle_grad(x, t, tau, softcap, keep):
  """float64 d processed_lp / d x with the kept set ``keep`` held constant."""
  x = np.asarray(x, np.float64)
  z = softcap * np.tanh(x / softcap) if softcap else x
  y = z / tau[:, None]
  p = np.where(keep, np.exp(y - y.max(-1, keepdims=True)), 0.0)
  p /= p.sum(-1, keepdims=True)
  onehot = np.arange(x.shape[-1]) == np.asarray(t)[:, None]
  dz = np.where(keep, (onehot - p) / tau[:, None], 0.0)
  return dz * (1 - np.tanh(x / softcap) ** 2 if softcap else 1.0)


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_gradients_with_softcap_and_per_example_temperature_match_float64(impl, dtype):
  rng = np.random.default_rng(1)
  n, v, softcap = 6, 3001, 20.0
  x = jnp.asarray(rng.normal(size=(n, v)) * 6, dtype)
  z = softcap * np.tanh(np.asarray(x, np.float64) / softcap)
  t = jnp.asarray(np.argsort(z, -1)[:, -2])  # the second most likely: kept
  tau = jnp.array([0.6, 0.8, 1.0, 1.2, 0.9, 1.5], jnp.float32)
  sampling = lpk.Sampling(
    temperature=tau,
    top_k=jnp.array([40, 0, 5, 0, 100, 0]),
    top_p=jnp.array([0.9, 0.95, 1.0, 0.8, 1.0, 0.999], jnp.float32),
    min_p=jnp.array([0.0, 0.02, 0.0, 0.0, 0.05, 0.0], jnp.float32),
  )
  want = processed("reference", x.astype(jnp.float32), t, sampling, softcap)

  def total(x, tau):  # one program for the values and both gradients
    stats = processed(impl, x, t, sampling._replace(temperature=tau), softcap)
    return jnp.sum(stats.logprobs), stats

  (_, got), (dx, dtau) = jax.jit(jax.value_and_grad(total, (0, 1), has_aux=True))(x, tau)
  np.testing.assert_array_equal(got.kept_count, want.kept_count)
  assert bool(jnp.all(got.kept))
  np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got.log_kept_mass, want.log_kept_mass, rtol=1e-5, atol=1e-5)
  assert dx.dtype == dtype
  tau64 = np.asarray(tau, np.float64)
  y = z / tau64[:, None]
  keep = np.asarray(kept_mask(jnp.asarray(y - y.max(-1, keepdims=True), jnp.float32), sampling))
  oracle = _oracle_grad(x, t, tau64, softcap, keep)
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(dx, np.float64), oracle, atol=tol)
  assert np.all(np.asarray(dx, np.float64)[~keep] == 0)
  # d tau with the kept set held: (E_p_kept[y] - y_t) / tau.
  p = np.where(keep, np.exp(y - y.max(-1, keepdims=True)), 0.0)
  p /= p.sum(-1, keepdims=True)
  y_t = y[np.arange(n), np.asarray(t)]
  np.testing.assert_allclose(dtau, ((p * y).sum(-1) - y_t) / tau64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", FAST)
def test_raw_and_kept_mass_terms_have_the_references_gradients(impl):
  """All three differentiable outputs at once, with a searched row (a nucleus past K)."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(4, 2000)) * 0.3, jnp.float32)  # flat: big nuclei
  t = jnp.array([3, 5, 7, 11])
  sampling = lpk.Sampling(0.8, top_p=jnp.array([0.9, 0.5, 1.0, 0.999], jnp.float32))
  w = jnp.array([1.0, -2.0, 0.5, 3.0])

  def loss(x, impl):
    s = processed(impl, x, t, sampling)
    return jnp.sum(w * jnp.where(s.kept, s.logprobs, 0) + 0.3 * s.raw_logprobs - s.log_kept_mass), s

  both = jax.jit(  # one program for the values and gradients of both
    lambda x: [jax.grad(loss, has_aux=True)(x, i) for i in (impl, "reference")]
  )
  (g_got, got), (g_want, want) = both(x)
  np.testing.assert_array_equal(got.kept_count, want.kept_count)
  assert int(got.kept_count[0]) > lpk.ProcessedConfig().candidates  # the search ran
  np.testing.assert_allclose(g_got, g_want, atol=2e-6)


@pytest.mark.parametrize(
  "impl", ["reference", "logits", "pallas_gpu", "pallas_tpu"]
)  # no eye @ -inf
def test_impossible_tokens_give_minus_inf_and_nan_rows_nan(impl):
  x = jnp.array(
    [[0.0, -jnp.inf, 1.0, 2.0], [0.0, 1.0, jnp.nan, 2.0], [-jnp.inf, 3.0, 1.0, 0.0]], jnp.float32
  )
  t = jnp.array([1, 0, 2])
  s = processed(impl, x, t, lpk.Sampling(top_k=3, top_p=0.99))
  assert float(s.logprobs[0]) == -np.inf and float(s.raw_logprobs[0]) == -np.inf
  assert np.isnan(s.logprobs[1])
  assert np.isfinite(s.logprobs[2]) or float(s.logprobs[2]) == -np.inf
  dx = jax.grad(
    lambda x: jnp.sum(
      jnp.where(
        jnp.arange(3) == 1, 0, processed(impl, x, t, lpk.Sampling(top_k=3, top_p=0.99)).logprobs
      )
    )
  )(x)
  assert np.all(np.isfinite(np.asarray(dx)[0])) and np.all(np.isfinite(np.asarray(dx)[2]))


@pytest.mark.parametrize("impl", ["reference", "logits", "pallas_gpu", "pallas_tpu"])
def test_a_row_of_minus_inf_keeps_nothing_and_gives_minus_inf(impl):
  """A row with no possible token (every logit ``-inf``): its processed and raw
  log-probabilities and its kept mass are ``-inf`` (never NaN), it keeps
  nothing and is not greedy, with zero derivatives, truncated or not, beside
  rows that keep their values. (The fast paths gave NaN and kept every column
  where nothing truncated, the reference NaN.)"""
  x = jnp.array([[0.0, 1.0, 2.0, -1.0], [-jnp.inf] * 4, [3.0, -jnp.inf, 1.0, 0.0]], jnp.float32)
  t = jnp.array([1, 2, 0])
  samplers = [
    lpk.Sampling(),
    lpk.Sampling(temperature=0.7, top_k=2, top_p=0.9, min_p=0.05),
    lpk.Sampling(temperature=jnp.array([0.5, 0.8, 1.2]), top_p=jnp.array([0.5, 0.9, 1.0])),
  ]

  def loss(x, sampling):
    s = processed(impl, x, t, sampling)
    finite = [jnp.where(jnp.isfinite(a), a, 0) for a in (s.logprobs, s.raw_logprobs)]
    return jnp.sum(
      finite[0] + finite[1] + jnp.where(jnp.isfinite(s.log_kept_mass), s.log_kept_mass, 0)
    ), s

  for sampling in samplers:
    (dx, s), (_, want) = jax.jit(
      lambda x, sampling=sampling: (
        jax.grad(loss, has_aux=True)(x, sampling),
        loss(x.at[1].set(0.0), sampling),
      )
    )(x)
    for name in ("logprobs", "raw_logprobs", "log_kept_mass"):
      assert float(getattr(s, name)[1]) == -np.inf, (name, sampling)
    assert not bool(s.kept[1]) and int(s.kept_count[1]) == 0 and not bool(s.greedy[1])
    np.testing.assert_array_equal(np.asarray(dx)[1], 0.0)
    assert np.all(np.isfinite(np.asarray(dx)))
    others = np.array([0, 2])  # the other rows as without it
    np.testing.assert_allclose(s.logprobs[others], want.logprobs[others], rtol=1e-6)
    np.testing.assert_array_equal(s.kept_count[others], want.kept_count[others])


def _saturated_rows(v: int) -> tuple[np.ndarray, np.ndarray]:
  """float32 rows ``[8, v]`` and targets ``[8]`` past a softcap of 7 where capped
  logits tie or lie an ulp apart (see the test below)."""
  rng = np.random.default_rng(1)
  # An adjacent pair x1 < x2 that XLA's float32 tanh orders the other way (one
  # pair in five here), else any adjacent pair.
  xs = (np.float32(38.0).view(np.int32) + np.arange(1 << 14, dtype=np.int32)).view(np.float32)
  capped = np.asarray(jax.jit(lambda x: 7.0 * jnp.tanh(x / 7.0))(xs))
  i = int(np.argmax(np.diff(capped) < 0))
  x1, x2 = xs[i], xs[i + 1]
  x = rng.normal(size=(8, v)).astype(np.float32) * 2
  t = rng.integers(0, v, 8)
  x[0, 10], x[0, 20], t[0] = x2, x1, 10  # the largest logit, and a smaller one
  x[1, :62] = np.linspace(x2 + 1, x2 + 9, 62)  # then x2, x1 at ranks 63 and 64
  x[1, 100], x[1, 200], t[1] = x2, x1, 200
  x[2, 0], x[2, 1], x[2, 2], t[2] = 70.0, -80.0, -62.0, 1  # caps 7, -7 and -7 + 1 ulp
  x[3:] = np.round(rng.normal(size=(5, v)) * 20 * 4) / 4  # coarse: ties
  x[4, :5] = x[4].max()
  t[3:] = np.where(rng.random(5) < 0.5, np.argmax(x[3:], -1), t[3:])
  return x, t


@pytest.mark.parametrize("impl", ["logits", "pallas_gpu", "pallas_tpu", "hidden"])
def test_a_saturated_softcap_keeps_the_references_sets(impl):
  """Logits far past the softcap (cap 7), where capped logits tie or lie an ulp
  apart: the kept sets, their sizes and the greedy flags are the reference's,
  ties meaning equal capped logits; the candidates are each row's largest
  capped values exactly. XLA's float32 ``tanh`` is not monotone (the larger
  of an adjacent pair x1 < x2 may cap an ulp lower; the library's tie), and
  the fast paths read order from raw logits (the CPU kernels choose candidates
  by them, the row max is the cap of the largest logit): with it x2 was greedy
  and min-p 1 kept both where the reference kept x1 (row 0), top-k 64 kept 65
  (row 1: x1 65th by raw value); and the reference ranked values after the
  shift, where ``-7 - 7`` and its neighbour's round alike, so top-k V - 1 kept
  V (row 2). Randomised batches like rows 3-7 kept other sets than the
  reference's in 25 of 3500."""
  v = 1000
  x, t = map(jnp.asarray, _saturated_rows(v))
  sampling = lpk.Sampling(
    jnp.array([1.0, 0.7, 2.0, 0.25, 1.0, 0.7, 2.0, 0.25]),
    jnp.array([0, 64, v - 1, 2, 63, 0, 0, v - 1]),
    jnp.array([1.0, 1.0, 1.0, 1.0, 0.999, 0.5, 0.9, 1.0]),
    jnp.array([1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]),
  )
  want = jax.jit(lambda x: processed("reference", x, t, sampling, 7.0))(x)
  got = jax.jit(lambda x: processed(impl, x, t, sampling, 7.0))(x)
  np.testing.assert_array_equal(got.kept_count, want.kept_count)
  np.testing.assert_array_equal(got.kept, want.kept)
  np.testing.assert_array_equal(got.greedy, want.greedy)
  # Two float32 sums of up to 1000 exps each, in other orders than the reference's.
  np.testing.assert_allclose(got.log_kept_mass, want.log_kept_mass, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(want.kept_count[:3], [2, 64, v - 1])  # x1, x2 tie; -7 alone
  if impl == "logits":
    first = jax.jit(
      lambda x: lpk.XlaProcessed().partials_and_candidates(
        x, t, None, 7.0, 64, lpk.ProcessedConfig()
      )
    )
    want_top = -np.sort(-np.asarray(lpk.partials.capped(x, 7.0)), axis=1)[:, :64]
    np.testing.assert_array_equal(np.asarray(first(x)[1]), want_top)


def test_replay_gives_nan_for_a_nan_kept_logit_and_minus_inf_for_no_mass():
  """Replay of recorded kept ids reads only their logits: a NaN among them gives
  NaN (it gave the NaN column's -inf treatment: a finite number), kept ids whose
  logits are all ``-inf`` give ``-inf`` (it gave NaN), a ``-inf`` target among
  finite ones ``-inf``; a NaN outside the kept ids is not read. Derivatives stay
  finite (zero where the value is not finite)."""
  x = jnp.array(
    [
      [0.0, 1.0, jnp.nan, 2.0],  # NaN among the kept ids
      [0.0, 1.0, jnp.nan, 2.0],  # NaN outside them
      [0.0, 1.0, -jnp.inf, -jnp.inf],  # the kept ids' logits all -inf
      [3.0, -jnp.inf, 1.0, 0.0],  # a -inf target beside a finite one
    ],
    jnp.float32,
  )
  t = jnp.array([0, 0, 2, 1])
  ids = jnp.array([[0, 2, -1], [0, 1, -1], [2, 3, -1], [0, 1, -1]])

  def run(x):
    lp = lpk.replay_token_logprobs(x, t, ids, temperature=0.8)
    return jnp.sum(jnp.where(jnp.isfinite(lp), lp, 0)), lp

  dx, lp = jax.jit(jax.grad(run, has_aux=True))(x)
  assert np.isnan(lp[0]) and float(lp[2]) == -np.inf and float(lp[3]) == -np.inf
  np.testing.assert_allclose(lp[1], jax.nn.log_softmax(jnp.array([0.0, 1.0]) / 0.8)[0], rtol=1e-6)
  assert np.all(np.isfinite(np.asarray(dx)))
  np.testing.assert_array_equal(np.asarray(dx)[[0, 2, 3]], 0.0)


@pytest.mark.parametrize(
  "impl", [None, PALLAS_GPU_HIDDEN, PALLAS_TPU_HIDDEN], ids=["xla", "pallas_gpu", "pallas_tpu"]
)
def test_nan_hidden_rows_are_nan_and_leave_the_others_alone(impl):
  """The hidden path: a NaN hidden row gives that token NaN (value and gradient)
  and every other token its clean value and a finite gradient; so does the
  replay from hidden states on the same implementation."""
  rng = np.random.default_rng(2)
  h = jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(8, 50)), jnp.float32)
  t = jnp.argmax(h @ w, -1)
  sampling = lpk.Sampling(temperature=0.8, top_k=10, top_p=0.9)
  bad = h.at[1, 3].set(jnp.nan)
  for vocab_axis, table in ((-1, w), (0, w.T)):
    kw = dict(vocab_axis=vocab_axis, implementation=impl)
    clean = lpk.fused_processed_token_stats(h, table, t, sampling, **kw)
    got = lpk.fused_processed_token_stats(bad, table, t, sampling, **kw)
    assert np.isnan(got.logprobs[1])
    others = np.array([0, 2, 3])
    np.testing.assert_allclose(got.logprobs[others], clean.logprobs[others], rtol=1e-6)

    def loss(h, table, kw=kw):
      lp = lpk.fused_processed_token_stats(h, table, t, sampling, **kw).logprobs
      return jnp.sum(jnp.where(jnp.arange(4) == 1, 0.0, lp))

    dh, dw = (np.asarray(g) for g in jax.grad(loss, argnums=(0, 1))(bad, table))
    assert np.all(np.isfinite(dh[others])) and np.all(dh[1] == 0)
    assert np.all(np.isfinite(dw)), "a dead NaN row leaked into d unembed"

    ids = jnp.tile(jnp.arange(10), (4, 1))  # the replay's own kernels where impl has them
    lp = lpk.fused_replay_token_logprobs(bad, table, t % 10, ids, **kw)
    assert np.isnan(lp[1]) and np.all(np.isfinite(lp[others]))

    def replayed(h, table, kw=kw, ids=ids):
      lp = lpk.fused_replay_token_logprobs(h, table, t % 10, ids, **kw)
      return jnp.sum(jnp.where(jnp.arange(4) == 1, 0.0, lp))

    dh, dw = (np.asarray(g) for g in jax.grad(replayed, argnums=(0, 1))(bad, table))
    assert np.all(dh[1] == 0) and np.all(np.isfinite(dw)), "replay: a dead NaN row leaked"


@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_masked_positions_get_zero_gradients_under_a_sampler(path):
  """Tokens outside the response, some of them outside the kept set (-inf), put
  nothing into the response's gradient: zero rows, no NaN."""
  rng = np.random.default_rng(5)
  b, t_len, d, v = 2, 10, 8, 200
  h = jnp.asarray(rng.normal(size=(b, t_len, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
  x = h @ w
  next_tokens = jnp.argmax(x, -1)  # row t predicts token t + 1: kept
  dropped = jnp.argmin(x, -1)  # never in a top-20 set
  outside = jnp.arange(t_len) % 3 == 0  # these positions are not in the response
  chosen = jnp.where(outside[None, 1:], dropped[:, :-1], next_tokens[:, :-1])
  tokens = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), chosen], axis=1)
  mask = jnp.broadcast_to(~outside, (b, t_len))
  sampling = lpk.Sampling(temperature=0.9, top_k=20)

  def response(x_or_h):
    if path == "logits":
      scores = lpk.score(x_or_h, tokens, mask, sampling=sampling)
    else:
      scores = lpk.score_hidden(x_or_h, w, tokens, mask, sampling=sampling)
    return jnp.sum(scores.response_logprob)

  value, grad = jax.value_and_grad(response)(x if path == "logits" else h)
  assert np.isfinite(value)
  grad = np.asarray(grad)
  assert np.all(np.isfinite(grad))
  predicting_outside = np.asarray(outside[1:])  # row t predicts token t + 1
  assert np.all(grad[:, :-1][:, predicting_outside] == 0)
  assert np.all(grad[:, -1] == 0)  # the last row predicts nothing


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_greedy_is_the_first_of_tied_maxima(impl):
  x = jnp.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]], jnp.float32)
  sampling = lpk.Sampling(top_k=2)
  first = processed(impl, x, jnp.array([1, 0]), sampling)
  second = processed(impl, x, jnp.array([2, 3]), sampling)
  np.testing.assert_array_equal(first.greedy, [True, True])
  np.testing.assert_array_equal(second.greedy, [False, False])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_sampler_that_truncates_nothing_is_the_plain_distribution(impl):
  """Temperature alone (top-k, top-p and min-p Python numbers, all off: the
  path takes one candidate per row, not 64): every row keeps its whole row, the
  processed log-probabilities are the raw ones and :func:`lpkernel.token_logprobs`'
  (``-inf`` for an impossible target, NaN for a row holding a NaN, whose kept
  set is then undefined), the kept mass is 1, the kept set has V ids, greedy
  is the reference's first argmax, and the gradients into the logits and the
  per-example temperature are the reference's (nothing from the masked NaN
  row's position)."""
  from lpkernel.ops.processed.api import sampling_rows

  v = 300
  x = 3 * jax.random.normal(jax.random.key(5), (2, 4, v))
  t = jax.random.randint(jax.random.key(6), (2, 4), 0, v).at[0, 1].set(jnp.argmax(x[0, 1]))
  if "hidden" not in impl:  # (the hidden paths' logits are h @ w: no -inf or NaN of one row)
    x, t = x.at[1, 2, :7].set(-jnp.inf), t.at[1, 2].set(3)  # an impossible target
    x = x.at[0, 3, 5].set(jnp.nan)
  nan_row = jnp.any(jnp.isnan(x), axis=-1)
  tau = jnp.array([0.7, 1.3])
  for off in (lpk.Sampling(), lpk.Sampling(0.7, v, 1.0, 0.0)):
    assert sampling_rows(off, t, v, lpk.ProcessedConfig())[1] == 1
  assert sampling_rows(lpk.Sampling(top_p=0.99), t, v, lpk.ProcessedConfig())[1] == 64

  def loss(impl, x, tau):
    s = processed(impl, x, t, lpk.Sampling(temperature=tau))
    finite = jnp.where(jnp.isfinite(s.logprobs), s.logprobs, 0.0)
    return jnp.sum(finite * jnp.arange(1.0, 9.0).reshape(2, 4)), s

  grads = jax.jit(jax.grad(loss, (1, 2), has_aux=True), static_argnums=0)
  (dx, dtau), got = grads(impl, x, tau)
  (dx_ref, dtau_ref), want = grads("reference", x, tau)
  plain = lpk.token_logprobs(x, t, temperature=tau[:, None])
  np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got.logprobs, plain, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(jnp.isnan(got.logprobs), nan_row)
  np.testing.assert_array_equal(got.raw_logprobs == got.logprobs, ~nan_row)
  np.testing.assert_array_equal(got.kept, ~nan_row)
  np.testing.assert_array_equal(got.kept_count, jnp.where(nan_row, 0, v))
  np.testing.assert_allclose(got.log_kept_mass[~nan_row], 0.0, atol=1e-6)  # (reference: logsumexp)
  np.testing.assert_array_equal(got.greedy, want.greedy)
  assert bool(got.greedy[0, 1])
  np.testing.assert_array_equal(dx[nan_row], 0.0)
  np.testing.assert_allclose(dx[~nan_row], dx_ref[~nan_row], atol=1e-5)
  np.testing.assert_allclose(dtau, dtau_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
  "impl,shape",
  [  # each implementation meets V = 1, V = 3 and one token, in two of the shapes
    pytest.param(impl, shape, id=f"{impl}-{shape[0]}x{shape[1]}")
    for i, impl in enumerate(IMPLEMENTATIONS)
    for shape in [[(1, 1), (2, 3)], [(3, 1), (1, 3)]][i % 2]
  ],
)
def test_awkward_shapes(impl, shape):
  """V = 1 and 3, one token; every sampler setting keeps the most likely token."""
  n, v = shape
  x = jnp.asarray(np.random.default_rng(n * 7 + v).normal(size=(n, v)), jnp.float32)
  t = jnp.argmax(x, -1)
  samplings = [lpk.Sampling(), lpk.Sampling(0.5, 1, 0.1, 0.5), lpk.Sampling(top_k=2, top_p=0.9)]
  both = jax.jit(
    lambda x: [(processed(impl, x, t, s), processed("reference", x, t, s)) for s in samplings]
  )
  for got, want in both(x):  # one program for every setting
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-6)
    np.testing.assert_array_equal(got.kept_count, want.kept_count)
    assert bool(jnp.all(got.greedy))


@pytest.mark.parametrize("impl", ["logits", "pallas_gpu"])
def test_short_rows_in_chunks_are_the_references(impl):
  """Short rows run the forward a chunk of rows at a time
  (:func:`lpkernel.ops.processed.xla.forward_chunk`: 2 rows of V = 64 with
  top-k 50), the last chunk overlapping its predecessor (201 rows): values,
  kept sets and gradients (logits and per-example temperature) are the
  reference's; a NaN row stays in its own chunk."""
  from lpkernel.ops.processed.xla import forward_chunk

  n, v = 201, 64
  assert forward_chunk(n, v, 64, jnp.float32, None) == 2 and n % 2 == 1
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(n, v)) * 3, jnp.float32).at[7].set(jnp.nan)
  t = jnp.asarray(rng.integers(0, v, n), jnp.int32)
  tau = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)

  def loss(impl, x, tau):
    s = processed(impl, x, t, lpk.Sampling(tau, 50, 0.9))
    return jnp.sum(jnp.where(s.kept & ~jnp.isnan(s.logprobs), s.logprobs, 0.0)), s

  grads = jax.jit(
    lambda i, x, tau: jax.grad(loss, (1, 2), has_aux=True)(i, x, tau), static_argnums=0
  )
  (dx, dtau), got = grads(impl, x, tau)
  (dx_ref, dtau_ref), want = grads("reference", x, tau)
  np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got.kept, want.kept)
  np.testing.assert_array_equal(got.kept_count, want.kept_count)
  assert np.isnan(got.logprobs[7]) and not np.isnan(np.delete(np.asarray(got.logprobs), 7)).any()
  np.testing.assert_allclose(dx, dx_ref, atol=1e-5)
  np.testing.assert_allclose(dtau, dtau_ref, rtol=1e-4, atol=1e-5)


def test_no_rows():
  s = lpk.processed_token_stats(
    jnp.zeros((0, 5)), jnp.zeros((0,), jnp.int32), lpk.Sampling(top_k=2)
  )
  assert s.logprobs.shape == (0,)


def _kept_ids(x, sampling, k):
  y = x / sampling.temperature
  keep = kept_mask(y - jnp.max(y, -1, keepdims=True), sampling)
  ids = jnp.where(keep, jnp.arange(x.shape[-1]), -1)
  return (-jnp.sort(-ids, axis=-1))[:, :k], keep


@pytest.mark.parametrize("vocab_axis", [-1, 0])
def test_replay_equals_processed_and_reaches_only_the_kept_rows(vocab_axis):
  rng = np.random.default_rng(3)
  n, d, v = 24, 16, 1500
  h = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(d, v)) * 0.7, jnp.float32)
  x = h @ w
  sampling = lpk.Sampling(0.7, 30, 0.9)
  ids, keep = _kept_ids(x, sampling, 40)
  t = jnp.where(jnp.arange(n) % 2 == 0, jnp.argmax(x, -1), jnp.asarray(rng.integers(0, v, n)))
  want = lpk.processed_token_stats(x, t, sampling).logprobs
  from_logits = lpk.replay_token_logprobs(x, t, ids, temperature=0.7)
  table = w if vocab_axis == -1 else w.T
  fused = lambda h, table: lpk.fused_replay_token_logprobs(  # noqa: E731
    h, table, t, ids, temperature=0.7, vocab_axis=vocab_axis, gather_bytes=4096
  )
  from_hidden = fused(h, table)
  for got in (from_logits, from_hidden):
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    # rtol: the compiled dot products (on the CPU) sum in another order than XLA's
    np.testing.assert_allclose(got[~np.isinf(want)], want[~np.isinf(want)], rtol=2e-6, atol=2e-6)
  finite = ~np.isinf(np.asarray(want))

  def loss_hidden(h, table):
    return jnp.sum(jnp.where(finite, fused(h, table), 0.0))

  def loss_logits(h, table):
    logits = h @ (table if vocab_axis == -1 else table.T)
    return jnp.sum(jnp.where(finite, lpk.replay_token_logprobs(logits, t, ids, temperature=0.7), 0))

  dh, dw = jax.grad(loss_hidden, (0, 1))(h, table)
  rh, rw = jax.grad(loss_logits, (0, 1))(h, table)
  np.testing.assert_allclose(dh, rh, atol=2e-5)
  np.testing.assert_allclose(dw, rw, atol=2e-5)
  touched = np.any(np.asarray(dw) != 0, axis=0 if vocab_axis == -1 else 1)
  assert np.all(np.asarray(keep)[finite].any(0) >= touched)  # only rows in some kept set


def _replay_oracle(h, w, t, ids, tau, softcap, weights):
  """float64 (lp [N], d h, d w [V, D], d tau) of ``sum(weights * lp)`` over the
  kept ids, ``w`` as rows ``[V, D]``; ``weights`` 0 where lp is not finite."""
  h, w = np.asarray(h, np.float64), np.asarray(w, np.float64)
  x = np.einsum("nd,nkd->nk", h, w[np.maximum(ids, 0)])
  z = softcap * np.tanh(x / softcap) if softcap else x
  y = np.where(ids >= 0, z / tau[:, None], -np.inf)
  log_s = np.logaddexp.reduce(y, axis=-1)
  at = ids == t[:, None]
  lp = np.where(at.any(-1), np.max(np.where(at, y, -np.inf), -1) - log_s, -np.inf)
  p = np.where(ids >= 0, np.exp(y - log_s[:, None]), 0.0)
  dy = weights[:, None] * (at - p)  # d loss / d y at the kept ids
  dz = dy / tau[:, None]
  dx = dz * (1 - np.tanh(x / softcap) ** 2 if softcap else 1.0)
  dh = np.einsum("nk,nkd->nd", dx, w[np.maximum(ids, 0)])
  dw = np.zeros_like(w)
  np.add.at(dw, ids[ids >= 0], (dx[:, :, None] * h[:, None, :])[ids >= 0])
  dtau = -np.sum(dy * np.where(ids >= 0, z, 0.0), -1) / tau**2
  return lp, dh, dw, dtau


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(
  "n, d, v, k, vocab_axis, softcap",
  [(5, 3, 7, 4, 0, None), (37, 96, 1000, 70, -1, 30.0), (9, 256, 3001, 130, 0, None)],
  ids=["D3-tied", "K70-softcap", "K130-two-column-blocks"],
)
def test_the_gpu_replay_kernels_are_the_float64_oracles(dtype, n, d, v, k, vocab_axis, softcap):
  """:class:`lpkernel.ops.PallasGpuProcessed`' replay kernels (interpret mode):
  values and gradients into hidden states, table and per-token temperature
  against a float64 oracle, on awkward shapes: ``D`` 3 (one column per
  program), ``K`` past one block of ids and not a power of two, ``D`` 256 (two
  column blocks), ``-1`` padding, targets outside the kept set."""
  rng = np.random.default_rng(n)
  h = jnp.asarray(rng.normal(size=(n, d)), dtype)
  w = jnp.asarray(rng.normal(size=(v, d)) * (2 / d) ** 0.5, dtype)
  table = w if vocab_axis == 0 else w.T
  drawn = np.stack([rng.permutation(v)[: k + 1] for _ in range(n)]).astype(np.int32)
  ids = drawn[:, :k].copy()
  ids[::3, -min(k - 1, 5) :] = -1
  t = np.where(np.arange(n) % 4 == 1, drawn[:, k], drawn[:, 0])  # some targets not kept
  tau = rng.uniform(0.5, 1.5, n).astype(np.float32)
  weights = np.linspace(0.5, 1.5, n)
  want_lp, *want_grads = _replay_oracle(h, w, t, ids, tau, softcap, weights)
  weights = np.where(np.isfinite(want_lp), weights, 0.0)
  want_lp, *want_grads = _replay_oracle(h, w, t, ids, tau, softcap, weights)

  def loss(h, table, tau):
    lp = lpk.fused_replay_token_logprobs(
      h, table, jnp.asarray(t), jnp.asarray(ids), temperature=tau, softcap=softcap,
      vocab_axis=vocab_axis, implementation=lpk.PallasGpuProcessed(interpret=True),
    )  # fmt: skip
    return jnp.sum(jnp.where(weights > 0, lp * weights, 0.0)), lp

  grad = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))
  (_, lp), (dh, dtable, dtau) = grad(h, table, jnp.asarray(tau))
  assert dh.dtype == dtype and dtable.dtype == dtype
  np.testing.assert_array_equal(np.isneginf(lp), np.isneginf(want_lp))
  finite = np.isfinite(want_lp)
  np.testing.assert_allclose(lp[finite], want_lp[finite], rtol=1e-5, atol=1e-5)
  dw = dtable if vocab_axis == 0 else dtable.T
  tol = 1e-5 if dtype == jnp.float32 else 1e-2  # d h and d w rounded to bfloat16
  for got, want in zip((dh, dw, dtau), want_grads, strict=True):
    got = np.asarray(got, np.float64)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.max(np.abs(want)))


def test_the_replay_takes_a_processed_implementation():
  """``implementation=``: the GPU kernels refuse the CPU by name and run as an
  object in interpret mode (also under ``vmap``), the reference materialises the
  logits, an implementation without the replay's kernels (the TPU's) runs XLA's
  steps, and a user's object with :class:`lpkernel.ops.base.ReplayRows`' two
  methods is called for both passes."""
  rng = np.random.default_rng(11)
  h = jnp.asarray(rng.normal(size=(3, 6, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(50, 8)), jnp.float32)
  t = jnp.asarray(rng.integers(0, 50, (3, 6)), jnp.int32)
  others = np.stack([rng.permutation(49)[:4] + 1 for _ in range(18)]).reshape(3, 6, 4)
  ids = jnp.concatenate([t[..., None], jnp.asarray((np.asarray(t)[..., None] + others) % 50)], -1)
  ids = ids.at[0, :, -1].set(-1).astype(jnp.int32)

  def loss(h, w, t, ids, impl):
    lp = lpk.fused_replay_token_logprobs(h, w, t, ids, vocab_axis=0, implementation=impl)
    return jnp.sum(lp * jnp.linspace(0.5, 1.5, lp.size).reshape(lp.shape))

  grads = jax.value_and_grad(loss, (0, 1))
  want = grads(h, w, t, ids, "reference")
  with pytest.raises(ValueError, match="pallas_gpu.*not on this 'cpu' backend"):
    grads(h, w, t, ids, "pallas_gpu")

  class Counting:  # a user's kernels: XLA's dot products, each call counted
    name, platforms, lanes, calls = "counting", None, 1, []

    def partials_and_candidates(self, *args):
      raise AssertionError("not the replay's")

    processed_grads = partials_and_candidates

    def kept_dots(self, h, w, ids):
      self.calls.append("dots")
      return jnp.einsum("nd,nkd->nk", h, w[jnp.clip(ids, 0)])

    def kept_grads(self, h, w, ids, dx):
      self.calls.append("grads")
      dw = jnp.zeros(w.shape).at[jnp.clip(ids, 0)].add(dx[..., None] * h[:, None])
      return jnp.einsum("nk,nkd->nd", dx, w[jnp.clip(ids, 0)]), dw

  counting = Counting()
  impls = [lpk.PallasGpuProcessed(interpret=True), lpk.PallasTpuProcessed(interpret=True), counting]
  for impl in impls:
    got = grads(h, w, t, ids, impl)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert set(counting.calls) == {"dots", "grads"}  # both passes are the object's
  batched = jax.jit(jax.vmap(grads, (0, None, 0, 0, None)), static_argnums=4)
  value, (dh, dw) = batched(h, w, t, ids, impls[0])
  for i in range(3):
    one = grads(h[i], w, t[i], ids[i], "reference")
    np.testing.assert_allclose(value[i], one[0], rtol=1e-6)
    np.testing.assert_allclose(dh[i], one[1][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dw[i], one[1][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("vocab_axis", [0, -1], ids=["tied", "unembed"])
def test_the_gpu_replay_kernels_lower_for_a_gpu(dtype, vocab_axis):
  """Lowered for a GPU (Triton), the replay's forward and backward are the two
  kernels and nothing gathers kept rows in XLA: no chunk loop, no ``[N, K, D]``
  rows and no ``[N, V]`` logits anywhere in the program; a ``[D, V]`` table's
  kernels run in a loop over slabs of ``D`` (``[V, 16]`` here), never on the
  whole table transposed."""
  n, d, v, k = 64, 256, 1000, 100
  h = jax.ShapeDtypeStruct((n, d), dtype)
  w = jax.ShapeDtypeStruct((v, d) if vocab_axis == 0 else (d, v), dtype)
  t = jax.ShapeDtypeStruct((n,), jnp.int32)
  ids = jax.ShapeDtypeStruct((n, k), jnp.int32)
  tau = jax.ShapeDtypeStruct((n,), jnp.float32)

  def loss(h, w, t, ids, tau):
    return lpk.fused_replay_token_logprobs(
      h, w, t, ids, temperature=tau, vocab_axis=vocab_axis, implementation=lpk.PallasGpuProcessed()
    ).sum()

  lowered = jax.jit(jax.grad(loss, (0, 1, 4))).trace(h, w, t, ids, tau)
  text = lowered.lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("custom_call @__gpu$xla.gpu.triton") == 2
  assert "lpkernel_replay_dots" in text and "lpkernel_replay_grads" in text
  assert text.count("stablehlo.while") == (0 if vocab_axis == 0 else 2)
  assert f"tensor<{n}x{k}x{d}x" not in text and f"tensor<{n}x{v}x" not in text
  if vocab_axis != 0:
    assert f"tensor<{v}x{d}x" not in text and f"tensor<{v}x16x" in text


def test_replay_checks_its_ids():
  x, t = jnp.zeros((2, 5)), jnp.array([0, 1])
  with pytest.raises(ValueError, match="kept_ids"):
    lpk.replay_token_logprobs(x, t, jnp.zeros((3, 2), jnp.int32))
  with pytest.raises(ValueError, match=r"K >= 1\), got \(2, 0\)"):
    lpk.replay_token_logprobs(x, t, jnp.zeros((2, 0), jnp.int32))
  lp = lpk.replay_token_logprobs(x, t, jnp.array([[0, 9], [1, -1]]))
  assert np.isnan(lp[0]) and np.isclose(lp[1], 0.0)
  wide = np.array([[0, 2**32 + 3], [1, -1]], np.int64)  # beyond int32: out of range, not padding
  assert np.isnan(lpk.replay_token_logprobs(x, t, wide)[0])
  with pytest.raises(ValueError, match=r"outside \[-1, V=5\).*\[0\] with ids \[0, 4294967299\]"):
    lpk.check_kept_ids(x, wide)


@pytest.mark.parametrize("kernels", ["cpu", "xla"])
def test_a_repeated_kept_id_poisons_its_position(kernels):
  """A kept set counts an id once; an id twice (0-padded ids, say) would count
  its mass twice: a plausible wrong number. The position is NaN instead, on
  every path, with a NaN derivative (as an id out of range), the other
  positions untouched; the eager and the checkified checks name it."""
  rng = np.random.default_rng(8)
  n, d, v = 6, 8, 30
  h = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
  t = jnp.arange(n)
  ids = jnp.stack([t, t + 6, t + 12, jnp.full(n, -1)], axis=-1)
  repeated = ids.at[2, 3].set(14).at[4, 1].set(4)  # row 2 names 14 twice; row 4 its target
  context = without_cpu_kernels() if kernels == "xla" else contextlib.nullcontext()
  with context:

    def lps(h, w, kept):
      return (
        lpk.replay_token_logprobs(h @ w, t, kept, temperature=0.9),
        lpk.fused_replay_token_logprobs(h, w, t, kept, temperature=0.9),
      )

    def d_hidden(h, w, kept):
      return [jax.grad(lambda h, i=i: jnp.sum(lps(h, w, kept)[i]))(h) for i in range(2)]

    assert holds_cpu_kernels(lambda h, w: lps(h, w, repeated), h, w) == (kernels == "cpu")
    want = lps(h, w, ids)
    got = jax.jit(lps)(h, w, repeated)
    grads = jax.jit(d_hidden)(h, w, repeated)
  rows = np.array([2, 4])
  for lp, ref, dh in zip(got, want, grads, strict=True):
    assert np.all(np.isnan(np.asarray(lp)[rows]))
    np.testing.assert_allclose(np.delete(lp, rows), np.delete(ref, rows), rtol=1e-5)
    dh = np.asarray(dh)
    assert np.all(np.isnan(dh[rows])) and np.all(np.isfinite(np.delete(dh, rows, axis=0)))
  with pytest.raises(ValueError, match=r"repeat an id.*first at \[2\] with ids \[2, 8, 14, 14\]"):
    lpk.check_kept_ids(v, repeated)
  lpk.check_kept_ids(v, ids)

  def checked(kept):
    lpk.checkify_kept_ids(v, kept)
    return lpk.replay_token_logprobs(h @ w, t, kept)

  err, _ = jax.jit(checkify.checkify(checked))(repeated)
  assert "repeat an id" in str(err.get())
  err, _ = jax.jit(checkify.checkify(checked))(ids)
  assert err.get() is None


def test_replay_of_a_greedy_request_is_at_temperature_one():
  rng = np.random.default_rng(5)
  n, d, v = 6, 8, 40
  h = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
  x = h @ w
  temps = jnp.array([0.8, 0.0, 1.3, 5e-6, 0.8, 0.0])  # rows 1, 3 and 5 greedy
  sampling = lpk.Sampling(temps, top_k=5, top_p=0.9)
  greedy = temps < 1e-5  # at temperature 1, untruncated
  y = x / jnp.where(greedy, 1.0, temps)[:, None]
  rules = lpk.Sampling(1.0, jnp.where(greedy, 0, 5), jnp.where(greedy, 1.0, 0.9))
  keep = kept_mask(y - jnp.max(y, -1, keepdims=True), rules)
  ids = jnp.where(keep, jnp.arange(v), -1)  # the processed kept sets
  t = jnp.asarray(rng.integers(0, 3, n))
  want = lpk.processed_token_stats(x, t, sampling).logprobs
  at_one = lpk.token_logprobs(x, t)
  for lp in (
    lpk.replay_token_logprobs(x, t, ids, temperature=temps),
    lpk.fused_replay_token_logprobs(h, w, t, ids, temperature=temps),
  ):
    np.testing.assert_array_equal(np.isinf(lp), np.isinf(want))
    ok = ~np.isinf(np.asarray(want))
    np.testing.assert_allclose(lp[ok], want[ok], rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(lp[1::2], at_one[1::2], rtol=2e-6, atol=2e-6)
  every = jnp.broadcast_to(jnp.arange(v), (n, v))
  np.testing.assert_allclose(
    lpk.replay_token_logprobs(x, t, every, temperature=0), at_one, atol=2e-6
  )

  def total(tau):
    lp = lpk.replay_token_logprobs(x, t, every, temperature=tau)
    return jnp.sum(lp)

  d_tau = np.asarray(jax.grad(total)(temps))
  assert np.all(d_tau[1::2] == 0) and np.all(d_tau[0::2] != 0)
  with pytest.raises(ValueError, match="greedy"):
    lpk.replay_token_logprobs(x, t, ids, temperature=-0.5)
  bad = lpk.replay_token_logprobs(x, t, every, temperature=jnp.full(n, -1.0))
  assert np.all(np.isnan(bad))


@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_score_under_a_sampler_sums_processed_logprobs(path):
  rng = np.random.default_rng(4)
  b, t_len, d, v = 2, 12, 8, 300
  h = jnp.asarray(rng.normal(size=(b, t_len, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
  x = h @ w
  greedy_next = jnp.argmax(x, -1)  # every token the argmax of its row: always kept
  tokens = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), greedy_next[:, :-1]], axis=1)
  mask = jnp.broadcast_to(jnp.arange(t_len) >= 4, (b, t_len))
  segments = jnp.array([[1] * 6 + [2] * 6, [1] * 10 + [0] * 2])
  sampling = lpk.Sampling(jnp.array([0.7, 1.0]), 20, jnp.array([0.9, 0.95]))
  kw = dict(segment_ids=segments, num_segments=2, sampling=sampling)
  if path == "logits":
    got = lpk.score(x, tokens, mask, **kw)
  else:
    got = lpk.score_hidden(h, w, tokens, mask, **kw)
  want = lpk.score(x, tokens, mask, **kw, implementation="reference")
  np.testing.assert_allclose(got.response_logprob, want.response_logprob, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got.prompt_logprob, want.prompt_logprob, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got.response_greedy, want.response_greedy)
  assert bool(jnp.all(jnp.isfinite(got.joint_logprob)))
  raw = lpk.score(x, tokens, mask, segment_ids=segments, num_segments=2, temperature=1.0)
  assert bool(jnp.all(got.joint_logprob[0] > raw.joint_logprob[0]))  # renormalised: larger
  with pytest.raises(ValueError, match="Sampling.temperature"):
    lpk.score(x, tokens, mask, temperature=0.5, sampling=sampling)


def _fraction(fn, args, reference_bytes):
  stats = jax.jit(fn).lower(*args).compile().memory_analysis()
  return stats.temp_size_in_bytes / reference_bytes


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_no_logits_sized_temporaries_at_the_benchmark_shape(dtype):
  """The benchmark's logits case (B8 T512 V32000, its sampler and loss), forward
  and backward: XLA:CPU's fusion choices change with the size (an entropy term
  once materialised float32 [N, V] buffers here and not at N = 2048)."""
  b, t, v = 8, 512, 32000
  sampling = lpk.Sampling(temperature=0.7, top_k=50, top_p=0.95)

  def loss(x, targets):
    s = lpk.processed_token_stats(x, targets, sampling)
    return jnp.sum(jnp.where(s.kept, s.logprobs, 0.0))

  args = (jax.ShapeDtypeStruct((b, t, v), dtype), jax.ShapeDtypeStruct((b, t), jnp.int32))
  for fn in (loss, jax.grad(loss)):
    assert _fraction(fn, args, b * t * v * 4) < 0.10


@pytest.mark.parametrize(
  "v,top_k,dtype,softcap",
  [
    (v, k, d, None)
    for v, k in [
      (256, 50),
      (384, 50),
      (640, 50),
      (1000, 50),
      (1280, 50),
      (2048, 50),
      (4099, 50),
      (32000, 1000),
    ]  # fmt: skip
    for d in ("float32", "bfloat16", "float16")
  ]
  + [(v, 50, d, 30.0) for v in (256, 1000, 2048, 4099) for d in ("float32", "bfloat16")],
)
def test_no_large_temporaries_for_a_short_row_or_a_large_top_k(v, top_k, dtype, softcap):
  """The decision over each row's ``K`` largest values runs a chunk of rows at
  a time where its ``[N, K]`` arrays would be large against the logits (15%
  of them at V = 2048 with top-k 50, 14% at V = 32000 with top-k 1000), each
  within half a percent of them, and a short swept row's slices are a
  sixteenth of it (V = 4099: an eighth). Where the candidates themselves pass
  4% of the logits (``K`` = 64 of V under 1600) the whole forward runs a chunk
  of rows at a time (:func:`lpkernel.ops.processed.xla.forward_chunk`): whole,
  it held 33% of the logits at V = 256, 23% at 384, 15% at 640, 9.7% at 1000
  and 9.9% at 1280. Float16 candidates, which XLA gathers (the CPU's kernel
  takes float32 and bfloat16), weigh twice in that rule (V = 2048: 15%), and
  a softcap's reductions run in blocks of rows within 2% of the logits (V =
  256: a block was all of them; V = 2048 and 4099: 13-16%)."""
  dtype = jnp.dtype(dtype)
  b, t = 8, 512
  sampling = lpk.Sampling(0.7, top_k, 0.95)

  def loss(x, targets):
    return lpk.processed_token_stats(x, targets, sampling, softcap=softcap).logprobs.sum()

  args = (jax.ShapeDtypeStruct((b, t, v), dtype), jax.ShapeDtypeStruct((b, t), jnp.int32))
  fractions = [_fraction(fn, args, b * t * v * 4) for fn in (loss, jax.grad(loss))]
  assert max(fractions) < 0.10, fractions


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_no_large_temporaries_from_hidden_states_with_a_large_top_k(dtype):
  """From hidden states at the benchmark's shape with top-k 1000: the CPU
  sweep's running candidates are within a 25th of the row and their ``K``
  largest read in place (a ``[N, 4K]`` buffer and XLA's top-k over a copy of it
  were 28% of the float32 logits), and the backward's zeros wait for it (its
  ``[D, V]`` carry was live beside the forward's ``[N, K]``: 13% in
  bfloat16)."""
  n, d, v = 4096, 512, 32000
  sampling = lpk.Sampling(0.7, 1000, 0.95)

  def loss(h, w, t):  # the benchmark's: the kept targets' sum
    s = lpk.fused_processed_token_stats(h, w, t, sampling)
    return jnp.sum(jnp.where(s.kept, s.logprobs, 0.0))

  args = (
    jax.ShapeDtypeStruct((n, d), dtype),
    jax.ShapeDtypeStruct((d, v), dtype),
    jax.ShapeDtypeStruct((n,), jnp.int32),
  )
  fractions = [_fraction(fn, args, n * v * 4) for fn in (loss, jax.grad(loss, (0, 1)))]
  assert max(fractions) < 0.10, fractions


SAMPLERS = ["top_k_top_p", "top_p", "min_p"]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_no_logits_sized_temporaries(dtype, sampler):
  """Forward+backward (and each path's forward alone, under one sampler), from
  logits and from hidden states (both layouts), under 10% of the float32
  logits' bytes."""
  n, d, v = 2048, 256, 32000
  sampling = {
    "top_k_top_p": lpk.Sampling(0.7, 50, 0.95),
    "top_p": lpk.Sampling(1.0, 0, 0.95),
    "min_p": lpk.Sampling(1.0, 0, 1.0, 0.05),
  }[sampler]
  bound = n * v * 4
  x = jax.ShapeDtypeStruct((n, v), dtype)
  t = jax.ShapeDtypeStruct((n,), jnp.int32)
  h = jax.ShapeDtypeStruct((n, d), dtype)
  failures = []
  paths = [
    ("logits", lambda x, t: lpk.processed_token_stats(x, t, sampling).logprobs.sum(), (x, t)),
    (
      "hidden",
      lambda h, w, t: lpk.fused_processed_token_stats(h, w, t, sampling).logprobs.sum(),
      (h, jax.ShapeDtypeStruct((d, v), dtype), t),
    ),
    (
      "hidden_tied",
      lambda h, w, t: lpk.fused_processed_token_stats(
        h, w, t, sampling, vocab_axis=0
      ).logprobs.sum(),
      (h, jax.ShapeDtypeStruct((v, d), dtype), t),
    ),
  ]
  # Each path forward and backward; the forward alone of each path for one
  # sampler (every pair of sampler, path and pass).
  for i, (name, fn, args) in enumerate(paths):
    argnums = (0,) if name == "logits" else (0, 1)
    for grad in (True,) if i != SAMPLERS.index(sampler) else (False, True):
      f = jax.grad(fn, argnums) if grad else fn
      frac = _fraction(f, args, bound)
      if frac > 0.1:
        failures.append(f"{name} grad={grad}: {frac:.1%}")
  assert not failures, failures


@pytest.mark.parametrize("vocab_axis", [0, -1], ids=["tied", "unembed"])
def test_the_candidates_from_hidden_states_hold_no_copy_of_the_table(vocab_axis):
  """XLA's steps from hidden states (every platform but the CPU with its
  kernels) gather the candidates' values from the table as stored, in pieces
  of ``D`` where one token's would pass the chunks' budget: the forward under
  10% of the float32 logits where the table is twice their size (before: 231%
  from a ``[D, V]`` table, transposed whole, and 31% from a tied one, one
  token's 2048 gathered columns of 2048 values at once)."""
  n, d, v = 1024, 2048, 32000
  h = jax.ShapeDtypeStruct((n, d), jnp.float32)
  w = jax.ShapeDtypeStruct((v, d) if vocab_axis == 0 else (d, v), jnp.float32)
  t = jax.ShapeDtypeStruct((n,), jnp.int32)
  sampling = lpk.Sampling(0.7, 50, 0.95)

  def loss(h, w, t):
    stats = lpk.fused_processed_token_stats(h, w, t, sampling, vocab_axis=vocab_axis)
    return stats.logprobs.sum()

  with without_cpu_kernels():
    assert _fraction(loss, (h, w, t), n * v * 4) < 0.1


@pytest.mark.parametrize("kernels", ["cpu", "xla"])
@pytest.mark.parametrize(
  "n, d, v, k, vocab_axis",
  [
    (4096, 64, 151936, 64, 0),
    (4096, 64, 32000, 64, 0),
    (4096, 64, 32000, 512, 0),
    (1024, 2048, 32000, 512, 0),
    (1024, 2048, 151936, 512, -1),
  ],
  ids=["qwen-vocabulary", "llama-vocabulary", "K512", "D2048", "unembed-D2048"],
)
def test_replay_from_hidden_states_has_no_logits_sized_temporaries(kernels, n, d, v, k, vocab_axis):
  """Forward and forward+backward of the replay, on the CPU kernels and on
  XLA's steps (the ids' sort for repeats; the kept rows gathered in token
  chunks of at most 1% of the float32 logits, two such arrays in the
  backward), under 10% of the float32 logits' bytes: at the benchmark's
  vocabulary, at 524 MB of logits (XLA's chunks were a fixed 32 MB before, 13.5%
  here; with K 512 its ``[N, K]`` arrays hold several percent, and chunks of
  2.5% of the logits would have made it 13.2%), where one token's kept rows
  (4 MB) outweigh its logits 32 times, and from a ``[D, V]`` unembedding twice
  the logits' size (XLA's steps transposed it whole before: 200%; now a slab
  of 16 columns of ``D`` at a time)."""
  bound = n * v * 4
  h = jax.ShapeDtypeStruct((n, d), jnp.float32)
  w = jax.ShapeDtypeStruct((v, d) if vocab_axis == 0 else (d, v), jnp.float32)
  t = jax.ShapeDtypeStruct((n,), jnp.int32)
  ids = jax.ShapeDtypeStruct((n, k), jnp.int32)

  def replayed(h, w, t, ids):
    lp = lpk.fused_replay_token_logprobs(h, w, t, ids, temperature=0.7, vocab_axis=vocab_axis)
    return lp.sum()

  context = without_cpu_kernels() if kernels == "xla" else contextlib.nullcontext()
  with context:
    for f in (replayed, jax.grad(replayed, (0, 1))):
      assert holds_cpu_kernels(f, h, w, t, ids) == (kernels == "cpu")
      assert _fraction(f, (h, w, t, ids), bound) < 0.1


def test_the_rollout_example_runs():
  from lpkernel.examples import rollout_replay

  assert np.isfinite(rollout_replay.main())


def test_the_processed_op_takes_its_own_implementations_by_name_or_object():
  """Names resolve on this backend (the GPU kernels refuse the CPU by name, run
  in interpret mode as an object), any object with the protocol's two passes
  runs, and a logits implementation is refused naming the op it belongs to."""
  x = jax.random.normal(jax.random.key(0), (3, 40))
  t = jnp.array([0, 5, 39])
  sampling = lpk.Sampling(temperature=0.8, top_k=5)
  want = lpk.processed_token_stats(x, t, sampling, implementation="reference")

  class Counting:  # a user's implementation: delegates to XLA's passes
    name, platforms, lanes, calls = "counting", None, 1, []

    def partials_and_candidates(self, *args):
      self.calls.append("forward")
      return lpk.XlaProcessed().partials_and_candidates(*args)

    def processed_grads(self, *args):
      self.calls.append("backward")
      return lpk.XlaProcessed().processed_grads(*args)

  counting = Counting()
  pallas = (lpk.PallasGpuProcessed(interpret=True), lpk.PallasTpuProcessed(interpret=True))
  for impl in ("xla", *pallas, counting):
    got = lpk.processed_token_stats(x, t, sampling, implementation=impl)
    np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=1e-6)
  raw = lambda x: lpk.processed_token_stats(x, t, sampling, implementation=counting).raw_logprobs  # noqa: E731
  jax.grad(lambda x: jnp.sum(raw(x)))(x)
  assert counting.calls == ["forward", "forward", "backward"]
  for name, platform in (("pallas_gpu", "gpu"), ("pallas_tpu", "tpu")):
    with pytest.raises(ValueError, match=f"runs on \\['{platform}'\\]"):
      lpk.processed_token_stats(x, t, sampling, implementation=name)
  with pytest.raises(TypeError, match="is a logits implementation"):
    lpk.processed_token_stats(x, t, sampling, implementation=lpk.PallasGpuLogits(interpret=True))

  class LogitsOnly(Counting):  # no passes from hidden states
    pass

  with pytest.raises(ValueError, match="no processed kernels from hidden states"):
    lpk.fused_processed_token_stats(x, jnp.eye(40), t, sampling, implementation=LogitsOnly())


@pytest.mark.parametrize("group, c", [(64, 3), (5, 3), (8, 1), (4, 6), (1, 2), (7, 4)])
def test_group_tops_are_each_groups_largest_values_with_their_copies(group, c):
  """The sweep's record from hidden states (XLA's steps; the CPU keeps running
  candidates instead): each group's ``c`` largest values, descending, ties
  counted, ``-inf`` past a short group (also a tail group and a group narrower
  than ``c``), NaN in a group holding one."""
  from lpkernel.ops.processed import record

  group_tops = jax.jit(record.group_tops, static_argnums=(1, 2))

  rng = np.random.default_rng(group * 10 + c)
  for w in (64, 70, 3):
    z = rng.integers(0, 4, size=(3, w)).astype(np.float32)  # many ties
    padded = np.concatenate([z, np.full((3, -w % group), -np.inf, np.float32)], 1)
    want = -np.sort(-padded.reshape(3, -1, group), -1)[..., :c]
    want = np.concatenate([want, np.full((*want.shape[:2], c - want.shape[2]), -np.inf)], -1)
    np.testing.assert_array_equal(group_tops(jnp.asarray(z), group, c), want)
  z = np.zeros((1, group), np.float32)
  z[0, -1] = np.nan
  assert np.isnan(np.asarray(group_tops(jnp.asarray(z), group, c))[0, 0, 0])


def _clustered(n, d, v, spans, seed=0):
  """Hidden states whose rows' largest logits lie in the columns ``spans``
  (``(lo, width)`` each); random rows (largest values far apart) without spans."""
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(n, d)).astype(np.float32)
  w = rng.normal(size=(d, v)).astype(np.float32)
  if spans:
    h[:, 0] = 1.0
    w[1:] *= 0.05
    w[0] = 0.0
    for lo, width in spans:
      w[0, lo : lo + width] = 5 + 0.3 * rng.random(width)
  return jnp.asarray(h), jnp.asarray(w), jnp.asarray(rng.integers(0, v, n))


@pytest.mark.parametrize(
  "case, spans, groups, share",
  [
    ("recorded", [], 4, 0.25),
    ("gathered", [(64, 20)], 4, 1.0),
    ("more_groups_than_gathered", [(64, 4), (128, 4)], 1, 1.0),
    ("more_rows_than_gathered", [(64, 20)], 4, 0.25),
  ],
)
@pytest.mark.parametrize("impl", ["xla", "pallas_gpu"])
def test_the_k_largest_from_hidden_states_in_every_branch(impl, case, spans, groups, share):
  """From hidden states the ``K`` largest come from the sweep's record of each
  group's largest (capped) values, with the groups that may hold more of them
  gathered (rows taken apart), or from whole groups when a row or the batch
  needs more: each branch is reached here (checked on the record) and every one
  gives the reference's kept sets and values, with a softcap and without. XLA's
  steps (the CPU kernels off: on the CPU a running top-k takes the record's
  place) and the Pallas GPU kernels' token chunks (interpret mode), which
  recorded the uncapped values: with a softcap, the kept sets and masses of the
  rows the record settled were wrong."""
  from lpkernel.ops.processed.candidates import _recorded_top
  from lpkernel.ops.processed.record import group_tops

  n, d, v, k = 48, 16, 5000, 8
  config = lpk.ProcessedConfig(candidates=k, gathered_groups=groups, gathered_rows=share)
  h, w, t = _clustered(n, d, v, spans)
  tops = group_tops(h @ w, config.hidden_group, config.group_values)
  _, ids, over = _recorded_top(tops, k, groups)
  gathering = int(jnp.sum(jnp.any(ids >= 0, axis=1)))
  over = bool(jnp.any(over))
  reached = {
    "recorded": gathering == 0,
    "gathered": 0 < gathering <= n * share and not over,
    "more_groups_than_gathered": over,
    "more_rows_than_gathered": gathering > n * share and not over,
  }[case]
  assert reached, (gathering, over)
  chunks = lpk.PallasGpuProcessed(fused=lpk.PallasGpuFused(chunk_tokens=16), interpret=True)
  cases = (
    (lpk.Sampling(0.7, 5, 0.95), None),
    (lpk.Sampling(1.0, 0, 0.9), 4.0),
    (lpk.Sampling(1.0, 7, 1.0), 4.0),
    (lpk.Sampling(0.5, 0, 1.0, 0.05), None),
  )

  def every_case(h, implementation, config=None):  # one program for the four
    return [
      lpk.fused_processed_token_stats(
        h, w, t, sampling, softcap=softcap, config=config, implementation=implementation
      )
      for sampling, softcap in cases
    ]

  wanted = jax.jit(lambda h: every_case(h, "reference"))(h)
  with contextlib.nullcontext() if impl == "pallas_gpu" else without_cpu_kernels():
    implementation = chunks if impl == "pallas_gpu" else None
    found = jax.jit(lambda h: every_case(h, implementation, config))(h)
  for got, want in zip(found, wanted, strict=True):
    np.testing.assert_array_equal(got.kept, want.kept)
    np.testing.assert_array_equal(got.kept_count, want.kept_count)
    np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got.log_kept_mass, want.log_kept_mass, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("v", [32 * 37, 65536], ids=["one-chunk", "two-chunks"])
@pytest.mark.parametrize(
  "dtype,softcap",
  [(jnp.float32, None), (jnp.bfloat16, None), (jnp.float16, None), (jnp.float32, 5.0)],
  ids=["float32", "bfloat16", "float16", "softcap"],
)
def test_partials_from_the_group_maxima_are_the_plain_ones(v, dtype, softcap):
  """On the CPU the processed path's partials take their maxima and the greedy
  flag's block maxima from its 32-column group maxima: the same max, sum, target
  and greedy flag as the plain forward's own passes, on rows with ties across
  groups and chunks, targets at group edges, a NaN row and an all -inf row."""
  from lpkernel.ops.logprobs.xla import XlaLogits
  from lpkernel.ops.processed.xla import _logits_group_maxima

  rng = np.random.default_rng(12)
  n = 12
  x = np.round(rng.normal(size=(n, v)) * 2, 1)  # many ties
  top = x.max(-1, keepdims=True)
  x[:4, [31, 32, v // 2, v - 1]] = top[:4] + 1  # the max in several groups and chunks
  x[4, :] = 7.0  # every column ties
  x[5, 40] = np.nan
  x[6, :] = -np.inf
  x = jnp.asarray(x, dtype)
  t = jnp.asarray([31, 32, v // 2, v - 1, 0, 40, 3, *rng.integers(0, v, n - 7)], jnp.int32)
  t = t.at[7].set(jnp.argmax(x[7]))  # a greedy one among the random rows
  tau = jnp.asarray(rng.uniform(0.5, 2, n), jnp.float32)
  maxima = _logits_group_maxima(x, 32, 512)

  def run(maxima):
    return jax.jit(lambda x, t, tau, m: XlaLogits().partials(x, t, tau, softcap, m))(
      x, t, tau, maxima
    )

  got, want = run(maxima), run(None)
  np.testing.assert_array_equal(got.m, want.m)
  np.testing.assert_array_equal(got.t, want.t)
  np.testing.assert_allclose(got.s, want.s, rtol=1e-6)
  np.testing.assert_array_equal(got.arg == t, want.arg == t)
  greedy = [0, 4] if softcap else [0, 4, 7]  # capping may tie row 7's max with another
  assert bool(np.all(np.asarray(want.arg == t)[greedy]))  # the flags the rows set up
  assert not bool(np.any(np.asarray(want.arg == t)[1:4]))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_xlas_own_steps_give_the_compiled_kernels_numbers(dtype):
  """Without the compiled CPU kernels (a machine without a compiler, and the
  programs for a GPU or TPU: XLA's top-k, gather and merge tree, and its
  bisection for the rows the candidates leave open), the same kept sets and
  values, from logits (ties, a NaN row, softcap: its polynomial may round an
  ulp apart in another fusion) and from hidden states (groups gathered)."""
  rng = np.random.default_rng(7)
  x = rng.normal(size=(12, 5000)) * 4
  x[1, :40] = x[1].max()  # ties at the top
  x[2, 3] = np.nan
  x = jnp.asarray(x, dtype)
  t = jnp.asarray(rng.integers(0, 5000, 12))
  sampling = lpk.Sampling(0.7, jnp.array([50, 0, 5, 100] * 3), jnp.array([0.95, 0.9, 1.0] * 4))
  h, w, th = _clustered(16, 16, 5000, [(64, 20)], seed=4)
  hidden, config = lpk.Sampling(0.7, 5, 0.95), lpk.ProcessedConfig(candidates=8, gathered_rows=1.0)

  def from_logits(x):
    return lpk.processed_token_stats(x, t, sampling, softcap=30.0)

  def from_hidden(h):
    return lpk.fused_processed_token_stats(h, w, th, hidden, config=config)

  def both():
    return jax.jit(from_logits)(x), jax.jit(from_hidden)(h)

  compiled = both()
  assert holds_cpu_kernels(from_logits, x) and holds_cpu_kernels(from_hidden, h)
  assert int(jnp.max(compiled[0].kept_count)) > 64  # nuclei past the candidates: searched
  with without_cpu_kernels():
    assert not holds_cpu_kernels(from_logits, x) and not holds_cpu_kernels(from_hidden, h)
    steps = both()
  for got, want in zip(steps, compiled, strict=True):
    np.testing.assert_array_equal(got.kept, want.kept)
    np.testing.assert_array_equal(got.kept_count, want.kept_count)
    np.testing.assert_array_equal(got.greedy, want.greedy)
    for a, b in zip(got[:3], want[:3], strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert np.isnan(compiled[0].logprobs[2]) and int(compiled[0].kept_count[1]) >= 40


def test_no_sort_in_the_compiled_programs():
  """XLA:CPU rewrites a top-k whose consumers it sees as a sort of the row (10x
  to 15x slower, silently): the compiled processed programs, from logits and
  from hidden states, forward and backward, hold the compiled CPU kernels
  (:mod:`lpkernel.ops.processed.cpu_top_k`: from logits the candidates from the
  group maxima, the float32 logits' maxima taken by the kernel, with no top-k
  left; from hidden states the running candidates' ``K`` largest), or without
  them XLA's top-k, and no sort."""
  from lpkernel.ops.processed import cpu_top_k

  n, d, v = 256, 32, 32000
  x16 = jax.ShapeDtypeStruct((n, v), jnp.bfloat16)
  sampling = lpk.Sampling(0.7, 50, 0.95)
  t = jax.ShapeDtypeStruct((n,), jnp.int32)
  h, w = jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32)
  x = jax.ShapeDtypeStruct((n, v), jnp.float32)

  def logits(x, t):
    return lpk.processed_token_stats(x, t, sampling).logprobs.sum()

  def hidden(h, w, t):
    return lpk.fused_processed_token_stats(h, w, t, sampling).logprobs.sum()

  compiled = cpu_top_k.available()
  for fn, args, kernel in (
    (logits, (x, t), "lpkernel_cpu_maxima_top_k"),  # float32: the maxima the kernel's own
    (logits, (x16, t), "lpkernel_cpu_groups_top_k"),  # bfloat16: XLA's maxima
    (hidden, (h, w, t), "lpkernel_cpu_running_values"),  # the running candidates' K largest
    (jax.grad(hidden), (h, w, t), "lpkernel_cpu_running_values"),
  ):
    text = jax.jit(fn).lower(*args).compile().as_text()
    assert (kernel if compiled else '"TopK"') in text and " sort(" not in text


@pytest.mark.parametrize("spans", [[], [(64, 20)]], ids=["recorded", "gathered"])
def test_a_nan_row_on_the_recorded_path_is_nan_and_leaves_the_others_alone(spans):
  """Wide enough for the record (V 5000): a NaN hidden row gives that token NaN
  and a zero gradient, every other token the reference's kept set and value and
  a finite gradient, with nothing gathered and with groups gathered."""
  from lpkernel.ops.processed.candidates import _recorded_top
  from lpkernel.ops.processed.record import group_tops

  h, w, t = _clustered(6, 16, 5000, spans, seed=3)
  bad = h.at[2, 5].set(jnp.nan)
  sampling = lpk.Sampling(0.7, 5, 0.95)
  config = lpk.ProcessedConfig(candidates=8, gathered_rows=1.0)
  _, ids, over = _recorded_top(group_tops(h @ w, 64, 3), 8, 4)
  assert not bool(jnp.any(over)) and bool(jnp.any(ids >= 0)) == bool(spans)
  got = lpk.fused_processed_token_stats(bad, w, t, sampling, config=config)
  want = lpk.fused_processed_token_stats(h, w, t, sampling, implementation="reference")
  others = np.array([0, 1, 3, 4, 5])
  assert np.isnan(got.logprobs[2]) and np.isnan(got.log_kept_mass[2]) and not got.kept[2]
  np.testing.assert_array_equal(got.kept_count[others], want.kept_count[others])
  np.testing.assert_allclose(got.logprobs[others], want.logprobs[others], rtol=2e-5, atol=2e-5)

  def loss(h, w):
    lp = lpk.fused_processed_token_stats(h, w, t, sampling, config=config).logprobs
    return jnp.sum(jnp.where((jnp.arange(6) == 2) | ~jnp.isfinite(lp), 0.0, lp))

  dh, dw = (np.asarray(g) for g in jax.grad(loss, argnums=(0, 1))(bad, w))
  assert np.all(dh[2] == 0) and np.all(np.isfinite(dh)) and np.all(np.isfinite(dw))


def test_a_whole_rows_nucleus_among_the_candidates_needs_no_search():
  """Top-p alone (no top-k, no min-p): a nucleus that ends among the ``K``
  candidates is decided there, from the row's whole mass (the columns past them
  summed first, as the engine's ascending sum), with the reference's kept set;
  a nucleus past them is left to the search."""
  from lpkernel import partials as P
  from lpkernel.ops.processed import select as S
  from lpkernel.ops.processed import xla as X

  n, v = 8, 1000
  scale = jnp.where(jnp.arange(n) % 2 == 0, 8.0, 0.05)[:, None]  # peaked rows, flat rows
  x = jax.random.normal(jax.random.key(3), (n, v), jnp.float32) * scale
  targets = jnp.zeros((n,), jnp.int32)
  config = lpk.ProcessedConfig()
  parts, top, _ = X.logits_forward(x, targets, None, None, 64, config, X.XlaProcessed(), 1)
  shift = P.finish(parts, targets, v, None).shift
  p = jnp.full((n,), 0.9)
  params = S.Params(None, jnp.zeros((n,), jnp.int32), p, jnp.zeros((n,)), shift)
  d = S.decide(top, False, params, v, parts.s)
  want = kept_mask(x, lpk.Sampling(top_p=0.9))
  np.testing.assert_array_equal(d.settled, np.arange(n) % 2 == 0)
  settled = np.asarray(d.settled)
  np.testing.assert_array_equal(S.kept(x, params, d.kappa)[settled], want[settled])
  np.testing.assert_array_equal(d.size[settled], jnp.sum(want, axis=-1)[settled])
  assert int(jnp.max(jnp.sum(want, axis=-1)[settled])) > 1  # a nucleus, not only the argmax


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_group_maxima_stand_for_the_max_pass_on_whole_groups(dtype):
  """V a multiple of the group (32): the partials' row max and first argmax come
  from the group maxima (float32: the candidates' kernel's own). Tied maxima in
  two groups (greedy is the first), a tie inside one group, an impossible
  target, a NaN row, a row of ``-inf`` but one column: the reference's values,
  kept sets and greedy flags."""
  rng = np.random.default_rng(5)
  v = 2048
  x = rng.normal(size=(6, v)).astype(np.float32) * 2
  x[0, [40, 1500]] = 30.0  # tied maxima in groups 1 and 46
  x[1, [65, 66]] = 30.0  # tied inside group 2
  x[2, 7] = -np.inf
  x[3, 100] = np.nan
  x[4, :] = -np.inf
  x[4, 2047] = 1.0
  t = jnp.array([1500, 65, 7, 3, 2047, 40])
  x = jnp.asarray(x, dtype)
  s = lpk.Sampling(0.7, 50, 0.95)
  got = jax.jit(lambda x: lpk.processed_token_stats(x, t, s))(x)
  want = lpk.processed_token_stats(x, t, s, implementation="reference")
  np.testing.assert_array_equal(got.greedy, want.greedy)
  np.testing.assert_array_equal(got.greedy, [False, True, False, False, True, False])
  np.testing.assert_array_equal(got.kept, want.kept)
  np.testing.assert_array_equal(got.kept_count, want.kept_count)
  np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.raw_logprobs, want.raw_logprobs, rtol=1e-5, atol=1e-6)
  assert np.isneginf(got.logprobs[2]) and np.isnan(got.logprobs[3]) and got.logprobs[4] == 0


@pytest.mark.parametrize("dot_dtype", [None, "float32"], ids=["as-stored", "upcast"])
def test_searched_rows_from_hidden_states_take_wide_matmuls(dot_dtype):
  """Top-p alone on flat rows (every row's nucleus past the candidates: each is
  searched, its logits made again a chunk of rows at a time): the reference's
  kept sets and log-probabilities whether the table is read as stored (one
  matmul per chunk, ``rows_width``) or upcast a block at a time; and under
  the upcast the temporaries stay under 10% of the float32 logits."""
  from lpkernel.ops.processed import xla as X

  n, d, v = 96, 16, 4099
  h = 0.05 * jax.random.normal(jax.random.key(0), (n, d), jnp.float32)
  w = jax.random.normal(jax.random.key(1), (d, v), jnp.float32)
  targets = jax.random.randint(jax.random.key(2), (n,), 0, v)
  sampling = lpk.Sampling(temperature=1.0, top_p=0.95)
  config = lpk.FusedConfig(dot_dtype=dot_dtype)
  got = lpk.fused_processed_token_stats(h, w, targets, sampling, fused_config=config)
  want = lpk.fused_processed_token_stats(h, w, targets, sampling, implementation="reference")
  assert int(jnp.min(want.kept_count)) > 64  # past the candidates: searched
  np.testing.assert_array_equal(got.kept, want.kept)
  np.testing.assert_array_equal(got.kept_count, want.kept_count)
  np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-5)
  chunk, width = X.search_chunk(2048), X.rows_width(X.search_chunk(2048), 256, 32000, config)
  if dot_dtype is None:
    assert width == 32000
  else:  # the upcast block within the chunk's logits, whole sweep blocks
    assert 256 <= width and width % 256 == 0 and 256 * width <= chunk * 32000
  if dot_dtype is not None:
    shapes = (
      jax.ShapeDtypeStruct((2048, 256), jnp.bfloat16),
      jax.ShapeDtypeStruct((256, 32000), jnp.bfloat16),
      jax.ShapeDtypeStruct((2048,), jnp.int32),
    )
    fn = lambda h, w, t: lpk.fused_processed_token_stats(  # noqa: E731
      h, w, t, sampling, fused_config=config
    ).logprobs.sum()
    assert _fraction(fn, shapes, 2048 * 32000 * 4) < 0.10
