"""check_inputs (eager), checkify_inputs (under jit) and check_chain_rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import lpkernel as lpk

TOKENS = jnp.array([[1, 2, 3, 0], [4, 1, 0, 0]])
MASK = jnp.array([[0, 0, 1, 1], [0, 1, 0, 0]], bool)
SEG = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]])


def test_valid_inputs_pass():
  lpk.check_inputs(5, TOKENS, MASK, SEG, num_segments=1)
  lpk.check_inputs(jnp.zeros((2, 4, 5)), TOKENS, MASK)


@pytest.mark.parametrize(
  "tokens,seg,num_segments,match",
  [
    (TOKENS.at[0, 2].set(-1), SEG, None, r"negative ids.*\[b=0, t=2\].*-1"),
    (TOKENS.at[1, 1].set(5), SEG, None, r"ids >= vocab_size=5.*\[b=1, t=1\]"),
    (TOKENS, SEG.at[1, 3].set(-1), None, r"segment_ids hold negative.*\[b=1, t=3\]"),
    (TOKENS, SEG.at[0, 3].set(2), 1, r"segment_ids exceed num_segments=1.*\[b=0, t=3\]"),
  ],
)
def test_bad_values_raise_eagerly(tokens, seg, num_segments, match):
  with pytest.raises(ValueError, match=match):
    lpk.check_inputs(5, tokens, MASK, seg, num_segments=num_segments)


def test_padding_ids_are_not_checked():
  lpk.check_inputs(5, TOKENS.at[1, 3].set(-100), MASK, SEG)


def test_shape_errors_come_first():
  with pytest.raises(ValueError, match="T=3"):
    lpk.check_inputs(jnp.zeros((2, 3, 5)), TOKENS, MASK)


@pytest.mark.parametrize(
  "tokens,seg,num_segments,match",
  [
    (TOKENS.at[0, 2].set(-1), SEG, None, "negative ids"),
    (TOKENS.at[1, 1].set(5), SEG, None, "vocab_size"),
    (TOKENS, SEG.at[0, 3].set(3), 2, "exceed"),
  ],
)
def test_checkify_raises_under_jit(tokens, seg, num_segments, match):
  logits = jnp.zeros((2, 4, 5))

  def checked(logits, tokens, mask, seg):
    lpk.checkify_inputs(logits, tokens, mask, seg, num_segments=num_segments)
    return lpk.score(logits, tokens, mask, segment_ids=seg, num_segments=num_segments)

  run = jax.jit(checkify.checkify(checked))
  err, scores = run(logits, tokens, MASK, seg)
  with pytest.raises(checkify.JaxRuntimeError, match=match):
    err.throw()
  err, _ = run(logits, TOKENS, MASK, SEG)
  err.throw()  # valid inputs: no error


@pytest.mark.parametrize(
  "sampling,error,match",
  [
    (
      lpk.Sampling(top_p=jnp.array([0.5, 1.5])),
      ValueError,
      r"top_p holds .*\[b=1\] with value 1.5",
    ),
    (lpk.Sampling(temperature=np.array([0.7, -1.0])), ValueError, r"temperature holds .*\[b=1\]"),
    (lpk.Sampling(min_p=jnp.array([jnp.nan, 0.0])), ValueError, r"min_p holds .*\[b=0\]"),
    (lpk.Sampling(top_k=jnp.array([2.0, 3.0])), TypeError, "top_k must hold integers"),
    (lpk.Sampling(top_p=jnp.array([0.5, 0.9, 1.0])), ValueError, r"top_p has shape \(3,\)"),
    (lpk.Sampling(top_p=0.0), ValueError, r"top_p=0.0 must be in"),  # jit traces it: an array
  ],
)
def test_sampling_values_raise_eagerly_and_through_checkify(sampling, error, match):
  """A sampler's array values out of range (NaN in every processed op) are named
  by check_inputs, first position and value, and raise through checkify under
  jit; shapes, dtypes and Python values raise at call time, as in the ops. A
  greedy request (temperature 0) and valid arrays pass."""
  with pytest.raises(error, match=match):
    lpk.check_inputs(5, TOKENS, MASK, SEG, sampling=sampling)
  valid = lpk.Sampling(jnp.array([0.0, 0.7]), jnp.array([0, 3]), jnp.array([1.0, 0.9]), 0.05)
  lpk.check_inputs(5, TOKENS, MASK, SEG, sampling=valid)

  def checked(logits, sampling):
    lpk.checkify_inputs(logits, TOKENS, MASK, SEG, sampling=sampling)
    return lpk.score(logits, TOKENS, MASK, segment_ids=SEG, sampling=sampling)

  run = jax.jit(checkify.checkify(checked))
  logits = jnp.zeros((2, 4, 5))
  if error is TypeError or "shape" in match:
    with pytest.raises(error, match=match):  # at trace time
      run(logits, sampling)
  else:
    err, scores = run(logits, sampling)
    assert np.isnan(np.asarray(scores.response_logprob)).any()  # the op poisons it
    name = match.split(" ")[0].split("=")[0]
    with pytest.raises(checkify.JaxRuntimeError, match=f"Sampling.{name} holds values"):
      err.throw()
  err, _ = run(logits, valid)
  err.throw()


def test_seed_pair_is_rejected_by_the_chain_rule():
  """log Pr([x, y]) = -3.5 with log Pr(x) = -5.2 means log Pr(y|x) = +1.7 > 0."""
  with pytest.raises(ValueError, match="cannot be positive"):
    lpk.check_chain_rule(-3.5, -5.2)
  lpk.check_chain_rule(-5.9, -5.2)


def test_chain_rule_check_on_real_scores():
  logits = jax.random.normal(jax.random.key(0), (2, 4, 5))
  s = lpk.score(logits, TOKENS, MASK, segment_ids=SEG)
  lpk.check_chain_rule(s.joint_logprob, s.prompt_logprob)
  with pytest.raises(ValueError, match="cannot be positive"):  # swapped roles
    lpk.check_chain_rule(s.prompt_logprob, s.joint_logprob)


@pytest.mark.parametrize("joint,prompt,match", [(np.nan, -1.0, "NaN"), (0.5, -1.0, "<= 0")])
def test_chain_rule_rejects_nan_and_positive(joint, prompt, match):
  with pytest.raises(ValueError, match=match):
    lpk.check_chain_rule(joint, prompt)


def test_impossible_joint_is_consistent():
  lpk.check_chain_rule(-np.inf, -2.0)
  lpk.check_chain_rule(-np.inf, -np.inf)


def test_teaching_helpers():
  from lpkernel.examples import teaching

  logits = teaching.logits_from_conditionals([{1: 0.1}, {2: 0.5}, {3: 0.8}, {}], 4)
  s = lpk.score(logits, jnp.array([[0, 1, 2, 3]]), jnp.zeros((1, 4), bool))
  np.testing.assert_allclose(np.exp(s.prompt_logprob[0]), 0.04, rtol=1e-6)
  curve = teaching.product_vs_log_sum(0.5, [10, 200, 2000])
  assert curve["product"][-1] == 0 and np.isneginf(curve["log_of_product"][-1])
  np.testing.assert_allclose(curve["log_sum"], curve["exact"], rtol=1e-6)


@pytest.mark.parametrize(
  "call",
  [
    lambda x, t, a: lpk.score(x, t, t > 0, temperature=a),
    lambda x, t, a: lpk.token_logprobs(x, t, temperature=a),
    lambda x, t, a: lpk.nll_loss(x, t, a),
    lambda x, t, a: lpk.fused_nll_loss(x, jnp.ones((4, 4)), t, a),
  ],
  ids=["score-temperature", "token_logprobs-temperature", "nll_loss-weights", "fused-weights"],
)
def test_per_example_arrays_need_the_tokens_rank(call):
  """A per-example [B] temperature or weight against [B, T] tokens with B == T
  would broadcast along T (NumPy aligns the last axes): refused, naming the fix;
  [B, 1] is per example, a scalar array is everywhere."""
  x, t = jnp.zeros((3, 3, 4)), jnp.ones((3, 3), jnp.int32)
  with pytest.raises(ValueError, match=r"fewer axes.*\[:, None\]"):
    call(x, t, jnp.array([0.5, 1.0, 2.0]))
  call(x, t, jnp.array([[0.5], [1.0], [2.0]]))
  call(x, t, jnp.array(0.5))
