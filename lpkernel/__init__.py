"""lpkernel: chain-rule log-probabilities of token sequences in JAX."""

from lpkernel import losses as losses
from lpkernel import reference as reference
from lpkernel.checks import check_chain_rule as check_chain_rule
from lpkernel.checks import check_inputs as check_inputs
from lpkernel.checks import checkify_inputs as checkify_inputs
from lpkernel.fused import FusedConfig as FusedConfig
from lpkernel.fused import TokenStats as TokenStats
from lpkernel.fused import fused_token_logprobs as fused_token_logprobs
from lpkernel.fused import fused_token_stats as fused_token_stats
from lpkernel.fused import score_hidden as score_hidden
from lpkernel.logprobs import ChunkConfig as ChunkConfig
from lpkernel.logprobs import token_logprobs as token_logprobs
from lpkernel.logprobs import token_logprobs_and_greedy as token_logprobs_and_greedy
from lpkernel.scoring import Scores as Scores
from lpkernel.scoring import score as score

__version__ = "0.1.0"

__all__ = [
  "ChunkConfig",
  "FusedConfig",
  "TokenStats",
  "fused_token_logprobs",
  "losses",
  "fused_token_stats",
  "score_hidden",
  "Scores",
  "check_chain_rule",
  "check_inputs",
  "checkify_inputs",
  "reference",
  "score",
  "token_logprobs",
  "token_logprobs_and_greedy",
]
