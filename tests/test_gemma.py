"""A gemma-style model (tests/gemma_standin.py) through the declared ModelSpec.

Its call hides its signature, takes packing as ``positions`` plus an
``attention_mask [B, L, L]``, returns an ``Output`` dataclass, keeps a tied
``[V, D]`` table and a final-logit softcap in its config: every path is
compared with ``lpk.score`` on its own logits, each sequence scored alone.
"""

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lpkernel as lpk
from lpkernel import flax as lpk_flax
from lpkernel.flax import (
  GEMMA,
  ModelSpec,
  loglikelihood,
  packed_positions,
  score_linen,
  score_model,
)
from tests import gemma_standin as gm

CONFIG = gm.TransformerConfig()
LENGTHS = (7, 9)  # two sequences packed into one row of 20, then padding


@pytest.fixture(scope="module")
def model():
  module = gm.Transformer(CONFIG)
  variables = module.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))
  # A trained model's table: logits of several nats, so the softcap and any
  # attention across sequences change the scores visibly (gemma's init is 0.01).
  table = variables["params"]["embedder"]["input_embedding"]
  variables["params"]["embedder"]["input_embedding"] = 2.0 * table / jnp.std(table)
  return module, variables


@functools.partial(jax.jit, static_argnums=0)
def _logits(module, variables, tokens):
  return module.apply(variables, tokens).logits


@functools.partial(jax.jit, static_argnums=0, static_argnames=("fused", "num_segments", "softcap"))
def _score(module, variables, tokens, response, segment_ids=None, **kw):
  """``score_linen`` with GEMMA, compiled (the linen model runs op by op otherwise)."""
  return score_linen(module, variables, tokens, response, spec=GEMMA, segment_ids=segment_ids, **kw)


def _sequences():
  keys = jax.random.split(jax.random.key(1), len(LENGTHS))
  # ids from 1: 0 is gemma's padding id
  tokens = [
    jax.random.randint(k, (1, n), 1, CONFIG.num_embed) for k, n in zip(keys, LENGTHS, strict=True)
  ]
  responses = [jnp.arange(n)[None] >= n // 2 for n in LENGTHS]
  return tokens, responses


def _packed(tokens, responses, width=20):
  pad = width - sum(LENGTHS)
  row = jnp.concatenate([*tokens, jnp.zeros((1, pad), jnp.int32)], 1)
  response = jnp.concatenate([*responses, jnp.zeros((1, pad), bool)], 1)
  seg = jnp.concatenate(
    [jnp.full((1, n), i + 1) for i, n in enumerate(LENGTHS)] + [jnp.zeros((1, pad), int)], 1
  )
  return row, response, seg


def test_standin_hides_its_signature_like_gemma(model):
  module, _ = model
  params = inspect.signature(module.__call__).parameters
  assert "positions" not in params and "attention_mask" not in params


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_unpacked_rows_equal_score_of_its_own_logits(model, fused):
  module, variables = model
  tokens, responses = _sequences()
  for t, r in zip(tokens, responses, strict=True):
    by_hand = lpk.score(_logits(module, variables, t), t, r)
    got = _score(module, variables, t, r, fused=fused)
    np.testing.assert_allclose(got.response_logprob, by_hand.response_logprob, rtol=1e-5)
    np.testing.assert_allclose(got.token_logprobs, by_hand.token_logprobs, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.response_greedy, by_hand.response_greedy)


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_packed_rows_score_each_sequence_as_alone(model, fused):
  module, variables = model
  tokens, responses = _sequences()
  row, response, seg = _packed(tokens, responses)
  packed = score_linen(
    module.apply,
    variables,
    row,
    response,
    spec=GEMMA,
    segment_ids=seg,
    num_segments=2,
    fused=fused,
  )
  for i, (t, r) in enumerate(zip(tokens, responses, strict=True)):
    alone = lpk.score(_logits(module, variables, t), t, r)
    np.testing.assert_allclose(packed.joint_logprob[0, i], alone.joint_logprob[0], rtol=1e-5)
    np.testing.assert_allclose(packed.response_logprob[0, i], alone.response_logprob[0], rtol=1e-5)


def test_packing_without_the_mask_is_refused_not_silently_wrong(model):
  """The wrapper that passes positions only lets the second sequence attend to the
  first: scored that way the number is wrong, so lpkernel refuses to pack it."""
  module, variables = model
  tokens, responses = _sequences()
  row, response, seg = _packed(tokens, responses)
  positions_only = ModelSpec(positions="positions", hidden="return_hidden_states")
  with pytest.raises(ValueError, match="declares no segment_ids= or attention_mask="):
    score_linen(module, variables, row, response, spec=positions_only, segment_ids=seg)
  with pytest.raises(ValueError, match="declares no positions= and segment_ids="):
    score_linen(module, variables, row, response, segment_ids=seg)  # nothing declared
  # What the refusal prevents: positions restart, but attention crosses sequences.
  positions = packed_positions(seg)
  leaked = module.apply(variables, row, positions=positions).logits
  wrong = lpk.score(leaked, row, response, segment_ids=seg, num_segments=2)
  alone = lpk.score(_logits(module, variables, tokens[1]), tokens[1], responses[1])
  assert abs(float(wrong.joint_logprob[0, 1] - alone.joint_logprob[0])) > 0.1


@pytest.mark.parametrize("fused", [False, True])
def test_softcap_comes_from_the_config_and_a_conflicting_one_raises(model, fused):
  """One rule on both paths: the spec's softcap is what the model does; the logits
  already carry it (never capped twice), and a disagreeing value raises before the
  model runs."""
  module, variables = model
  tokens, responses = _sequences()
  t, r = tokens[0], responses[0]
  h = module.apply(variables, t, return_hidden_states=True).hidden_states
  table = variables["params"]["embedder"]["input_embedding"]
  uncapped = lpk.score_hidden(h, table, t, r, vocab_axis=0)
  by_hand = lpk.score(_logits(module, variables, t), t, r)  # the model's own (capped) logits
  capped = _score(module, variables, t, r, fused=fused)
  assert abs(float(capped.joint_logprob[0] - uncapped.joint_logprob[0])) > 1e-4
  np.testing.assert_allclose(capped.joint_logprob, by_hand.joint_logprob, rtol=1e-5)
  same = _score(module, variables, t, r, fused=fused, softcap=30.0)
  np.testing.assert_array_equal(same.joint_logprob, capped.joint_logprob)

  class Exploding(type(module)):
    def __call__(self, *args, **kwargs):
      raise AssertionError("the model ran before the softcap was checked")

  exploding = Exploding(module.config)
  with pytest.raises(ValueError, match="disagrees with the model's own final-logit softcap 30"):
    score_linen(exploding, variables, t, r, spec=GEMMA, fused=fused, softcap=20.0)
  with pytest.raises(ValueError, match="disagrees"):
    lpk_flax.sft_loss_model(
      lambda tokens, **kw: exploding.apply(variables, tokens, **kw),
      t,
      r,
      fused=fused,
      spec=dataclasses.replace(GEMMA, softcap=30.0, unembed=lambda m, v: table),
      softcap=5.0,
    )


def test_gemma_spec_on_a_callable_says_what_it_needs(model):
  module, variables = model
  tokens, responses = _sequences()
  with pytest.raises(TypeError, match="score_linen"):
    score_model(
      lambda t, **kw: module.apply(variables, t, **kw),
      tokens[0],
      responses[0],
      spec=GEMMA,
      fused=True,
    )


def test_fused_gradients_reach_the_tied_table_as_stored(model):
  """Fused and logits paths give the same gradients of every parameter, the
  ``[V, D]`` table included (test_fused.py shows it is never transposed)."""
  module, variables = model
  tokens, responses = _sequences()
  t, r = tokens[1], responses[1]

  def loss(variables, fused):
    return _score(module, variables, t, r, fused=fused).response_logprob.sum()

  g_fused = jax.jit(jax.grad(loss), static_argnums=1)(variables, True)
  g_logits = jax.jit(jax.grad(loss), static_argnums=1)(variables, False)
  for a, b in zip(jax.tree.leaves(g_fused), jax.tree.leaves(g_logits), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_loglikelihood_packs_gemma_and_matches_one_per_row(model, fused):
  module, variables = model
  requests = [([5, 6, 7], [8, 9]), ([11], [12, 13, 14]), ([3] * 9, [1]), ([20, 21], [22])]
  kw = dict(variables=variables, spec=GEMMA, max_length=16, fused=fused)
  packed = loglikelihood(module, requests, batch_size=2, **kw)
  alone = loglikelihood(module, requests, batch_size=3, pack=False, **kw)
  np.testing.assert_allclose([p[0] for p in packed], [a[0] for a in alone], rtol=1e-5)
  assert [p[1] for p in packed] == [a[1] for a in alone]
  ctx, cont = requests[1]
  t = jnp.array([ctx + cont])
  r = jnp.array([[False] * len(ctx) + [True] * len(cont)])
  by_hand = lpk.score(_logits(module, variables, t), t, r).response_logprob[0]
  np.testing.assert_allclose(packed[1][0], by_hand, rtol=1e-5)


def test_undeclared_outputs_raise_clear_errors(model):
  module, variables = model
  tokens, responses = _sequences()
  t, r = tokens[0], responses[0]
  with pytest.raises(TypeError, match="no logits in 'scores'"):
    score_linen(module, variables, t, r, spec=ModelSpec(logits_field="scores"))
  no_table = ModelSpec(hidden="return_hidden_states")
  with pytest.raises(ValueError, match="declare ModelSpec\\(unembed="):
    score_linen(module, variables, t, r, spec=no_table, fused=True)
  with pytest.raises(TypeError, match="spec must be a lpkernel.flax.ModelSpec"):
    score_linen(module, variables, t, r, spec={"positions": "positions"})
  with pytest.raises(TypeError, match="must be a keyword name"):
    ModelSpec(positions=3)
