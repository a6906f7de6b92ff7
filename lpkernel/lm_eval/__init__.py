"""An lm-evaluation-harness model backend: ``model="lpkernel"`` in Python and on the command line.

Needs the optional extra (``pip install "lpkernel[lm-eval]"``, lm-eval 0.4).
Importing this module registers :class:`LpkernelLM` under the name
``"lpkernel"``, beside lm-eval's own models. In Python, pass the model itself::

    import lm_eval, lpkernel.lm_eval
    results = lm_eval.simple_evaluate(
        model="lpkernel",
        model_args={"model": nnx_model, "tokenizer": tokenizer, "max_length": 2048},
        tasks=["hellaswag"],
    )

On the command line (lm-eval's own arguments; ``--model_args`` names a factory
``module:callable`` that returns the model, and a tokenizer directory or name
that resolves offline)::

    python -m lpkernel.lm_eval --model lpkernel \\
      --model_args factory=my_pkg.models:build,tokenizer=/path/to/tokenizer,max_length=2048 \\
      --tasks hellaswag --batch_size auto --output_path results/

``loglikelihood`` and ``loglikelihood_rolling`` run through
:class:`lpkernel.flax.Scorer`: lm-eval's context/continuation tokenization and
windows, requests in rows of a few widths, packed several to a row when the
model's ``ModelSpec`` declares how it keeps sequences apart. ``generate_until``
is not implemented.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Mapping
from typing import Any

try:
  import lm_eval.models  # noqa: F401  (lm-eval's own models first: registering adds, never replaces)
  from lm_eval.__main__ import cli_evaluate
  from lm_eval.api.model import TemplateLM
  from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without the extra
  raise ImportError(
    'lpkernel.lm_eval needs lm-evaluation-harness: pip install "lpkernel[lm-eval]"'
  ) from e

from lpkernel.flax.loglikelihood import Scorer
from lpkernel.flax.spec import ModelSpec


def load_factory(factory: str) -> dict[str, Any]:
  """``"module:callable"`` -> what the callable returns, as ``{"model", "variables",
  "spec", ...}``.

  The callable takes no arguments and returns the model, a tuple ``(model,
  variables)`` or ``(model, variables, spec)``, or a mapping with ``"model"``
  and any of ``"variables"``, ``"spec"``, ``"tokenizer"``, ``"max_length"``.
  """
  module_name, _, attr = factory.partition(":")
  if not module_name or not attr:
    raise ValueError(f"factory={factory!r} must be 'module:callable' (e.g. my_pkg.models:build)")
  try:
    built = getattr(importlib.import_module(module_name), attr)()
  except (ImportError, AttributeError) as e:
    raise ValueError(f"factory={factory!r}: {e}") from e
  if isinstance(built, Mapping):
    unknown = set(built) - {"model", "variables", "spec", "tokenizer", "max_length"}
    if "model" not in built or unknown:
      raise TypeError(
        f"factory={factory!r} returned a mapping with keys {sorted(built)}: it needs 'model' "
        "and may hold 'variables', 'spec', 'tokenizer', 'max_length'"
      )
    return dict(built)
  if isinstance(built, tuple):
    if not 1 <= len(built) <= 3:
      raise TypeError(
        f"factory={factory!r} returned a {len(built)}-tuple: (model, variables, spec)"
      )
    return dict(zip(("model", "variables", "spec"), built, strict=False))
  return {"model": built}


class Tokenizer:
  """One face for the tokenizers users bring, with Hugging Face's rules for BOS.

  Three kinds: lm-eval's ``tok_encode`` / ``tok_decode`` contract; a Hugging
  Face tokenizer (``encode(text, add_special_tokens=...)``), or a name or local
  directory that ``transformers.AutoTokenizer`` loads; a SentencePiece-style
  tokenizer such as gemma's (``encode(text, *, add_bos=...)``).
  """

  def __init__(self, tokenizer: Any):
    if isinstance(tokenizer, str):
      try:
        from transformers import AutoTokenizer
      except ImportError as e:
        raise TypeError(
          f"tokenizer={tokenizer!r} is a name: loading it needs transformers "
          "(pip install transformers), or pass a tokenizer object"
        ) from e
      tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    self.kind = _tokenizer_kind(tokenizer)
    self.tokenizer = tokenizer

  def encode(self, text: str, add_special: bool | None) -> list[int]:
    """Ids of ``text``; ``add_special`` None keeps the tokenizer's own default."""
    if self.kind == "lm-eval":
      return list(self.tokenizer.tok_encode(text))
    if add_special is None:
      return list(self.tokenizer.encode(text))
    if self.kind == "sentencepiece":
      return list(self.tokenizer.encode(text, add_bos=add_special))
    return list(self.tokenizer.encode(text, add_special_tokens=add_special))

  def decode(self, ids: list[int]) -> str:
    if self.kind == "lm-eval":
      return self.tokenizer.tok_decode(ids)
    return self.tokenizer.decode(ids)

  def token_id(self, *names: str) -> int | None:
    """The first of ``bos_token_id``-style attributes the tokenizer has (also
    under ``special_tokens``, as gemma's ``BOS`` / ``EOS``)."""
    for name in names:
      for owner in (self.tokenizer, getattr(self.tokenizer, "special_tokens", None)):
        value = getattr(owner, name, None)
        if value is not None and hasattr(value, "__index__"):  # an int, or an int enum
          return int(value)
    return None


def _tokenizer_kind(tokenizer: Any) -> str:
  if hasattr(tokenizer, "tok_encode") and hasattr(tokenizer, "tok_decode"):
    return "lm-eval"
  encode = getattr(tokenizer, "encode", None)
  if not callable(encode) or not callable(getattr(tokenizer, "decode", None)):
    raise TypeError(
      "tokenizer must have tok_encode/tok_decode, or encode/decode (a Hugging Face or "
      f"SentencePiece-style tokenizer), or be a tokenizer name or directory; got "
      f"{type(tokenizer).__name__}"
    )
  parameters: Mapping[str, inspect.Parameter]
  try:
    parameters = inspect.signature(encode).parameters
  except (TypeError, ValueError):
    parameters = {}
  return "sentencepiece" if "add_bos" in parameters else "huggingface"


@register_model("lpkernel")
class LpkernelLM(TemplateLM):
  """lm-eval's ``LM`` for a Flax model scored by lpkernel.

  Args:
    model: an ``nnx.Module`` or callable ``model(tokens, ...)``; with
      ``variables``, a linen module (or its ``apply``). Or None with ``factory``.
    tokenizer: a Hugging Face tokenizer, its name or local directory, a
      SentencePiece-style tokenizer (``encode(text, *, add_bos)``, as gemma's),
      or an object with lm-eval's ``tok_encode`` / ``tok_decode``.
    factory: ``"module:callable"`` returning the model (and its variables and
      spec; see :func:`load_factory`): how the command line names a model.
    max_length: the model's window (tokens fed per request); default the
      spec's declared ``max_length``, else required.
    variables: a linen model's variables.
    spec: the model's :class:`~lpkernel.flax.ModelSpec` (None: its ``lpkernel_spec``).
    batch_size: most rows per model call, or ``"auto"`` / ``"auto:N"``
      (``lpkernel.flax.loglikelihood.AUTO_BATCH_TOKENS`` tokens per call).
    prefix_token_id: the token that conditions an empty context and a rolling
      document's first token; default the tokenizer's BOS, else its EOS / EOT.
    add_bos_token: HFLM's rule: None keeps the tokenizer's own behaviour (a
      tokenizer whose post-processor adds BOS adds it), True / False ask for
      its special tokens or not; a text that already starts with the prefix
      token's string gets none added.
    pack: None packs exactly when the spec allows; False one request per row.
    fused: score from hidden states without materialising logits.
    pad_token_id: fills rows past their requests (never scored).
    **ignored: lm-eval's generic options (``device``, ``max_batch_size``).
  """

  def __init__(
    self,
    model: Any = None,
    tokenizer: Any = None,
    *,
    factory: str | None = None,
    max_length: int | None = None,
    variables: Any = None,
    spec: ModelSpec | None = None,
    batch_size: int | str = 8,
    prefix_token_id: int | None = None,
    add_bos_token: bool | None = None,
    pack: bool | None = None,
    fused: bool = False,
    pad_token_id: int = 0,
    **ignored: Any,
  ):
    super().__init__()
    unknown = set(ignored) - {"device", "max_batch_size"}
    if unknown:
      raise TypeError(f"LpkernelLM got unknown arguments {sorted(unknown)}")
    if factory is not None:
      if model is not None:
        raise TypeError("pass model= or factory=, not both")
      built = load_factory(factory)
      model, variables = built["model"], built.get("variables", variables)
      spec, tokenizer = built.get("spec", spec), tokenizer or built.get("tokenizer")
      max_length = max_length or built.get("max_length")
    if model is None:
      raise TypeError("LpkernelLM needs model= (in Python) or factory='module:callable'")
    if tokenizer is None:
      raise TypeError("LpkernelLM needs tokenizer= (an object, a name or a local directory)")
    self.tokenizer = Tokenizer(tokenizer)
    self.add_bos_token = add_bos_token
    prefix = prefix_token_id
    if prefix is None:
      prefix = self.tokenizer.token_id("bos_token_id", "BOS", "eos_token_id", "EOS")
      prefix = prefix if prefix is not None else self._eot()
    if prefix is None:
      raise ValueError(
        f"no prefix_token_id given and the tokenizer ({type(self.tokenizer.tokenizer).__name__}) "
        "has no BOS / EOS / EOT id: pass prefix_token_id="
      )
    self._prefix: int = prefix
    self.scorer = Scorer.of(
      model,
      max_length=None if max_length is None else int(max_length),
      variables=variables,
      spec=spec,
      batch_size=batch_size,
      pack=pack,
      pad_token=pad_token_id,
      fused=fused,
    )

  def _eot(self) -> int | None:
    return self.tokenizer.token_id("eot_token_id", "eos_token_id", "EOS")

  @property
  def eot_token_id(self) -> int:
    eot = self._eot()
    return self._prefix if eot is None else eot

  @property
  def prefix_token_id(self) -> int:
    return self._prefix

  @property
  def max_length(self) -> int:
    return self.scorer.max_length

  @property
  def tokenizer_name(self) -> str:
    return type(self.tokenizer.tokenizer).__name__

  def tok_encode(
    self,
    string: str,
    add_special_tokens: bool | None = None,
    left_truncate_len: int | None = None,
    **kwargs,
  ) -> list[int]:
    """HFLM's ``tok_encode``: ``add_special_tokens`` else ``add_bos_token`` else the
    tokenizer's default, and none added to a text that starts with the prefix
    token's string."""
    add = add_special_tokens if add_special_tokens is not None else self.add_bos_token
    if add_special_tokens is None:
      prefix = self.tokenizer.decode([self.prefix_token_id])
      if prefix and string.startswith(prefix):
        add = False
    ids = self.tokenizer.encode(string, add)
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, tokens: list[int], **kwargs) -> str:
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


def main(argv: list[str] | None = None) -> None:
  """lm-eval's command line with the ``lpkernel`` backend registered (this
  module's import registered it): ``python -m lpkernel.lm_eval`` and the
  ``lpkernel-lm-eval`` script."""
  if argv is not None:
    sys.argv = [sys.argv[0], *argv]
  cli_evaluate()


__all__ = ["LpkernelLM", "Tokenizer", "load_factory", "main"]
