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


def grad_kernel(x_ref, t_ref, *refs, vocab_size, softcap, has_tau, with_dtau):
  """``d x`` of one ``[rows, cols]`` tile and, with ``with_dtau``, its part of each
  row's ``d tau`` added to the row block's resident sum.

  Row blocks ``[rows, 1]`` after the targets: shift, log_s, log_sk, kappa
  (uint32), min_p and the cotangents g_processed, g_raw, g_log_kept_mass; then
  tau if ``has_tau``."""
  (shift, log_s, log_sk, kappa, min_p, g_p, g_r, g_l), refs = refs[:8], refs[8:]
  tau_ref, (dx_ref, *dtau_ref) = (refs[0], refs[1:]) if has_tau else (None, refs)
  x = x_ref[...]
  cols = pl.program_id(1) * x.shape[1] + lax.broadcasted_iota(jnp.int32, x.shape, 1)
  tau = None if tau_ref is None else tau_ref[...]
  params = S.Params(tau, None, None, min_p[...], shift[...])  # top-k and top-p: unused here
  g = (g_p[...], g_r[...], g_l[...])
  inside = cols < vocab_size  # the tail tile's columns past V hold garbage
  dy, dtau = row_grads(
    P.capped(x, softcap), cols, t_ref[...], params, kappa[...], log_s[...], log_sk[...], g,
    with_dtau, fresh=inside,
  )  # fmt: skip
  dx = jnp.where(live_rows(g), P.grad_x(dy, x, tau, softcap), 0.0)
  dx_ref[...] = dx.astype(dx_ref.dtype)
  if dtau_ref:

    @pl.when(pl.program_id(1) == 0)
    def _init():
      dtau_ref[0][...] = jnp.zeros_like(dtau_ref[0])

    dtau_ref[0][...] += dtau
