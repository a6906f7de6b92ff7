"""The kept set's search for XLA:CPU (``cpu_search.cc``, through JAX's typed FFI).

XLA's search (:func:`lpkernel.ops.processed.select.kept_within`) reads a chunk
of rows once per halving of their brackets (about 26 times for a nucleus of
thousands of tokens), and twice more for A's mass and the kept set's. The
kernel takes one row at a time, in cache: a pass for A's mass, a pass that
lists only the values between two pivots sampled around the threshold (about a
sixth), passes over that shrinking list, and a pass for the kept set's mass and
size. The same kept sets (its masses summed in float64 from float32 blocks of
256, XLA's in float32). :func:`kept_set_of_logits` searches from the capped
logits themselves where min-p is off: one pass lists the values at or above a
sampled pivot, and only they are weighed.
Built and registered by :mod:`.cpu_library`; where it is not, :func:`available`
says False and the caller sweeps in XLA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lpkernel.ops.processed.cpu_library import available

__all__ = ["available", "kept_set", "kept_set_of_logits"]


def _kept_set_types(rows: tuple[int, ...]):
  """(kappa, mass, count)'s types, one value per row."""
  return tuple(jax.ShapeDtypeStruct(rows, d) for d in (jnp.uint32, jnp.float32, jnp.int32))


def kept_set(key, e, floor, ceiling, share, min_p, active, by_count: bool):
  """(kappa uint32, mass float32, count int32) ``[C]``: the kept set of A, ``{e >=
  min_p, key >= floor}``, of rows whose values' keys are ``key uint32 [C, n]``
  (:func:`~lpkernel.ops.processed.select.order_key`) and weights ``e float32 [C,
  n]``; as :func:`~lpkernel.ops.processed.select.kept_within` (``share``: top-p's
  ``p``, or top-k's ``k`` ``by_count``; ``ceiling`` past each row's largest key;
  A whole where not ``active``). A program for the CPU only (where
  :func:`available`); the caller chooses it with
  :func:`lpkernel.ops.platform.on_cpu_or`."""
  rows = floor.shape
  out = _kept_set_types(rows)
  call = jax.ffi.ffi_call("lpkernel_cpu_kept_set", out, vmap_method="sequential")
  u32, f32 = jnp.uint32, jnp.float32
  return call(
    key.astype(u32),
    e.astype(f32),
    floor.astype(u32),
    ceiling.astype(u32),
    share.astype(f32),
    min_p.astype(f32),
    active.astype(jnp.int32),
    ones=np.int64(by_count),
  )


def kept_set_of_logits(z, at, shift, tau, total, floor, ceiling, share, active, by_count: bool):
  """As :func:`kept_set` with min-p off (A is ``{key >= floor}``), from the capped
  logits themselves, read in place: row ``i`` of the result is row ``at[i]`` of
  ``z float32 [R, n]`` (``at int32 [C]``, or None for ``z``'s rows in order,
  ``C = R``); each row's ``shift``, temperature
  ``tau`` and ``total`` (its sum of :meth:`~lpkernel.ops.processed.select.Params.e`,
  A's mass where ``floor`` is 0) ``[C]``. The kernel lists the values at or
  above a pivot sampled so that they likely hold the kept set and takes their
  ``exp`` alone: the row is read about once, with no weights or keys formed for
  it. By weight, a row whose sample says most of it is to be weighed (over a
  quarter listed, or top-p above 31/32 with the floor 0) is declined: its
  ``count`` is -1, for :func:`kept_set` on XLA's weights. A program for the CPU
  only (where :func:`available`)."""
  rows = floor.shape
  out = _kept_set_types(rows)
  call = jax.ffi.ffi_call("lpkernel_cpu_kept_set_of_logits", out, vmap_method="sequential")
  u32, f32 = jnp.uint32, jnp.float32
  at = jnp.arange(z.shape[0], dtype=jnp.int32) if at is None else at.astype(jnp.int32)
  return call(
    z.astype(f32),
    at,
    jnp.broadcast_to(shift, rows).astype(f32),
    jnp.broadcast_to(1.0 if tau is None else tau, rows).astype(f32),
    total.astype(f32),
    floor.astype(u32),
    ceiling.astype(u32),
    share.astype(f32),
    active.astype(jnp.int32),
    ones=np.int64(by_count),
  )
