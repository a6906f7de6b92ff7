"""Score Flax models: an ``nnx.Module`` called directly, or a linen module.

How a model receives packed rows and what it returns is declared by a
:class:`~lpkernel.flax.spec.ModelSpec` (the ``spec=`` argument, else the model's
``lpkernel_spec``), never guessed from its signature. The output is logits
``[B, T, V]`` (scored with ``lpkernel.score``), a pair ``(hidden [B, T, D],
unembed)`` or an object with logits / hidden-state fields (hidden states are
scored with ``score_hidden``, never building the logits).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
from flax import linen, nnx

from lpkernel.flax.spec import ModelSpec, spec_of
from lpkernel.losses import sft_loss_hidden, sft_loss_logits
from lpkernel.ops.fused.api import fused_token_stats
from lpkernel.ops.logprobs.api import token_logprobs_and_greedy
from lpkernel.scoring import Scores, score, score_hidden, score_rows


@dataclasses.dataclass(frozen=True)
class BoundModel:
  """A model as a pure function of its state, with its spec (hashable: a static
  argument of ``jax.jit``).

  Attributes:
    static: the nnx ``GraphDef``, the linen module, or the callable.
    kind: ``"nnx"``, ``"linen"`` (``static.apply(variables, ...)``), ``"apply"``
      (``static(variables, ...)``) or ``"callable"`` (``static(tokens, ...)``).
    spec: how the model is called and read.
  """

  static: Any
  kind: str
  spec: ModelSpec

  @staticmethod
  def of(model: Any, variables: Any = None, spec: ModelSpec | None = None):
    """``(BoundModel, state)`` for an nnx module, a linen module or its ``apply``
    with ``variables``, or a callable ``model(tokens, ...)``."""
    if variables is not None:
      owner = getattr(model, "__self__", None)
      if isinstance(model, linen.Module):
        return BoundModel(model, "linen", spec_of(model, spec)), variables
      if isinstance(owner, linen.Module) and getattr(model, "__name__", "") == "apply":
        return BoundModel(owner, "linen", spec_of(owner, spec)), variables
      if callable(model):
        return BoundModel(model, "apply", spec_of(model, spec)), variables
      raise TypeError(f"a linen model is a Module or its apply, got {type(model).__name__}")
    if isinstance(model, linen.Module):
      raise TypeError("a linen module needs its variables (score_linen(module, variables, ...))")
    if isinstance(model, nnx.Module):
      graphdef, state = nnx.split(model)
      return BoundModel(graphdef, "nnx", spec_of(model, spec)), state
    if not callable(model):
      raise TypeError(f"model must be an nnx.Module or a callable, got {type(model).__name__}")
    return BoundModel(model, "callable", spec_of(model, spec)), None

  def module_and_variables(self, state) -> tuple[Any, Any]:
    """What the spec's callables receive: (module, variables), variables None for nnx."""
    if self.kind == "nnx":
      return nnx.merge(self.static, state), None
    return (self.static if self.kind == "linen" else None), state

  def output(self, state, tokens, segment_ids, fused: bool):
    """``spec.read`` of the model's output for ``tokens`` packed by ``segment_ids``."""
    kwargs = self.spec.call_kwargs(segment_ids, fused)
    module, variables = self.module_and_variables(state)
    if self.spec.call is not None:
      if self.kind not in ("nnx", "callable"):
        raise TypeError("ModelSpec.call applies to nnx modules and plain callables, not linen")
      out = self.spec.call(module if self.kind == "nnx" else self.static, tokens, **kwargs)
    elif self.kind == "nnx":
      out = module(tokens, **kwargs)
    elif self.kind == "linen":
      out = module.apply(variables, tokens, **kwargs)
    elif self.kind == "apply":
      out = self.static(variables, tokens, **kwargs)
    else:
      out = self.static(tokens, **kwargs)
    return self.spec.read(out, fused, module, variables)


def run_model(
  bound: BoundModel,
  state: Any,
  tokens: jax.Array,
  segment_ids: jax.Array | None,
  fused: bool,
  score_kwargs: dict,
) -> tuple[Any, dict]:
  """The model's output for ``tokens`` and the keywords to score it with.

  Decided before the model runs: the softcap lpkernel applies
  (:meth:`ModelSpec.softcap_for`, an explicit one must agree with the
  model's) and what the model is given of ``segment_ids``
  (:meth:`ModelSpec.model_rows`: a model that cannot see packing gets nothing,
  and a row it would misread is refused or scored NaN).

  Returns:
    (logits or ``(hidden, unembed)``, keywords for :func:`scores_from_output`
    with ``segment_ids`` and the spec's ``vocab_axis`` / ``softcap``).
  """
  module, variables = bound.module_and_variables(state)
  kwargs = dict(score_kwargs)
  kwargs["softcap"] = bound.spec.softcap_for(kwargs.get("softcap"), fused, module, variables)
  model_segments, kwargs["segment_ids"] = bound.spec.model_rows(segment_ids)
  out, options = bound.output(state, tokens, model_segments, fused)
  return out, {**kwargs, **options}


def scores_from_output(
  output: Any,
  tokens: jax.Array,
  response_mask: jax.Array,
  *,
  drops_last: bool = False,
  **score_kwargs: Any,
) -> Scores:
  """``Scores`` from what a model returned: logits, or ``(hidden, unembed)``.

  Args:
    output: ``[B, T(-1), V]`` logits or ``(hidden [B, T(-1), D], unembed)``
      (``unembed`` ``[D, V]``, or ``[V, D]`` with ``vocab_axis=0``).
    drops_last: the model was fed ``tokens[:, :-1]`` (as lm-eval feeds it), so
      its output has ``T - 1`` rows; the last token, which predicts nothing, is
      never an input.
    **score_kwargs: ``segment_ids``, ``num_segments``, ``temperature``,
      ``softcap``, ``vocab_axis`` (fused), ``implementation``.
  """
  fused = isinstance(output, tuple) and len(output) == 2
  if not fused and not hasattr(output, "shape"):
    raise TypeError(
      f"model output must be logits or (hidden, unembed), got {type(output).__name__}"
    )
  if not fused:
    score_kwargs.pop("vocab_axis", None)
  if not drops_last:
    if fused:
      hidden, unembed = output
      # Scores alone: score_kwargs never asks for with_stats.
      return cast(Scores, score_hidden(hidden, unembed, tokens, response_mask, **score_kwargs))
    return score(output, tokens, response_mask, **score_kwargs)
  segment_ids = score_kwargs.pop("segment_ids", None)
  num_segments = score_kwargs.pop("num_segments", None)
  rows = output[0] if fused else output
  if rows.shape[:2] != (tokens.shape[0], tokens.shape[1] - 1):
    raise ValueError(f"model output has {rows.shape[:2]=} for tokens {tokens.shape=} minus one")

  def per_token(targets):
    if fused:
      stats = fused_token_stats(*output, targets[:, :-1], **score_kwargs)
      lp, greedy = stats.logprobs, stats.greedy
    else:
      lp, greedy = token_logprobs_and_greedy(output, targets[:, :-1], **score_kwargs)
    # The last row predicts nothing and is never scored.
    return (
      jnp.concatenate([lp, jnp.zeros_like(lp[:, :1])], axis=1),
      jnp.concatenate([greedy, jnp.zeros_like(greedy[:, :1])], axis=1),
      None,
    )

  return score_rows(
    tokens, response_mask, segment_ids, num_segments, per_token, ("tokens", tokens.shape)
  )[0]


def score_bound(
  bound: BoundModel,
  state: Any,
  tokens: jax.Array,
  response_mask: jax.Array,
  *,
  segment_ids: jax.Array | None = None,
  num_segments: int | None = None,
  fused: bool = False,
  **score_kwargs: Any,
) -> Scores:
  """Scores of a :class:`BoundModel` (the function under ``score_model`` and
  ``score_linen``)."""
  score_kwargs = dict(score_kwargs, num_segments=num_segments)
  out, kwargs = run_model(bound, state, tokens, segment_ids, fused, score_kwargs)
  return scores_from_output(out, tokens, response_mask, **kwargs)


def score_model(
  model: Callable,
  tokens: jax.Array,
  response_mask: jax.Array,
  *,
  spec: ModelSpec | None = None,
  segment_ids: jax.Array | None = None,
  num_segments: int | None = None,
  fused: bool = False,
  **score_kwargs: Any,
) -> Scores:
  """Scores rows with an ``nnx.Module`` (or any callable ``model(tokens, ...)``).

  Args:
    model: called as ``model(tokens, **keywords)`` with the keywords its
      ``spec`` declares (packing with ``segment_ids``; the hidden-state flag
      with ``fused=True``).
    tokens, response_mask, segment_ids, num_segments: as for ``lpkernel.score``.
      Packed rows (``segment_ids``) need a spec that declares how the model
      keeps sequences apart; otherwise ``ValueError``.
    spec: a :class:`~lpkernel.flax.ModelSpec`; None takes the model's
      ``lpkernel_spec``, else ``ModelSpec()``.
    fused: score from hidden states without materialising logits.
    **score_kwargs: ``temperature``, ``softcap``, ``implementation``.
  """
  bound, state = BoundModel.of(model, spec=spec)
  return score_bound(
    bound,
    state,
    tokens,
    response_mask,
    segment_ids=segment_ids,
    num_segments=num_segments,
    fused=fused,
    **score_kwargs,
  )


def sft_loss_model(
  model: Callable,
  tokens: jax.Array,
  response_mask: jax.Array,
  *,
  spec: ModelSpec | None = None,
  segment_ids: jax.Array | None = None,
  num_segments: int | None = None,
  normalise: str = "tokens",
  response_only: bool = True,
  z_loss: float = 0.0,
  fused: bool = True,
  **score_kwargs: Any,
) -> jax.Array:
  """The SFT loss of an ``nnx.Module``, its gradients written in the forward pass.

  The same number as ``sft_loss(score_model(model, ..., fused=fused),
  normalise, response_only=...)`` (plus ``z_loss`` times the normalised
  squared log-sum-exp): from the model's hidden states with no ``[B, T, V]``
  logits (``losses.sft_loss_hidden``), or with ``fused=False`` from its logits
  (``losses.sft_loss_logits``).

  Args:
    model, spec, tokens, response_mask, segment_ids, num_segments: as for
      :func:`score_model`; with ``fused=True`` the spec must declare how the
      model returns hidden states (``ModelSpec(hidden=...)``, as ``TinyLM`` does).
    normalise, response_only, z_loss: as for :func:`lpkernel.losses.sft_loss_hidden`.
    fused: from hidden states (True) or logits (False).
    **score_kwargs: ``temperature``, ``softcap``, ``implementation``.
  """
  bound, state = BoundModel.of(model, spec=spec)
  # logits, or (hidden, unembed) and the spec's vocab_axis / softcap, or a clear error.
  out, kwargs = run_model(bound, state, tokens, segment_ids, fused, score_kwargs)
  options: dict[str, Any] = dict(
    num_segments=num_segments, normalise=normalise, response_only=response_only, z_loss=z_loss
  )
  if fused:
    hidden, unembed = out
    return sft_loss_hidden(hidden, unembed, tokens, response_mask, **options, **kwargs)
  return sft_loss_logits(out, tokens, response_mask, **options, **kwargs)


def score_linen(
  module: linen.Module | Callable,
  variables: Any,
  tokens: jax.Array,
  response_mask: jax.Array,
  *,
  spec: ModelSpec | None = None,
  segment_ids: jax.Array | None = None,
  num_segments: int | None = None,
  fused: bool = False,
  **score_kwargs: Any,
) -> Scores:
  """Scores rows with a linen module: ``module.apply(variables, tokens, ...)``.

  ``module`` is a linen ``Module``, its ``apply``, or any
  ``apply_fn(variables, tokens, ...)``; the rest is as for :func:`score_model`
  (the spec's callables receive the module and ``variables``).
  """
  bound, state = BoundModel.of(module, variables, spec)
  return score_bound(
    bound,
    state,
    tokens,
    response_mask,
    segment_ids=segment_ids,
    num_segments=num_segments,
    fused=fused,
    **score_kwargs,
  )
