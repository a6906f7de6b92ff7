"""tunix integration: its models' log-probabilities and GRPO loss without the logits.

Google's tunix (``pip install "lpkernel[tunix]"``) computes every policy and
reference log-probability by materialising ``[B, T, V]`` float32 logits
(``tunix.rl.common.compute_per_token_logps``). This module reads a tunix
model's final hidden states and unembedding instead and hands them to
lpkernel's fused sweep:

* :func:`compute_per_token_logps`: a drop-in with tunix's signature and
  outputs (plus ``return_entropy``);
* ``"lpkernel_grpo"``: a policy loss registered in tunix's own registry when
  this module is imported, honouring ``GRPOConfig`` (``beta``, ``epsilon``,
  ``epsilon_high``, ``epsilon_c``, ``loss_algo`` incl. ``gspo-token``,
  ``loss_agg_mode``, ``kl_loss_mode``, ``kl_clamp_value``, ``temperature``,
  ``sampler_is_weights``) and returning every aux key tunix's learners log.
  A tunix user switches with ``GRPOConfig(policy_loss_fn="lpkernel_grpo")``;
* :func:`route_log_probabilities`: tunix's reference / old-policy / rollout
  log-probabilities through the drop-in as well;
* :func:`model_spec`: the ``lpkernel.flax.ModelSpec`` of a tunix model, so
  ``lpk.flax.score_model`` (and the lm-eval backend) score it, fused or not.

Model families (Qwen2, Qwen3, Gemma 3: ``output_hidden_states=True`` sows the
final hidden states; Llama 3: the final norm's output is captured with
``nnx.capture``); the unembedding is ``lm_head.w`` ``[D, V]`` or, tied, the
embedding table ``[V, D]`` read as stored (:func:`unembedding`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

try:
  from tunix.rl import common, function_registry
except ImportError as error:  # an optional dependency
  raise ImportError("lpkernel.tunix needs tunix: pip install 'lpkernel[tunix]'") from error

from lpkernel.flax.spec import ModelSpec
from lpkernel.ops.fused.api import fused_token_stats
from lpkernel.rl import PolicyObjective, Rollout, policy_loss


def unembedding(model: nnx.Module) -> tuple[jax.Array, int, Any]:
  """``(table, vocab_axis, dtype)`` of a tunix causal LM's output projection.

  Untied: ``lm_head.w`` ``[D, V]`` (``vocab_axis=-1``); tied (Qwen
  ``use_tied_embedding``, Llama ``weight_tying``, Gemma always): the embedding
  table ``[V, D]`` (``vocab_axis=0``). ``dtype`` is the one the model's head
  casts both operands to (None: as stored).
  """
  config = getattr(model, "config", None)
  tied = bool(
    getattr(config, "use_tied_embedding", False) or getattr(config, "weight_tying", False)
  )
  if hasattr(model, "lm_head") and not tied:
    head = model.lm_head
    if getattr(head, "bias", None) is not None:
      raise TypeError(
        f"{type(model).__name__}.lm_head adds a bias to the logits: the fused sweep "
        "computes hidden @ unembed only (score its logits with lpk.score instead)"
      )
    weight = head.w if hasattr(head, "w") else head.kernel  # tunix's Einsum, or nnx.Linear
    return weight[...], -1, getattr(head, "dtype", None)
  embedder = getattr(model, "embedder")  # noqa: B009  (nnx.Module declares no attributes)
  return embedder.input_embedding[...], 0, getattr(embedder, "dtype", None)


def head_inputs(model: nnx.Module, hidden: jax.Array) -> tuple[jax.Array, jax.Array, int]:
  """``(hidden, table, vocab_axis)`` as the model's head multiplies them: both cast
  to the head's dtype (:func:`unembedding`)."""
  table, vocab_axis, dtype = unembedding(model)
  if dtype is not None:
    hidden, table = hidden.astype(dtype), table.astype(dtype)
  return hidden, table, vocab_axis


def _accepts(model: nnx.Module, name: str) -> bool:
  try:
    params = inspect.signature(model.__call__).parameters
  except (TypeError, ValueError):
    return False
  return name in params or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())


def hidden_states(model: nnx.Module, tokens: jax.Array, **kwargs: Any) -> jax.Array:
  """The final hidden states ``[B, T, D]`` (after the final norm) of ``model(tokens, **kwargs)``.

  Under ``jit`` the model's own logits are never computed: nothing reads them,
  so XLA removes the head's matmul.
  """
  if "output_hidden_states" in inspect.signature(model.__call__).parameters:
    call = nnx.capture(model, nnx.Intermediate)
    _, sown = call(tokens, **kwargs, output_hidden_states=True)
    hidden: Any = sown["all_hidden_states"]
  elif hasattr(model, "final_norm"):  # Llama 3 sows nothing: its final norm's output
    call = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)
    _, outputs = call(tokens, **kwargs)
    hidden = outputs["final_norm"]["__call__"]
  else:
    raise TypeError(
      f"{type(model).__name__} neither sows its hidden states (output_hidden_states=) nor "
      "has a final_norm to capture them from"
    )
  return hidden.get_value()[-1]


def _call(model: nnx.Module, tokens: jax.Array, **keywords: Any):
  """``ModelSpec.call`` for tunix models: logits ``[B, T, V]``, or with
  ``output_hidden_states=True`` the pair ``(hidden, unembed)``. Rows without
  packing keywords are one sequence each (positions from 0, causal mask)."""
  hidden = keywords.pop("output_hidden_states", False)
  if "positions" not in keywords:
    b, t = tokens.shape
    keywords["positions"] = jnp.broadcast_to(jnp.arange(t), (b, t))
    keywords["attention_mask"] = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
  keywords["cache"] = None
  if not hidden:
    return model(tokens, **keywords)[0]
  h, table, _ = head_inputs(model, hidden_states(model, tokens, **keywords))
  return h, table


def model_spec(model: nnx.Module) -> ModelSpec:
  """The :class:`~lpkernel.flax.ModelSpec` of a tunix causal LM (Qwen2, Qwen3,
  Llama 3, Gemma 3), for ``lpk.flax.score_model(model, ..., spec=model_spec(model))``:
  packed rows through ``positions`` and ``attention_mask``, ``fused=True``
  through its sown hidden states and its (tied or untied) unembedding."""
  _, vocab_axis, _ = unembedding(model)
  return ModelSpec(
    attention_mask="attention_mask",
    positions="positions",
    hidden="output_hidden_states",
    vocab_axis=vocab_axis,
    call=_call,
  )


def _temperature(temperature: float) -> float:
  """tunix divides the logits by the temperature unless it is 0 or 1."""
  return 1.0 if temperature in (0.0, 1.0) else temperature


def token_stats(
  model: nnx.Module,
  prompt_tokens: jax.Array,
  completion_tokens: jax.Array,
  pad_id: int,
  eos_id: int,
  *,
  segment_ids: jax.Array | None = None,
  segment_positions: jax.Array | None = None,
  temperature: float = 1.0,
  images: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """``(logprobs, entropy)`` per scored token, laid out as tunix lays them out.

  Unpacked: ``[B, completion_len]``, one per completion token. Packed
  (``segment_ids``): ``[B, L]`` over the whole row, position 0 set to 0.
  Both from one fused sweep over ``hidden @ unembed`` at tunix's temperature.
  """
  input_tokens, positions, attn_mask, input_seg_ids = common.process_ids(
    prompt_tokens, completion_tokens, pad_id, eos_id, segment_ids, segment_positions
  )
  kwargs: dict[str, Any] = {"positions": positions, "cache": None, "attention_mask": attn_mask}
  if _accepts(model, "segment_ids"):
    seg = segment_ids if segment_ids is not None else input_seg_ids
    if seg is not None:
      kwargs["segment_ids"] = seg
  if images is not None:
    kwargs["images"] = images
  hidden = hidden_states(model, input_tokens, **kwargs)
  keep = input_tokens.shape[1] - 1 if segment_ids is not None else completion_tokens.shape[1]
  rows, table, vocab_axis = head_inputs(model, hidden[:, -keep - 1 : -1])
  targets = input_tokens[:, -keep:]
  stats = fused_token_stats(
    rows, table, targets, temperature=_temperature(temperature), vocab_axis=vocab_axis
  )
  lp, entropy = stats.logprobs, stats.entropy
  if segment_ids is not None:  # tunix pads the first position so that lp[i] scores token[i]
    lp, entropy = (jnp.pad(x, ((0, 0), (1, 0))) for x in (lp, entropy))
  return lp, entropy


@functools.partial(
  jax.jit,
  static_argnames=(
    "pad_id",
    "eos_id",
    "stop_gradient",
    "return_logits",
    "temperature",
    "return_entropy",
  ),
)
def compute_per_token_logps(
  graphdef,
  state,
  prompt_tokens: jax.Array,
  completion_tokens: jax.Array,
  pad_id: int,
  eos_id: int,
  images: jax.Array | None = None,
  stop_gradient: bool = True,
  return_logits: bool = False,
  segment_ids: jax.Array | None = None,
  segment_positions: jax.Array | None = None,
  temperature: float = 1.0,
  return_entropy: bool = False,
):
  """``tunix.rl.common.compute_per_token_logps`` without the ``[B, T, V]`` logits.

  Same arguments and outputs: float32 ``[B, completion_len]`` (packed:
  ``[B, L]``) log-probabilities, and with ``return_entropy=True`` the
  per-token entropy as a second output (the logits are never built, so
  ``return_logits=True`` is refused: ask for the entropy instead).
  """
  if return_logits:
    raise ValueError(
      "lpkernel never builds the [B, T, V] logits: pass return_entropy=True for the entropy"
    )
  model = nnx.merge(graphdef, state)
  lp, entropy = token_stats(
    model,
    prompt_tokens,
    completion_tokens,
    pad_id,
    eos_id,
    segment_ids=segment_ids,
    segment_positions=segment_positions,
    temperature=temperature,
    images=images,
  )
  if stop_gradient:
    lp, entropy = jax.lax.stop_gradient((lp, entropy))
  return (lp, entropy) if return_entropy else lp


_TUNIX_COMPUTE_PER_TOKEN_LOGPS = common.compute_per_token_logps


def _routed(*args, return_logits: bool = False, **kwargs):
  if return_logits:  # a caller that reads the logits keeps tunix's own
    return _TUNIX_COMPUTE_PER_TOKEN_LOGPS(*args, return_logits=True, **kwargs)
  return compute_per_token_logps(*args, **kwargs)


def route_log_probabilities(enabled: bool = True) -> None:
  """Route tunix's own ``common.compute_per_token_logps`` calls (the reference,
  old-policy and rollout log-probabilities of ``RLCluster`` and the rollout
  workers) through :func:`compute_per_token_logps`; calls that ask for the
  logits keep tunix's. ``enabled=False`` restores tunix's function."""
  common.compute_per_token_logps = _routed if enabled else _TUNIX_COMPUTE_PER_TOKEN_LOGPS


def objective_from_config(algo_config: Any) -> PolicyObjective:
  """The :class:`~lpkernel.rl.PolicyObjective` a tunix ``GRPOConfig`` describes
  (tunix's ``"grpo"`` loss: log-ratio clamp 20, tunix metric keys)."""
  epsilon = algo_config.epsilon
  epsilon_high = getattr(algo_config, "epsilon_high", None)
  return PolicyObjective(
    epsilon=epsilon,
    epsilon_high=epsilon if epsilon_high is None else epsilon_high,
    epsilon_c=getattr(algo_config, "epsilon_c", None),
    ratio="gspo-token" if algo_config.loss_algo == "gspo-token" else "token",
    log_ratio_clamp=20.0,
    aggregation=algo_config.loss_agg_mode,
    beta=algo_config.beta or 0.0,
    kl=algo_config.kl_loss_mode,
    kl_clamp=getattr(algo_config, "kl_clamp_value", None),
    entropy_coef=getattr(algo_config, "entropy_coef", None) or 0.0,
    metrics="tunix",
  )


@function_registry.register_policy_loss_fn("lpkernel_grpo")
def grpo_loss_fn(model, train_example, algo_config, pad_id, eos_id, **kwargs):
  """tunix's ``"grpo"`` policy loss computed by lpkernel: ``(loss, aux)``.

  The same loss, gradients and aux keys as ``tunix.rl.algo_core.grpo_loss_fn``
  on the same ``TrainExample`` (packed rows included), from one fused sweep:
  no logits, with the entropy (``aux["entropy"]``) from the same pass.
  """
  del kwargs
  lp, entropy = token_stats(
    model,
    train_example.prompt_ids,
    train_example.completion_ids,
    pad_id,
    eos_id,
    segment_ids=getattr(train_example, "segment_ids", None),
    segment_positions=getattr(train_example, "segment_positions", None),
    temperature=getattr(algo_config, "temperature", 1.0),
  )
  ref = train_example.ref_per_token_logps
  objective = objective_from_config(algo_config)
  if ref is None and objective.beta:  # tunix skips the KL term without reference log-probs
    objective = dataclasses.replace(objective, beta=0.0)
  rollout = Rollout(
    mask=train_example.completion_mask,
    advantages=train_example.advantages,
    old_logprobs=train_example.old_per_token_logps,
    ref_logprobs=ref,
    is_weights=getattr(train_example, "sampler_is_weights", None),
  )
  return policy_loss(lp, rollout, objective, entropy=entropy)


__all__ = [
  "compute_per_token_logps",
  "grpo_loss_fn",
  "head_inputs",
  "hidden_states",
  "model_spec",
  "objective_from_config",
  "route_log_probabilities",
  "token_stats",
  "unembedding",
]
