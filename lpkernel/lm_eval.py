"""An lm-evaluation-harness model backend: ``simple_evaluate(model="lpkernel", ...)``.

Needs the optional extra (``pip install "lpkernel[lm-eval]"``, lm-eval 0.4).
Importing this module registers :class:`LpkernelLM` under the name
``"lpkernel"``; pass a Flax model and a tokenizer through ``model_args``::

    import lm_eval, lpkernel.lm_eval
    results = lm_eval.simple_evaluate(
        model="lpkernel",
        model_args={"model": nnx_model, "tokenizer": tokenizer, "max_length": 2048},
        tasks=["hellaswag"],
    )

``loglikelihood`` and ``loglikelihood_rolling`` run through
:class:`lpkernel.flax.Scorer`: lm-eval's context/continuation tokenization and
windows, requests packed several to a row when the model's ``ModelSpec``
declares how it keeps sequences apart (one per row otherwise), one compiled
program per shape. ``generate_until`` is not implemented.
"""

from __future__ import annotations

from typing import Any

try:
  from lm_eval.api.model import TemplateLM
  from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without the extra
  raise ImportError(
    'lpkernel.lm_eval needs lm-evaluation-harness: pip install "lpkernel[lm-eval]"'
  ) from e

from lpkernel.flax.loglikelihood import Scorer
from lpkernel.flax.spec import ModelSpec


def _token_id(tokenizer: Any, *names: str) -> int | None:
  for name in names:
    value = getattr(tokenizer, name, None)
    if value is not None:
      return int(value)
  return None


@register_model("lpkernel")
class LpkernelLM(TemplateLM):
  """lm-eval's ``LM`` for a Flax model scored by lpkernel.

  Args:
    model: an ``nnx.Module`` or callable ``model(tokens, ...)``; with
      ``variables``, a linen module (or its ``apply``).
    tokenizer: an object with lm-eval's ``tok_encode(str) -> list[int]`` /
      ``tok_decode(list[int]) -> str``, or a Hugging Face tokenizer
      (``encode(str, add_special_tokens=...)`` / ``decode``).
    max_length: the model's window (tokens fed per request).
    variables: a linen model's variables.
    spec: the model's :class:`~lpkernel.flax.ModelSpec` (None: its ``lpkernel_spec``).
    batch_size: rows per model call (lm-eval's ``batch_size``; "auto" is not supported).
    prefix_token_id: the token that conditions an empty context and a rolling
      document's first token; default the tokenizer's BOS, else its EOS / EOT.
    add_bos_token: ask a Hugging Face tokenizer for its special tokens.
    pack: None packs exactly when the spec allows; False one request per row.
    fused: score from hidden states without materialising logits.
    pad_token_id: fills rows past their requests (never scored).
    **ignored: lm-eval's generic options (``device``, ``max_batch_size``).
  """

  def __init__(
    self,
    model: Any,
    tokenizer: Any,
    *,
    max_length: int = 2048,
    variables: Any = None,
    spec: ModelSpec | None = None,
    batch_size: int | str = 8,
    prefix_token_id: int | None = None,
    add_bos_token: bool = False,
    pack: bool | None = None,
    fused: bool = False,
    pad_token_id: int = 0,
    **ignored: Any,
  ):
    super().__init__()
    unknown = set(ignored) - {"device", "max_batch_size"}
    if unknown:
      raise TypeError(f"LpkernelLM got unknown arguments {sorted(unknown)}")
    if not (hasattr(tokenizer, "tok_encode") or hasattr(tokenizer, "encode")):
      raise TypeError(
        "tokenizer must have tok_encode/tok_decode or encode/decode, got "
        f"{type(tokenizer).__name__}"
      )
    self.tokenizer = tokenizer
    self.add_bos_token = add_bos_token
    self._prefix = prefix_token_id
    if self._prefix is None:
      self._prefix = _token_id(tokenizer, "bos_token_id", "eos_token_id", "eot_token_id")
    if self._prefix is None:
      raise ValueError("no prefix_token_id given and the tokenizer has no BOS / EOS / EOT id")
    self.scorer = Scorer.of(
      model,
      max_length=max_length,
      variables=variables,
      spec=spec,
      batch_size=int(batch_size),
      pack=pack,
      pad_token=pad_token_id,
      fused=fused,
    )

  @property
  def eot_token_id(self) -> int:
    eot = _token_id(self.tokenizer, "eot_token_id", "eos_token_id")
    return self._prefix if eot is None else eot

  @property
  def prefix_token_id(self) -> int:
    return self._prefix

  @property
  def max_length(self) -> int:
    return self.scorer.max_length

  @property
  def tokenizer_name(self) -> str:
    return type(self.tokenizer).__name__

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    if hasattr(self.tokenizer, "tok_encode"):
      return list(self.tokenizer.tok_encode(string))
    special = self.add_bos_token if add_special_tokens is None else add_special_tokens
    return list(self.tokenizer.encode(string, add_special_tokens=special))

  def tok_decode(self, tokens: list[int], **kwargs) -> str:
    if hasattr(self.tokenizer, "tok_decode"):
      return self.tokenizer.tok_decode(tokens)
    return self.tokenizer.decode(tokens)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    """``[((context, continuation), context_ids, continuation_ids), ...]`` -> results."""
    windows = [self.scorer.window(ctx, cont) for _, ctx, cont in requests]
    results = self.scorer.score_windows(windows)
    for (key, _, _), result in zip(requests, results, strict=True):
      self.cache_hook.add_partial("loglikelihood", key, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """log Pr(document) of each ``Instance`` (``args = (text,)``), lm-eval's windows."""
    documents = [self.tok_encode(text) for (text,) in (r.args for r in requests)]
    results = self.scorer.loglikelihood_rolling(documents, self.prefix_token_id)
    for request, result in zip(requests, results, strict=True):
      self.cache_hook.add_partial("loglikelihood_rolling", request.args, result)
    return results

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    raise NotImplementedError(
      "lpkernel scores sequences; generation (generate_until tasks) is not implemented"
    )


__all__ = ["LpkernelLM"]
