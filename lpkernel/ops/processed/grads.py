"""The processed log-probabilities' gradient, written once for every implementation.

The kept set is a constant of the rollout: from each row's threshold key
(:mod:`lpkernel.ops.processed.select`), normaliser and kept mass,
:func:`row_grads` gives ``d y`` of a block of capped logits (an XLA sweep's
block, a Pallas kernel's tile) and its part of ``d temperature``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lpkernel import partials as P
from lpkernel.ops.processed import select as S


def live_rows(g) -> jax.Array:
  """bool[N]: rows with a cotangent (a NaN one included: poisoned values keep theirs)."""
  return (g[0] != 0) | (g[1] != 0) | (g[2] != 0)


def row_grads(
  z, cols, targets, params: S.Params, kappa, log_s, log_sk, g, tau_grad: bool, fresh=None
):
  """``d y`` of a block of capped logits ``z [N, W]`` at columns ``cols [1, W]``
  and, with ``tau_grad``, its part of ``d tau`` (shaped as the row values; else
  None) over the columns ``fresh`` (bool ``[1, W]``; None: all).

  Row values (``targets``, ``params``, ``kappa``, ``log_s``, ``log_sk``, each of
  ``g``) are ``[N]``, or columns ``[N, 1]`` (:func:`lpkernel.ops.processed.select.column`: a TPU
  kernel's row blocks). ``g``: (g_processed, g_raw, g_log_kept_mass) float32,
  zero on dead rows; the processed term counts only where the target was kept
  (its value is ``-inf`` otherwise).
  """
  g_p, g_r, g_l = (S.column(c) for c in g)
  tau_col = params.col(params.tau)
  shift = S.column(params.shift)
  p = P.softmax(z, shift, S.column(log_s), tau_col)
  keep = S.kept(z, params, kappa)
  pk = jnp.where(keep, P.softmax(z, shift, S.column(log_sk), tau_col), 0.0)
  onehot = cols == S.column(targets)
  dy = jnp.where(onehot, g_r + g_p, 0.0) - p * (g_r + g_l) + pk * (g_l - g_p)
  # A dead row's statistics may be NaN (a NaN input nobody reads): it gives nothing.
  dy = jnp.where(S.column(live_rows(g)), dy, 0.0)
  if not tau_grad or params.tau is None:
    return dy, None
  y_c = P.centred_y(z, shift, tau_col)
  counted = dy != 0 if fresh is None else (dy != 0) & fresh
  dtau = -jnp.sum(jnp.where(counted, dy * y_c, 0.0), axis=-1, keepdims=targets.ndim == 2)
  return dy, dtau / params.tau
