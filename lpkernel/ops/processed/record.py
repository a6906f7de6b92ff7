"""The record the sweep from hidden states keeps: each group's few largest values.

The ``K`` largest values of a row are read from it (exactly, where no group
holds more of them than it recorded), so only a few groups' unembedding rows
are gathered (:func:`lpkernel.ops.processed.candidates.from_hidden_record`). Shared by the
XLA sweep and the Pallas GPU chunks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def merge_tops(a: list[jax.Array], b: list[jax.Array], c: int) -> list[jax.Array]:
  """The ``c`` largest of two descending lists of values (elementwise arrays):
  the ``r``-th is the best split of ``r + 1`` values between the lists,
  ``max_i min(a[i - 1], b[r - i])`` (a list's ``[-1]`` unbounded)."""

  def split(i, r):
    if i == 0:
      return b[r] if r < len(b) else None
    if r - i < 0:
      return a[i - 1] if i - 1 < len(a) else None
    if i - 1 >= len(a) or r - i >= len(b):
      return None
    return jnp.minimum(a[i - 1], b[r - i])

  out = []
  for r in range(min(c, len(a) + len(b))):
    terms = [t for t in (split(i, r) for i in range(r + 2)) if t is not None]
    best = terms[0]
    for t in terms[1:]:
      best = jnp.maximum(best, t)
    out.append(best)
  return out


def group_tops(z: jax.Array, group: int, c: int) -> jax.Array:
  """``[N, W] -> [N, ceil(W / group), c]``: each group's ``c`` largest values,
  descending, equal values counted as often as they occur (``-inf`` past a
  group's columns; NaN in a group with one). A merge tree of elementwise maxima
  and minima over halves of the groups: no sort, no reduction, one loop fusion
  per level."""
  n, w = z.shape
  if w % group:
    z = jnp.concatenate([z, jnp.full((n, -w % group), -jnp.inf, z.dtype)], axis=1)
  zg = z.reshape(n, -1, group)
  width = 1 << (group - 1).bit_length()  # the group padded to a power of two
  if width != group:
    zg = jnp.concatenate([zg, jnp.full((*zg.shape[:2], width - group), -jnp.inf, z.dtype)], 2)
  tops = [zg]
  while tops[0].shape[-1] > 1:
    h = tops[0].shape[-1] // 2
    tops = merge_tops([t[..., :h] for t in tops], [t[..., h:] for t in tops], c)
  tops += [jnp.full_like(tops[0], -jnp.inf)] * (c - len(tops))
  return jnp.concatenate(tops, axis=-1)
