"""Named problem shapes shared by the tests and the benchmark suite."""

from __future__ import annotations

from typing import NamedTuple


class LogitsShape(NamedTuple):
  """Scoring ``float[B, T, V]`` logits."""

  name: str
  batch: int
  time: int
  vocab: int

  @property
  def tokens(self) -> int:
    return self.batch * self.time


class HiddenShape(NamedTuple):
  """Scoring from ``hidden[N, D]`` and ``unembed[D, V]`` (the fused path)."""

  name: str
  tokens: int
  width: int
  vocab: int


# Logits shapes: a small vocabulary, Llama-2's 32000 and Llama-3's 128256.
TINY = LogitsShape("tiny", 2, 16, 257)
SMALL_VOCAB = LogitsShape("v8k", 32, 128, 8192)
LLAMA2_VOCAB = LogitsShape("v32k", 8, 512, 32000)
LLAMA3_VOCAB = LogitsShape("v128k", 4, 1024, 128256)
LLAMA3_LONG = LogitsShape("v128k-long", 8, 4096, 128256)
LLAMA3_XL = LogitsShape("v128k-xl", 16, 4096, 128256)

# Hidden-state shapes for the fused path.
TINY_HIDDEN = HiddenShape("tiny-fused", 64, 32, 1031)
FUSED_MEMORY = HiddenShape("fused-d512", 4096, 512, 32000)
FUSED_DEFAULT = HiddenShape("fused-d1024", 4096, 1024, 32000)
FUSED_GPU = HiddenShape("fused-gpu", 32768, 4096, 128256)
# Qwen's vocabulary at D = 2048 (N scaled to 2 CPU cores), for the kept-set replay.
REPLAY = HiddenShape("replay-qwen", 1024, 2048, 151936)
# The same at the N (a GPU's shape).
REPLAY_GPU = HiddenShape("replay-qwen-gpu", 4096, 2048, 151936)
