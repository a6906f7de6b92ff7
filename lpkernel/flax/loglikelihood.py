"""lm-evaluation-harness ``loglikelihood`` and ``loglikelihood_rolling`` on token ids.

Each request becomes ``context + continuation`` cut to its last
``max_length + 1`` tokens, exactly as lm-eval does; the model is fed all but the
last of them (at most ``max_length`` tokens) and the continuation is scored.
Requests are grouped by length into rows of a few widths (the model sees a
power of two of tokens, at most ``max_length``: :func:`row_width`), packed
first-fit within a width when the model's :class:`~lpkernel.flax.ModelSpec`
declares how it keeps sequences apart, else placed one per row; scored per
segment and returned in request order. ``is_greedy`` is lm-eval's rule: every continuation
token is the *first* argmax of its row. Rolling log-likelihoods cut documents
into lm-eval's disjoint windows and score them the same way.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lpkernel.flax.adapters import BoundModel, run_model, scores_from_output
from lpkernel.flax.spec import ModelSpec


def _ids(name: str, ids, vocab_size: int | None) -> list[int]:
  if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
    raise TypeError(f"{name} must be a sequence of token ids, got {type(ids).__name__} {ids!r:.40}")
  arr = np.asarray(list(ids))
  if arr.size and not np.issubdtype(arr.dtype, np.integer):
    raise TypeError(f"{name} must hold integer token ids, got {arr.dtype} ({list(ids)[:4]}...)")
  out = [int(i) for i in arr.tolist()]
  if vocab_size is not None:
    bad = [i for i in out if not 0 <= i < vocab_size]
    if bad:
      raise ValueError(f"{name} holds ids outside [0, {vocab_size}): {bad[:4]}")
  return out


def _window(context, continuation, max_length, prefix_token, vocab_size):
  """lm-eval's window: (tokens, continuation length), the tokens' last ``max_length + 1``."""
  context = _ids("context", context, vocab_size)
  continuation = _ids("continuation", continuation, vocab_size)
  if not continuation:
    raise ValueError("a request needs a non-empty continuation")
  if not context:
    if prefix_token is None:
      raise ValueError("empty context: pass prefix_token (e.g. BOS / end-of-text) to condition on")
    # lm-eval: a continuation that already starts with the prefix token conditions on it.
    if continuation[0] == prefix_token and len(continuation) > 1:
      context, continuation = continuation[:1], continuation[1:]
    else:
      context = [prefix_token]
  if len(continuation) > max_length:
    raise ValueError(
      f"continuation of {len(continuation)} tokens is longer than {max_length=}: it would be cut"
    )
  return (context + continuation)[-(max_length + 1) :], len(continuation)


def pack_requests(windows: Sequence[tuple[list[int], int]], row_length: int, pack: bool = True):
  """First-fit packing of ``(tokens, continuation_length)`` into rows (longest first).

  Returns:
    list of rows, each a list of request indices.
  """
  order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
  rows: list[list[int]] = []
  free: list[int] = []
  for i in order:
    n = len(windows[i][0])
    slot = next((r for r, room in enumerate(free) if room >= n), None) if pack else None
    if slot is None:
      rows.append([])
      free.append(row_length)
      slot = len(rows) - 1
    rows[slot].append(i)
    free[slot] -= n
  return rows


@functools.partial(jax.jit, static_argnames=("bound", "num_segments", "fused", "packed"))
def _score_rows(state, tokens, response, seg, *, bound, num_segments, fused, packed):
  """Per-segment ``(log Pr(continuation | context), greedy)`` of packed rows.

  The model sees ``tokens[:, :-1]`` (at most ``max_length`` tokens); its output
  row ``t`` predicts token ``t + 1``. Built once per (model structure, shapes):
  calls with new requests reuse the compiled program.
  """
  out, kwargs = run_model(bound, state, tokens[:, :-1], seg[:, :-1] if packed else None, fused, {})
  kwargs.pop("segment_ids")
  s = scores_from_output(
    out, tokens, response, drops_last=True, segment_ids=seg, num_segments=num_segments, **kwargs
  )
  return s.response_logprob, s.response_greedy


def _vocab_size(bound: BoundModel, state, row_length: int, fused: bool, packed: bool) -> int:
  """V from the model's output shape (traced, not run)."""
  tokens = jax.ShapeDtypeStruct((1, row_length - 1), jnp.int32)
  seg = tokens if packed else None
  out = jax.eval_shape(
    lambda state, tokens, seg: bound.output(state, tokens, seg, fused)[0], state, tokens, seg
  )
  if isinstance(out, tuple):  # (hidden, unembed)
    return int(out[1].shape[bound.spec.vocab_axis])
  return int(out.shape[-1])


AUTO_BATCH_TOKENS = 16384
"""Tokens per model call under ``batch_size="auto"``: rows of each width get
``AUTO_BATCH_TOKENS // width`` of them (at least one)."""


def row_width(n_tokens: int, max_length: int) -> int:
  """The row width for a window of ``n_tokens``: the model sees ``width - 1``
  tokens, a power of two (at least 8) covering the window, at most ``max_length``.

  Requests are scored in rows of their own width, so the work follows the
  requests (a 10-token request is not a ``max_length`` forward) while only a
  few shapes are compiled (one per power of two).
  """
  seen = max(n_tokens - 1, 1)
  return min(max(8, 1 << (seen - 1).bit_length()), max_length) + 1


def parse_batch_size(batch_size: int | str | None) -> int | None:
  """A positive int, or None for lm-eval's ``"auto"`` / ``"auto:N"`` (rows per
  call from :data:`AUTO_BATCH_TOKENS`)."""
  if isinstance(batch_size, str):
    if batch_size == "auto" or batch_size.startswith("auto:"):
      return None
    if batch_size.isdigit():
      batch_size = int(batch_size)
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f'batch_size={batch_size!r} must be a positive int, "auto" or "auto:N"')
  return batch_size


@dataclasses.dataclass(frozen=True)
class Scorer:
  """A model bound for lm-eval-style requests: window ``max_length``, requests
  scored in rows of a few widths (:func:`row_width`), packed or not.

  Build it with :meth:`of`; :func:`loglikelihood`, :func:`loglikelihood_rolling`
  and the lm-eval backend share it, so a model is split and traced once.

  Attributes:
    batch_size: most rows per model call; None: ``AUTO_BATCH_TOKENS // width``.
  """

  bound: BoundModel
  state: Any
  max_length: int
  batch_size: int | None
  pack: bool
  fused: bool
  pad_token: int
  vocab_size: int

  @staticmethod
  def of(
    model: Any,
    *,
    max_length: int | None,
    variables: Any = None,
    spec: ModelSpec | None = None,
    batch_size: int | str | None = 8,
    pack: bool | None = None,
    pad_token: int = 0,
    fused: bool = False,
  ) -> Scorer:
    """Binds ``model``; ``max_length`` None takes the spec's declared window
    (``ModelSpec.max_length``) and raises when it declares none."""
    batch_size = parse_batch_size(batch_size)
    bound, state = BoundModel.of(model, variables, spec)
    if max_length is None:
      max_length = bound.spec.max_length_of(*bound.module_and_variables(state))
    if max_length is None:
      raise ValueError(
        "max_length is required: the model's ModelSpec declares none (ModelSpec(max_length=...)); "
        "pass the model's context window as max_length="
      )
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
      raise ValueError(f"max_length={max_length!r} must be a positive int")
    if pack is None:
      pack = bound.spec.packs
    elif pack and not bound.spec.packs:
      raise ValueError(
        "pack=True needs a model whose spec declares how it keeps packed sequences apart "
        "(positions= and segment_ids= or attention_mask=); this one would let packed "
        "requests attend to each other"
      )
    vocab_size = _vocab_size(bound, state, max_length + 1, fused, pack)
    _ids("pad_token", [pad_token], vocab_size)
    return Scorer(bound, state, max_length, batch_size, pack, fused, pad_token, vocab_size)

  def window(self, context, continuation, prefix_token=None) -> tuple[list[int], int]:
    """lm-eval's window of one request: (its last ``max_length + 1`` tokens,
    continuation length)."""
    return _window(context, continuation, self.max_length, prefix_token, self.vocab_size)

  def score_windows(self, windows: Sequence[tuple[list[int], int]]) -> list[tuple[float, bool]]:
    """``(log Pr(last n tokens | the rest), greedy)`` of each ``(tokens, n)``, in order."""
    by_width: dict[int, list[int]] = {}
    for i, (tokens, _) in enumerate(windows):
      by_width.setdefault(row_width(len(tokens), self.max_length), []).append(i)
    results: list[tuple[float, bool]] = [(0.0, False)] * len(windows)
    for width, members in sorted(by_width.items()):
      scored = self._score_rows_of_width([windows[i] for i in members], width)
      for i, result in zip(members, scored, strict=True):
        results[i] = result
    return results

  def _score_rows_of_width(self, windows, row_length: int) -> list[tuple[float, bool]]:
    rows = pack_requests(windows, row_length, self.pack)
    num_segments = max(len(r) for r in rows)
    num_segments = 1 << (num_segments - 1).bit_length()  # few distinct compiled shapes
    per_call = self.batch_size or max(1, AUTO_BATCH_TOKENS // row_length)
    per_call = min(per_call, 1 << (len(rows) - 1).bit_length())  # no call of padding rows
    n_rows = -(-len(rows) // per_call) * per_call
    tokens = np.full((n_rows, row_length), self.pad_token, np.int32)
    seg = np.zeros((n_rows, row_length), np.int32)
    response = np.zeros((n_rows, row_length), bool)
    place = {}
    for r, members in enumerate(rows):
      pos = 0
      for s, i in enumerate(members, start=1):
        toks, n_cont = windows[i]
        tokens[r, pos : pos + len(toks)] = toks
        seg[r, pos : pos + len(toks)] = s
        response[r, pos + len(toks) - n_cont : pos + len(toks)] = True
        place[i] = (r, s - 1)
        pos += len(toks)
    run = functools.partial(
      _score_rows, bound=self.bound, num_segments=num_segments, fused=self.fused, packed=self.pack
    )
    logprob = np.zeros((n_rows, num_segments), np.float32)
    greedy = np.zeros((n_rows, num_segments), bool)
    for b in range(0, n_rows, per_call):
      sl = slice(b, b + per_call)
      lp, gr = run(self.state, tokens[sl], response[sl], seg[sl])
      logprob[sl], greedy[sl] = np.asarray(lp), np.asarray(gr)
    return [(float(logprob[place[i]]), bool(greedy[place[i]])) for i in range(len(windows))]

  def loglikelihood(self, requests, prefix_token=None) -> list[tuple[float, bool]]:
    """As :func:`loglikelihood`."""
    if prefix_token is not None:
      _ids("prefix_token", [prefix_token], self.vocab_size)
    return self.score_windows([self.window(c, y, prefix_token) for c, y in requests])

  def loglikelihood_rolling(self, documents, prefix_token: int) -> list[float]:
    """As :func:`loglikelihood_rolling`."""
    _ids("prefix_token", [prefix_token], self.vocab_size)
    documents = list(documents)
    windows, owner = [], []
    for d, doc in enumerate(documents):
      if isinstance(doc, (int, np.integer)):
        raise TypeError(
          f"documents must be a list of documents, each a sequence of token ids; "
          f"documents[{d}] is the int {doc} (for one document, pass [[...]])"
        )
      doc = _ids(f"documents[{d}]", doc, self.vocab_size)
      # Ids are checked once, above; each window is exactly context + piece.
      for context, continuation in rolling_windows(doc, prefix_token, self.max_length):
        windows.append((context + continuation, len(continuation)))
        owner.append(d)
    totals = [0.0] * len(documents)
    for d, (lp, _) in zip(owner, self.score_windows(windows), strict=True):
      totals[d] += lp
    return totals


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_length: int):
  """lm-eval's disjoint rolling windows of a document, as ``(context, continuation)``.

  The document is cut into consecutive pieces of ``max_length`` tokens; each
  piece is a continuation whose context is the ``prefix_token`` (first piece)
  or the tokens just before it, so that context and piece fill one window of
  ``max_length + 1`` tokens (``get_rolling_token_windows`` with
  ``context_len=1``, then ``make_disjoint_window``). Every token is predicted
  exactly once.
  """
  tokens = list(tokens)
  out = []
  for start in range(0, len(tokens), max_length):
    end = min(start + max_length, len(tokens))
    context = [prefix_token] if start == 0 else tokens[max(0, end - max_length - 1) : start]
    out.append((context, tokens[start:end]))
  return out


def loglikelihood(
  model: Callable,
  requests: Iterable[tuple[Sequence[int], Sequence[int]]],
  *,
  max_length: int,
  variables: Any = None,
  spec: ModelSpec | None = None,
  batch_size: int | str = 8,
  prefix_token: int | None = None,
  pack: bool | None = None,
  pad_token: int = 0,
  fused: bool = False,
) -> list[tuple[float, bool]]:
  """``log Pr(continuation | context)`` and greedy flags, in request order, as lm-eval.

  Args:
    model: an ``nnx.Module`` or callable ``model(tokens, ...)``, or with
      ``variables`` a linen module (or its ``apply``), returning what its
      ``spec`` declares, for ``tokens [B, L]`` with ``L <= max_length``.
    requests: list of ``(context_tokens, continuation_tokens)`` (integer ids).
    max_length: the model's window: each request keeps its last
      ``max_length + 1`` tokens, of which the model is fed all but the last.
    variables: a linen model's variables.
    spec: how the model takes packing and what it returns
      (:class:`~lpkernel.flax.ModelSpec`; None: the model's ``lpkernel_spec``).
    batch_size: most rows per model call (at least 1), or lm-eval's ``"auto"``
      (``"auto:N"`` alike): ``AUTO_BATCH_TOKENS // width`` rows per call.
    prefix_token: conditioning token for requests with an empty context (as
      lm-eval, a continuation starting with it conditions on that token).
    pack: pack several requests per row; None packs exactly when the spec
      declares how the model keeps sequences apart; True without that raises.
    pad_token: the id that fills rows past their requests (never scored).
    fused: score from hidden states without logits.

  Returns:
    ``[(logprob, is_greedy), ...]``; ``[]`` for no requests.

  Raises:
    ValueError: empty context without ``prefix_token``; a continuation longer
      than ``max_length``; an empty continuation; ids outside ``[0, V)``;
      ``batch_size < 1``; ``pack=True`` for a model that cannot see packing.
    TypeError: non-integer ids.
  """
  scorer = Scorer.of(
    model,
    max_length=max_length,
    variables=variables,
    spec=spec,
    batch_size=batch_size,
    pack=pack,
    pad_token=pad_token,
    fused=fused,
  )
  return scorer.loglikelihood(list(requests), prefix_token)


def loglikelihood_rolling(
  model: Callable,
  documents: Iterable[Sequence[int]],
  *,
  max_length: int,
  prefix_token: int,
  variables: Any = None,
  spec: ModelSpec | None = None,
  batch_size: int | str = 8,
  pack: bool | None = None,
  pad_token: int = 0,
  fused: bool = False,
) -> list[float]:
  """``log Pr(document)`` of each document, window by window, as lm-eval's
  ``loglikelihood_rolling`` (perplexity tasks).

  Each document is cut into :func:`rolling_windows`; the windows of all the
  documents are scored together (packed when the model can see packing) and
  summed per document. ``prefix_token`` (BOS / end-of-text) conditions the
  first token. Arguments as for :func:`loglikelihood`.

  Returns:
    one float per document (0.0 for an empty one).
  """
  scorer = Scorer.of(
    model,
    max_length=max_length,
    variables=variables,
    spec=spec,
    batch_size=batch_size,
    pack=pack,
    pad_token=pad_token,
    fused=fused,
  )
  return scorer.loglikelihood_rolling(documents, prefix_token)
