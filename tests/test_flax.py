"""Flax adapters (nnx and linen), the reference LM, SFT and loglikelihood."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lpkernel as lpk
from lpkernel.examples.sft import InstructionTask, train_sft
from lpkernel.flax import (
  ModelSpec,
  TinyLM,
  TinyLMConfig,
  loglikelihood,
  loglikelihood_rolling,
  packed_positions,
  score_linen,
  score_model,
)
from lpkernel.losses import sft_loss

CFG = TinyLMConfig(vocab_size=32, width=32, num_layers=2, num_heads=2, max_length=24)


@pytest.fixture(scope="module")
def model():
  return TinyLM(CFG, rngs=nnx.Rngs(0))


def _rows(seed=0, b=2, t=10):
  tokens = jax.random.randint(jax.random.key(seed), (b, t), 0, CFG.vocab_size)
  response = jnp.arange(t)[None] >= jnp.array([[4], [6]])[:b]
  return tokens, response


def _close(a, b, atol=1e-5):
  for name in ("prompt_logprob", "response_logprob", "joint_logprob", "token_logprobs"):
    np.testing.assert_allclose(
      getattr(a, name), getattr(b, name), rtol=1e-5, atol=atol, err_msg=name
    )
  for name in ("prompt_tokens", "response_tokens", "response_greedy"):
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


@functools.partial(nnx.jit, static_argnames=("num_segments", "fused"))
def _score_model(model, tokens, response, segment_ids=None, num_segments=None, fused=False):
  """``score_model`` compiled once (TinyLM run op by op dominates these tests' time)."""
  return score_model(
    model, tokens, response, segment_ids=segment_ids, num_segments=num_segments, fused=fused
  )


def test_nnx_adapter_equals_scoring_by_hand(model):
  tokens, response = _rows()
  seg = jnp.array([[1] * 8 + [0] * 2, [1] * 10])
  by_hand = nnx.jit(
    lambda m: lpk.score(m(tokens, segment_ids=seg), tokens, response, segment_ids=seg)
  )(model)
  _close(_score_model(model, tokens, response, seg), by_hand)
  _close(_score_model(model, tokens, response, seg, fused=True), by_hand)


class LinenLM(nn.Module):
  vocab: int = 16
  width: int = 8
  tied: bool = True

  @nn.compact
  def __call__(self, tokens, return_hidden=False):
    embed = nn.Embed(self.vocab, self.width)
    h = nn.Dense(self.width)(embed(tokens))
    unembed = (
      embed.embedding.T
      if self.tied
      else self.param("out", nn.initializers.normal(), (self.width, self.vocab))
    )
    return (h, unembed) if return_hidden else h @ unembed


@pytest.mark.parametrize("tied", [True, False])
def test_linen_adapter_logits_and_fused(tied):
  module = LinenLM(tied=tied)
  tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, 16)
  response = jnp.arange(7)[None] >= 3
  response = jnp.broadcast_to(response, (2, 7))
  variables = module.init(jax.random.key(0), tokens)
  by_hand = jax.jit(lambda v: lpk.score(module.apply(v, tokens), tokens, response))(variables)
  spec = ModelSpec(hidden="return_hidden")
  logits_path = jax.jit(lambda v: score_linen(module.apply, v, tokens, response))
  fused_path = jax.jit(lambda v: score_linen(module, v, tokens, response, spec=spec, fused=True))
  _close(logits_path(variables), by_hand)
  _close(fused_path(variables), by_hand)
  # Declared, not guessed: no packing keywords declared, so packed rows are refused
  # (naming what the spec lacks), and fused=True without the hidden-state keyword is refused.
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 2], [1] * 7])
  with pytest.raises(
    ValueError, match="row 0 .* several sequences.* no positions= and segment_ids="
  ):
    score_linen(module.apply, variables, tokens, response, spec=spec, segment_ids=seg)
  with pytest.raises(ValueError, match="ModelSpec\\(hidden=...\\)"):
    score_linen(module.apply, variables, tokens, response, fused=True)


def test_right_padding_is_not_packing():
  """One sequence per row then padding (an HF attention mask) needs nothing from a
  causal model; rows it would misread are refused eagerly and NaN under jit."""
  module = LinenLM(tied=True)
  tokens = jax.random.randint(jax.random.key(1), (3, 7), 0, 16)
  response = jnp.broadcast_to(jnp.arange(7)[None] >= 3, (3, 7))
  variables = module.init(jax.random.key(0), tokens)
  pad_mask = jnp.array([[1] * 7, [1] * 5 + [0] * 2, [0] * 7])
  got = score_linen(module.apply, variables, tokens, response, segment_ids=pad_mask)
  want = lpk.score(module.apply(variables, tokens), tokens, response, segment_ids=pad_mask)
  _close(got, want)
  for bad in ([[0, 0, 1, 1, 1, 1, 1]], [[1, 1, 1, 2, 2, 2, 0]], [[1, 1, 0, 1, 1, 1, 1]]):
    bad = jnp.concatenate([pad_mask[:2], jnp.array(bad)])
    with pytest.raises(ValueError, match="row 2 of segment_ids"):
      score_linen(module.apply, variables, tokens, response, segment_ids=bad)
    under_jit = jax.jit(lambda v, s: score_linen(module.apply, v, tokens, response, segment_ids=s))
    s = under_jit(variables, bad)
    assert np.isnan(s.joint_logprob[2]) and np.isfinite(s.joint_logprob[:2]).all()


def test_packed_attention_scores_like_each_sequence_alone(model):
  a, b = _rows(3, 1, 7), _rows(4, 1, 9)
  tokens = jnp.concatenate([a[0], b[0], jnp.zeros((1, 4), jnp.int32)], 1)
  response = jnp.concatenate([a[1], b[1], jnp.zeros((1, 4), bool)], 1)
  seg = jnp.array([[1] * 7 + [2] * 9 + [0] * 4])
  packed = _score_model(model, tokens, response, seg, num_segments=2)
  for i, (t, r) in enumerate((a, b)):
    alone = _score_model(model, t, r)
    np.testing.assert_allclose(packed.joint_logprob[0, i], alone.joint_logprob[0], rtol=1e-5)
    np.testing.assert_allclose(packed.response_logprob[0, i], alone.response_logprob[0], rtol=1e-5)


def test_positions_restart_per_segment():
  seg = jnp.array([[1, 1, 1, 2, 2, 0, 0]])
  np.testing.assert_array_equal(packed_positions(seg), [[0, 1, 2, 0, 1, 0, 1]])


def test_response_only_gradient_is_conditional_gradient(model):
  tokens, response = _rows(5)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def grads(loss):
    def f(params):
      return loss(score_model(nnx.merge(graphdef, params, rest), tokens, response))

    return jax.jit(jax.grad(f))(params)

  def by_hand(params):  # -sum of log_softmax at the response targets, written out
    logits = nnx.merge(graphdef, params, rest)(tokens)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(response[:, 1:], picked, 0.0))

  g_sft = grads(lambda s: sft_loss(s, "sum"))
  g_hand = jax.jit(jax.grad(by_hand))(params)
  g_full = grads(lambda s: sft_loss(s, "sum", response_only=False))
  for a, b in zip(jax.tree.leaves(g_sft), jax.tree.leaves(g_hand), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  diff = max(
    float(jnp.max(jnp.abs(a - b)))
    for a, b in zip(jax.tree.leaves(g_sft), jax.tree.leaves(g_full), strict=True)
  )
  assert diff > 1e-3  # not the full-sequence gradient


def test_sft_raises_conditional_and_full_sequence_moves_prompt():
  task = InstructionTask(alphabet=12, prompt_length=4)
  cfg = TinyLMConfig(
    vocab_size=task.vocab_size, width=32, num_layers=2, num_heads=2, max_length=task.length
  )
  resp = train_sft(TinyLM(cfg, rngs=nnx.Rngs(0)), task, steps=60, response_only=True, eval_every=60)
  full = train_sft(
    TinyLM(cfg, rngs=nnx.Rngs(0)), task, steps=60, response_only=False, eval_every=60
  )
  before, after = resp[0], resp[-1]
  assert after["log Pr(y|x)"] > before["log Pr(y|x)"] + 5.0, resp
  # The full-sequence loss also learns the prompt distribution; response-only does not.
  assert full[-1]["log Pr(x)"] > before["log Pr(x)"] + 2.0, full
  assert full[-1]["log Pr(x)"] > resp[-1]["log Pr(x)"] + 2.0


# --- loglikelihood ---------------------------------------------------------

REQUESTS = [
  ([1, 2, 3], [4, 5]),
  ([7], [8, 9, 10]),
  ([3] * 9, [1]),
  ([5, 6], [7]),
  ([2, 2], [2, 2, 2]),
]


@pytest.mark.parametrize("fused", [False, True])
def test_loglikelihood_packed_equals_unpacked_and_by_hand(model, fused):
  packed = loglikelihood(model, REQUESTS, max_length=16, batch_size=2, fused=fused)
  unpacked = loglikelihood(model, REQUESTS, max_length=16, batch_size=3, pack=False)
  np.testing.assert_allclose([p[0] for p in packed], [u[0] for u in unpacked], rtol=1e-5)
  assert [p[1] for p in packed] == [u[1] for u in unpacked]
  ctx, cont = REQUESTS[1]
  tokens = jnp.array([ctx + cont])
  response = jnp.array([[False] * len(ctx) + [True] * len(cont)])
  np.testing.assert_allclose(
    packed[1][0], _score_model(model, tokens, response).response_logprob[0], rtol=1e-5
  )


def test_loglikelihood_left_truncates_like_lm_eval(model):
  ctx, cont = list(range(1, 21)), [3, 4]
  ((lp, _),) = loglikelihood(model, [(ctx, cont)], max_length=8)
  window = (ctx + cont)[-9:]
  tokens = jnp.array([window])
  response = jnp.array([[False] * 7 + [True] * 2])
  np.testing.assert_allclose(
    lp, _score_model(model, tokens, response).response_logprob[0], rtol=1e-5
  )


def test_loglikelihood_errors(model):
  with pytest.raises(ValueError, match="longer than max_length"):
    loglikelihood(model, [([1], list(range(1, 12)))], max_length=8)
  with pytest.raises(ValueError, match="empty context"):
    loglikelihood(model, [([], [1, 2])], max_length=8)
  ((lp, _),) = loglikelihood(model, [([], [1, 2])], max_length=8, prefix_token=0)
  assert np.isfinite(lp)


def test_loglikelihood_is_greedy_on_a_constructed_model():
  vocab = 6

  def next_token_model(tokens):  # always predicts (token + 1) % vocab
    return 10.0 * jax.nn.one_hot((tokens + 1) % vocab, vocab)

  reqs = [([0, 1], [2, 3]), ([0, 1], [2, 4]), ([5], [0])]
  out = loglikelihood(next_token_model, reqs, max_length=6)
  assert [g for _, g in out] == [True, False, True]
  assert out[0][0] > out[1][0]


# --- loglikelihood follows lm-eval exactly -------------------------------------------


def _one_by_one(model_fn, requests, max_length, prefix_token=None):
  """Each request alone, scored by hand on exactly lm-eval's input window."""
  out = []
  model_fn = jax.jit(model_fn)
  for ctx, cont in requests:
    window = (list(ctx) + list(cont))[-(max_length + 1) :]
    logits = model_fn(jnp.array([window[:-1]]))[0]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    positions = range(len(window) - len(cont) - 1, len(window) - 1)
    lp = sum(float(logp[p, window[p + 1]]) for p in positions)
    greedy = all(int(jnp.argmax(logits[p])) == window[p + 1] for p in positions)
    out.append((lp, greedy))
  return out


def test_plain_callable_is_never_packed_and_matches_lm_eval_by_hand(model):
  def plain(tokens):  # cannot see segments: packing would let requests attend to each other
    return model(tokens)

  requests = REQUESTS + [([4, 4, 4], [5, 6, 7, 8]), ([9, 1], [2])]
  got = loglikelihood(plain, requests, max_length=16, batch_size=2)
  want = _one_by_one(plain, requests, 16)
  np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-5, atol=1e-5)
  assert [g[1] for g in got] == [w[1] for w in want]
  with pytest.raises(ValueError, match="pack=True needs a model"):
    loglikelihood(plain, requests, max_length=16, pack=True)

  # Accepting the keywords is not enough: only a declared spec packs.
  def wrapper(tokens, segment_ids=None, positions=None):  # drops segment_ids
    return model(tokens, positions=positions)

  with pytest.raises(ValueError, match="pack=True needs a model"):
    loglikelihood(
      wrapper, requests, max_length=16, pack=True, spec=ModelSpec(positions="positions")
    )
  got = loglikelihood(wrapper, requests, max_length=16, batch_size=2)
  np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-5, atol=1e-5)


def test_model_with_max_length_positions_is_fed_max_length_tokens():
  small = TinyLM(
    TinyLMConfig(vocab_size=32, width=16, num_layers=1, num_heads=2, max_length=8), rngs=nnx.Rngs(3)
  )
  ctx, cont = list(range(1, 21)), [3, 4]
  ((lp, _),) = loglikelihood(small, [(ctx, cont)], max_length=8)
  ((want, _),) = _one_by_one(small, [(ctx, cont)], 8)
  np.testing.assert_allclose(lp, want, rtol=1e-5)


def test_empty_context_conditions_on_a_leading_prefix_token(model):
  (a,) = loglikelihood(model, [([], [0, 5, 6])], max_length=8, prefix_token=0)
  (b,) = loglikelihood(model, [([0], [5, 6])], max_length=8)
  (c,) = loglikelihood(model, [([], [5, 6])], max_length=8, prefix_token=0)
  np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
  np.testing.assert_allclose(c[0], b[0], rtol=1e-6)


def test_greedy_is_the_first_argmax_so_ties_count_only_for_the_lowest_id():
  def tied(tokens):  # ids 2 and 3 tie for the max everywhere
    return jnp.broadcast_to(jnp.array([0.0, 1.0, 5.0, 5.0, 2.0]), (*tokens.shape, 5))

  out = loglikelihood(tied, [([0], [2]), ([0], [3]), ([0], [2, 2])], max_length=4)
  assert [g for _, g in out] == [True, False, True]
  np.testing.assert_allclose(out[0][0], out[1][0])


def test_loglikelihood_rejects_bad_ids_and_batch_sizes(model):
  assert loglikelihood(model, [], max_length=8) == []
  for bad in ([32, 1], [-1, 1]):
    with pytest.raises(ValueError, match=r"context holds ids outside \[0, 32\)"):
      loglikelihood(model, [(bad, [1])], max_length=8)
  with pytest.raises(ValueError, match="continuation holds ids"):
    loglikelihood(model, [([1], [40])], max_length=8)
  with pytest.raises(ValueError, match="prefix_token"):
    loglikelihood(model, [([], [1])], max_length=8, prefix_token=99)
  with pytest.raises(TypeError, match="integer"):
    loglikelihood(model, [([1.5, 2.0], [1])], max_length=8)
  for batch_size in (0, -2, "8x"):
    with pytest.raises(ValueError, match="batch_size"):
      loglikelihood(model, REQUESTS, max_length=8, batch_size=batch_size)
  # One document given as its ids, not as a list of documents: the argument is named.
  with pytest.raises(TypeError, match=r"documents\[0\] is the int 1 .*\[\[\.\.\.\]\]"):
    loglikelihood_rolling(model, [1, 2, 3], max_length=8, prefix_token=0)
  with pytest.raises(TypeError, match="context must be a sequence of token ids"):
    loglikelihood(model, [(1, [2])], max_length=8)


def test_loglikelihood_compiles_once_for_repeated_calls(model):
  """The second call compiles nothing: JAX reports every backend compile."""
  compiles = []

  def listen(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(duration)

  loglikelihood(model, REQUESTS, max_length=16, batch_size=2)
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    loglikelihood(model, list(reversed(REQUESTS)), max_length=16, batch_size=2)
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert compiles == []


@pytest.mark.parametrize("fused", [True, False], ids=["hidden", "logits"])
def test_sft_loss_model_is_sft_loss_of_scores(model, fused):
  """The Flax training loss from hidden states (TinyLM ties its table, [V, D]) or
  logits: value and parameter gradients equal ``sft_loss(score_model(..., fused))``."""
  from lpkernel.flax import sft_loss_model

  tokens, response = _rows(6)
  seg = jnp.array([[1] * 5 + [2] * 5, [1] * 8 + [0] * 2])
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    m = nnx.merge(graphdef, params, rest)
    return sft_loss_model(m, tokens, response, segment_ids=seg, normalise="sequences", fused=fused)

  def scored(params):
    m = nnx.merge(graphdef, params, rest)
    return sft_loss(score_model(m, tokens, response, segment_ids=seg, fused=fused), "sequences")

  (a, ga), (b, gb) = (jax.jit(jax.value_and_grad(f))(params) for f in (loss, scored))
  np.testing.assert_allclose(a, b, rtol=1e-6)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
  if not fused:
    return
  with pytest.raises(ValueError, match="hidden"):  # a model that cannot return hidden states
    sft_loss_model(lambda t: jnp.zeros((*t.shape, 8)), tokens, response)
