"""Implementations of lpkernel's ops, behind one seam.

Per op (``ops/<op>/``: ``api.py`` the public entry, ``reference.py`` plain
``jnp``), implementation objects that satisfy the op's protocol
(:mod:`lpkernel.ops.base`) on the kernel contract of ``lpkernel.partials``:

* logits path (``token_logprobs``, ``score``): :class:`XlaLogits`,
  :class:`PallasGpuLogits`, :class:`PallasTpuLogits`;
* fused path (``fused_token_stats``, ``score_hidden``): :class:`XlaFused`,
  :class:`PallasGpuFused`, :class:`PallasTpuFused`;
* processed path from logits (``processed_token_stats``, ``score(sampling=)``):
  :class:`XlaProcessed`, :class:`PallasGpuProcessed`, :class:`PallasTpuProcessed`
  (both opt-in); replay from hidden states (``fused_replay_token_logprobs``)
  takes the same objects, and runs an object's own kernels where it has
  :class:`~lpkernel.ops.base.ReplayRows`' two methods (the GPU's).

Each is held to the reference, values and gradients, by
``tests/test_implementations.py`` (against the float64 oracle too, Pallas in
interpret mode, and lowered for its hardware), ``tests/test_policy.py`` (the
bad-input and numerics policy) and ``tests/test_sharding.py`` (on each
vocabulary shard).

An implementation whose code JAX differentiates exactly at any order declares
``differentiable = True`` (the XLA ones); the ops' custom-VJP rules that run any
other (a Pallas kernel has no derivative) take the XLA implementation's
derivatives, so second derivatives are exact everywhere
(:mod:`lpkernel.ops.higher_order`).

An implementation may also provide ``loss_grads``, which writes a training
loss's gradients in the forward pass (:func:`lpkernel.fused_nll_loss`,
:func:`lpkernel.nll_loss`; the rows' cotangents come through
:class:`lpkernel.partials.LossRows`); without it, or when it declines, the loss
runs ``partials`` then ``grads`` (``grad_logits`` on the logits path). A logits
implementation may provide ``grad_logits_and_tau`` (``d x`` and each row's
``d temperature`` from one pass over ``x``: the Pallas kernels); without it an
array temperature's gradient takes its own pass (``centred_expected_y``).

A public entry's ``implementation=`` takes None (the measured best for the
backend), a name, one of these objects (with its tiling and, for Pallas,
``interpret=True`` to run on the CPU), or any object satisfying the op's
protocol (a new implementation needs no edit here). A named implementation that cannot run
on this backend raises ``ValueError``; nothing falls back silently.
"""

from __future__ import annotations

import jax

from lpkernel.ops.base import CentredExpectedY, GradLogitsAndTau
from lpkernel.ops.base import FusedImplementation as FusedImplementation
from lpkernel.ops.base import LogitsImplementation as LogitsImplementation
from lpkernel.ops.base import ProcessedImplementation as ProcessedImplementation
from lpkernel.ops.fused.pallas_gpu import PallasGpuFused as PallasGpuFused
from lpkernel.ops.fused.pallas_tpu import PallasTpuFused as PallasTpuFused
from lpkernel.ops.fused.xla import FusedConfig as FusedConfig
from lpkernel.ops.fused.xla import XlaFused as XlaFused
from lpkernel.ops.logprobs.pallas_gpu import PallasGpuLogits as PallasGpuLogits
from lpkernel.ops.logprobs.pallas_tpu import PallasTpuLogits as PallasTpuLogits
from lpkernel.ops.logprobs.xla import ChunkConfig as ChunkConfig
from lpkernel.ops.logprobs.xla import XlaLogits as XlaLogits
from lpkernel.ops.processed.pallas_gpu import PallasGpuProcessed as PallasGpuProcessed
from lpkernel.ops.processed.pallas_tpu import PallasTpuProcessed as PallasTpuProcessed
from lpkernel.ops.processed.xla import XlaProcessed as XlaProcessed

REFERENCE = "reference"

LOGITS: dict[str, type[LogitsImplementation]] = {
  "xla": XlaLogits,
  "pallas_gpu": PallasGpuLogits,
  "pallas_tpu": PallasTpuLogits,
}
FUSED: dict[str, type[FusedImplementation]] = {
  "xla": XlaFused,
  "pallas_gpu": PallasGpuFused,
  "pallas_tpu": PallasTpuFused,
}
PROCESSED: dict[str, type[ProcessedImplementation]] = {
  "xla": XlaProcessed,
  "pallas_gpu": PallasGpuProcessed,
  "pallas_tpu": PallasTpuProcessed,
}

# The measured best per backend: on an H200 (jax 0.11.2) the Pallas kernels beat
# XLA on every measured shape, forward and backward; on TPUs the kernels are
# unmeasured, so XLA stays the default.
DEFAULT_LOGITS = {"cpu": "xla", "gpu": "pallas_gpu", "tpu": "xla"}
DEFAULT_FUSED = {"cpu": "xla", "gpu": "xla", "tpu": "xla"}
# The processed kernels are unmeasured on a GPU: opt-in.
DEFAULT_PROCESSED = {"cpu": "xla", "gpu": "xla", "tpu": "xla"}

__all__ = [
  "ChunkConfig",
  "FusedImplementation",
  "LogitsImplementation",
  "FusedConfig",
  "PallasGpuFused",
  "PallasGpuLogits",
  "PallasGpuProcessed",
  "PallasTpuFused",
  "PallasTpuLogits",
  "PallasTpuProcessed",
  "ProcessedImplementation",
  "XlaFused",
  "XlaLogits",
  "XlaProcessed",
  "fused_implementation",
  "is_reference",
  "logits_implementation",
  "processed_implementation",
]


def is_reference(implementation: object) -> bool:
  return isinstance(implementation, str) and implementation == REFERENCE


_ENTRIES = {
  "logits": "token_logprobs, score, nll_loss, sft_loss_logits",
  "fused": "fused_token_stats, fused_token_logprobs, score_hidden, fused_nll_loss, sft_loss_hidden",
  "processed": "processed_token_stats, score(sampling=...)",
}


_PROTOCOLS = {
  "logits": LogitsImplementation,
  "fused": FusedImplementation,
  "processed": ProcessedImplementation,
}


def _check_op(implementation, registry, op: str) -> None:
  """TypeError for an object that does not satisfy ``op``'s protocol, saying which
  op takes which (the other op's objects have other methods)."""
  if implementation is None or isinstance(implementation, (str, _PROTOCOLS[op])):
    if op == "logits" and not isinstance(implementation, (type(None), str)):
      _check_temperature_grad(implementation)
    return
  others = [o for o, p in _PROTOCOLS.items() if o != op and isinstance(implementation, p)]
  what = f"a {others[0]} implementation" if others else "not one"
  names = ", ".join(c.__name__ for c in registry.values())
  raise TypeError(
    f"implementation={type(implementation).__name__}(...) is {what}: the {op} op "
    f"({_ENTRIES[op]}) takes {names}, a name, None or an object satisfying "
    f"lpkernel.ops.base.{_PROTOCOLS[op].__name__}"
    + "".join(f"; {o} implementations go to {_ENTRIES[o]}" for o in others)
  )


def _check_temperature_grad(implementation) -> None:
  """A logits implementation must give each row's ``d temperature`` one way or the other."""
  if not isinstance(implementation, (GradLogitsAndTau, CentredExpectedY)):
    raise TypeError(
      f"implementation={type(implementation).__name__}(...) has neither "
      "grad_logits_and_tau nor centred_expected_y (lpkernel.ops.base): a temperature's "
      "gradient needs one"
    )


def _resolve(implementation, registry, defaults, op: str, like=None):
  _check_op(implementation, registry, op)
  backend = jax.default_backend()
  if implementation is None:
    implementation = defaults.get(backend, "xla")
  if isinstance(implementation, str):
    if implementation not in registry:
      names = sorted([*registry, REFERENCE])
      raise ValueError(f"unknown {op} implementation {implementation!r}; choose one of {names}")
    cls = registry[implementation]
    # A name is configured for the call's shape and dtype on this machine
    # (heuristics, then the tuned table: lpkernel.ops.tuning); an object is used as given.
    if like is None:
      implementation = cls()
    else:
      implementation = cls.config_for(like[0], like[1], backend)
    # A name resolves on this process's backend: one it cannot run on raises here.
    # An object is the caller's: it may be lowered for another platform (jax.export,
    # an AOT compile for a GPU or TPU on a CPU host), and run where it cannot, Pallas
    # itself refuses it when the program is compiled.
    platforms = getattr(implementation, "platforms", None)
    if platforms is not None and backend not in platforms and not implementation.interpret:
      raise ValueError(
        f"the {implementation.name!r} {op} implementation runs on {list(platforms)}, "
        f"not on this {backend!r} backend (pass an implementation with interpret=True "
        f"to run it in Pallas interpret mode, or the object itself to lower it for its "
        f"platform)"
      )
  return implementation


def logits_implementation(
  implementation: str | LogitsImplementation | None = None, like=None
) -> LogitsImplementation:
  """The logits implementation object for ``implementation`` on this backend;
  ``like``: ``(shape, dtype)`` of the logits rows ``[N, V]`` a name is configured for."""
  return _resolve(implementation, LOGITS, DEFAULT_LOGITS, "logits", like)


def fused_implementation(
  implementation: str | FusedImplementation | None = None, like=None
) -> FusedImplementation:
  """The fused implementation object for ``implementation`` on this backend;
  ``like``: ``((N, D, V), dtype)`` of the matmul a name is configured for."""
  return _resolve(implementation, FUSED, DEFAULT_FUSED, "fused", like)


def processed_implementation(
  implementation: str | ProcessedImplementation | None = None,
) -> ProcessedImplementation:
  """The processed implementation object for ``implementation`` on this backend."""
  return _resolve(implementation, PROCESSED, DEFAULT_PROCESSED, "processed")
