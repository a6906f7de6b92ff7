"""The processed path's Pallas GPU (Triton) kernels: the logits' gradient (one
elementwise pass, the kept set given by each row's threshold key), and the
replay from hidden states' kept dot products and their gradients (each kept
row of the unembedding gathered, never the ``[N, V]`` logits). Their wrapper is
:mod:`lpkernel.ops.processed.pallas_gpu`; the logits forward's kernel is the
logits path's (:func:`lpkernel.ops.logprobs.pallas_gpu_kernel.partials_kernel`
with its group maxima)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lpkernel import partials as P
from lpkernel.ops.pallas_backends import triton as plgpu  # the wrapper required it
from lpkernel.ops.processed import select as S
from lpkernel.ops.processed.grads import live_rows, row_grads


def grad_kernel(x_ref, t_ref, *refs, block_rows, block_v, softcap, has_tau, tau_grad):
  """``d x`` of one ``[block_rows, block_v]`` tile and, with ``tau_grad``, this
  column block's part of each row's ``d tau`` (the caller sums the blocks).

  Row inputs after the targets: shift, log_s, log_sk, kappa (uint32), min_p and
  the cotangents g_processed, g_raw, g_log_kept_mass; then tau if ``has_tau``."""
  (shift, log_s, log_sk, kappa, min_p, g_p, g_r, g_l), refs = refs[:8], refs[8:]
  tau_ref, (dx_ref, *dtau_ref) = (refs[0], refs[1:]) if has_tau else (None, refs)
  n, v = x_ref.shape
  rows = pl.program_id(0) * block_rows + jnp.arange(block_rows, dtype=jnp.int32)
  cols = pl.program_id(1) * block_v + jnp.arange(block_v, dtype=jnp.int32)
  row_ok = rows < n
  inside = (cols < v)[None, :]
  mask = row_ok[:, None] & inside

  def row(ref, other=0.0):
    return plgpu.load(ref.at[rows], mask=row_ok, other=other)

  x = plgpu.load(x_ref.at[rows[:, None], cols[None, :]], mask=mask, other=0.0)
  tau = None if tau_ref is None else row(tau_ref, 1.0)
  params = S.Params(tau, None, None, row(min_p), row(shift))  # top-k and top-p: unused here
  g = (row(g_p), row(g_r), row(g_l))  # 0 past N: dead rows
  dy, dtau = row_grads(
    P.capped(x, softcap), cols[None, :], row(t_ref, -1), params,
    row(kappa, jnp.uint32(0)), row(log_s), row(log_sk), g, tau_grad, fresh=inside,
  )  # fmt: skip
  dx = jnp.where(live_rows(g)[:, None], P.grad_x(dy, x, params.col(tau), softcap), 0.0)
  plgpu.store(dx_ref.at[rows[:, None], cols[None, :]], dx.astype(dx_ref.dtype), mask=mask)
  if dtau_ref:
    plgpu.store(dtau_ref[0].at[pl.program_id(1) * n + rows], dtau, mask=row_ok)


def replay_dots_kernel(h_ref, w_ref, ids_ref, out_ref, *, block_k, block_d):
  """Replay from hidden states: token ``program_id(0)``'s kept dot products for
  ids ``[block_k * program_id(1), ...)``: ``out[i, j] = h[i] . w[ids[i, j]]``,
  float32 products summed over ``block_d`` columns at a time from the gathered
  rows of ``w [V, D]`` (``block_d`` divides ``D``); anything where an id is
  outside ``[0, V)``."""
  i = pl.program_id(0)
  v, d = w_ref.shape
  ks = pl.program_id(1) * block_k + jnp.arange(block_k, dtype=jnp.int32)
  live = ks < ids_ref.shape[1]
  ids = plgpu.load(ids_ref.at[i, ks], mask=live, other=-1)
  read = ((ids >= 0) & (ids < v))[:, None]  # padding reads nothing
  ids = jnp.clip(ids, 0, v - 1)

  def step(c, acc):
    cols = c * block_d + jnp.arange(block_d, dtype=jnp.int32)
    mask = read & (cols < d)[None, :]  # [block_k, block_d]; block_d divides D
    rows = plgpu.load(w_ref.at[ids[:, None], cols[None, :]], mask=mask, other=0)
    rows = rows.astype(jnp.float32)
    hc = plgpu.load(h_ref.at[i, cols]).astype(jnp.float32)
    return acc + jnp.sum(rows * hc[None, :], axis=1)

  acc = lax.fori_loop(0, d // block_d, step, jnp.zeros((block_k,), jnp.float32))
  plgpu.store(out_ref.at[i, ks], acc, mask=live)


def replay_grads_kernel(h_ref, w_ref, ids_ref, dx_ref, _, dh_ref, dw_ref, *, block_d):
  """The backward of :func:`replay_dots_kernel` for token ``program_id(0)`` and
  columns ``[block_d * program_id(1), ...)``: ``d h[i] = sum_j dx[i, j] w[ids[i, j]]``
  stored, and ``dx[i, j] h[i]`` added atomically to row ``ids[i, j]`` of the
  float32 ``dw`` (aliased to the zeros before it), one id at a time (so two
  tokens' adds to one row, or interpret mode's, never overwrite each other).
  An id outside ``[0, V)`` (padding) is skipped: no read, no add (a padded
  kept set's many ``-1`` would otherwise all add to one row, atomically)."""
  i = pl.program_id(0)
  v = w_ref.shape[0]
  cols = pl.program_id(1) * block_d + jnp.arange(block_d, dtype=jnp.int32)
  hc = plgpu.load(h_ref.at[i, cols]).astype(jnp.float32)

  def step(j, acc):
    row = plgpu.load(ids_ref.at[i, j])

    def add(acc):
      g = plgpu.load(dx_ref.at[i, j])
      plgpu.atomic_add(dw_ref, (row, cols), g * hc)
      return acc + g * plgpu.load(w_ref.at[row, cols]).astype(jnp.float32)

    return lax.cond((row >= 0) & (row < v), add, lambda acc: acc, acc)

  acc = lax.fori_loop(0, ids_ref.shape[1], step, jnp.zeros((block_d,), jnp.float32))
  plgpu.store(dh_ref.at[i, cols], acc.astype(dh_ref.dtype))
