"""Top-k kernels for XLA:CPU (``cpu_top_k.cc``, through JAX's typed FFI).

* :func:`top_k`: ``lax.top_k``'s values and indices, 3x to 6x faster. XLA:CPU's
  TopK sorts each row partially on one thread (about 12 us for the 64 largest
  of 1000 values), and the processed paths take two or three per token
  (:mod:`lpkernel.ops.processed.xla`); the kernel filters each row through a
  small buffer of candidates and shares the rows among XLA's intra-op threads.
* :func:`groups_top_k`: the ``K`` largest among a row's ``K`` groups with the
  largest maxima, read in place (XLA gathers them first);
* :func:`group_tops`: :func:`lpkernel.ops.processed.record.group_tops` (each
  group's few largest values, the record of the sweep from hidden states) in
  registers, where XLA:CPU materialises each level of its merge tree.

Built and registered by :mod:`.cpu_library`; where it is not
(:func:`available` False), every step is XLA's (:func:`top_k` is ``lax.top_k``,
:func:`group_tops` the merge tree, and :func:`compiled` says False so callers
gather): the same numbers, slower on the CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lpkernel.ops.platform import on_cpu_or
from lpkernel.ops.processed import record
from lpkernel.ops.processed.cpu_library import available


def _native(a: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  shape = a.shape[:-1] + (k,)
  call = jax.ffi.ffi_call(
    "lpkernel_cpu_top_k",
    (jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape, jnp.int32)),
    vmap_method="broadcast_all",
  )
  values, ids = call(a.astype(jnp.float32))
  return values.astype(a.dtype), ids  # exact: a narrower float is a float32 too


def _xla(a: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  values, ids = lax.top_k(a, k)
  # With its consumers in view XLA:CPU rewrites a top-k as a sort of the whole
  # row, 10x to 15x slower; one barrier per output (a barrier over the pair
  # fails XLA's SPMD partitioner under shard_map).
  return lax.optimization_barrier(values), lax.optimization_barrier(ids)


def top_k(a: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """``lax.top_k(a, k)`` (``a [..., n]``, floating; ``k <= n``): on the CPU the
  compiled top-k where :func:`available` and ``a`` is at most float32 wide, else
  ``lax.top_k`` (kept from XLA:CPU's rewrite into a sort)."""
  if k > a.shape[-1]:
    raise ValueError(f"top_k: k={k} exceeds the last dimension {a.shape[-1]}")
  if not (jnp.issubdtype(a.dtype, jnp.floating) and a.dtype.itemsize <= 4 and available()):
    return _xla(a, k)
  return on_cpu_or(lambda: _native(a, k), lambda: _xla(a, k))


def compiled(dtype) -> bool:
  """Whether :func:`groups_top_k` takes ``dtype`` (float32, bfloat16) here."""
  return jnp.dtype(dtype) in (jnp.float32, jnp.bfloat16) and available()


def groups_top_k(x: jax.Array, ids: jax.Array, group: int, k: int) -> jax.Array:
  """float32[N, k]: the ``k`` largest values of ``x [N, n]`` (float32 or
  bfloat16, read in place) among the columns of its groups ``ids [N, m]``
  (distinct; group ``j``: columns ``[j * group, (j + 1) * group)`` below n),
  descending: ``lax.top_k`` of the gathered columns, with no gather. The first
  bar is the least of the groups' maxima, so few values enter the buffer. A
  program for the CPU only (where :func:`compiled`); the caller chooses it with
  :func:`lpkernel.ops.platform.on_cpu_or`."""
  out = jax.ShapeDtypeStruct((x.shape[0], k), jnp.float32)
  call = jax.ffi.ffi_call("lpkernel_cpu_groups_top_k", out, vmap_method="broadcast_all")
  return call(x, ids.astype(jnp.int32), group=np.int64(group))


def _native_group_tops(z: jax.Array, group: int, c: int) -> jax.Array:
  n, w = z.shape
  out = jax.ShapeDtypeStruct((n, -(-w // group), c), jnp.float32)
  call = jax.ffi.ffi_call("lpkernel_cpu_group_tops", out, vmap_method="broadcast_all")
  return call(z, group=np.int64(group), c=np.int64(c))


def group_tops(z: jax.Array, group: int, c: int) -> jax.Array:
  """:func:`lpkernel.ops.processed.record.group_tops` of float32 ``z [N, W]``:
  on the CPU the compiled kernel where :func:`available` and ``c <= 4``, else
  XLA's merge tree (a group holding NaN is NaN throughout on the CPU, at least
  its largest value in XLA's)."""
  if not (z.dtype == jnp.float32 and c <= 4 and available()):
    return record.group_tops(z, group, c)
  return on_cpu_or(lambda: _native_group_tops(z, group, c), lambda: record.group_tops(z, group, c))
