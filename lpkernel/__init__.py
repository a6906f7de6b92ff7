"""lpkernel: chain-rule log-probabilities of token sequences in JAX."""

from lpkernel import losses as losses
from lpkernel import ops as ops
from lpkernel import reference as reference
from lpkernel import rl as rl
from lpkernel.checks import check_chain_rule as check_chain_rule
from lpkernel.checks import check_inputs as check_inputs
from lpkernel.checks import check_kept_ids as check_kept_ids
from lpkernel.checks import checkify_inputs as checkify_inputs
from lpkernel.checks import checkify_kept_ids as checkify_kept_ids
from lpkernel.ops import ChunkConfig as ChunkConfig
from lpkernel.ops import FusedConfig as FusedConfig
from lpkernel.ops import PallasGpuFused as PallasGpuFused
from lpkernel.ops import PallasGpuLogits as PallasGpuLogits
from lpkernel.ops import PallasGpuProcessed as PallasGpuProcessed
from lpkernel.ops import PallasTpuFused as PallasTpuFused
from lpkernel.ops import PallasTpuLogits as PallasTpuLogits
from lpkernel.ops import PallasTpuProcessed as PallasTpuProcessed
from lpkernel.ops import XlaFused as XlaFused
from lpkernel.ops import XlaLogits as XlaLogits
from lpkernel.ops import XlaProcessed as XlaProcessed
from lpkernel.ops.fused.api import fused_nll_loss as fused_nll_loss
from lpkernel.ops.fused.api import fused_token_logprobs as fused_token_logprobs
from lpkernel.ops.fused.api import fused_token_stats as fused_token_stats
from lpkernel.ops.logprobs.api import nll_loss as nll_loss
from lpkernel.ops.logprobs.api import token_logprobs as token_logprobs
from lpkernel.ops.logprobs.api import token_logprobs_and_greedy as token_logprobs_and_greedy
from lpkernel.ops.processed.api import fused_processed_token_stats as fused_processed_token_stats
from lpkernel.ops.processed.api import processed_token_stats as processed_token_stats
from lpkernel.ops.processed.candidates import ProcessedConfig as ProcessedConfig
from lpkernel.ops.processed.replay import fused_replay_token_logprobs as fused_replay_token_logprobs
from lpkernel.ops.processed.replay import replay_token_logprobs as replay_token_logprobs
from lpkernel.sampling import ProcessedStats as ProcessedStats
from lpkernel.sampling import Sampling as Sampling
from lpkernel.scoring import score as score
from lpkernel.scoring import score_hidden as score_hidden
from lpkernel.scoring import to_predicting_positions as to_predicting_positions
from lpkernel.types import Scores as Scores
from lpkernel.types import TokenStats as TokenStats

__version__ = "0.1.0"

__all__ = [
  "ChunkConfig",
  "FusedConfig",
  "PallasGpuFused",
  "PallasGpuLogits",
  "PallasGpuProcessed",
  "PallasTpuProcessed",
  "PallasTpuFused",
  "PallasTpuLogits",
  "ProcessedConfig",
  "ProcessedStats",
  "Sampling",
  "Scores",
  "TokenStats",
  "XlaFused",
  "XlaLogits",
  "XlaProcessed",
  "check_chain_rule",
  "check_inputs",
  "check_kept_ids",
  "checkify_inputs",
  "checkify_kept_ids",
  "fused_nll_loss",
  "nll_loss",
  "fused_token_logprobs",
  "fused_token_stats",
  "fused_processed_token_stats",
  "fused_replay_token_logprobs",
  "processed_token_stats",
  "replay_token_logprobs",
  "losses",
  "ops",
  "reference",
  "rl",
  "score",
  "score_hidden",
  "token_logprobs",
  "to_predicting_positions",
  "token_logprobs_and_greedy",
]
