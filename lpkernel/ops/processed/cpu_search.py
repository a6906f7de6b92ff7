"""The threshold search for XLA:CPU (``cpu_search.cc``, through JAX's typed FFI).

:func:`lpkernel.ops.processed.select.largest_key_within` in XLA sweeps every
row once per halving of its bracket, an ``exp`` of every value each time (about
26 sweeps for a nucleus of thousands of tokens). The kernel takes the values
and their weights once and halves a list of the bracket's values that shrinks
with it: the same threshold (the masses summed in float64, XLA's in float32).
Built and registered by :mod:`.cpu_library`; where it is not, :func:`available`
says False and the caller sweeps in XLA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lpkernel.ops.processed.cpu_library import available

__all__ = ["available", "key_within"]


def key_within(key, e, floor, ceiling, start, budget, min_p, active, ones: bool) -> jax.Array:
  """uint32[C]: :func:`~lpkernel.ops.processed.select.largest_key_within` of rows
  whose values' keys are ``key uint32 [C, n]`` (:func:`~lpkernel.ops.processed.
  select.order_key`) and weights ``e float32 [C, n]`` (or 1 with ``ones``), A
  being ``{e >= min_p, key >= floor}``; ``floor``, ``ceiling``, ``start``
  uint32[C], ``budget`` and ``min_p`` float32[C], ``active`` bool[C]. A program
  for the CPU only (where :func:`available`); the caller chooses it with
  :func:`lpkernel.ops.platform.on_cpu_or`."""
  out = jax.ShapeDtypeStruct(floor.shape, jnp.uint32)
  call = jax.ffi.ffi_call("lpkernel_cpu_key_within", out, vmap_method="sequential")
  u32, f32 = jnp.uint32, jnp.float32
  return call(
    key.astype(u32),
    e.astype(f32),
    floor.astype(u32),
    ceiling.astype(u32),
    start.astype(u32),
    budget.astype(f32),
    min_p.astype(f32),
    active.astype(jnp.int32),
    ones=np.int64(ones),
  )
