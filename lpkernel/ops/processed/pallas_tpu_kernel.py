"""The processed logits path's Pallas TPU (Mosaic) gradient kernel: one
elementwise pass over VMEM tiles, the kept set given by each row's threshold
key, each row's ``d tau`` accumulated in its resident output. Its wrapper is
:mod:`lpkernel.ops.processed.pallas_tpu`; the forward's kernel is the logits
path's (:func:`lpkernel.ops.logprobs.pallas_tpu_kernel.partials_kernel` with its
lane groups)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lpkernel import partials as P
from lpkernel.ops.processed import select as S
from lpkernel.ops.processed.grads import live_rows, row_grads


def processed_dy(z, cols, targets, rows, tau, inside, with_dtau):
  """``d y`` of a tile's capped logits and, with ``with_dtau``, its part of each
  row's ``d tau`` (:func:`lpkernel.ops.processed.grads.row_grads`); ``rows``:
  the ``[rows, 1]`` blocks of shift, log_s, log_sk, kappa (uint32), min_p and the
  cotangents g_processed, g_raw, g_log_kept_mass."""
  shift, log_s, log_sk, kappa, min_p, *g = rows
  params = S.Params(tau, None, None, min_p, shift)  # top-k and top-p: unused here
  return row_grads(z, cols, targets, params, kappa, log_s, log_sk, g, with_dtau, fresh=inside)


def grad_kernel(x_ref, t_ref, *refs, vocab_size, softcap, has_tau, with_dtau):
  """``d x`` of one ``[rows, cols]`` tile and, with ``with_dtau``, its part of each
  row's ``d tau`` added to the row block's resident sum; after the targets the
  :func:`processed_dy` rows, then tau if ``has_tau``."""
  rows, refs = [ref[...] for ref in refs[:8]], refs[8:]
  tau_ref, (dx_ref, *dtau_ref) = (refs[0], refs[1:]) if has_tau else (None, refs)
  x = x_ref[...]
  cols = pl.program_id(1) * x.shape[1] + lax.broadcasted_iota(jnp.int32, x.shape, 1)
  tau = None if tau_ref is None else tau_ref[...]
  inside = cols < vocab_size  # the tail tile's columns past V hold garbage
  dy, dtau = processed_dy(P.capped(x, softcap), cols, t_ref[...], rows, tau, inside, with_dtau)
  dx = jnp.where(live_rows(rows[5:]), P.grad_x(dy, x, tau, softcap), 0.0)
  dx_ref[...] = dx.astype(dx_ref.dtype)
  if dtau_ref:

    @pl.when(pl.program_id(1) == 0)
    def _init():
      dtau_ref[0][...] = jnp.zeros_like(dtau_ref[0])

    dtau_ref[0][...] += dtau
