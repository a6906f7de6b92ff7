"""lm-evaluation-harness end to end: ``simple_evaluate(model="lpkernel")`` on the
local tasks in tests/lm_eval_tasks, against the same numbers computed with
``lpk.score`` on the model's own logits (and lm-eval's own window functions)."""

import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import lpkernel as lpk
import lpkernel.lm_eval  # noqa: F401  (registers model="lpkernel")
from lpkernel.flax import ModelSpec, TinyLM, TinyLMConfig, rolling_windows
from tests.lm_eval_tasks import loader

TASKS = Path(__file__).parent / "lm_eval_tasks"
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 .,?"
MAX_LENGTH = 32  # several rolling windows for the longer documents


def hf_tokenizer() -> PreTrainedTokenizerFast:
  """A real Hugging Face tokenizer, built locally: one token per character."""
  vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
  vocab.update({c: 4 + i for i, c in enumerate(ALPHABET)})
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
  return PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
  )


class CharTokenizer:
  """lm-eval's tok_encode / tok_decode contract, nothing else (ids as above)."""

  eot_token_id = 2

  def tok_encode(self, text):
    return [4 + ALPHABET.index(c) for c in text]

  def tok_decode(self, ids):
    return "".join(ALPHABET[i - 4] for i in ids)


VOCAB = 4 + len(ALPHABET)


@pytest.fixture(scope="module")
def model():
  return TinyLM(
    TinyLMConfig(vocab_size=VOCAB, width=32, num_heads=2, max_length=64), rngs=nnx.Rngs(7)
  )


@nnx.jit
def _score_row(model, tokens, response, seg):
  return lpk.score(model(tokens, segment_ids=seg), tokens, response, segment_ids=seg)


def _logprob(model, context, continuation) -> tuple[float, bool]:
  """log Pr(continuation | context) by hand: lpk.score on the model's own logits
  (one row, right-padded to one compiled length; padding is segment 0)."""
  window = (list(context) + list(continuation))[-(MAX_LENGTH + 1) :]
  n, width = len(window), MAX_LENGTH + 1
  tokens = jnp.array([window + [0] * (width - n)])
  seg = (jnp.arange(width) < n)[None].astype(jnp.int32)
  response = (jnp.arange(width) >= n - len(continuation))[None] & (seg > 0)
  s = _score_row(model, tokens, response, seg)
  return float(s.response_logprob[0]), bool(s.response_greedy[0])


def _encode_pair(tok, context, continuation):
  """lm-eval's rule: trailing spaces move to the continuation; split the whole encoding."""
  n = len(context) - len(context.rstrip())
  if n:
    context, continuation = context[:-n], context[-n:] + continuation
  whole = tok.encode(context + continuation, add_special_tokens=False)
  ctx = tok.encode(context, add_special_tokens=False)
  return ctx, whole[len(ctx) :]


@pytest.mark.parametrize("pack", [None, False], ids=["packed", "one-per-row"])
def test_simple_evaluate_matches_lpk_score(model, pack):
  tok = hf_tokenizer()
  results = simple_evaluate(
    model="lpkernel",
    model_args={"model": model, "tokenizer": tok, "max_length": MAX_LENGTH, "pack": pack},
    tasks=["lpk_mc", "lpk_ppl"],
    task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
    batch_size=3,
    log_samples=True,
  )
  # Multiple choice: every (question, choice) log-likelihood, then acc and acc_norm.
  acc, acc_norm = [], []
  samples = {s["doc_id"]: s for s in results["samples"]["lpk_mc"]}
  for i, doc in enumerate(loader.rows("mc.jsonl")):
    want = [_logprob(model, *_encode_pair(tok, doc["question"], " " + c)) for c in doc["choices"]]
    got = [tuple(r[0]) for r in samples[i]["resps"]]
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-5, atol=1e-5)
    assert [bool(g[1]) for g in got] == [w[1] for w in want]
    lls = np.array([w[0] for w in want])
    acc.append(np.argmax(lls) == doc["label"])
    lengths = np.array([len(c) for c in doc["choices"]], float)
    acc_norm.append(np.argmax(lls / lengths) == doc["label"])
  mc = results["results"]["lpk_mc"]
  np.testing.assert_allclose(mc["acc,none"], np.mean(acc))
  np.testing.assert_allclose(mc["acc_norm,none"], np.mean(acc_norm))

  # Perplexity: each document window by window, lm-eval's own windows, lpk.score each.
  total, words, nbytes = 0.0, 0, 0
  for doc in loader.rows("ppl.jsonl"):
    ids = tok.encode(doc["text"], add_special_tokens=False)
    windows = map(make_disjoint_window, get_rolling_token_windows(ids, 1, MAX_LENGTH, 1))
    total += sum(_logprob(model, ctx, cont)[0] for ctx, cont in windows)
    words += len(doc["text"].split())
    nbytes += len(doc["text"].encode())
  ppl = results["results"]["lpk_ppl"]
  np.testing.assert_allclose(ppl["word_perplexity,none"], math.exp(-total / words), rtol=1e-5)
  np.testing.assert_allclose(ppl["byte_perplexity,none"], math.exp(-total / nbytes), rtol=1e-5)
  np.testing.assert_allclose(ppl["bits_per_byte,none"], -total / nbytes / math.log(2), rtol=1e-5)


def test_tok_encode_contract_tokenizer_and_a_plain_callable(model):
  """A tokenizer with only tok_encode/tok_decode, a plain callable (one request per
  row: it declares no packing) and an explicit prefix token."""
  lm = lpkernel.lm_eval.LpkernelLM(
    lambda tokens: model(tokens), CharTokenizer(), max_length=MAX_LENGTH, batch_size=2
  )
  assert lm.prefix_token_id == 2 and not lm.scorer.pack

  class Request:
    def __init__(self, *args):
      self.args = args

  got = lm.loglikelihood([Request("ice is", " cold"), Request("", "hi")], disable_tqdm=True)
  tok = CharTokenizer()
  want = [
    _logprob(model, tok.tok_encode("ice is"), tok.tok_encode(" cold")),
    _logprob(model, [2], tok.tok_encode("hi")),
  ]
  np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-5)
  (rolled,) = lm.loglikelihood_rolling([Request("ab" * 40)], disable_tqdm=True)
  ids = tok.tok_encode("ab" * 40)
  want = sum(_logprob(model, c, y)[0] for c, y in rolling_windows(ids, 2, MAX_LENGTH))
  np.testing.assert_allclose(rolled, want, rtol=1e-5)
  with pytest.raises(NotImplementedError, match="generation"):
    lm.generate_until([Request("a", {})])


def test_rolling_windows_are_lm_evals():
  for n in (0, 1, 5, 31, 32, 33, 64, 65, 100):
    for max_length in (1, 2, 7, 32):
      tokens = list(range(10, 10 + n))
      want = [
        (list(c), list(y))
        for c, y in map(make_disjoint_window, get_rolling_token_windows(tokens, 1, max_length, 1))
      ]
      assert rolling_windows(tokens, 1, max_length) == want, (n, max_length)


def test_bad_arguments_raise(model):
  with pytest.raises(TypeError, match="tok_encode"):
    lpkernel.lm_eval.LpkernelLM(model, object(), max_length=8)
  with pytest.raises(TypeError, match="unknown arguments"):
    lpkernel.lm_eval.LpkernelLM(model, CharTokenizer(), max_length=8, temprature=2)
  with pytest.raises(ValueError, match="pack=True"):
    lpkernel.lm_eval.LpkernelLM(lambda t: model(t), CharTokenizer(), max_length=8, pack=True)
  lm = lpkernel.lm_eval.LpkernelLM(model, CharTokenizer(), max_length=8, spec=ModelSpec())
  assert not lm.scorer.pack  # an explicit spec without packing keywords wins


def test_linen_model_with_variables_and_a_declared_spec():
  """A linen model (the gemma stand-in) through the backend: module + variables +
  GEMMA, packed, equals lpkernel.flax.loglikelihood one request per row."""
  import jax

  from lpkernel.flax import GEMMA, loglikelihood
  from tests import gemma_standin as gm

  module = gm.Transformer(gm.TransformerConfig(num_embed=VOCAB))
  variables = module.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))
  lm = lpkernel.lm_eval.LpkernelLM(
    module, CharTokenizer(), variables=variables, spec=GEMMA, max_length=16, batch_size=2
  )
  assert lm.scorer.pack

  class Request:
    def __init__(self, *args):
      self.args = args

  pairs = [("ice is", " cold"), ("water is", " wet"), ("a cat says", " meow")]
  got = lm.loglikelihood([Request(*p) for p in pairs], disable_tqdm=True)
  tok = CharTokenizer()
  ids = [(tok.tok_encode(c), tok.tok_encode(y)) for c, y in pairs]
  want = loglikelihood(module, ids, variables=variables, spec=GEMMA, max_length=16, pack=False)
  np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-5)
  assert [g[1] for g in got] == [w[1] for w in want]
