"""Fused path against score(hidden @ unembed) and the float64 oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lpkernel as lpk
from benchmarks import shapes
from lpkernel import reference
from tests.helpers import (
  GRAD_TOLERANCES,
  assert_close,
  jitted,
  oracle_score,
  oracle_token_logprobs,
  pairwise,
)

SMALL = lpk.FusedConfig(vocab_block=4)  # many blocks and a tail on small V
# Backward steps of three 4-column blocks: at V = 13 the last step's blocks
# overlap the first step's columns but one (FusedConfig.grad_blocks); of four,
# one step of 4 + 4 + 4 + 1 columns.
GROUPED = lpk.FusedConfig(vocab_block=4, grad_blocks=3)
ONE_STEP = lpk.FusedConfig(vocab_block=4, grad_blocks=4)


def _inputs(seed, n, d, v, dtype=jnp.float32):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  h = jax.random.normal(k1, (n, d), jnp.float32).astype(dtype)
  w = (2 * jax.random.normal(k2, (d, v), jnp.float32) / d**0.5).astype(dtype)
  return h, w, jax.random.randint(k3, (n,), 0, v, jnp.int32)


def _logits(h, w):
  return jnp.dot(h, w, preferred_element_type=jnp.float32)


def _name(dtype) -> str:
  return jnp.dtype(dtype).name


# Every pair of values of the options (tests/helpers.pairwise); the first case
# is named by tests/test_default_emitters.py.
VALUE_CASES = [
  pytest.param(config, n, v, dtype, id=f"{config_id}-{n}-{v}-{_name(dtype)}")
  for (config_id, config), (n, v), dtype in pairwise(
    [("default-block", lpk.FusedConfig()), ("block4", SMALL)],
    [(3, 32003), (5, 1), (9, 7), (17, 64)],
    [jnp.bfloat16, jnp.float32],
  )
]


@pytest.mark.parametrize("config,n,v,dtype", VALUE_CASES)
def test_values_match_materialised_and_oracle(config, n, v, dtype):
  h, w, t = _inputs(0, n, 16, v, dtype)
  with jax.default_matmul_precision("highest"):  # GPUs default to TF32
    got = lpk.fused_token_logprobs(h, w, t, implementation=lpk.XlaFused(config))
    logits = _logits(h, w)
  assert_close(
    got, reference.token_logprobs(logits, t), rtol=1e-5, atol=1e-4, what="vs materialised"
  )
  assert_close(got, oracle_token_logprobs(logits, t), rtol=1e-5, atol=1e-4, what="vs oracle")


# The backward sweep over 4-column blocks one or three to a step, or token
# chunks of 4 (two and a tail of 3).
BACKWARDS = {
  "sweep": SMALL,
  "grouped": GROUPED,
  "chunks": lpk.FusedConfig(grad_chunks=True, loss_chunk_tokens=4),
}


@pytest.mark.parametrize(
  "backward,temperature,softcap,dtype",
  [
    pytest.param(*case, id="-".join(map(str, case[:3])) + f"-{_name(case[3])}")
    for case in pairwise(
      list(BACKWARDS), ["per-token", "one"], [3.0, None], [jnp.bfloat16, jnp.float32]
    )
  ],
)
def test_gradients_match_materialised(backward, temperature, softcap, dtype):
  h, w, t = _inputs(1, 11, 8, 13, dtype)
  impl = lpk.XlaFused(BACKWARDS[backward])
  tau = 1.0 if temperature == "one" else jnp.linspace(0.5, 2.0, 11)
  c = jax.random.normal(jax.random.key(9), (3, 11))

  def loss_fused(h, w, tau):
    s = lpk.fused_token_stats(h, w, t, temperature=tau, softcap=softcap, implementation=impl)
    return jnp.sum(c[0] * s.logprobs + c[1] * s.lse + c[2] * s.entropy)

  def loss_ref(h, w, tau):
    y = _logits(h, w)
    if softcap is not None:
      y = softcap * jnp.tanh(y / softcap)
    y = y / jnp.asarray(tau)[..., None]
    logp = jax.nn.log_softmax(y)
    ent = -jnp.sum(jnp.exp(logp) * logp, -1)
    lp = jnp.take_along_axis(logp, t[:, None], -1)[:, 0]
    return jnp.sum(c[0] * lp + c[1] * jax.nn.logsumexp(y, -1) + c[2] * ent)

  argnums = (0, 1) if temperature == "one" else (0, 1, 2)
  # Both sides at full float32 matmul precision (GPUs default to TF32).
  with jax.default_matmul_precision("highest"):
    # Compiled; a Python 1.0 stays static (no temperature).
    args, fixed = ((h, w), (tau,)) if temperature == "one" else ((h, w, tau), ())
    got = jitted(lambda *a: jax.value_and_grad(loss_fused, argnums)(*a, *fixed), *args)
    want = jitted(lambda *a: jax.value_and_grad(loss_ref, argnums)(*a, *fixed), *args)
  assert_close(got[0], want[0], rtol=1e-5, atol=1e-4, what="value")
  tol = GRAD_TOLERANCES[jnp.dtype(dtype)] if dtype != jnp.float32 else dict(rtol=1e-4, atol=1e-5)
  for name, a, b in zip(("dhidden", "dunembed", "dtemperature"), got[1], want[1], strict=False):
    assert a.dtype == b.dtype
    assert_close(a, b, **tol, what=name)


@pytest.mark.parametrize(
  "implementation",
  [lpk.XlaFused(SMALL), lpk.XlaFused(GROUPED), lpk.XlaFused(ONE_STEP), "xla", "reference"],
  ids=str,
)
def test_tied_table_is_read_as_stored(implementation):
  """``vocab_axis=0``: a ``[V, D]`` table gives the ``[D, V]`` values and oracle gradients."""
  h, w, t = _inputs(3, 9, 8, 13)
  table = w.T.copy()  # [V, D], as an embedding is stored
  tau = jnp.linspace(0.5, 2.0, 9)
  c = jax.random.normal(jax.random.key(10), (3, 9))

  def loss(h, table, vocab_axis):
    s = lpk.fused_token_stats(
      h,
      table,
      t,
      temperature=tau,
      softcap=3.0,
      implementation=implementation,
      vocab_axis=vocab_axis,
    )
    return jnp.sum(c[0] * s.logprobs + c[1] * s.lse + c[2] * s.entropy)

  def oracle_loss(h, w):  # float64, from the written-out definitions
    y = 3.0 * jnp.tanh(jnp.dot(h, w) / 3.0) / tau[:, None]
    logp = jax.nn.log_softmax(y)
    lp = jnp.take_along_axis(logp, t[:, None], -1)[:, 0]
    ent = -jnp.sum(jnp.exp(logp) * logp, -1)
    return jnp.sum(c[0] * lp + c[1] * jax.nn.logsumexp(y, -1) + c[2] * ent)

  with jax.default_matmul_precision("highest"):
    got = jax.value_and_grad(loss, (0, 1))(h, table, 0)
    flat = jax.value_and_grad(loss, (0, 1))(h, w, -1)
  with jax.enable_x64():
    want = jax.value_and_grad(oracle_loss, (0, 1))(
      *(jnp.asarray(np.asarray(x), jnp.float64) for x in (h, w))
    )
  assert got[1][1].shape == table.shape
  assert_close(got[0], flat[0], rtol=1e-6, atol=1e-5, what="value vs [D, V]")
  assert_close(got[0], want[0], rtol=1e-5, atol=1e-4, what="value vs oracle")
  assert_close(got[1][0], want[1][0], rtol=1e-4, atol=1e-5, what="dhidden vs oracle")
  assert_close(got[1][1], want[1][1].T, rtol=1e-4, atol=1e-5, what="dtable vs oracle")


def test_tied_table_is_never_transposed_in_memory():
  """A gemma-like table: ``vocab_axis=0`` keeps temporaries far below the table's
  bytes; passing ``table.T`` copies it (the test can fail). On the CPU the
  bfloat16 backward holds one copy of d table by design (see XlaFused.grads), so
  the backward is checked in float32."""
  n, d, v = 512, 640, 65536
  t = jax.ShapeDtypeStruct((n,), jnp.int32)

  def temp(loss, dtype, with_grad):
    fn = jax.grad(loss, argnums=(0, 1)) if with_grad else loss
    h, table = jax.ShapeDtypeStruct((n, d), dtype), jax.ShapeDtypeStruct((v, d), dtype)
    return jax.jit(fn).lower(h, table, t).compile().memory_analysis().temp_size_in_bytes

  as_stored = lambda h, w, t: lpk.fused_token_logprobs(h, w, t, vocab_axis=0).sum()  # noqa: E731
  transposed = lambda h, w, t: lpk.fused_token_logprobs(h, w.T, t).sum()  # noqa: E731
  for dtype, with_grad in ((jnp.bfloat16, False), (jnp.float32, False), (jnp.float32, True)):
    table_bytes = v * d * jnp.dtype(dtype).itemsize
    assert temp(as_stored, dtype, with_grad) < 0.1 * table_bytes
  assert temp(transposed, jnp.bfloat16, False) > v * d * 2  # the copy this option avoids


@pytest.mark.parametrize("num_segments", [None, 2])
def test_score_hidden_equals_score_of_logits(num_segments):
  k = jax.random.split(jax.random.key(2), 4)
  b, t, d, v = 2, 7, 8, 11
  hidden = jax.random.normal(k[0], (b, t, d))
  w = jax.random.normal(k[1], (d, v))
  tokens = jax.random.randint(k[2], (b, t), 0, v)
  response = jnp.arange(t)[None] >= jnp.array([[2], [4]])
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1]])
  got, stats = lpk.score_hidden(
    hidden,
    w,
    tokens,
    response,
    segment_ids=seg,
    num_segments=num_segments,
    implementation=lpk.XlaFused(SMALL),
    with_stats=True,
  )
  logits = jnp.einsum("btd,dv->btv", hidden, w)
  want = lpk.score(logits, tokens, response, segment_ids=seg, num_segments=num_segments)
  for name in ("prompt_logprob", "response_logprob", "joint_logprob", "token_logprobs"):
    assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-5, what=name)
  for name in ("prompt_tokens", "response_tokens", "response_greedy"):
    np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
  oracle = oracle_score(logits, tokens, response, seg, num_segments)
  assert_close(got.joint_logprob, oracle["joint_logprob"], rtol=1e-5, atol=1e-5, what="oracle")
  assert_close(stats.lse, jax.nn.logsumexp(logits, -1), rtol=1e-6, atol=1e-5, what="lse")


def test_greedy_matches_argmax():
  h, w, _ = _inputs(3, 32, 8, 10)
  t = jnp.argmax(_logits(h, w), -1).at[::2].add(1) % 10
  stats = lpk.fused_token_stats(h, w, t, implementation=lpk.XlaFused(SMALL))
  np.testing.assert_array_equal(stats.greedy, jnp.argmax(_logits(h, w), -1) == t)


@pytest.mark.parametrize("bad", [-1, 10, 1000])
def test_out_of_range_ids_give_nan(bad):
  h, w, t = _inputs(4, 3, 8, 10)
  lp = jax.jit(
    lambda h, w, t: lpk.fused_token_logprobs(h, w, t, implementation=lpk.XlaFused(SMALL))
  )(h, w, t.at[1].set(bad))
  assert np.isnan(lp[1]) and np.isfinite(np.asarray(lp)[[0, 2]]).all()


def test_neg_inf_hidden_gives_neg_inf_not_nan_and_masked_grads_are_finite():
  h, w, t = _inputs(5, 3, 4, 6)
  w = w.at[:, 2].set(jnp.array([1.0, 0, 0, 0]))
  h = h.at[0, 0].set(-jnp.inf)  # column 2's logit is -inf for row 0 (others NaN: 0 * inf)
  lp = lpk.fused_token_logprobs(h[1:], w, t[1:])
  assert np.isfinite(lp).all()
  g = jax.grad(
    lambda h: jnp.sum(jnp.where(jnp.arange(3) == 0, 0.0, lpk.fused_token_logprobs(h, w, t)))
  )(h)
  assert np.isfinite(g[1:]).all()


@pytest.mark.parametrize(
  "h_shape,w_shape,t_shape,dtypes,err",
  [
    ((4, 8), (7, 10), (4,), (jnp.float32, jnp.float32), ValueError),  # D mismatch
    ((4, 8), (8, 10), (5,), (jnp.float32, jnp.float32), ValueError),  # N mismatch
    ((4, 8), (8,), (4,), (jnp.float32, jnp.float32), ValueError),  # unembed rank
    ((4, 8), (8, 10), (4,), (jnp.float32, jnp.bfloat16), TypeError),  # dtype mismatch
  ],
)
def test_bad_shapes_raise(h_shape, w_shape, t_shape, dtypes, err):
  with pytest.raises(err):
    lpk.fused_token_logprobs(
      jnp.zeros(h_shape, dtypes[0]), jnp.zeros(w_shape, dtypes[1]), jnp.zeros(t_shape, jnp.int32)
    )


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("with_grad", [False, True], ids=["forward", "forward+backward"])
def test_no_logits_sized_temporaries(dtype, with_grad):
  s = shapes.FUSED_MEMORY
  h = jax.ShapeDtypeStruct((s.tokens, s.width), dtype)
  w = jax.ShapeDtypeStruct((s.width, s.vocab), dtype)
  t = jax.ShapeDtypeStruct((s.tokens,), jnp.int32)

  def loss(h, w, t):
    return lpk.fused_token_logprobs(h, w, t).sum()

  fn = jax.grad(loss, argnums=(0, 1)) if with_grad else loss
  temp = jax.jit(fn).lower(h, w, t).compile().memory_analysis().temp_size_in_bytes
  logits_f32 = s.tokens * s.vocab * 4
  # Per-block temporaries plus, on the CPU in bfloat16, one copy of d unembed
  # (D x V, the gradient's own size): 2.5-8.7% here; the logits would be 100%.
  assert temp < 0.10 * logits_f32, (
    f"temporaries {temp / 1e6:.1f} MB vs logits {logits_f32 / 1e6:.1f} MB"
  )


# --- the training loss: fused_nll_loss ---------------------------------------------------

CHUNKS = lpk.XlaFused(lpk.FusedConfig(vocab_block=4, loss_chunks=True, loss_chunk_tokens=2))


@pytest.mark.parametrize(
  "n,v,dtype",
  [(1, 1, jnp.float32), (5, 3, jnp.float32), (3, 32003, jnp.float32), (5, 3, jnp.bfloat16)],
  ids=["n1-v1", "n5-v3", "n3-v32003", "n5-v3-bfloat16"],
)
@pytest.mark.parametrize("implementation", [None, CHUNKS], ids=["default", "chunks2"])
def test_nll_loss_matches_the_reference(n, v, dtype, implementation):
  h, w, t = _inputs(11, n, 8, v, dtype)
  weights = jnp.linspace(1.0, 0.0, n) if n > 1 else None  # the last token weighs 0

  def loss(h, w, impl):
    return lpk.fused_nll_loss(h, w, t, weights, z_loss=0.01, implementation=impl)

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
  (value, g), (want, g_ref) = grad(h, w, implementation), grad(h, w, "reference")
  assert_close(value, want, rtol=2e-5, atol=2e-5, what="loss")
  lp = oracle_token_logprobs(_logits(h, w), t)
  lse = np.log(np.sum(np.exp(np.asarray(_logits(h, w), np.float64)), -1))
  wt = np.ones(n) if weights is None else np.asarray(weights, np.float64)
  assert_close(value, np.sum(wt * (0.01 * lse**2 - lp)), rtol=2e-5, atol=2e-5, what="oracle")
  for a, b in zip(g, g_ref, strict=True):
    assert a.dtype == b.dtype
    assert_close(a, b, **GRAD_TOLERANCES[jnp.dtype(dtype)], what="gradient")


@pytest.mark.parametrize(
  "impl", [CHUNKS, lpk.XlaFused(SMALL), "reference"], ids=["chunks", "default", "reference"]
)
def test_nll_loss_policy(impl):
  """+inf for an impossible weighted target, NaN (value and gradients) for an
  out-of-range weighted id; zero-weight tokens contribute exactly nothing, whatever
  they hold; the weights are constants (differentiating w.r.t. them raises rather
  than give a silent zero)."""
  h, w, t = _inputs(12, 6, 4, 10)
  weights = jnp.array([1.0, 1.0, 0.0, 0.0, 0.5, 0.0])
  keep = jnp.array([0, 1, 4])
  h_bad = h.at[2].set(jnp.nan).at[3].set(jnp.inf)
  impossible = w.at[:, 9].set(-jnp.inf)  # every logit of column 9 is -inf for h = 1

  def loss(h, w, t, weights):
    return lpk.fused_nll_loss(h, w, t, weights, implementation=impl)

  @jax.jit
  def run(h, w, t, weights):
    return jax.value_and_grad(loss)(h, w, t, weights)

  value, gh = run(h_bad, w, t.at[5].set(10), weights)  # row 5: out of range, weight 0
  want, _ = run(h[keep], w, t[keep], weights[keep])
  np.testing.assert_allclose(value, want, rtol=1e-6)
  with pytest.raises(TypeError, match="weights are constants"):
    jax.grad(loss, argnums=3)(h, w, t, weights)
  if impl != "reference":  # its autodiff puts 0 * NaN in the dead rows
    assert (gh[jnp.array([2, 3, 5])] == 0).all() and np.isfinite(gh).all()
  assert np.isposinf(run(jnp.ones_like(h), impossible, t.at[0].set(9), weights)[0])
  value, gh = run(h.at[0, 1].set(jnp.nan), w, t, weights)  # NaN wins in a weighted row
  assert np.isnan(value) and np.isnan(gh[0]).any()
  value, gh = run(h, w, t.at[1].set(-1), weights)
  assert np.isnan(value)
  if impl != "reference":  # the plain form's `where` gives a zero gradient there
    assert np.isnan(gh[1]).all() and np.isfinite(np.delete(gh, 1, axis=0)).all()


@pytest.mark.parametrize(
  "kwargs,err,match",
  [
    (dict(weights=jnp.ones(5)), ValueError, "weights.shape"),
    (dict(weights=jnp.ones(4, jnp.int32)), TypeError, "weights must be floats"),
    (dict(z_loss=-1.0), ValueError, "z_loss"),
    (dict(z_loss=float("nan")), ValueError, "z_loss"),
  ],
)
def test_nll_loss_bad_arguments_raise(kwargs, err, match):
  with pytest.raises(err, match=match):
    lpk.fused_nll_loss(jnp.zeros((4, 8)), jnp.zeros((8, 10)), jnp.zeros(4, jnp.int32), **kwargs)
  with pytest.raises(ValueError, match="loss_chunk_tokens"):
    lpk.FusedConfig(loss_chunk_tokens=0)
  with pytest.raises(ValueError, match="grad_blocks"):
    lpk.FusedConfig(grad_blocks=0)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_nll_loss_gradients_hold_no_logits_sized_temporaries(dtype):
  """The loss's forward+backward on the CPU default (token chunks of 512 in float32,
  the sweeps in bfloat16): about one chunk's float32 logits and a float32
  d unembed accumulator (D x V, the gradient's size), never [N, V]."""
  s = shapes.FUSED_MEMORY
  h = jax.ShapeDtypeStruct((s.tokens, s.width), dtype)
  w = jax.ShapeDtypeStruct((s.width, s.vocab), dtype)
  t = jax.ShapeDtypeStruct((s.tokens,), jnp.int32)
  grad = jax.grad(lambda h, w, t: lpk.fused_nll_loss(h, w, t), argnums=(0, 1))
  temp = jax.jit(grad).lower(h, w, t).compile().memory_analysis().temp_size_in_bytes
  logits_f32 = s.tokens * s.vocab * 4
  chunk, grad_acc = lpk.FusedConfig().loss_chunk_bytes, s.width * s.vocab * 4
  assert temp < 1.25 * chunk + grad_acc, f"{temp / logits_f32:.3f} of the logits' bytes"
  assert temp < 0.3 * logits_f32  # 25% in float32 here, 8% in bfloat16 (the sweeps)


@pytest.mark.parametrize(
  "implementation",
  [
    lpk.XlaFused(lpk.FusedConfig(vocab_block=128)),
    lpk.XlaFused(lpk.FusedConfig(vocab_block=128, grad_blocks=2)),
    lpk.XlaFused(lpk.FusedConfig(vocab_block=128, loss_chunks=True, loss_chunk_tokens=16)),
  ],
  ids=["sweeps", "sweeps-grouped", "loss-chunks"],
)
def test_bfloat16_tied_table_gradients_run_on_the_cpu(implementation):
  """A bfloat16 ``[V, D]`` table's gradient blocks: XLA:CPU has no bfloat16 dot with a
  float32 result that contracts the left operand's first axis (it raised at run
  time), so each is taken as ``dz.T @ h``; per-token stats and the loss, against the
  reference."""
  h, w, t = _inputs(13, 40, 16, 300, jnp.bfloat16)
  table = w.T.copy()

  def stats(h, table, impl):
    return lpk.fused_token_logprobs(h, table, t, implementation=impl, vocab_axis=0).sum()

  def loss(h, table, impl):
    return lpk.fused_nll_loss(h, table, t, z_loss=1e-3, implementation=impl, vocab_axis=0)

  for fn in (stats, loss):
    grad = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)), static_argnums=2)
    (value, g), (want, g_ref) = grad(h, table, implementation), grad(h, table, "reference")
    assert_close(value, want, rtol=2e-5, atol=2e-5, what=fn.__name__)
    for a, b in zip(g, g_ref, strict=True):
      assert a.dtype == jnp.bfloat16 and a.shape == b.shape
      assert_close(a, b, **GRAD_TOLERANCES[jnp.dtype(jnp.bfloat16)], what=f"{fn.__name__} grad")
