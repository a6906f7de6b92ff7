"""The implementation contract of each op, as ``typing.Protocol`` classes.

An implementation is any object with these members: the registry
(:mod:`lpkernel.ops`) and the ops' entries (``ops/<op>/api.py``) accept it
without being edited, and a type checker verifies it against the protocol
(``mypy`` in the test suite, ``tests/test_types.py``). The numerics every
implementation shares live in :mod:`lpkernel.partials`; array shapes are in the
docstrings, ``N`` rows of a vocabulary block of ``Vb`` columns.

Optional capabilities are protocols of their own, checked with ``isinstance``:
a logits implementation gives each row's ``d temperature`` either from its
gradient pass (:class:`GradLogitsAndTau`) or from a separate pass
(:class:`CentredExpectedY`); a training loss runs in one pass where an
implementation offers ``loss_grads`` (:class:`LogitsLossGrads`,
:class:`FusedLossGrads`), else as its forward then its gradient.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax

from lpkernel.partials import Finished, LossRows, RowPartials

Array = jax.Array


@runtime_checkable
class LogitsImplementation(Protocol):
  """The logits op: rows of logits ``x [N, Vb]`` to row partials, and their gradient.

  Attributes:
    name: the registry name (``"xla"``, ``"pallas_gpu"``, ...).
    platforms: the backends it runs on, or None for every backend.
  """

  @property
  def name(self) -> str: ...

  @property
  def platforms(self) -> tuple[str, ...] | None: ...

  def partials(
    self, x: Array, targets: Array, tau: Array | None, softcap: float | None
  ) -> RowPartials:
    """The row partials of ``x`` (``targets`` int32[N], local to the block;
    ``tau`` float32[N] or None)."""
    ...

  def grad_logits(
    self,
    x: Array,
    targets: Array,
    tau: Array | None,
    softcap: float | None,
    shift: Array,
    log_s: Array,
    g: Array,
    g_lse: Array | None = None,
  ) -> Array:
    """``d x`` (in ``x``'s dtype) of ``g * lp + g_lse * lse`` from each row's
    finished ``shift`` and ``log_s`` (float32[N] each)."""
    ...


@runtime_checkable
class GradLogitsAndTau(Protocol):
  """A gradient pass that also sums each row's ``d tau`` (float32[N])."""

  def grad_logits_and_tau(
    self,
    x: Array,
    targets: Array,
    tau: Array,
    softcap: float | None,
    shift: Array,
    log_s: Array,
    g: Array,
    g_lse: Array | None = None,
  ) -> tuple[Array, Array]: ...


@runtime_checkable
class CentredExpectedY(Protocol):
  """``E_p[(z - shift) / tau]`` per row (float32[N]), for ``d tau``'s own pass."""

  def centred_expected_y(
    self, x: Array, tau: Array, softcap: float | None, shift: Array, log_s: Array
  ) -> Array: ...


@runtime_checkable
class LogitsLossGrads(Protocol):
  """A training loss's (per-row terms, ``d x``, ``d tau`` or None) in one pass, or
  None to decline (the loss then runs ``partials`` and ``grad_logits``)."""

  def loss_grads(
    self, x: Array, tau: Array | None, softcap: float | None, rows: LossRows
  ) -> tuple[Array, Array, Array | None] | None: ...


@runtime_checkable
class FusedImplementation(Protocol):
  """The fused op: hidden states ``h [N, D]`` and an unembedding block (``[D, Vb]``,
  or ``[Vb, D]`` with ``vocab_axis=0``) to row partials with the entropy's sum,
  and their gradients, never ``[N, V]`` logits.

  Attributes:
    name, platforms: as for :class:`LogitsImplementation`.
  """

  @property
  def name(self) -> str: ...

  @property
  def platforms(self) -> tuple[str, ...] | None: ...

  def partials(
    self,
    h: Array,
    w: Array,
    targets: Array,
    tau: Array | None,
    softcap: float | None,
    vocab_axis: int = 1,
  ) -> RowPartials: ...

  def grads(
    self,
    h: Array,
    w: Array,
    targets: Array,
    tau: Array | None,
    softcap: float | None,
    f: Finished,
    g: Any,
    vocab_axis: int = 1,
  ) -> tuple[Array, Array, Array | None]:
    """(d h float32[N, D], d w in w's layout and dtype, d tau float32[N] or None)
    from the rows' :class:`~lpkernel.partials.Finished` statistics and their
    cotangents ``g = (g_lp, g_lse, g_entropy)`` (float32[N] each or None)."""
    ...


@runtime_checkable
class FusedLossGrads(Protocol):
  """A training loss's (outputs, d h, d w, d tau or None) in one pass, or None to
  decline (the loss then runs ``partials`` and ``grads``)."""

  def loss_grads(
    self,
    h: Array,
    w: Array,
    tau: Array | None,
    softcap: float | None,
    rows: LossRows,
    out_init: Any,
    vocab_axis: int = 1,
  ) -> tuple[Any, Array, Array, Array | None] | None: ...


@runtime_checkable
class ProcessedImplementation(Protocol):
  """The processed op from logits (:func:`lpkernel.processed_token_stats`): the two
  passes over the logits ``x [N, Vb]`` (the first also takes each row's largest
  values, the candidates); the decisions and searches between them are shared
  (:mod:`lpkernel.ops.processed`).

  Attributes:
    name, platforms: as for :class:`LogitsImplementation`.
    lanes: how columns form groups: group ``j`` holds columns
      ``(j // lanes) * lanes * group + lanes * c + j % lanes`` (``c < group``);
      1 for contiguous groups, 128 for a TPU tile's lanes.
  """

  @property
  def name(self) -> str: ...

  @property
  def platforms(self) -> tuple[str, ...] | None: ...

  @property
  def lanes(self) -> int: ...

  def partials_and_candidates(
    self,
    x: Array,
    targets: Array,
    tau: Array | None,
    softcap: float | None,
    k: int,
    config: Any,
  ) -> tuple[RowPartials, Array]:
    """(the row partials of ``x``, float32[N, k]: each row's ``k`` largest capped
    logits, descending, as ``lax.top_k``'s), ``config`` a
    :class:`lpkernel.ProcessedConfig`. Each implementation chooses how;
    :func:`lpkernel.ops.processed.candidates.from_group_maxima` takes them from
    the maxima of groups of ``config.group`` columns (laid out as ``lanes``
    says) in one more read of the groups it chooses."""
    ...

  def processed_grads(
    self,
    x: Array,
    targets: Array,
    params: Any,
    kappa: Array,
    log_s: Array,
    log_sk: Array,
    g: Any,
    softcap: float | None,
    tau_grad: bool,
  ) -> tuple[Array, Array | None]:
    """(``d x`` in x's dtype, with ``tau_grad`` each row's ``d tau`` float32[N]
    else None) of the processed statistics, the kept set given by each row's
    threshold key ``kappa`` (uint32[N]) and ``params``
    (:class:`lpkernel.ops.processed.select.Params`); ``log_s``, ``log_sk`` the
    rows' log normaliser and kept mass; ``g`` the cotangents
    (:func:`lpkernel.ops.processed.grads.row_grads`)."""
    ...


@runtime_checkable
class ProcessedHidden(Protocol):
  """A processed implementation's passes from hidden states ``h [N, D]`` and an
  unembedding block (``[D, Vb]``, or ``[Vb, D]`` with ``vocab_axis=0``), for
  :func:`lpkernel.fused_processed_token_stats`; ``fused`` is the XLA sweep's
  tiling (:class:`lpkernel.FusedConfig`), ``h`` already in its dot dtype."""

  def hidden_partials_and_candidates(
    self,
    h: Array,
    w: Array,
    targets: Array,
    tau: Array | None,
    softcap: float | None,
    vocab_axis: int,
    precision: Any,
    k: int,
    config: Any,
    fused: Any,
  ) -> tuple[RowPartials, Array]:
    """As :meth:`ProcessedImplementation.partials_and_candidates` of ``h @ w``;
    :func:`lpkernel.ops.processed.candidates.from_hidden_record` takes the
    candidates from group maxima or from each group's few largest values (then
    gathering only the groups that may hold more of them)."""
    ...

  def hidden_processed_grads(
    self,
    h: Array,
    w: Array,
    targets: Array,
    params: Any,
    kappa: Array,
    log_s: Array,
    log_sk: Array,
    g: Any,
    softcap: float | None,
    vocab_axis: int,
    precision: Any,
    fused: Any,
    tau_grad: bool,
  ) -> tuple[Array, Array, Array | None]:
    """(d h float32 [N, D], d w in w's layout and dtype, d tau float32[N] or
    None), as :meth:`ProcessedImplementation.processed_grads` through ``h @ w``."""
    ...


@runtime_checkable
class ReplayRows(Protocol):
  """Optional on a processed implementation: the kept dot products of the replay
  from hidden states (:func:`lpkernel.fused_replay_token_logprobs`) and their
  gradients, from ``h [N, D]``, the table as rows ``w [V, D]`` and the kept ids
  ``ids int32[N, K]`` (``-1`` padded). Without it the replay runs XLA's steps
  (on the CPU its compiled kernels)."""

  def kept_dots(self, h: Array, w: Array, ids: Array) -> Array:
    """float32[N, K]: ``h[i] . w[ids[i, j]]``, anything where an id is outside ``[0, V)``."""
    ...

  def kept_grads(self, h: Array, w: Array, ids: Array, dx: Array) -> tuple[Array, Array]:
    """``(d h [N, D] in h's dtype, d w float32 [V, D])`` of :meth:`kept_dots` for
    ``dx float32 [N, K]``, 0 where an id is outside ``[0, V)``."""
    ...
