"""How a model receives packed rows and what it returns: declared, never guessed.

A :class:`ModelSpec` names the keywords through which a model takes packing
(segment ids or an attention mask, and positions that restart per sequence),
the keyword that makes it return hidden states, and where an output object
keeps its logits or hidden states. Nothing is read from the model's signature:
a call that takes ``**kwargs`` (gemma's) or a wrapper that accepts
``positions`` but lets packed sequences attend to each other would make any
guess silently wrong. A model without a declared way to keep sequences apart is
never packed: the adapters raise, and ``loglikelihood`` puts one request per row.

A model may carry its own spec as the attribute ``lpkernel_spec`` (``TinyLM``
does); an explicit ``spec=`` wins. :data:`GEMMA` declares the ``gemma``
library's ``Transformer``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lpkernel import checks


def packed_positions(segment_ids: jax.Array) -> jax.Array:
  """int32[B, T] positions that restart at 0 at the start of each segment."""
  t = segment_ids.shape[1]
  idx = jnp.arange(t)[None, :]
  starts = jnp.concatenate(
    [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
  )
  last_start = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return (idx - last_start).astype(jnp.int32)


def causal_segment_mask(segment_ids: jax.Array) -> jax.Array:
  """bool[B, T, T]: query t sees keys s <= t of its own segment, never padding."""
  t = segment_ids.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  real = (segment_ids > 0)[:, :, None]
  # Padding rows attend to themselves only, so their softmax stays finite.
  return (causal & same & real) | jnp.eye(t, dtype=bool)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """How lpkernel calls a model and reads its output.

  Attributes:
    segment_ids: keyword taking int32[B, T] segment ids (1, 2, ... per
      sequence, 0 for padding), for a model that keeps sequences apart itself.
    attention_mask: keyword taking bool[B, T, T], True where query t may attend
      to key s (causal, same sequence; padding attends to itself only).
    positions: keyword taking int32[B, T] positions restarting at 0 per sequence.
      Rows are packed only when the model takes positions and one of the two
      above; otherwise each sequence gets a row of its own.
    hidden: keyword that, set to True, makes the model return hidden states
      (for ``fused=True``).
    logits_field, hidden_field: where an output object (a dataclass or a
      mapping) keeps the logits ``[B, T, V]`` and the final hidden states
      ``[B, T, D]``. An array output is the logits; a pair is
      ``(hidden, unembed)``.
    unembed: ``unembed(module, variables)`` returns the unembedding when the
      output carries hidden states only (``variables`` is None for nnx).
    vocab_axis: the unembedding's vocabulary axis: -1 for ``[D, V]``, 0 for a
      tied embedding table ``[V, D]`` (read as stored, never transposed).
    softcap: the model's final-logit softcap (None: not declared), a number
      or ``softcap(module, variables)`` reading it from the model's config.
      The model's logits already carry it; the fused path applies it to
      ``hidden @ unembed``. An explicit ``softcap=`` must agree with it
      (:meth:`softcap_for`).
    max_length: the most tokens the model takes in one row (its context
      window), a number or ``max_length(module, variables)``; None: not
      declared (the lm-eval backend then needs ``max_length=``).
    call: how an nnx module (or a plain callable model) is called:
      ``call(model, tokens, **keywords)`` returns the output read as above;
      None: ``model(tokens, **keywords)``. For models that take constant
      keywords, return tuples or hand over hidden states through ``sow``
      (``lpkernel.tunix.model_spec`` is one).
  """

  segment_ids: str | None = None
  attention_mask: str | None = None
  positions: str | None = None
  hidden: str | None = None
  logits_field: str = "logits"
  hidden_field: str = "hidden_states"
  unembed: Callable[[Any, Any], jax.Array] | None = None
  vocab_axis: int = -1
  softcap: float | Callable[[Any, Any], float | None] | None = None
  max_length: int | Callable[[Any, Any], int] | None = None
  call: Callable[..., Any] | None = None

  def __post_init__(self):
    for name in ("segment_ids", "attention_mask", "positions", "hidden"):
      value = getattr(self, name)
      if value is not None and not (isinstance(value, str) and value.isidentifier()):
        raise TypeError(f"ModelSpec.{name}={value!r} must be a keyword name or None")
    checks.vocab_axis(self.vocab_axis)
    if not (self.softcap is None or callable(self.softcap)):
      checks.check_softcap(self.softcap)

  @property
  def packs(self) -> bool:
    """The model keeps packed sequences apart: positions and segment ids or a mask."""
    isolates = self.segment_ids is not None or self.attention_mask is not None
    return isolates and self.positions is not None

  def _missing_packing(self) -> str:
    missing = [] if self.positions is not None else ["positions="]
    if self.segment_ids is None and self.attention_mask is None:
      missing.append("segment_ids= or attention_mask=")
    return " and ".join(missing)

  def model_rows(self, segment_ids: jax.Array | None) -> tuple[jax.Array | None, jax.Array | None]:
    """``(what the model is given, what lpkernel scores with)`` for ``segment_ids``.

    A model that declares packing gets the ids. Any other model gets nothing:
    a row holding one sequence followed by padding (an HF attention mask with
    right padding) needs nothing for a causal model. A row holding several
    sequences, or starting with padding, would let tokens attend across
    sequences or to padding: ``ValueError`` when the ids are concrete, and
    under ``jit`` the row is scored NaN (its segment ids made invalid).
    """
    if segment_ids is None or self.packs:
      return segment_ids, segment_ids
    seg = jnp.asarray(segment_ids).astype(jnp.int32)
    ok = single_sequence_rows(seg)
    if not isinstance(ok, jax.core.Tracer) and not bool(jnp.all(ok)):
      row = int(jnp.argmin(ok))
      raise ValueError(
        f"row {row} of segment_ids holds several sequences or starts with padding "
        f"({seg[row].tolist()}), and this model cannot keep packed sequences apart: its "
        f"ModelSpec declares no {self._missing_packing()}. Put one sequence per row with "
        "padding only after it, or declare how the model takes packing"
      )
    return None, jnp.where(ok[:, None], seg, -1)

  def call_kwargs(self, segment_ids: jax.Array | None, fused: bool) -> dict[str, Any]:
    """The keywords for ``tokens [B, T]`` packed by ``segment_ids`` (None: one
    sequence per row, nothing passed) and, with ``fused``, the hidden-state flag."""
    kwargs: dict[str, Any] = {}
    if segment_ids is not None:
      if not self.packs:
        raise ValueError(
          f"this model cannot receive packed rows: its ModelSpec declares no "
          f"{self._missing_packing()} (the keywords through which it keeps sequences "
          "apart); score one sequence per row"
        )
      if self.segment_ids is not None:
        kwargs[self.segment_ids] = segment_ids
      if self.attention_mask is not None:
        kwargs[self.attention_mask] = causal_segment_mask(segment_ids)
      assert self.positions is not None  # self.packs
      kwargs[self.positions] = packed_positions(segment_ids)
    if fused:
      if self.hidden is None:
        raise ValueError(
          "fused=True needs ModelSpec(hidden=...): the keyword that makes the model "
          "return hidden states"
        )
      kwargs[self.hidden] = True
    return kwargs

  def max_length_of(self, module: Any, variables: Any) -> int | None:
    """The declared context window, or None."""
    value = self.max_length
    return value(module, variables) if callable(value) else value

  def softcap_for(self, given: float | None, fused: bool, module: Any, variables: Any):
    """The softcap lpkernel applies, decided before the model runs.

    The spec's softcap is what the model does. Its logits already carry it, so
    the logits path applies none; the fused path applies it to
    ``hidden @ unembed``. An explicit ``given`` softcap must agree with it
    (``ValueError`` otherwise). A spec that declares none leaves ``given`` to
    be applied on either path.
    """
    if self.softcap is None:
      return given
    model = self.softcap(module, variables) if callable(self.softcap) else self.softcap
    if given is not None and given != model:
      raise ValueError(
        f"softcap={given} disagrees with the model's own final-logit softcap {model} "
        "(ModelSpec.softcap): the model applies it already; pass softcap=None or the same value"
      )
    return model if fused else None

  def read(self, output: Any, fused: bool, module: Any = None, variables: Any = None):
    """``(logits, {})`` or ``((hidden, unembed), {"vocab_axis": ...})`` from an output."""
    if fused:
      if isinstance(output, tuple) and len(output) == 2:
        pair = output
      else:
        if self.unembed is None:
          raise ValueError(
            f"the model returned {type(output).__name__}, not (hidden, unembed): declare "
            "ModelSpec(unembed=lambda module, variables: ...) to find the unembedding"
          )
        pair = (_field(output, self.hidden_field, "hidden states"), self.unembed(module, variables))
      return pair, {"vocab_axis": self.vocab_axis}
    if isinstance(output, tuple):
      raise TypeError("the model returned a tuple; (hidden, unembed) is scored with fused=True")
    if hasattr(output, "shape"):
      return output, {}
    return _field(output, self.logits_field, "logits"), {}


def single_sequence_rows(segment_ids: jax.Array) -> jax.Array:
  """bool[B]: the row is one sequence (one id > 0) from its first token, then only padding."""
  real = segment_ids > 0
  prefix = jnp.all(real[:, 1:] <= real[:, :-1], axis=1)
  one_id = jnp.all(~real | (segment_ids == segment_ids[:, :1]), axis=1)
  return prefix & one_id


def _field(output: Any, name: str, what: str) -> jax.Array:
  value = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
  if value is None:
    raise TypeError(
      f"the model's output ({type(output).__name__}) has no {what} in {name!r}: declare "
      f"the field in ModelSpec (logits_field= / hidden_field=)"
    )
  return value


def spec_of(model: Any, spec: ModelSpec | None) -> ModelSpec:
  """``spec``, else the model's own ``lpkernel_spec``, else ``ModelSpec()``
  (logits or a ``(hidden, unembed)`` pair out, no packing in)."""
  if spec is None:
    spec = getattr(model, "lpkernel_spec", None) or ModelSpec()
  if not isinstance(spec, ModelSpec):
    raise TypeError(f"spec must be a lpkernel.flax.ModelSpec, got {type(spec).__name__}")
  return spec


def _gemma_variables(variables: Any) -> Any:
  if variables is None:
    raise TypeError(
      "GEMMA reads the tied table and the softcap from a linen gemma Transformer and its "
      "variables: call score_linen(model, {'params': params}, ...) (a callable or nnx model "
      "needs a ModelSpec of its own, with unembed= and softcap= reading its weights)"
    )
  return variables


def _gemma_table(module: Any, variables: Any) -> jax.Array:
  return _gemma_variables(variables)["params"]["embedder"]["input_embedding"]


def _gemma_softcap(module: Any, variables: Any) -> float | None:
  _gemma_variables(variables)
  return module.config.final_logit_softcap


# gemma's Transformer (linen): `apply(variables, tokens, positions=, attention_mask=,
# return_hidden_states=)` returns Output(logits, cache, hidden_states); the tied
# table is params/embedder/input_embedding [V, D]; softcap from its config.
GEMMA = ModelSpec(
  attention_mask="attention_mask",
  positions="positions",
  hidden="return_hidden_states",
  unembed=_gemma_table,
  vocab_axis=0,
  softcap=_gemma_softcap,
)
