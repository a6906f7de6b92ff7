"""Flax integration: adapters, a tiny reference LM, lm-eval-style loglikelihood."""

from lpkernel.flax.adapters import score_linen as score_linen
from lpkernel.flax.adapters import score_model as score_model
from lpkernel.flax.adapters import scores_from_output as scores_from_output
from lpkernel.flax.loglikelihood import loglikelihood as loglikelihood
from lpkernel.flax.model import TinyLM as TinyLM
from lpkernel.flax.model import TinyLMConfig as TinyLMConfig
from lpkernel.flax.model import attention_mask as attention_mask
from lpkernel.flax.model import packed_positions as packed_positions

__all__ = [
  "TinyLM",
  "TinyLMConfig",
  "attention_mask",
  "loglikelihood",
  "packed_positions",
  "score_linen",
  "score_model",
  "scores_from_output",
]
