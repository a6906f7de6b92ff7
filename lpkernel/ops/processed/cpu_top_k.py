"""Top-k kernels for XLA:CPU (``cpu_top_k.cc``, through JAX's typed FFI).

* :func:`top_k`: ``lax.top_k``'s values and indices, 3x to 6x faster. XLA:CPU's
  TopK sorts each row partially on one thread (about 12 us for the 64 largest
  of 1000 values), and the processed paths take two or three per token
  (:mod:`lpkernel.ops.processed.xla`); the kernel filters each row through a
  small buffer of candidates and shares the rows among XLA's intra-op threads.
* :func:`groups_top_k`: a row's ``K`` largest values from the groups whose
  maxima are among the ``K`` largest, read in place (XLA takes the top-k of the
  maxima, then gathers those groups);
* :func:`maxima_and_top_k`: the same for float32 rows, the groups' maxima
  taken by the kernel from each row as it reads it (one read from memory);
* :func:`block_stats`: a block's maximum, first column of it and target value
  per row, one read of the block for the three (the fused sweeps' blocks);
* :func:`add_block`: the same, and a row's running candidates for its ``K``
  largest values given one more block of the row (the sweep from hidden
  states); :func:`running_values`: the ``K`` largest values they saw.

Built and registered by :mod:`.cpu_library`; where it is not
(:func:`available` False), every step is XLA's (:func:`top_k` is ``lax.top_k``,
and :func:`compiled` says False so callers gather, or record each group's
largest values from hidden states): the same numbers, slower on the CPU.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lpkernel.ops.platform import on_cpu_or
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


def groups_top_k(x: jax.Array, maxima: jax.Array, group: int, k: int, held: bool) -> jax.Array:
  """float32[N, k]: the ``k`` largest values of ``x [N, n]`` (float32 or bfloat16,
  read in place), descending, as ``lax.top_k``'s, given its groups' maxima
  ``maxima [N, ceil(n / group)]`` (float32 or bfloat16; group ``j``: columns
  ``[j * group, (j + 1) * group)``): ``held``, the groups' own maxima as
  ``jnp.max`` gives them, else an increasing function of them (capped
  logits'), which the kernel takes again from the groups it reads. Only the
  groups whose maximum is at least the ``k``-th largest are read (prefetched:
  they are scattered over the row), and the least of their own maxima is the
  first bar, so few values enter the buffer. A program for the CPU only (where
  :func:`compiled`); the caller chooses it with
  :func:`lpkernel.ops.platform.on_cpu_or`."""
  out = jax.ShapeDtypeStruct((x.shape[0], k), jnp.float32)
  call = jax.ffi.ffi_call("lpkernel_cpu_groups_top_k", out, vmap_method="broadcast_all")
  return call(x, maxima, group=np.int64(group), held=np.int64(held))


def maxima_and_top_k(
  x: jax.Array, group: int, k: int, with_maxima: bool = True
) -> tuple[jax.Array, jax.Array]:
  """(float32[N, ceil(n / group)] the maxima of each group of ``group`` columns,
  as ``jnp.max`` gives them, ``[N, 0]`` without ``with_maxima``; float32[N, k]
  as :func:`groups_top_k`) of ``x [N, n]`` float32: each row read from memory
  once, its groups' maxima taken first and then the groups they choose, from
  the cache. (A bfloat16 row is half as many bytes and XLA's maxima pass over
  it is faster than the kernel's.) A program for the CPU only (where
  :func:`compiled`); the caller chooses it with
  :func:`lpkernel.ops.platform.on_cpu_or`."""
  n, v = x.shape
  out = (
    jax.ShapeDtypeStruct((n, -(-v // group) if with_maxima else 0), jnp.float32),
    jax.ShapeDtypeStruct((n, k), jnp.float32),
  )
  call = jax.ffi.ffi_call("lpkernel_cpu_maxima_top_k", out, vmap_method="broadcast_all")
  maxima, top = call(x, group=np.int64(group))
  return maxima, top


def running_capacity(k: int, vocab_size: int) -> int:
  """Values per row of :func:`running_top_k`'s buffer for a row's ``k`` largest
  of ``vocab_size``: ``4k``, within a 25th of the row (4% of the float32
  logits; ``4k`` was 12.5% with top-k 1000 at V 32000), but at least ``k`` and
  a quarter more, and room for a vector of offers (each cut back to ``k`` makes
  room for the next)."""
  return max(k + k // 4 + 16, min(4 * k, vocab_size // 25))


def running_top_k(n: int, k: int, vocab_size: int) -> tuple[jax.Array, jax.Array]:
  """The empty running candidates of :func:`add_block` for ``n`` rows' ``k``
  largest values of ``vocab_size``: a buffer ``float32[n, cap]``
  (:func:`running_capacity`) and ``int32[n, 2]`` (count, bar)."""
  cap = running_capacity(k, vocab_size)
  return jnp.full((n, cap), -jnp.inf, jnp.float32), jnp.zeros((n, 2), jnp.int32)


class BlockStats(NamedTuple):
  """A block's statistics of each of its rows, as ``jnp``'s reductions give them
  (:func:`lpkernel.partials.block_partials`): ``m`` its maximum (NaN where the
  row holds one; a subnormal maximum may come as a zero, as XLA:CPU flushes
  them), ``arg`` the first column holding it (the block's width where none)
  and ``t`` the value at the row's target (``-inf`` outside the block); ``[n]``
  each."""

  m: jax.Array
  t: jax.Array
  arg: jax.Array


def _stats_out(n: int) -> tuple:
  f32, i32 = jnp.float32, jnp.int32
  return (
    jax.ShapeDtypeStruct((n,), f32),
    jax.ShapeDtypeStruct((n,), f32),
    jax.ShapeDtypeStruct((n,), i32),
  )


def _at(a: jax.Array, cols: jax.Array) -> jax.Array:
  """``a [n, W]`` at each row's column ``cols [n]``, 0 outside ``[0, W)``."""
  w = a.shape[-1]
  values = jnp.take_along_axis(a, jnp.clip(cols, 0, w - 1)[:, None], axis=-1)[:, 0]
  return jnp.where((cols >= 0) & (cols < w), values, 0)


@jax.custom_jvp
def _with_tangents(z, targets, m, t, arg):
  """``(m, t)`` as given (the kernel's, of ``stop_gradient(z)``), differentiable
  in ``z`` as ``jnp.max`` and the target's gather are: ``dz`` at the first
  maximum (ties: one column, not their mean; the partials' maximum is a shift
  whose derivative cancels) and at the target."""
  del z, targets, arg
  return m, t


@_with_tangents.defjvp
def _with_tangents_jvp(primals, tangents):
  z, targets, m, t, arg = primals
  dz = tangents[0]
  return (m, t), (_at(dz, arg).astype(m.dtype), _at(dz, targets).astype(t.dtype))


def _stats(z, targets, m, t, arg) -> BlockStats:
  m, t = _with_tangents(z, targets, m, t, arg)
  return BlockStats(m, t, arg)


def block_stats(z: jax.Array, targets: jax.Array) -> BlockStats:
  """:class:`BlockStats` (float32) of ``z [n, W]`` (float32 or bfloat16, read
  in place; another dtype as float32) with ``targets int32 [n]`` the block's
  columns (outside ``[0, W)`` where a target is in another block): one read of
  the block for all three, differentiable in ``z`` as XLA's reductions
  (:func:`_with_tangents`). A program for the CPU only (where
  :func:`available`); the caller chooses it with
  :func:`lpkernel.ops.platform.on_cpu_or`."""
  if z.dtype not in (jnp.float32, jnp.bfloat16):
    z = z.astype(jnp.float32)
  targets = targets.astype(jnp.int32)
  call = jax.ffi.ffi_call(
    "lpkernel_cpu_block_stats", _stats_out(z.shape[0]), vmap_method="broadcast_all"
  )
  return _stats(z, targets, *call(lax.stop_gradient(z), targets))


def add_block(state, z: jax.Array, k: int, targets: jax.Array):
  """(the running candidates ``state`` (:func:`running_top_k`) given one more
  block ``z float32 [n, W]`` of the rows, updated in place; the block's
  :class:`BlockStats`, as :func:`block_stats`): one read of the block for
  both. A program for the CPU only (where :func:`available`)."""
  z, targets = z.astype(jnp.float32), targets.astype(jnp.int32)
  buf, meta = state
  out = (
    *_stats_out(z.shape[0]),
    jax.ShapeDtypeStruct(buf.shape, jnp.float32),
    jax.ShapeDtypeStruct(meta.shape, jnp.int32),
  )
  call = jax.ffi.ffi_call(
    "lpkernel_cpu_block_stats_top_k", out, vmap_method="broadcast_all",
    input_output_aliases={2: 3, 3: 4},
  )  # fmt: skip
  m, t, arg, buf, meta = call(lax.stop_gradient(z), targets, buf, meta, k=np.int64(k))
  return (buf, meta), _stats(z, targets, m, t, arg)


def running_values(state, k: int) -> jax.Array:
  """float32[n, k]: the ``k`` largest values the running candidates saw, descending
  (``-inf`` where fewer, and in place of a negative NaN: ``lax.top_k`` of them and
  ``k`` values ``-inf``), read from the buffer in place. A program for the CPU
  only (where :func:`available`)."""
  buf, meta = state
  out = jax.ShapeDtypeStruct((buf.shape[0], k), jnp.float32)
  call = jax.ffi.ffi_call("lpkernel_cpu_running_values", out, vmap_method="broadcast_all")
  return call(buf, meta, k=np.int64(k))
