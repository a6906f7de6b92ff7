"""Flax integration: declared model specs, adapters, a tiny reference LM, lm-eval-style
log-likelihoods."""

from lpkernel.flax.adapters import score_linen as score_linen
from lpkernel.flax.adapters import score_model as score_model
from lpkernel.flax.adapters import scores_from_output as scores_from_output
from lpkernel.flax.adapters import sft_loss_model as sft_loss_model
from lpkernel.flax.loglikelihood import Scorer as Scorer
from lpkernel.flax.loglikelihood import loglikelihood as loglikelihood
from lpkernel.flax.loglikelihood import loglikelihood_rolling as loglikelihood_rolling
from lpkernel.flax.loglikelihood import rolling_windows as rolling_windows
from lpkernel.flax.model import TinyLM as TinyLM
from lpkernel.flax.model import TinyLMConfig as TinyLMConfig
from lpkernel.flax.model import attention_mask as attention_mask
from lpkernel.flax.spec import GEMMA as GEMMA
from lpkernel.flax.spec import ModelSpec as ModelSpec
from lpkernel.flax.spec import causal_segment_mask as causal_segment_mask
from lpkernel.flax.spec import packed_positions as packed_positions

__all__ = [
  "GEMMA",
  "ModelSpec",
  "Scorer",
  "TinyLM",
  "TinyLMConfig",
  "attention_mask",
  "causal_segment_mask",
  "loglikelihood",
  "loglikelihood_rolling",
  "packed_positions",
  "rolling_windows",
  "score_linen",
  "score_model",
  "scores_from_output",
  "sft_loss_model",
]
