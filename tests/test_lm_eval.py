"""lm-evaluation-harness end to end: ``simple_evaluate(model="lpkernel")`` on the
local tasks in tests/lm_eval_tasks, against the same numbers computed with
``lpk.score`` on the model's own logits (and lm-eval's own window functions)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

import lpkernel as lpk
import lpkernel.flax
import lpkernel.lm_eval  # noqa: F401  (registers model="lpkernel")
from lpkernel.flax import ModelSpec, TinyLM, TinyLMConfig, rolling_windows
from tests.lm_eval_tasks import loader

TASKS = Path(__file__).parent / "lm_eval_tasks"
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 .,?"
MAX_LENGTH = 32  # several rolling windows for the longer documents


def hf_tokenizer(adds_bos: bool = False) -> PreTrainedTokenizerFast:
  """A real Hugging Face tokenizer, built locally: one token per character; with
  ``adds_bos``, its post-processor prepends BOS (as Llama's and Gemma's do)."""
  vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
  vocab.update({c: 4 + i for i, c in enumerate(ALPHABET)})
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
  if adds_bos:
    tok.post_processor = processors.TemplateProcessing(
      single="<bos> $A", special_tokens=[("<bos>", 1)]
    )
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
  """lm-eval's rule: trailing spaces move to the continuation; split the whole
  encoding, each made with the tokenizer's own default (HFLM's add_bos_token=None)."""
  n = len(context) - len(context.rstrip())
  if n:
    context, continuation = context[:-n], context[-n:] + continuation
  whole = tok.encode(context + continuation)
  ctx = tok.encode(context)
  return ctx, whole[len(ctx) :]


@pytest.mark.parametrize(
  "pack,adds_bos",
  [(None, False), (False, False), (None, True)],
  ids=["packed", "one-per-row", "bos-adding-tokenizer"],
)
def test_simple_evaluate_matches_lpk_score(model, pack, adds_bos):
  """By hand with HFLM's rules: a tokenizer that adds BOS keeps it in contexts and
  rolling documents (HFLM 0.4.13's default); one that does not adds none."""
  tok = hf_tokenizer(adds_bos)
  if adds_bos:
    assert tok.encode("ab") == [1, 4, 5]
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
    ids = tok.encode(doc["text"])
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


def test_registering_adds_to_lm_evals_own_models():
  from lm_eval.api.registry import get_model, model_registry

  assert get_model("lpkernel") is lpkernel.lm_eval.LpkernelLM
  assert {"hf", "vllm", "dummy"} <= set(model_registry.keys())
  assert get_model("dummy").__name__ == "DummyLM"  # lm-eval's own, still there


@pytest.mark.long
def test_command_line_end_to_end(tmp_path, model):
  """``python -m lpkernel.lm_eval`` with lm-eval's arguments, a factory and a local
  tokenizer directory, in a subprocess: the same metrics as simple_evaluate in process."""
  tokenizer_dir = tmp_path / "tokenizer"
  hf_tokenizer(adds_bos=True).save_pretrained(tokenizer_dir)
  out = tmp_path / "out"
  root = Path(__file__).parent.parent
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(root)}
  args = [
    sys.executable, "-m", "lpkernel.lm_eval", "--model", "lpkernel",
    "--model_args", f"factory=tests.lm_eval_factory:build,tokenizer={tokenizer_dir},max_length=32",
    "--tasks", "lpk_mc,lpk_ppl", "--include_path", str(TASKS), "--batch_size", "auto",
    "--output_path", str(out),
  ]  # fmt: skip
  run = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  (path,) = out.rglob("results_*.json")
  got = json.loads(path.read_text())["results"]
  want = simple_evaluate(
    model="lpkernel",
    model_args={"model": model, "tokenizer": hf_tokenizer(adds_bos=True), "max_length": 32},
    tasks=["lpk_mc", "lpk_ppl"],
    task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
  )["results"]
  metrics = [
    ("lpk_mc", "acc,none"),
    ("lpk_mc", "acc_norm,none"),
    ("lpk_ppl", "word_perplexity,none"),
    ("lpk_ppl", "byte_perplexity,none"),
  ]
  for task, metric in metrics:
    np.testing.assert_allclose(got[task][metric], want[task][metric], rtol=1e-6)
  # The installed script is the same command.
  script = Path(sys.executable).parent / "lpkernel-lm-eval"
  run = subprocess.run([script, "--help"], env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0 and "lm-eval" in run.stdout, run.stderr[-2000:]


class GemmaStyleTokenizer:
  """SentencePiece-style, as ``gm.text.Gemma3Tokenizer``: ``encode(text, *, add_bos, add_eos)``."""

  class special_tokens:  # noqa: N801
    BOS, EOS = 1, 2

  def encode(self, text, *, add_bos=False, add_eos=False):
    return [1] * add_bos + CharTokenizer().tok_encode(text) + [2] * add_eos

  def decode(self, ids):
    return "".join("<bos>" if i == 1 else "<eos>" if i == 2 else ALPHABET[i - 4] for i in ids)


def test_arguments_lm_eval_users_pass(model, tmp_path):
  # A tokenizer name or directory is loaded, never taken for a tokenizer object.
  hf_tokenizer().save_pretrained(tmp_path)
  lm = lpkernel.lm_eval.LpkernelLM(model, str(tmp_path), batch_size="auto:4")
  assert lm.tok_encode("ab") == [4, 5] and lm.scorer.batch_size is None
  # max_length: the spec's declared window (TinyLM: its config), else required.
  assert lm.max_length == 64
  with pytest.raises(ValueError, match="max_length is required"):
    lpkernel.lm_eval.LpkernelLM(lambda t: model(t), CharTokenizer())
  with pytest.raises(ValueError, match="batch_size"):
    lpkernel.lm_eval.LpkernelLM(model, CharTokenizer(), batch_size="big")
  # gemma's tokenizer: add_bos=, and its BOS from special_tokens.
  lm = lpkernel.lm_eval.LpkernelLM(model, GemmaStyleTokenizer(), add_bos_token=True)
  assert lm.prefix_token_id == 1 and lm.tok_encode("ab") == [1, 4, 5]
  assert lm.tok_encode("ab", add_special_tokens=False) == [4, 5]


def test_rows_follow_the_requests_not_the_window(model):
  """A short request is scored in a short row: the model sees a power of two of
  tokens covering it, never the whole window."""
  seen = []

  def recording(tokens):
    seen.append(tokens.shape[1])
    return model(tokens)

  requests = [([1, 4, 5], [6, 7]), ([1] + [4] * 20, [5] * 10), ([1, 4], [5])]
  scorer = lpkernel.flax.Scorer.of(recording, max_length=64, batch_size=2)
  seen.clear()  # the vocabulary size was read from a full-window trace
  got = scorer.loglikelihood(requests)
  assert sorted(set(seen)) == [8, 32]
  want = [_logprob(model, c, y) for c, y in requests]
  np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-5)
  assert [g[1] for g in got] == [w[1] for w in want]


def test_per_request_numbers_equal_lm_evals_own_hflm_on_a_bos_adding_tokenizer():
  """lm-eval's own HFLM on a GPT-2 built from a config (PyTorch) against model="lpkernel"
  on the same network (its logits through ``jax.pure_callback``), with a tokenizer
  whose post-processor adds BOS: every per-choice and rolling log-likelihood."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("accelerate")  # HFLM's own dependency (lm-eval's "hf" extra)
  import jax
  from lm_eval.models.huggingface import HFLM
  from transformers import GPT2Config, GPT2LMHeadModel

  torch.manual_seed(0)
  config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2)
  gpt2 = GPT2LMHeadModel(config).eval()
  tok = hf_tokenizer(adds_bos=True)

  def torch_logits(tokens):
    with torch.no_grad():
      return gpt2(torch.tensor(np.array(tokens), dtype=torch.long)).logits.numpy()

  def jax_gpt2(tokens):
    out = jax.ShapeDtypeStruct((*tokens.shape, VOCAB), jnp.float32)
    return jax.pure_callback(torch_logits, out, tokens)

  tasks = TaskManager(include_path=str(TASKS), include_defaults=False)
  runs = {}
  for name, lm in [
    ("hf", HFLM(pretrained=gpt2, tokenizer=tok, max_length=MAX_LENGTH, batch_size=4)),
    ("lpkernel", lpkernel.lm_eval.LpkernelLM(jax_gpt2, tok, max_length=MAX_LENGTH, batch_size=4)),
  ]:
    runs[name] = simple_evaluate(
      model=lm, tasks=["lpk_mc", "lpk_ppl"], task_manager=tasks, log_samples=True
    )
  for task in ("lpk_mc", "lpk_ppl"):
    hf, lp = (sorted(runs[n]["samples"][task], key=lambda s: s["doc_id"]) for n in runs)
    for a, b in zip(hf, lp, strict=True):
      for ra, rb in zip(a["resps"], b["resps"], strict=True):
        ra, rb = np.atleast_1d(np.asarray(ra[0], float)), np.atleast_1d(np.asarray(rb[0], float))
        np.testing.assert_allclose(rb[0], ra[0], rtol=1e-4, atol=1e-4)
    for metric, value in runs["hf"]["results"][task].items():
      if isinstance(value, float) and "stderr" not in metric:
        np.testing.assert_allclose(runs["lpkernel"]["results"][task][metric], value, rtol=1e-4)
