"""Replay's dot products and repeated-id check for XLA:CPU (``cpu_replay.cc``, JAX FFI).

Gathered token by token (:mod:`.replay`'s XLA steps), the table rows of the
kept ids are read ``N * K / V`` times over at random (14 times at N 4096,
K 512, V 151936) and materialised in chunks. The kernels group a block of
tokens' (token, slot) pairs by table row and read each row once per block:
6x faster forward, 7x backward at N 1024, D 2048, V 151936, K 512 on 2 cores.
A ``[D, V]`` unembedding matrix is read in place, a tile of rows copied at a
time, never transposed whole; forward and backward read it in passes over a
range of ``D`` whose hidden-state columns stay in a core's L2 cache (the
forward 1.7x faster at the shape above).
A third finds the positions that name an id twice without sorting their ids.
Built and registered by :mod:`.cpu_library`; where it is not, :func:`takes`
says False and the caller gathers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lpkernel.ops.blocks import stores_columns
from lpkernel.ops.processed.cpu_library import available as available

_F32 = jnp.float32


def takes(h: jax.Array, w: jax.Array) -> bool:
  """Whether the kernels take ``h`` and the table ``w`` (float32 or bfloat16,
  one type) here."""
  return h.dtype == w.dtype and h.dtype in (jnp.float32, jnp.bfloat16) and available()


def _attrs(w: jax.Array, vocab_axis: int, block: int, width: int) -> dict:
  """The kernels' attributes: ``block`` and ``width`` as given, and ``columns``
  1 where ``w`` is stored ``[D, V]`` (``vocab_axis`` 1 or -1), 0 for ``[V, D]``."""
  columns = np.int64(stores_columns(w, vocab_axis))
  return {"block": np.int64(block), "width": np.int64(width), "columns": columns}


def kept_dots(
  h: jax.Array, w: jax.Array, ids: jax.Array, block: int = 0, *, vocab_axis: int = 0, width: int = 0
) -> jax.Array:
  """float32[N, K]: ``h[t] . (row ids[t, j] of the table)``, 0 where an id is
  outside ``[0, V)`` (``h [N, D]``, ``w [V, D]``, or ``[D, V]`` with
  ``vocab_axis`` 1 or -1: read in place, a tile of rows at a time; ``ids int32 [N, K]``).
  A program for the CPU only (where :func:`takes`); the caller chooses it with
  :func:`lpkernel.ops.platform.on_cpu_or`. ``block``: tokens per block (0: as
  many as the kernel's scratch bounds allow; tests take a few). ``width``:
  hidden-state columns per pass over the table (0: all of ``D`` for a
  ``[V, D]`` table, as many as keep the block's in a core's L2 cache for a
  ``[D, V]`` one; tests take a few)."""
  out = jax.ShapeDtypeStruct(ids.shape, _F32)
  call = jax.ffi.ffi_call("lpkernel_cpu_replay_dots", out, vmap_method="sequential")
  return call(h, w, ids.astype(jnp.int32), **_attrs(w, vocab_axis, block, width))


def repeated(ids: jax.Array, vocab_size: int) -> jax.Array:
  """bool[N]: whether row ``t`` of ``ids int32 [N, K]`` names an id in ``[0, V)``
  twice (:func:`lpkernel.checks.repeated_ids` without its sort: each row's ids
  marked in a V-bit set). A program for the CPU only (where :func:`available`)."""
  out = jax.ShapeDtypeStruct(ids.shape[:1], jnp.int32)
  call = jax.ffi.ffi_call("lpkernel_cpu_replay_repeats", out, vmap_method="sequential")
  return call(ids.astype(jnp.int32), v=np.int64(vocab_size)) != 0


def kept_grads(
  h, w, ids, dx, block: int = 0, *, vocab_axis: int = 0, width: int = 0
) -> tuple[jax.Array, jax.Array]:
  """float32 ``(dh [N, D], dw)`` of :func:`kept_dots` for the cotangent
  ``dx float32 [N, K]``: ``dh[t] = sum_j dx[t, j] w[ids[t, j]]`` and
  ``dw[r] = sum over ids[t, j] = r of dx[t, j] h[t]`` (rows of the table;
  ``dw`` in ``w``'s layout), in :func:`kept_dots`' blocks and passes."""
  out = (jax.ShapeDtypeStruct(h.shape, _F32), jax.ShapeDtypeStruct(w.shape, _F32))
  call = jax.ffi.ffi_call("lpkernel_cpu_replay_grads", out, vmap_method="sequential")
  args = (h, w, ids.astype(jnp.int32), dx.astype(_F32))
  dh, dw = call(*args, **_attrs(w, vocab_axis, block, width))
  return dh, dw
