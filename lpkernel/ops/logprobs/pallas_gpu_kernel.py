"""The logits path's Pallas GPU (Triton) kernel bodies: the forward's online
pass over a row's tiles, the elementwise gradient and the one-kernel training
loss. Their wrapper, tiling and launch are :mod:`lpkernel.ops.logprobs.pallas_gpu`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lpkernel import partials as P
from lpkernel.ops.pallas_backends import triton as plgpu  # the wrapper required it

_F32 = jnp.float32
_LOG2E = 1.4426950408889634


def _exp(x):
  """``exp`` as one ``ex2.approx`` (``exp2``) and a multiply.

  Pallas lowers ``jnp.exp`` to libdevice's accurate ``__nv_expf`` (a dozen
  instructions); at bfloat16 bandwidth the kernel is then bound by arithmetic.
  The argument is already shifted (small), so scaling it by log2(e) keeps its
  precision; ``ex2.approx`` is good to about 2 ulp.
  """
  return jnp.exp2(x * _LOG2E)


def _iota(n: int) -> jax.Array:
  """``[0, n)`` as int32 (index arithmetic stays 32-bit under ``jax_enable_x64``)."""
  return jnp.arange(n, dtype=jnp.int32)


def _any(flags):
  # Triton lowering has no reduce_or.
  return jnp.max(flags.astype(jnp.int32)) > 0


def _online_tile(
  x_ref, rows, row_ok, target, tau, start, carry, *, block_v, softcap, with_entropy, with_arg=True,
  maxima=None,
):  # fmt: skip
  """Folds columns ``[start, start + block_v)`` of the rows into their running
  ``(m, s, t, arg, sy)`` (float32 ``[block_rows]`` each, as ``tau``; ``arg``
  left as it is without ``with_arg``, for a loss that reads no greedy flag).

  ``maxima``: None, or ``(ref, group)``: store the maxima of the tile's
  ``group``-column groups (which ``block_v`` holds whole) into ``ref [N, G]``."""
  v = x_ref.shape[1]
  m, s, t, arg, sy = carry
  cols = jnp.asarray(start, jnp.int32) + _iota(block_v)
  mask = row_ok[:, None] & (cols < v)[None, :]
  x = plgpu.load(x_ref.at[rows[:, None], cols[None, :]], mask=mask, other=-jnp.inf)
  z = P.capped(x, softcap)  # masked columns are -inf: no mass, never the argmax
  if maxima is not None:
    _store_group_maxima(*maxima, z, rows, row_ok, start)
  block_m = jnp.max(z, axis=1)
  new_m = jnp.maximum(m, block_m)
  shift = P.shift_of(new_m)
  scale = _exp(P.scaled(m - shift, tau))  # 0 while the row is empty; NaN stays NaN
  y_c = P.scaled(z - shift[:, None], None if tau is None else tau[:, None])
  e = _exp(y_c)
  if with_entropy:  # re-centre the running sum of p * (y - shift) on the new shift
    delta = jnp.where(s > 0, P.scaled(P.shift_of(m) - shift, tau), 0.0)
    sy = (sy + s * delta) * scale + jnp.sum(e * P.finite_or_zero(y_c), axis=1)
  s = s * scale + jnp.sum(e, axis=1)
  # The first argmax moves only where a block raises the max (rarely, after
  # the first blocks): skip its per-element work otherwise. Ties keep the
  # earlier column.
  raised = block_m > m
  if with_arg:
    arg = jax.lax.cond(
      _any(raised),
      lambda: jnp.where(
        raised,
        jnp.min(jnp.where(z == block_m[:, None], cols[None, :], P.NO_COLUMN), axis=1),
        arg,
      ),
      lambda: arg,
    )
  # The target's z, from the same arithmetic as the max it is compared with,
  # picked only in the tile that holds it.
  here = (target >= start) & (target < start + block_v)
  t = jax.lax.cond(
    _any(here),
    lambda: jnp.maximum(
      t, jnp.max(jnp.where(cols[None, :] == target[:, None], z, -jnp.inf), axis=1)
    ),
    lambda: t,
  )
  return new_m, s, t, arg, sy


def _store_group_maxima(ref, group, z, rows, row_ok, start):
  """The maxima of ``z [block_rows, block_v]``'s ``group``-column groups, stored
  at their group indices (``start // group`` onwards) in ``ref [N, G]``."""
  block_rows, block_v = z.shape
  per_tile = block_v // group
  maxima = jnp.max(z.reshape(block_rows, per_tile, group), axis=2)
  groups = jnp.asarray(start, jnp.int32) // group + _iota(per_tile)
  mask = row_ok[:, None] & (groups < ref.shape[1])[None, :]
  plgpu.store(ref.at[rows[:, None], groups[None, :]], maxima, mask=mask)


def _no_columns(block_rows):
  """The running ``(m, s, t, arg, sy)`` of rows before their first tile."""
  minus_inf = jnp.full((block_rows,), -jnp.inf, _F32)
  zeros = jnp.zeros((block_rows,), _F32)
  return minus_inf, zeros, minus_inf, jnp.full((block_rows,), P.NO_COLUMN, jnp.int32), zeros


def partials_kernel(
  x_ref, t_ref, *refs, block_rows, block_v, span, softcap, has_tau, with_entropy, group=None
):
  """The rows' partials per vocabulary span; with ``group``, also every
  ``group``-column group's max of the capped logits (the last output)."""
  tau_ref, refs = (refs[0], refs[1:]) if has_tau else (None, refs)
  maxima = None if group is None else (refs[-1], group)
  refs = refs if group is None else refs[:-1]
  n = x_ref.shape[0]
  i, j = pl.program_id(0), pl.program_id(1)
  rows = i * block_rows + _iota(block_rows)
  row_ok = rows < n
  tau = None if tau_ref is None else plgpu.load(tau_ref.at[rows], mask=row_ok, other=1.0)
  target = plgpu.load(t_ref.at[rows], mask=row_ok, other=-1)
  tile = functools.partial(
    _online_tile, x_ref, rows, row_ok, target, tau,
    block_v=block_v, softcap=softcap, with_entropy=with_entropy, maxima=maxima,
  )  # fmt: skip
  fields = jax.lax.fori_loop(
    0, span // block_v, lambda k, c: tile(j * span + k * block_v, c), _no_columns(block_rows)
  )
  out = j * n + rows
  for ref, value in zip(refs, fields, strict=False):  # sy only with the entropy
    plgpu.store(ref.at[out], value, mask=row_ok)


def _tile_grad(x_ref, rows, row_ok, cols, target, tau, softcap, shift, log_s, g_lp, g_lse,
               g_ent=None, centred=None, *, with_dtau):  # fmt: skip
  """d x of one ``[block_rows, block_v]`` tile (its store mask too), and with
  ``with_dtau`` its rows' part of d tau (else None).

  Row values are ``[block_rows, 1]``; ``g_lse``, ``g_ent`` and ``centred`` may be None.
  """
  v = x_ref.shape[1]
  mask = row_ok[:, None] & (cols < v)[None, :]
  x = plgpu.load(x_ref.at[rows[:, None], cols[None, :]], mask=mask, other=0.0)
  z = P.capped(x, softcap)
  p = P.softmax(z, shift, log_s, tau, exp=_exp)
  y_c = P.centred_y(z, shift, tau) if g_ent is not None or with_dtau else None
  dy = P.grad_y(cols[None, :] == target, p, g_lp, g_lse, g_ent, y_c, centred, z=z)
  dx = P.grad_x(dy, x, tau, softcap)
  dtau = None
  if with_dtau:  # the masked-out loads (x = 0) carry no gradient and no mass
    dy, p = (jnp.where(mask, a, 0.0) for a in (dy, p))
    dtau = P.grad_tau(dy, y_c, tau, shift, p, g_lse)
  return dx, mask, dtau


def grad_kernel(x_ref, t_ref, *refs, block_rows, block_v, softcap, has_tau, fused):
  """d x of ``g_lp * lp`` (the logits path) or, ``fused``, of ``g_lp * lp +
  g_lse * lse + g_ent * entropy`` with each row block's part of d tau."""
  rows_in = 6 if fused else 3  # shift, log_s, g_lp (, g_lse, g_ent, centred)
  row_refs, refs = refs[:rows_in], refs[rows_in:]
  tau_ref, (dx_ref, *dtau_ref) = (refs[0], refs[1:]) if has_tau else (None, refs)
  n = x_ref.shape[0]
  rows = pl.program_id(0) * block_rows + _iota(block_rows)
  cols = pl.program_id(1) * block_v + _iota(block_v)
  row_ok = rows < n

  def row(ref, other=0.0):
    return plgpu.load(ref.at[rows], mask=row_ok, other=other)[:, None]

  shift, log_s, g_lp, *fused_rows = (row(r) for r in row_refs)
  g_lse, g_ent, centred = fused_rows if fused else (None, None, None)
  tau = None if tau_ref is None else row(tau_ref, 1.0)
  dx, mask, dtau = _tile_grad(
    x_ref, rows, row_ok, cols, row(t_ref, -1), tau, softcap, shift, log_s, g_lp, g_lse, g_ent,
    centred, with_dtau=bool(dtau_ref),
  )  # fmt: skip
  plgpu.store(dx_ref.at[rows[:, None], cols[None, :]], dx.astype(dx_ref.dtype), mask=mask)
  if dtau_ref:  # this column block's part of d tau; the caller sums the blocks
    plgpu.store(dtau_ref[0].at[pl.program_id(1) * n + rows], dtau[:, 0], mask=row_ok)


def loss_kernel(x_ref, t_ref, w_ref, *refs, block_rows, block_v, softcap, has_tau, row_terms):
  """A training loss over whole rows in one program: the online pass over the
  row's tiles, the loss's cotangents from its statistics, then ``d x`` tile by
  tile (the row is read twice, the second time mostly from L2)."""
  tau_refs, (dx_ref, out_ref, *dtau_ref) = (refs[:2], refs[2:]) if has_tau else ((), refs)
  n, v = x_ref.shape
  rows = pl.program_id(0) * block_rows + _iota(block_rows)
  row_ok = rows < n
  target = plgpu.load(t_ref.at[rows], mask=row_ok, other=-1)
  weight = plgpu.load(w_ref.at[rows], mask=row_ok, other=0.0)
  # The safe temperature (1 on dead or poisoned rows) transforms; the caller's poisons.
  tau, caller_tau = (
    (plgpu.load(r.at[rows], mask=row_ok, other=1.0) for r in tau_refs) if has_tau else (None, None)
  )
  tau_col = None if tau is None else tau[:, None]
  tiles = pl.cdiv(v, block_v)
  tile = functools.partial(
    _online_tile, x_ref, rows, row_ok, target, tau,
    block_v=block_v, softcap=softcap, with_entropy=False, with_arg=False,
  )  # fmt: skip
  m, s, t, arg, _ = jax.lax.fori_loop(
    0, tiles, lambda k, c: tile(k * block_v, c), _no_columns(block_rows)
  )
  f = P.finish(P.RowPartials(m, s, t, arg), target, v, tau)
  g_lp, g_lse, out = row_terms(f, target, caller_tau, weight)
  plgpu.store(out_ref.at[rows], out, mask=row_ok)
  col = lambda a: None if a is None else a[:, None]  # noqa: E731

  def grad_tile(k, dtau):
    cols = k * block_v + _iota(block_v)
    dx, mask, dtau_k = _tile_grad(
      x_ref, rows, row_ok, cols, target[:, None], tau_col, softcap, col(f.shift), col(f.log_s),
      col(g_lp), col(g_lse), with_dtau=has_tau,
    )  # fmt: skip
    plgpu.store(dx_ref.at[rows[:, None], cols[None, :]], dx.astype(dx_ref.dtype), mask=mask)
    return dtau if dtau_k is None else dtau + dtau_k[:, 0]

  dtau = jax.lax.fori_loop(0, tiles, grad_tile, jnp.zeros((block_rows,), _F32))
  if dtau_ref:
    plgpu.store(dtau_ref[0].at[rows], jnp.where(weight != 0, dtau, 0.0), mask=row_ok)
