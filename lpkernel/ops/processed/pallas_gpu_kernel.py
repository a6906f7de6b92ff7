"""The processed logits path's Pallas GPU (Triton) gradient kernel: one
elementwise pass, the kept set given by each row's threshold key. Its wrapper is
:mod:`lpkernel.ops.processed.pallas_gpu`; the forward's kernel is the logits
path's (:func:`lpkernel.ops.logprobs.pallas_gpu_kernel.partials_kernel` with its
group maxima)."""

from __future__ import annotations

import jax.numpy as jnp
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
