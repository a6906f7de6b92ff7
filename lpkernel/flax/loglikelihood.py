"""lm-evaluation-harness ``loglikelihood`` over ``(context, continuation)`` requests.

Each request becomes ``context + continuation`` cut to its last
``max_length + 1`` tokens, exactly as lm-eval does; the model is fed all but the
last of them (at most ``max_length`` tokens) and the continuation is scored.
Requests are sorted by length and packed first-fit into fixed-length rows (one
compiled shape) when the model can see packing (it takes both ``segment_ids``
and ``positions``), else placed one per row; scored per segment and returned
in request order. ``is_greedy`` is lm-eval's rule: every continuation token is
the *first* argmax of its row.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lpkernel.flax.adapters import model_kwargs, scores_from_output


def _named_parameters(fn) -> set[str]:
  """Parameters a callable names explicitly (``**kwargs`` declares nothing)."""
  try:
    return set(inspect.signature(fn).parameters)
  except (TypeError, ValueError):
    return set()


def can_pack(model: Callable) -> bool:
  """A model sees packed rows correctly only if it takes both ``segment_ids``
  (to mask attention across sequences) and ``positions`` (restarting per sequence)."""
  return {"segment_ids", "positions"} <= _named_parameters(model)


def _ids(name: str, ids, vocab_size: int | None) -> list[int]:
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


@functools.partial(
  jax.jit, static_argnames=("graphdef", "model_fn", "num_segments", "fused", "packed")
)
def _score_rows(state, tokens, response, seg, *, graphdef, model_fn, num_segments, fused, packed):
  """Per-segment ``(log Pr(continuation | context), greedy)`` of packed rows.

  The model sees ``tokens[:, :-1]`` (at most ``max_length`` tokens); its output
  row ``t`` predicts token ``t + 1``. Built once per (model structure, shapes):
  calls with new requests reuse the compiled program.
  """
  model = model_fn if graphdef is None else nnx.merge(graphdef, state)
  inputs_seg = seg[:, :-1] if packed else None
  out = model(tokens[:, :-1], **model_kwargs(model, inputs_seg, fused))
  s = scores_from_output(
    out, tokens, response, segment_ids=seg, num_segments=num_segments, drops_last=True
  )
  return s.response_logprob, s.response_greedy


def _vocab_size(model, graphdef, state, row_length, fused, packed) -> int:
  """V from the model's output shape (traced, not run)."""
  model_fn = None if graphdef is not None else model
  tokens = jax.ShapeDtypeStruct((1, row_length), jnp.int32)
  seg = jax.ShapeDtypeStruct((1, row_length), jnp.int32)

  def output(state, tokens, seg):
    m = model_fn if graphdef is None else nnx.merge(graphdef, state)
    return m(tokens[:, :-1], **model_kwargs(m, seg[:, :-1] if packed else None, fused))

  out = jax.eval_shape(output, state, tokens, seg)
  if isinstance(out, tuple):  # (hidden, unembed)
    return int(out[1].shape[-1])
  logits = getattr(out, "logits", out)
  return int(logits.shape[-1])


def loglikelihood(
  model: Callable,
  requests: Iterable[tuple[Sequence[int], Sequence[int]]],
  *,
  max_length: int,
  batch_size: int = 8,
  prefix_token: int | None = None,
  pack: bool | None = None,
  pad_token: int = 0,
  fused: bool = False,
) -> list[tuple[float, bool]]:
  """``log Pr(continuation | context)`` and greedy flags, in request order, as lm-eval.

  Args:
    model: an ``nnx.Module`` (or callable) returning logits or ``(hidden, unembed)``
      for ``tokens [B, L]`` with ``L <= max_length``.
    requests: list of ``(context_tokens, continuation_tokens)`` (integer ids).
    max_length: the model's window: each request keeps its last
      ``max_length + 1`` tokens, of which the model is fed all but the last.
    batch_size: rows per model call (at least 1).
    prefix_token: conditioning token for requests with an empty context (as
      lm-eval, a continuation starting with it conditions on that token).
    pack: pack several requests per row; None packs exactly when the model can
      see packing (:func:`can_pack`); True with a model that cannot raises.
    fused: score from hidden states without logits.

  Returns:
    ``[(logprob, is_greedy), ...]``; ``[]`` for no requests.

  Raises:
    ValueError: empty context without ``prefix_token``; a continuation longer
      than ``max_length``; an empty continuation; ids outside ``[0, V)``;
      ``batch_size < 1``; ``pack=True`` for a model that cannot see packing.
    TypeError: non-integer ids.
  """
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r} must be a positive int")
  if pack is None:
    pack = can_pack(model)
  elif pack and not can_pack(model):
    raise ValueError(
      "pack=True needs a model that takes segment_ids and positions; this one would let "
      "packed requests attend to each other"
    )
  requests = list(requests)
  if not requests:
    return []
  graphdef, state = nnx.split(model) if isinstance(model, nnx.Module) else (None, None)
  row_length = max_length + 1
  vocab_size = _vocab_size(model, graphdef, state, row_length, fused, pack)
  if prefix_token is not None:
    _ids("prefix_token", [prefix_token], vocab_size)
  windows = [_window(c, y, max_length, prefix_token, vocab_size) for c, y in requests]
  rows = pack_requests(windows, row_length, pack)
  num_segments = max(len(r) for r in rows)
  num_segments = 1 << (num_segments - 1).bit_length()  # few distinct compiled shapes
  n_rows = -(-len(rows) // batch_size) * batch_size
  tokens = np.full((n_rows, row_length), pad_token, np.int32)
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
    _score_rows,
    graphdef=graphdef,
    model_fn=None if graphdef is not None else model,
    num_segments=num_segments,
    fused=fused,
    packed=pack,
  )
  logprob = np.zeros((n_rows, num_segments), np.float32)
  greedy = np.zeros((n_rows, num_segments), bool)
  for b in range(0, n_rows, batch_size):
    sl = slice(b, b + batch_size)
    lp, gr = run(state, tokens[sl], response[sl], seg[sl])
    logprob[sl], greedy[sl] = np.asarray(lp), np.asarray(gr)
  return [(float(logprob[place[i]]), bool(greedy[place[i]])) for i in range(len(requests))]
