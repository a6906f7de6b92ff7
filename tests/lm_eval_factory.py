"""A model factory for the lm-eval command-line test: ``factory=tests.lm_eval_factory:build``."""

from flax import nnx

from lpkernel.flax import TinyLM, TinyLMConfig

VOCAB = 44  # tests/test_lm_eval.py: 4 special tokens and a 40-character alphabet


def build() -> TinyLM:
  """The tests' TinyLM (its spec declares its window, 64 tokens)."""
  return TinyLM(
    TinyLMConfig(vocab_size=VOCAB, width=32, num_heads=2, max_length=64), rngs=nnx.Rngs(7)
  )
