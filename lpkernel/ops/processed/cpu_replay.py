"""Replay's dot products for XLA:CPU (``cpu_replay.cc``, through JAX's typed FFI).

Gathered token by token (:mod:`.replay`'s XLA steps), the table rows of the
kept ids are read ``N * K / V`` times over at random (14 times at N 4096,
K 512, V 151936) and materialised in chunks. The kernels group a block of
tokens' (token, slot) pairs by table row and read each row once per block:
6x faster forward, 7x backward at N 1024, D 2048, V 151936, K 512 on 2 cores.
Built and registered by :mod:`.cpu_library`; where it is not, :func:`takes`
says False and the caller gathers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lpkernel.ops.processed.cpu_library import available

_F32 = jnp.float32


def takes(h: jax.Array, w_rows: jax.Array) -> bool:
  """Whether the kernels take ``h`` and ``w_rows`` (float32 or bfloat16, one
  type) here."""
  return h.dtype == w_rows.dtype and h.dtype in (jnp.float32, jnp.bfloat16) and available()


def kept_dots(
  h: jax.Array, w_rows: jax.Array, ids: jax.Array, block: int = 0
) -> tuple[jax.Array, jax.Array]:
  """``(x float32[N, K], repeated bool[N])``: ``x[t, j] = h[t] . w_rows[ids[t, j]]``,
  0 where an id is outside ``[0, V)``, and whether token ``t`` names a row twice
  (``h [N, D]``, ``w_rows [V, D]``, ``ids int32 [N, K]``). A program for the CPU
  only (where :func:`takes`); the caller chooses it with
  :func:`lpkernel.ops.platform.on_cpu_or`. ``block``: tokens per block (0: as
  many as the kernel's scratch bounds allow; tests take a few)."""
  out = (jax.ShapeDtypeStruct(ids.shape, _F32), jax.ShapeDtypeStruct(ids.shape[:1], jnp.int32))
  call = jax.ffi.ffi_call("lpkernel_cpu_replay_dots", out, vmap_method="sequential")
  x, repeated = call(h, w_rows, ids.astype(jnp.int32), block=np.int64(block))
  return x, repeated != 0


def kept_grads(h, w_rows, ids, dx, block: int = 0) -> tuple[jax.Array, jax.Array]:
  """float32 ``(dh [N, D], dw [V, D])`` of :func:`kept_dots` for the cotangent
  ``dx float32 [N, K]``: ``dh[t] = sum_j dx[t, j] w_rows[ids[t, j]]`` and
  ``dw[r] = sum over ids[t, j] = r of dx[t, j] h[t]``."""
  out = (jax.ShapeDtypeStruct(h.shape, _F32), jax.ShapeDtypeStruct(w_rows.shape, _F32))
  call = jax.ffi.ffi_call("lpkernel_cpu_replay_grads", out, vmap_method="sequential")
  dh, dw = call(h, w_rows, ids.astype(jnp.int32), dx.astype(_F32), block=np.int64(block))
  return dh, dw
