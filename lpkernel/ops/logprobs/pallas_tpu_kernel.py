"""The logits path's Pallas TPU (Mosaic) kernel bodies: the forward's merge of
VMEM tiles into resident row partials, the gradient (with each row's resident
``d tau``) and the one-kernel training loss. Their wrapper, block sizes and
launch are :mod:`lpkernel.ops.logprobs.pallas_tpu`."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lpkernel import partials as P
from lpkernel.ops.mosaic import lane_maxima

_F32 = jnp.float32


def partials_kernel(x_ref, target_ref, *refs, vocab_size, softcap, has_tau, lane_groups=False):
  """The running row partials; with ``lane_groups``, also the tile's 128 lane
  groups' maxima of the capped logits (the last output, one ``[rows, 128]``
  block per tile: lane ``l`` holds the max of the tile's columns ``l + 128 c``)."""
  tau_ref, outs = (refs[0], refs[1:]) if has_tau else (None, refs)
  maxima_ref, outs = (outs[-1], outs[:-1]) if lane_groups else (None, outs)
  k = pl.program_id(1)

  @pl.when(k == 0)
  def _init():
    for ref, value in zip(outs, P.empty(outs[0].shape)[:4], strict=True):
      ref[...] = value

  x = x_ref[...]
  cols = k * x.shape[1] + lax.broadcasted_iota(jnp.int32, x.shape, 1)
  tau = None if tau_ref is None else tau_ref[...]
  z = jnp.where(cols < vocab_size, P.capped(x, softcap), -jnp.inf)  # the tail's columns past V
  if maxima_ref is not None:
    maxima_ref[...] = lane_maxima(z)
  # The row block's outputs stay in VMEM across the vocabulary axis: the running partials.
  block = P.block_partials(z, cols, target_ref[...], tau, keepdims=True, with_entropy=False)
  merged = P.merge(P.RowPartials(*(ref[...] for ref in outs)), block, tau)
  for ref, value in zip(outs, merged[:4], strict=True):  # no entropy on the logits path
    ref[...] = value


def grad_kernel(
  x_ref, t_ref, shift_ref, log_s_ref, g_ref, *refs, vocab_size, softcap, has_lse, has_tau, with_dtau
):
  """d x of ``g * lp`` (and ``g_lse * lse`` with ``has_lse``) over one tile; with
  ``with_dtau`` the tile's part of each row's ``d tau`` added to its resident sum."""
  g_lse_ref, refs = (refs[0], refs[1:]) if has_lse else (None, refs)
  tau_ref, refs = (refs[0], refs[1:]) if has_tau else (None, refs)
  dx_ref, *dtau_ref = refs
  x = x_ref[...]
  tau = None if tau_ref is None else tau_ref[...]
  g_lse = None if g_lse_ref is None else g_lse_ref[...]
  cols = pl.program_id(1) * x.shape[1] + lax.broadcasted_iota(jnp.int32, x.shape, 1)
  z = P.capped(x, softcap)
  shift = shift_ref[...]
  p = P.softmax(z, shift, log_s_ref[...], tau)
  dy = P.grad_y(cols == t_ref[...], p, g_ref[...], g_lse, z=z)
  dx = P.grad_x(dy, x, tau, softcap)
  dx_ref[...] = dx.astype(dx_ref.dtype)
  if dtau_ref:

    @pl.when(pl.program_id(1) == 0)
    def _init():
      dtau_ref[0][...] = jnp.zeros_like(dtau_ref[0])

    in_vocab = cols < vocab_size  # the tail tile's columns past V hold garbage
    dy, y_c, p = (jnp.where(in_vocab, a, 0.0) for a in (dy, P.centred_y(z, shift, tau), p))
    dtau_ref[0][...] += P.grad_tau(dy, y_c, tau, shift, p, g_lse)


def loss_kernel(x_ref, t_ref, w_ref, *refs, softcap, has_tau, row_terms):
  """A training loss over a block of whole rows: statistics, cotangents, d x."""
  tau_refs, (dx_ref, out_ref, *dtau_ref) = (refs[:2], refs[2:]) if has_tau else ((), refs)
  x, target, weight = x_ref[...], t_ref[...], w_ref[...]
  # The safe temperature (1 on dead or poisoned rows) transforms; the caller's poisons.
  tau, caller_tau = (r[...] for r in tau_refs) if has_tau else (None, None)
  cols = lax.broadcasted_iota(jnp.int32, x.shape, 1)
  z = P.capped(x, softcap)
  f = P.finish(
    P.block_partials(z, cols, target, tau, keepdims=True, with_entropy=False),
    target,
    x.shape[1],
    tau,
  )
  g_lp, g_lse, out = row_terms(f, target, caller_tau, weight)
  p = P.softmax(z, f.shift, f.log_s, tau)
  dy = P.grad_y(cols == target, p, g_lp, g_lse, z=z)
  dx = P.grad_x(dy, x, tau, softcap)
  dx_ref[...] = dx.astype(dx_ref.dtype)
  out_ref[...] = out
  if dtau_ref:
    dtau = P.grad_tau(dy, P.centred_y(z, f.shift, tau), tau, f.shift, p, g_lse)
    dtau_ref[0][...] = jnp.where(weight != 0, dtau, 0.0)
