"""lm-evaluation-harness ``loglikelihood`` over ``(context, continuation)`` requests.

Each request becomes one packed segment ``context + continuation``, left-
truncated to the last ``max_length + 1`` tokens as lm-eval does; the
continuation is the response. Requests are sorted by length and packed
first-fit into fixed-length rows (one compiled shape), scored per segment, and
returned in request order.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from lpkernel.flax.adapters import score_model


def _window(context, continuation, max_length, prefix_token):
  context, continuation = list(context), list(continuation)
  if not continuation:
    raise ValueError("a request needs a non-empty continuation")
  if not context:
    if prefix_token is None:
      raise ValueError("empty context: pass prefix_token (e.g. BOS / end-of-text) to condition on")
    context = [prefix_token]
  if len(continuation) > max_length:
    raise ValueError(
      f"continuation of {len(continuation)} tokens is longer than {max_length=}: it would be cut"
    )
  return (context + continuation)[-(max_length + 1) :], len(continuation)


def pack_requests(windows: Sequence[tuple[list[int], int]], row_length: int, pack: bool = True):
  """First-fit packing of ``(tokens, continuation_length)`` into rows.

  Returns:
    rows: list of lists of request indices, and per-request (row, segment) places.
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


def loglikelihood(
  model,
  requests,
  *,
  max_length: int,
  batch_size: int = 8,
  prefix_token: int | None = None,
  pack: bool = True,
  pad_token: int = 0,
  fused: bool = False,
) -> list[tuple[float, bool]]:
  """``log Pr(continuation | context)`` and greedy flags, in request order.

  Args:
    model: an ``nnx.Module`` (or callable) returning logits or ``(hidden, unembed)``
      for ``tokens [B, max_length + 1]``; it gets ``segment_ids`` / ``positions``.
    requests: list of ``(context_tokens, continuation_tokens)``.
    max_length: the model's window; each request keeps its last
      ``max_length + 1`` tokens (the first one only conditions).
    batch_size: rows per model call.
    prefix_token: conditioning token for requests with an empty context.
    pack: pack several requests per row (else one per row); results are equal.
    fused: score from hidden states without logits.

  Returns:
    ``[(logprob, is_greedy), ...]``.

  Raises:
    ValueError: empty context without ``prefix_token``; a continuation longer
      than ``max_length``; an empty continuation.
  """
  windows = [_window(c, y, max_length, prefix_token) for c, y in requests]
  row_length = max_length + 1
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

  graphdef, state = nnx.split(model) if isinstance(model, nnx.Module) else (None, None)

  @jax.jit
  def run(state, tokens, response, seg):
    m = model if graphdef is None else nnx.merge(graphdef, state)
    s = score_model(m, tokens, response, segment_ids=seg, num_segments=num_segments, fused=fused)
    return s.response_logprob, s.response_greedy

  logprob = np.zeros((n_rows, num_segments), np.float32)
  greedy = np.zeros((n_rows, num_segments), bool)
  for b in range(0, n_rows, batch_size):
    sl = slice(b, b + batch_size)
    lp, gr = run(state, tokens[sl], response[sl], seg[sl])
    logprob[sl], greedy[sl] = np.asarray(lp), np.asarray(gr)
  return [(float(logprob[place[i]]), bool(greedy[place[i]])) for i in range(len(requests))]
