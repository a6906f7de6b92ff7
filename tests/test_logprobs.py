"""token_logprobs: values and gradients against the reference and the float64 oracle."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

import lpkernel as lpk
from lpkernel import reference
from lpkernel.ops import ChunkConfig, XlaLogits
from tests.helpers import (
  GRAD_TOLERANCES,
  TOLERANCES,
  assert_close,
  jitted,
  oracle_token_logprobs,
  pairwise,
  random_logits,
  random_tokens,
)

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
# A tiny chunk config sends small vocabularies through the multi-chunk path, and
# V = 17 (no divisor in [2, 8]) through the sweep: 3 blocks of 5 and a tail.
SMALL_CHUNKS = ChunkConfig(max_chunk=8, min_chunk=2, sweep_block=5)


def _inputs(seed, shape, v, dtype):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return random_logits(k1, (*shape, v), dtype), random_tokens(k2, shape, v)


def _check_against_both(logits, targets, **opts):
  dtype = logits.dtype
  got = lpk.token_logprobs(logits, targets, **opts)
  assert got.dtype == jnp.float32
  tol = TOLERANCES[jnp.dtype(dtype)]
  opts.pop("implementation", None)
  want = jitted(reference.token_logprobs, logits, targets, **opts)
  assert_close(got, want, **tol, what="vs reference")
  assert_close(got, oracle_token_logprobs(logits, targets, **opts), **tol, what="vs oracle")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize(
  "shape,v",
  [((5,), 1), ((5,), 3), ((2, 3), 32003), ((1,), 40000), ((4, 7), 520), ((3,), 2049)],
  ids=["V1", "V3", "V32003", "V40000-chunked", "V520", "V2049"],
)
def test_values_match_reference_and_oracle(shape, v, dtype):
  _check_against_both(*_inputs(0, shape, v, dtype))


@given(
  n=st.sampled_from([1, 6]),
  v=st.sampled_from([1, 2, 17, 50]),
  dtype=st.sampled_from(DTYPES),
  chunked=st.booleans(),
  seed=st.integers(0, 2**16),
)
def test_random_shapes(n, v, dtype, chunked, seed):
  logits, targets = _inputs(seed, (n,), v, dtype)
  _check_against_both(
    logits, targets, implementation=XlaLogits(SMALL_CHUNKS if chunked else ChunkConfig())
  )


# Every pair of values of the four options (tests/helpers.pairwise), the first
# case with every option on (tests/test_default_emitters.py names two).
VALUE_AND_GRAD_CASES = [
  pytest.param(
    chunks, temperature, softcap, dtype,
    id=f"{chunks_id}-{temperature}-{'plain' if softcap is None else 'softcap'}-"
    f"{jnp.dtype(dtype).name}",
  )
  for (chunks_id, chunks), temperature, softcap, dtype in pairwise(
    [("chunked", SMALL_CHUNKS), ("one-chunk", ChunkConfig())],
    ["per-row", "scalar", "one"],
    [2.5, None],
    [jnp.bfloat16, jnp.float32, jnp.float16],
  )
]  # fmt: skip


@pytest.mark.parametrize("chunks,temperature,softcap,dtype", VALUE_AND_GRAD_CASES)
def test_value_and_grad_match_reference(chunks, temperature, softcap, dtype):
  logits, targets = _inputs(1, (3, 4), 24, dtype)
  tau = {"one": 1.0, "scalar": jnp.float32(0.7), "per-row": jnp.array([[0.5], [1.0], [2.0]])}[
    temperature
  ]
  weights = jax.random.normal(jax.random.key(2), targets.shape)

  def loss(fn, x, tau, **kw):
    return jnp.sum(weights * fn(x, targets, temperature=tau, softcap=softcap, **kw))

  argnums = (1,) if temperature == "one" else (1, 2)
  grads = jax.value_and_grad(loss, argnums=argnums)

  def compiled(fn, **kw):  # a Python 1.0 stays static (no temperature)
    if temperature == "one":
      return jitted(lambda x: grads(fn, x, tau, **kw), logits)
    return jitted(lambda x, tau: grads(fn, x, tau, **kw), logits, tau)

  got_v, got_g = compiled(lpk.token_logprobs, implementation=XlaLogits(chunks))
  ref_v, ref_g = compiled(reference.token_logprobs)
  tol = TOLERANCES[jnp.dtype(dtype)]
  assert_close(got_v, ref_v, rtol=tol["rtol"], atol=1e-4, what="value")
  assert got_g[0].dtype == logits.dtype
  assert_close(got_g[0], ref_g[0], **GRAD_TOLERANCES[jnp.dtype(dtype)], what="dlogits")
  if temperature != "one":
    assert np.shape(got_g[1]) == np.shape(tau)
    assert_close(got_g[1], ref_g[1], rtol=1e-4, atol=1e-4, what="dtemperature")


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunks", [ChunkConfig(), SMALL_CHUNKS], ids=["one-chunk", "chunked"])
def test_custom_vjp_check_grads(softcap, chunks):
  logits, targets = _inputs(3, (4,), 16, jnp.float32)
  tau = jnp.array([0.5, 1.0, 1.5, 3.0])

  def f(x, tau):
    return lpk.token_logprobs(
      x, targets, temperature=tau, softcap=softcap, implementation=XlaLogits(chunks)
    )

  check_grads(f, (logits, tau), order=1, modes=["rev"], eps=1e-2, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("bad", [-1, -3, 7, 100])
def test_out_of_range_ids_give_nan_and_never_wrap(bad):
  logits, targets = _inputs(4, (3,), 7, jnp.float32)
  targets = targets.at[1].set(bad)
  lp = jax.jit(lpk.token_logprobs)(logits, targets)
  assert np.isnan(lp[1])
  assert np.isfinite(np.asarray(lp)[[0, 2]]).all()


@pytest.mark.parametrize("chunks", [ChunkConfig(), SMALL_CHUNKS], ids=["one-chunk", "chunked"])
def test_neg_inf_target_is_zero_probability_not_nan(chunks):
  logits = jnp.zeros((3, 16)).at[0, 5].set(-jnp.inf).at[1].set(-jnp.inf).at[2, :8].set(-jnp.inf)
  targets = jnp.array([5, 2, 3])
  lp = lpk.token_logprobs(logits, targets, implementation=XlaLogits(chunks))
  np.testing.assert_array_equal(lp, [-np.inf, -np.inf, -np.inf])
  # A masked (zero-cotangent) impossible row leaves no NaN in the gradient.
  grad = jax.grad(lambda x: jnp.sum(jnp.where(jnp.arange(3) == 2, 0.0, lp_fn(x, targets, chunks))))(
    logits
  )
  assert np.isfinite(grad).all()


def lp_fn(x, targets, chunks):
  lp = lpk.token_logprobs(x, targets, implementation=XlaLogits(chunks))
  return jnp.where(jnp.isneginf(lp), 0.0, lp)


def test_neg_inf_elsewhere_gives_finite_gradient():
  logits = jnp.zeros((2, 6)).at[:, 4:].set(-jnp.inf)
  targets = jnp.array([1, 2])
  grad = jax.grad(lambda x: jnp.sum(lpk.token_logprobs(x, targets)))(logits)
  assert np.isfinite(grad).all()
  np.testing.assert_allclose(grad[0], [-0.25, 0.75, -0.25, -0.25, 0.0, 0.0], rtol=1e-6)


def test_masked_nan_rows_put_no_nan_into_gradients():
  logits = jnp.zeros((3, 5)).at[1].set(jnp.nan)
  targets = jnp.array([0, 1, 2])
  grad = jax.grad(
    lambda x: jnp.sum(jnp.where(jnp.arange(3) == 1, 0.0, lpk.token_logprobs(x, targets)))
  )(logits)
  assert np.isfinite(grad).all()


def test_vmap_over_extra_axis_matches_batched_call():
  logits, targets = _inputs(5, (4, 3), 11, jnp.bfloat16)
  mapped = jax.vmap(lpk.token_logprobs)(logits, targets)
  chex.assert_trees_all_close(mapped, lpk.token_logprobs(logits, targets))


def test_no_retracing_on_new_values():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(x, t):
    return lpk.token_logprobs(x, t)

  for seed in range(3):
    f(*_inputs(seed, (2, 3), 9, jnp.float32))


@pytest.mark.parametrize(
  "logits_shape,targets_shape,dtype,err",
  [
    ((2, 3, 5), (2, 4), jnp.float32, ValueError),  # leading dims differ
    ((2, 3), (2, 3), jnp.float32, ValueError),  # missing V axis
    ((2, 0), (2,), jnp.float32, ValueError),  # V = 0
    ((2, 5), (2,), jnp.int32, TypeError),  # integer logits
    ((2, 5), (2,), jnp.float64, TypeError),
  ],
)
def test_bad_shapes_and_dtypes_raise(logits_shape, targets_shape, dtype, err):
  logits = jax.ShapeDtypeStruct(logits_shape, dtype)
  targets = jnp.zeros(targets_shape, jnp.int32)
  with pytest.raises(err):
    lpk.token_logprobs(logits, targets)


def test_float_targets_raise_type_error():
  with pytest.raises(TypeError, match="targets"):
    lpk.token_logprobs(jnp.zeros((2, 4)), jnp.zeros((2,)))


def test_bad_temperature_shape_and_softcap_raise():
  with pytest.raises(ValueError, match="temperature"):
    lpk.token_logprobs(jnp.zeros((2, 4)), jnp.zeros((2,), jnp.int32), temperature=jnp.ones(3))
  with pytest.raises(ValueError, match="softcap"):
    lpk.token_logprobs(jnp.zeros((2, 4)), jnp.zeros((2,), jnp.int32), softcap=-1.0)


@pytest.mark.parametrize(
  "v,chunk",
  [(32000, 32000), (128256, 32064), (40000, 20000), (65537, None), (3, 3), (32003, None)]
  + [(50257, None), (151936, None)],  # chunks of 1733 (a prime), of 1187 * 2**k: no argmax blocks
)
def test_chunk_choice_divides_vocab(v, chunk):
  """A chunk divides V and has argmax blocks; None (65537 and 32003 are prime)
  means the vocabulary is swept in blocks."""
  assert ChunkConfig().chunk(v) == chunk


def test_softcap_tanh_is_monotone_odd_and_within_its_rounding_bound():
  """Softcap's ``tanh`` (:func:`lpkernel.partials.monotone_tanh`) on every float32
  of windows where XLA's own float32 ``tanh`` decreases (one adjacent pair in
  five from 0.5 to 8 on the CPU), across the switch between its two branches
  and into saturation: never decreasing, exactly odd, within 2.1 ulp of the
  float64 ``tanh``; its autodiff derivative ``1 - tanh**2``, finite everywhere.

  The bound is its roundings', given an ``exp`` within 1 ulp: from |y| = 0.625,
  ``t = 1 - q`` with ``q = 2 / (exp(2|y|) + 1) <= 0.445`` and ``t`` in [0.555,
  1), whose ulp is the unit roundoff u: ``exp``'s 2u relative through ``q``
  (at most ``2e / (e + 1)**2 <= 0.346`` of it: 0.69), the add's and the
  divide's u each (0.89), the subtraction's 0.5: 2.08 ulp; below, the
  polynomial's last add (0.5) and its correction's few roundings of under a
  tenth of ``y``. (Measured on XLA:CPU over every float32: 1.33.)"""
  from lpkernel.partials import monotone_tanh

  f = jax.jit(monotone_tanh)
  starts = [1e-3, 0.55, 0.62, 1.0, 2.0, 4.0, 7.9]
  y = np.concatenate(
    [np.float32(a).view(np.int32) + np.arange(1 << 17, dtype=np.int32) for a in starts]
  )
  y = np.concatenate([y.view(np.float32), [0.0, 0.625, 9.0, 20.0, 1e30, np.inf]]).astype(np.float32)
  y = np.sort(y)
  t = np.asarray(f(jnp.asarray(y)))
  assert np.all(np.diff(t) >= 0)
  np.testing.assert_array_equal(np.asarray(f(jnp.asarray(-y))), -t)
  ulp = np.spacing(np.abs(t)).astype(np.float64)
  assert np.max(np.abs(t - np.tanh(y.astype(np.float64))) / np.maximum(ulp, 1e-45)) <= 2.1
  assert np.isnan(f(jnp.float32(np.nan)))
  d = np.asarray(jax.jit(jax.vmap(jax.grad(monotone_tanh)))(jnp.asarray(y)))
  np.testing.assert_allclose(d, 1 - np.tanh(y.astype(np.float64)) ** 2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name)
def test_softcap_backward_is_one_pass_over_whole_rows(dtype):
  """The forward reduces softcap rows in blocks (a loop); the elementwise backward
  must not: in a loop, XLA:CPU copied the whole bfloat16 ``[N, V]`` result per
  block (a bfloat16 softcap forward+backward 10x slower at V = 100352)."""
  n, v = 256, 32000  # 8 row blocks of 32 rows
  rows = jax.ShapeDtypeStruct((n,), jnp.float32)
  args = (jax.ShapeDtypeStruct((n, v), dtype), jax.ShapeDtypeStruct((n,), jnp.int32))
  impl = XlaLogits()

  def backward(x, t, shift, log_s, g):
    return impl.grad_logits(x, t, None, 30.0, shift, log_s, g)

  def forward(x, t):
    return impl.partials(x, t, None, 30.0)

  def loops(fn, *a):
    return jax.jit(fn).lower(*a).compile().as_text().count(" while(")

  assert loops(forward, *args) >= 1  # the check can fail: the forward loops over row blocks
  assert loops(backward, *args, rows, rows, rows) == 0


@pytest.mark.parametrize(
  "chunks,block",
  [
    # one chunk of 48 in blocks of 8 (8 + 48 / 8 = 14 values per row, the least with 6)
    (ChunkConfig(max_chunk=2**30, argmax_block=12), 8),
    (ChunkConfig(max_chunk=16, min_chunk=2, argmax_block=4), 4),  # chunks of 16, blocks of 4
    (ChunkConfig(max_chunk=16, min_chunk=2, argmax_block=1), None),  # no block: the masked max
  ],
  ids=["blocks8", "chunks16-blocks4", "masked"],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_first_argmax_from_block_maxima(chunks, block, dtype):
  """The greedy flag from blocks' maxima: a tie at the max before the target (in
  an earlier chunk, an earlier block of its chunk, or its own block) makes it not
  greedy; at or after it, greedy; a larger value elsewhere, not greedy."""
  v = 48
  assert chunks.argmax_block_for(chunks.chunk(v)) == block
  rows, targets, want = [], [], []
  base = np.asarray(jax.random.uniform(jax.random.key(0), (v,)))
  for t in range(0, v, 5):
    for p in [0, 3, 4, 11, 12, 15, 16, 17, 30, 46, 47]:
      for top in (5.0, 6.0):  # a tie, or a larger value at p
        if p == t:
          continue
        row = base.copy()
        row[t], row[p] = 5.0, top
        rows.append(row)
        targets.append(t)
        want.append(top == 5.0 and p > t)
  x, t = jnp.asarray(np.stack(rows), dtype), jnp.asarray(targets)
  impl = XlaLogits(chunks)
  lp, greedy = jax.jit(lambda x, t: lpk.token_logprobs_and_greedy(x, t, implementation=impl))(x, t)
  np.testing.assert_array_equal(greedy, np.array(want))
  want_lp, want_greedy = reference.token_logprobs_and_greedy(x, t)
  np.testing.assert_array_equal(greedy, want_greedy)
  assert_close(lp, want_lp, rtol=1e-6, atol=1e-6, what="log-probabilities")


def test_greedy_flags():
  logits = jnp.array([[0.0, 2.0, 1.0], [3.0, 3.0, 0.0]])
  _, greedy = lpk.token_logprobs_and_greedy(logits, jnp.array([1, 0]))
  np.testing.assert_array_equal(greedy, [True, True])
  _, greedy = lpk.token_logprobs_and_greedy(logits, jnp.array([2, -1]))
  np.testing.assert_array_equal(greedy, [False, False])


# --- the training loss: nll_loss -------------------------------------------------------

ONE_KERNEL = lpk.PallasGpuLogits(
  block_rows=4, block_v=64, splits=1, loss_kernel=True, interpret=True
)


def _oracle_lse(logits):
  y = np.asarray(jnp.asarray(logits, jnp.float32), np.float64)
  m = np.max(y, axis=-1, keepdims=True)
  return np.log(np.sum(np.exp(y - m), axis=-1)) + m[..., 0]


@pytest.mark.parametrize(
  "shape,v,dtype",
  [
    ((1,), 1, jnp.float32),
    ((5,), 3, jnp.float32),
    ((3,), 32003, jnp.float32),
    ((2, 3), 3, jnp.bfloat16),
  ],  # fmt: skip
  ids=["n1-v1", "n5-v3", "n3-v32003", "2x3-v3-bfloat16"],
)
@pytest.mark.parametrize("implementation", [None, ONE_KERNEL], ids=["default", "pallas-one-kernel"])
def test_nll_loss_matches_the_reference_and_oracle(shape, v, dtype, implementation):
  x, t = _inputs(13, shape, v, dtype)
  n = int(np.prod(shape))
  weights = jnp.linspace(1.0, 0.0, n).reshape(shape) if n > 1 else None  # the last weighs 0

  def loss(x, impl):
    return lpk.nll_loss(x, t, weights, z_loss=0.01, implementation=impl)

  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  (value, g), (want, g_ref) = grad(x, implementation), grad(x, "reference")
  assert_close(value, want, rtol=2e-5, atol=2e-5, what="loss")
  wt = np.ones(shape) if weights is None else np.asarray(weights, np.float64)
  oracle = np.sum(wt * (0.01 * _oracle_lse(x) ** 2 - oracle_token_logprobs(x, t)))
  assert_close(value, oracle, rtol=2e-5, atol=2e-5, what="oracle")
  assert g.dtype == x.dtype
  assert_close(g, g_ref, **GRAD_TOLERANCES[jnp.dtype(dtype)], what="d logits")


TPU_ONE_KERNEL = lpk.PallasTpuLogits(block_rows=8, block_v=128, loss_kernel=True, interpret=True)


@pytest.mark.parametrize(
  "impl",
  [None, ONE_KERNEL, TPU_ONE_KERNEL, "reference"],
  ids=["default", "pallas_gpu-one-kernel", "pallas_tpu-one-kernel", "reference"],
)
def test_nll_loss_policy(impl):
  """+inf for an impossible weighted target, NaN (value and gradient) for an
  out-of-range weighted id or a NaN in a weighted row; zero-weight rows contribute
  exactly nothing, whatever they hold; the weights are constants (differentiating
  w.r.t. them raises rather than give a silent zero)."""
  x, t = _inputs(14, (6,), 10, jnp.float32)
  weights = jnp.array([1.0, 1.0, 0.0, 0.0, 0.5, 0.0])
  keep = jnp.array([0, 1, 4])

  def loss(x, t, weights):
    return lpk.nll_loss(x, t, weights, temperature=jnp.full(t.shape, 0.5), implementation=impl)

  @jax.jit
  def run(x, t, weights):
    return jax.value_and_grad(loss)(x, t, weights)

  bad = x.at[2].set(jnp.nan).at[3].set(jnp.inf)
  value, gx = run(bad, t.at[5].set(10), weights)  # row 5: out of range, weight 0
  np.testing.assert_allclose(value, run(x[keep], t[keep], weights[keep])[0], rtol=1e-6)
  with pytest.raises(TypeError, match="weights are constants"):
    jax.grad(loss, argnums=2)(x, t, weights)
  if impl != "reference":  # its autodiff puts 0 * NaN in the dead rows
    assert (gx[jnp.array([2, 3, 5])] == 0).all() and np.isfinite(gx).all()
  assert np.isposinf(run(x.at[0, 4].set(-jnp.inf), t.at[0].set(4), weights)[0])
  value, gx = run(x.at[0, 1].set(jnp.nan), t, weights)  # NaN wins in a weighted row
  assert np.isnan(value) and np.isnan(gx[0]).any()
  value, gx = run(x, t.at[1].set(-1), weights)
  assert np.isnan(value)
  if impl != "reference":  # the plain form's `where` gives a zero gradient there
    assert np.isnan(gx[1]).all() and np.isfinite(np.delete(gx, 1, axis=0)).all()


def test_nll_loss_scales_its_gradient_by_the_cotangent():
  """The backward hands d logits on as written when the cotangent is 1, scaled otherwise."""
  x, t = _inputs(15, (4,), 50, jnp.float32)
  g1 = jax.jit(jax.grad(lambda x: lpk.nll_loss(x, t)))(x)
  g3 = jax.jit(jax.grad(lambda x, c: c * lpk.nll_loss(x, t)))(x, 3.0)
  assert_close(g3, 3 * g1, rtol=1e-6, atol=0, what="3 x d logits")
  per_token = jax.jit(jax.grad(lambda x: -jnp.sum(lpk.token_logprobs(x, t))))(x)
  assert_close(g1, per_token, rtol=1e-6, atol=0, what="d logits vs per-token")


@pytest.mark.parametrize(
  "kwargs,err,match",
  [
    (dict(weights=jnp.ones(5)), ValueError, "weights.shape"),
    (dict(weights=jnp.ones(4, jnp.int32)), TypeError, "weights must be floats"),
    (dict(z_loss=-1.0), ValueError, "z_loss"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(targets=jnp.zeros(5, jnp.int32)), ValueError, "targets"),
  ],
)
def test_nll_loss_bad_arguments_raise(kwargs, err, match):
  args = dict(logits=jnp.zeros((4, 8)), targets=jnp.zeros(4, jnp.int32)) | kwargs
  with pytest.raises(err, match=match):
    lpk.nll_loss(**args)


@given(
  n=st.sampled_from([1, 6]),
  v=st.sampled_from([1, 17, 50]),
  dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
  z_loss=st.sampled_from([0.0, 0.01]),
  seed=st.integers(0, 2**16),
)
def test_nll_loss_is_the_weighted_sum_of_token_logprobs(n, v, dtype, z_loss, seed):
  """``nll_loss`` equals ``sum(w * (z * lse^2 - token_logprobs))``, values and gradients."""
  x, t = _inputs(seed, (n,), v, dtype)
  u = jax.random.uniform(jax.random.key(seed + 1), (n,))
  w = jnp.where(u < 0.3, 0.0, u)  # some tokens weigh nothing

  def composed(x):
    lse = jax.nn.logsumexp(x.astype(jnp.float32), axis=-1)
    return jnp.sum(w * (z_loss * lse**2 - lpk.token_logprobs(x, t)))

  got, g = jax.jit(jax.value_and_grad(lambda x: lpk.nll_loss(x, t, w, z_loss=z_loss)))(x)
  want, g_want = jax.jit(jax.value_and_grad(composed))(x)
  assert_close(got, want, rtol=1e-5, atol=1e-5, what="loss")
  assert_close(g, g_want, **GRAD_TOLERANCES[jnp.dtype(dtype)], what="d logits")


@pytest.mark.parametrize("v", [4, 257], ids=["V4", "V257"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_short_rows_greedy_flag_is_the_first_argmax_with_ties_nan_and_minus_inf(v, dtype):
  """A row of at most 512 columns takes its max's first column from the CPU's
  block statistics kernel: the flag is the first argmax (a tie's later column
  is not greedy), a row with a NaN has none, and a row of ``-inf`` (no
  possible token) has none either, at its first column too. The same flags
  as the reference."""
  x = np.linspace(-2.0, 1.0, 6 * v).reshape(6, v)
  x[0, [1, 3]] = 5.0  # a tie: column 1 is greedy, 3 is not
  x[1, [1, 3]] = 5.0
  x[2, 0] = np.nan  # NaN wins: no greedy column
  x[3, :] = -np.inf  # no possible token: target 0 is not greedy
  x[4, :] = -np.inf
  x[5, v - 1] = 3.0  # the row's one max (bfloat16 rounds the ramp's top into ties)
  x = jnp.asarray(x, dtype)
  t = jnp.array([1, 3, v - 1, 0, v - 1, v - 1])
  got = jax.jit(lpk.token_logprobs_and_greedy)(x, t)[1]
  want = reference.token_logprobs_and_greedy(x, t)[1]
  np.testing.assert_array_equal(got, [True, False, False, False, False, True])
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("v", [1031, 1024], ids=["swept", "one-chunk"])
def test_capped_rows_in_blocks_of_rows_are_the_reference(v, dtype):
  """Capped rows are reduced in blocks of rows within 2% of the logits, each
  block slicing its rows and its swept slice's columns of the logits at once
  (``xla._in_row_blocks``): 1000 rows in blocks of 322 (the last overlapping
  its predecessor) over a prime V's 64-column slices, or of 20 over whole
  rows. Values, greedy
  flags and gradients (logits and per-example temperature) are the reference's,
  with a NaN row, a row of -inf but its target and an impossible target."""
  n = 1000
  logits, targets = _inputs(3, (n,), v, dtype)
  logits = logits.at[5].set(jnp.nan).at[600, : v - 1].set(-jnp.inf).at[999, 0].set(-jnp.inf)
  targets = targets.at[600].set(v - 1).at[999].set(0)
  tau = jnp.asarray(np.random.default_rng(0).uniform(0.5, 2.0, n), jnp.float32)
  opts = dict(softcap=5.0)

  def run(fn):
    def loss(x, tau):
      lp, greedy = fn(x, targets, temperature=tau, **opts)
      return jnp.sum(jnp.where(jnp.isfinite(lp), lp, 0.0)), (lp, greedy)

    (_, (lp, greedy)), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(logits, tau)
    return lp, greedy, grads

  lp, greedy, (dx, dtau) = run(lpk.token_logprobs_and_greedy)
  lp_ref, greedy_ref, (dx_ref, dtau_ref) = run(reference.token_logprobs_and_greedy)
  assert np.isnan(lp[5]) and lp[999] == -np.inf and np.isfinite(lp[600])
  assert_close(lp, lp_ref, **TOLERANCES[jnp.dtype(dtype)], what="values")
  np.testing.assert_array_equal(greedy, greedy_ref)
  tol = GRAD_TOLERANCES[jnp.dtype(dtype)]
  assert_close(dx.astype(jnp.float32), dx_ref.astype(jnp.float32), **tol, what="d logits")
  assert_close(dtau, dtau_ref, **GRAD_TOLERANCES[jnp.dtype(jnp.float32)], what="d temperature")
