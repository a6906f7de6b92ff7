"""score: chain-rule sums against the reference and the float64 oracle."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lpkernel as lpk
from lpkernel import reference
from lpkernel.ops import ChunkConfig, XlaLogits
from tests.helpers import (
  GRAD_TOLERANCES,
  TOLERANCES,
  assert_close,
  oracle_score,
  pad_rows,
  random_logits,
  random_tokens,
)

FLOAT_FIELDS = ("prompt_logprob", "response_logprob", "joint_logprob", "token_logprobs")
COUNT_FIELDS = ("prompt_tokens", "response_tokens", "response_greedy")


def _inputs(seed, b, t, v, dtype=jnp.float32):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  logits = random_logits(k1, (b, t, v), dtype)
  tokens = random_tokens(k2, (b, t), v)
  prompt_len = jax.random.randint(k3, (b, 1), 0, t + 1)
  response = jnp.arange(t)[None, :] >= prompt_len
  return logits, tokens, response


def _check(scores, expected, dtype=jnp.float32):
  tol = TOLERANCES[jnp.dtype(dtype)]
  for name in FLOAT_FIELDS:
    assert_close(
      getattr(scores, name),
      expected[name] if isinstance(expected, dict) else getattr(expected, name),
      rtol=tol["rtol"],
      atol=1e-4,
      what=name,
    )
  for name in COUNT_FIELDS:
    want = expected[name] if isinstance(expected, dict) else getattr(expected, name)
    np.testing.assert_array_equal(
      getattr(scores, name), np.asarray(want).astype(getattr(scores, name).dtype), err_msg=name
    )


# Compiled once each (eager calls compile every primitive on its own).
_jit_score = jax.jit(lpk.score, static_argnames=("num_segments",))
_jit_reference = jax.jit(reference.score, static_argnames=("num_segments",))


@pytest.mark.parametrize(
  "dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name
)
@pytest.mark.parametrize("b,t,v", [(2, 1, 5), (3, 6, 1), (2, 5, 3), (1, 3, 32003), (2, 9, 40)])
def test_matches_reference_and_oracle(b, t, v, dtype):
  logits, tokens, response = _inputs(0, b, t, v, dtype)
  scores = _jit_score(logits, tokens, response)
  _check(scores, _jit_reference(logits, tokens, response), dtype)
  _check(scores, oracle_score(logits, tokens, response), dtype)


# Shapes come from small sets (awkward ones included) so that the drawn examples
# reuse a few compiled programs; values, lengths and sides vary freely.
@given(
  b=st.sampled_from([1, 3]),
  t=st.sampled_from([1, 12]),
  v=st.sampled_from([1, 20]),
  left=st.booleans(),
  seed=st.integers(0, 2**16),
)
def test_padding_matches_oracle(b, t, v, left, seed):
  logits, tokens, response = _inputs(seed, b, t, v)
  lengths = np.random.default_rng(seed).integers(0, t + 1, size=b)
  seg = pad_rows(lengths, t, left=left)
  tokens = jnp.where(seg > 0, tokens, -100)  # pad ids never leak into sums
  scores = _jit_score(logits, tokens, response, segment_ids=seg)
  _check(scores, oracle_score(logits, tokens, response, seg))
  _check(scores, _jit_reference(logits, tokens, response, segment_ids=seg))
  np.testing.assert_array_equal(
    scores.joint_logprob, scores.prompt_logprob + scores.response_logprob
  )


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_boolean_attention_mask_is_a_segment_ids(left):
  """``segment_ids=tokens != pad`` (bool, as JAX code writes masks) scores as the
  0 / 1 attention mask does, eagerly and under jit, and passes check_inputs."""
  logits, tokens, response = _inputs(3, 3, 6, 11)
  mask = pad_rows([6, 4, 1], 6, left=left)
  want = lpk.score(logits, tokens, response, segment_ids=mask)
  for bool_mask in (mask > 0, np.asarray(mask > 0), np.asarray(mask > 0).tolist()):
    chex.assert_trees_all_equal(lpk.score(logits, tokens, response, segment_ids=bool_mask), want)
  jitted_score = jax.jit(lambda m: lpk.score(logits, tokens, response, segment_ids=m))
  chex.assert_trees_all_close(jitted_score(mask > 0), want)
  lpk.check_inputs(logits, tokens, response, segment_ids=np.asarray(mask > 0))


def _pack(pieces, t):
  """Packs (logits, tokens, response) pieces into one row with segment ids."""
  v = pieces[0][0].shape[-1]
  logits = np.zeros((1, t, v), np.float32)
  tokens = np.zeros((1, t), np.int32)
  response = np.zeros((1, t), bool)
  seg = np.zeros((1, t), np.int32)
  pos = 0
  for s, (lg, tk, rs) in enumerate(pieces, start=1):
    n = tk.shape[1]
    logits[0, pos : pos + n] = lg[0]
    tokens[0, pos : pos + n] = tk[0]
    response[0, pos : pos + n] = rs[0]
    seg[0, pos : pos + n] = s
    pos += n
  return jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(response), jnp.asarray(seg)


@given(
  lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4),
  v=st.sampled_from([1, 12]),
  seed=st.integers(0, 999),
)
def test_packing_invariance(lengths, v, seed):
  pieces = [_inputs(seed + i, 1, n, v) for i, n in enumerate(lengths)]
  t = 26  # the longest packing (4 x 6) and trailing padding: one compiled shape
  logits, tokens, response, seg = _pack(pieces, t)
  packed = _jit_score(logits, tokens, response, segment_ids=seg, num_segments=5)
  for i, piece in enumerate(pieces):
    alone = _jit_score(*piece)
    for name in (
      "prompt_logprob",
      "response_logprob",
      "joint_logprob",
      "prompt_tokens",
      "response_tokens",
      "response_greedy",
    ):
      np.testing.assert_allclose(
        getattr(packed, name)[0, i], getattr(alone, name)[0], rtol=1e-6, atol=1e-6, err_msg=name
      )
  assert packed.prompt_tokens[0, -1] == 0 and packed.joint_logprob[0, -1] == 0
  per_row = _jit_score(logits, tokens, response, segment_ids=seg)
  np.testing.assert_allclose(
    per_row.joint_logprob, packed.joint_logprob.sum(1), rtol=1e-5, atol=1e-5
  )


@given(seed=st.integers(0, 999))
def test_permuting_segments_permutes_scores(seed):
  pieces = [_inputs(seed + i, 1, n, 7) for i, n in enumerate((3, 5, 2))]
  a = lpk.score(*_pack(pieces, 10)[:3], segment_ids=_pack(pieces, 10)[3], num_segments=3)
  order = [2, 0, 1]
  b = lpk.score(
    *_pack([pieces[i] for i in order], 10)[:3],
    segment_ids=_pack([pieces[i] for i in order], 10)[3],
    num_segments=3,
  )
  np.testing.assert_allclose(b.joint_logprob[0], a.joint_logprob[0, order], rtol=1e-6)


@pytest.mark.parametrize("num_segments", [None, 3])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_gradients_match_reference(num_segments, dtype):
  logits, tokens, response = _inputs(7, 2, 9, 13, dtype)
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0, 0], [1, 1, 2, 2, 2, 3, 3, 3, 3]])
  w = jax.random.normal(jax.random.key(8), (2,) if num_segments is None else (2, num_segments))

  def loss(fn, x):
    s = fn(x, tokens, response, segment_ids=seg, num_segments=num_segments)
    return jnp.sum(w * (s.response_logprob + 0.5 * s.prompt_logprob))

  got = jax.grad(loss, argnums=1)(lpk.score, logits)
  want = jax.grad(loss, argnums=1)(reference.score, logits)
  assert got.dtype == dtype
  assert_close(got, want, **GRAD_TOLERANCES[jnp.dtype(dtype)], what="dlogits")


def test_response_and_joint_gradients_match_the_float64_oracle():
  logits, tokens, response = _inputs(9, 2, 7, 11)
  x = np.asarray(logits, np.float64)
  p = np.exp(x - x.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  onehot = np.arange(11) == np.asarray(tokens)[:, 1:, None]
  # Row t predicts token t + 1: d lp / d logits[t] = onehot - softmax, for scored targets.
  d = np.zeros_like(x)
  d[:, :-1] = onehot - p[:, :-1]
  in_response = np.zeros((2, 7), bool)
  in_response[:, :-1] = np.asarray(response)[:, 1:]
  for field, rows in (("response_logprob", in_response), ("joint_logprob", np.ones((2, 7), bool))):
    rows = rows.copy()
    rows[:, -1] = False  # the last row predicts nothing
    g = jax.grad(lambda x, f=field: getattr(lpk.score(x, tokens, response), f).sum())(logits)
    np.testing.assert_allclose(g, np.where(rows[..., None], d, 0.0), atol=1e-6, err_msg=field)


def test_temperature_and_softcap_match_reference():
  logits, tokens, response = _inputs(10, 2, 6, 9)
  tau = jnp.array([[0.7], [1.3]])
  got = lpk.score(logits, tokens, response, temperature=tau, softcap=4.0)
  want = reference.score(logits, tokens, response, temperature=tau, softcap=4.0)
  _check(got, want)


def test_vmap_over_extra_batch_axis():
  logits, tokens, response = _inputs(11, 6, 5, 7)
  rs = lambda x: x.reshape(2, 3, *x.shape[1:])
  mapped = jax.jit(jax.vmap(lpk.score))(rs(logits), rs(tokens), rs(response))
  flat = jax.jit(lpk.score)(logits, tokens, response)
  chex.assert_trees_all_close(jax.tree.map(lambda x: x.reshape(6, *x.shape[2:]), mapped), flat)


def test_no_retracing():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(*args):
    return lpk.score(*args)

  for seed in range(3):
    f(*_inputs(seed, 2, 4, 5))


def test_out_of_range_token_poisons_only_its_sums():
  logits, tokens, response = _inputs(12, 2, 5, 6)
  response = jnp.array([[0, 0, 1, 1, 1]] * 2, bool)
  tokens = tokens.at[0, 3].set(-1).at[1, 0].set(99)  # [1, 0] is the unscored first token
  s = jax.jit(lpk.score)(logits, tokens, response)
  assert np.isnan(s.response_logprob[0]) and np.isnan(s.joint_logprob[0])
  assert np.isfinite(s.prompt_logprob[0])
  assert np.isnan(s.token_logprobs[0, 3]) and np.isfinite(s.token_logprobs[0, 2])
  assert np.isfinite(s.joint_logprob[1])


@pytest.mark.parametrize("bad_seg,num_segments", [(-1, None), (-2, 2), (3, 2)])
def test_invalid_segment_ids_poison_the_row(bad_seg, num_segments):
  logits, tokens, response = _inputs(13, 2, 5, 6)
  seg = jnp.array([[1, 1, 2, 2, 0], [1, 1, 1, 2, 2]]).at[0, 4].set(bad_seg)
  s = jax.jit(lpk.score, static_argnames="num_segments")(
    logits, tokens, response, segment_ids=seg, num_segments=num_segments
  )
  assert np.isnan(s.joint_logprob[0]).all() and np.isfinite(s.joint_logprob[1]).all()


def test_neg_inf_target_gives_neg_inf_sum_and_finite_grads():
  logits, tokens, response = _inputs(14, 2, 5, 6)
  response = jnp.ones((2, 5), bool)
  logits = logits.at[0, 1, tokens[0, 2]].set(-jnp.inf)
  s = lpk.score(logits, tokens, response)
  assert s.response_logprob[0] == -np.inf and s.joint_logprob[0] == -np.inf
  assert np.isfinite(s.response_logprob[1])
  g = jax.grad(lambda x: lpk.score(x, tokens, response).response_logprob[1])(logits)
  assert np.isfinite(g).all()
  both = lpk.score(logits, tokens, jnp.zeros_like(response)).prompt_logprob
  assert both[0] == -np.inf  # -inf sums stay -inf, never NaN


def test_masked_positions_put_no_nan_into_gradients():
  logits, tokens, response = _inputs(15, 1, 6, 5)
  seg = jnp.array([[1, 1, 1, 1, 0, 0]])
  logits = logits.at[0, 4:].set(jnp.nan)  # garbage logits under padding
  g = jax.grad(lambda x: lpk.score(x, tokens, response, segment_ids=seg).joint_logprob.sum())(
    logits
  )
  assert np.isfinite(g).all()


@pytest.mark.parametrize(
  "kwargs,err,match",
  [
    (dict(logits=(2, 5), tokens=(2, 5)), ValueError, "logits"),
    (dict(logits=(2, 5, 3), tokens=(2, 4)), ValueError, "T=5"),
    (dict(logits=(3, 5, 3), tokens=(2, 5)), ValueError, "B=3"),
    (dict(mask=(2,)), ValueError, "response_mask"),
    (dict(mask=(2, 4)), ValueError, "response_mask"),
    (dict(seg=(2, 4)), ValueError, "segment_ids"),
    (dict(tokens_dtype=jnp.float32), TypeError, "tokens"),
    (dict(seg_dtype=jnp.float32), TypeError, "segment_ids"),
    (dict(num_segments=0), ValueError, "num_segments"),
  ],
)
def test_bad_shapes_raise_naming_the_dimension(kwargs, err, match):
  logits = jnp.zeros(kwargs.get("logits", (2, 5, 3)))
  tokens = jnp.zeros(kwargs.get("tokens", (2, 5)), kwargs.get("tokens_dtype", jnp.int32))
  mask = jnp.zeros(kwargs.get("mask", tokens.shape), bool)
  seg = jnp.ones(kwargs.get("seg", tokens.shape), kwargs.get("seg_dtype", jnp.int32))
  with pytest.raises(err, match=match):
    lpk.score(logits, tokens, mask, segment_ids=seg, num_segments=kwargs.get("num_segments"))


# --- The seed examples -------------------------------------------------------


def test_the_cat_sat_is_point_zero_four():
  """Pr("the", "cat", "sat") = 0.1 x 0.5 x 0.8 from a constructed model.

  The first token is conditioned on a BOS start token, so it is scored too.
  """
  bos, the, cat, sat = 0, 1, 2, 3
  probs = np.full((1, 4, 4), 1e-3)
  probs[0, 0, the], probs[0, 1, cat], probs[0, 2, sat] = 0.1, 0.5, 0.8
  for row in probs[0, :3]:
    rest = [i for i in range(4) if row[i] not in (0.1, 0.5, 0.8)]
    row[rest] = (1 - row.max()) / len(rest)
  logits = jnp.log(jnp.asarray(probs, jnp.float32))
  s = lpk.score(logits, jnp.array([[bos, the, cat, sat]]), jnp.zeros((1, 4), bool))
  np.testing.assert_allclose(np.exp(s.prompt_logprob[0]), 0.04, rtol=1e-6)
  np.testing.assert_allclose(np.exp(s.token_logprobs[0, 1:]), [0.1, 0.5, 0.8], rtol=1e-6)


def test_product_underflows_but_log_sum_is_exact():
  n, p = 2000, 0.5
  logits = jnp.log(jnp.full((1, n + 1, 2), p, jnp.float32))
  tokens = jnp.zeros((1, n + 1), jnp.int32)
  s = lpk.score(logits, tokens, jnp.ones((1, n + 1), bool))
  per_token = jnp.exp(s.token_logprobs[0, 1:])
  assert float(jnp.prod(per_token)) == 0.0  # 0.5 ** 2000 underflows float32
  np.testing.assert_allclose(s.response_logprob[0], n * np.log(p), rtol=1e-6)


def test_chunked_path_scores_match():
  logits, tokens, response = _inputs(16, 2, 5, 24)
  a = lpk.score(
    logits, tokens, response, implementation=XlaLogits(ChunkConfig(max_chunk=8, min_chunk=2))
  )
  _check(a, reference.score(logits, tokens, response))


def test_predicting_positions_match_the_pytorch_alignment():
  logits, tokens, response = _inputs(21, 2, 6, 9)
  s = lpk.score(logits, tokens, response)
  shifted = lpk.to_predicting_positions(s.token_logprobs)
  # PyTorch / TRL: log_softmax(logits[:, :-1]) gathered at tokens[:, 1:], at index t - 1.
  torch_style = jnp.take_along_axis(
    jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], axis=-1
  )[..., 0]
  np.testing.assert_allclose(shifted[:, :-1], torch_style, rtol=1e-6, atol=1e-6)
  assert (shifted[:, -1] == 0).all()
