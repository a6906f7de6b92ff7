"""The kernel contract: per-row softmax partials, their one merge, and one ``finish``.

Every implementation (XLA, Pallas GPU, Pallas TPU, each vocabulary shard of the
vocab-parallel functions) reduces a block of a logits row to a
:class:`RowPartials`; partials of blocks of the same row are merged by
:func:`combine` (over an array axis, or over a mesh axis with collectives), and
:func:`finish` turns the merged partials into log-probability, log-sum-exp,
entropy and the greedy flag. The numerics live here, once:

* Shift before you scale: the partials hold the *capped* logits
  ``z = softcap(x)`` (float32) and apply the temperature only to differences
  ``z - shift``, so ``y = z / temperature`` is never formed: a bfloat16 logit
  near the format's maximum at temperature 0.5 would overflow float32 to
  ``inf`` (and ``inf - inf`` is NaN), though every log-probability is finite.
* ``lp = (t - shift) / tau - log(s)``, never ``t / tau - (lse)``: at large logit
  magnitudes the log-sum-exp rounds to the ulp of ``shift`` (a row of 1e8 would
  score 0 instead of ``-log V``). The backward pass gets ``shift`` and
  ``log(s)`` separately for the same reason.
* NaN wins: a NaN anywhere in the row makes ``m`` and ``s`` NaN, and so the
  log-probability, even when the target is ``-inf``.
* ``-inf`` at the target is probability zero: ``-inf``, also for all-``-inf`` rows.
* greedy means the target is the *first* argmax of its capped row ``z`` (a
  temperature never changes the greedy token).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32
NO_COLUMN = jnp.iinfo(jnp.int32).max


class RowPartials(NamedTuple):
  """Softmax statistics of one block of columns of each row, all ``[N]``.

  ``z`` is the capped logit ``softcap(x)`` in float32 (:func:`capped`) and
  ``tau`` the row's temperature: the softmax is over ``y = z / tau``, always
  formed as ``(z - shift) / tau`` (:func:`scaled`).

  Attributes:
    m: max of ``z`` over the block (``-inf`` for an empty or all-``-inf``
      block; NaN if the block holds NaN).
    s: sum of ``exp((z - shift(m)) / tau)``; see :func:`shift_of`.
    t: the target's ``z``, or ``-inf`` when the block does not hold the target.
    arg: int32, the first column (global id) where ``z == m``. Implementations
      that only decide the target's own flag may report, instead, the target
      itself when it is the block's first argmax, ``-1`` when an earlier column
      of the block attains ``m``, and any column of the block on the target's
      side otherwise (e.g. the block's first column): merges then give the
      same greedy flag.
    sy: sum of ``e * (z - shift(m)) / tau`` with ``e`` the terms of ``s``
      (finite terms only), for
      the entropy; None where no entropy is asked for. Centred on the shift so
      that the entropy keeps its precision at large logit magnitudes.
  """

  m: jax.Array
  s: jax.Array
  t: jax.Array
  arg: jax.Array
  sy: jax.Array | None = None


def finite_or_zero(x: jax.Array) -> jax.Array:
  # |x| < inf rather than isfinite: it lowers in every backend, Pallas Triton included.
  return jnp.where(jnp.abs(x) < jnp.inf, x, 0.0)


def shift_of(m: jax.Array) -> jax.Array:
  """The shift of a row's exponentials: its max, or 0 when that is not finite."""
  return finite_or_zero(m)


# tanh(y) = y + y**3 q(y**2) on |y| < _TANH_SMALL: q a minimax polynomial
# (relative error under 5e-9), coefficients from s**0 up.
_TANH_SMALL = 0.625
_TANH_Q = (-0.33333284410815744, 0.133314849843449, -0.053742077920945146, 0.020644166172266804,
           -0.005708570191834194)  # fmt: skip


@jax.jit
def monotone_tanh(y: jax.Array) -> jax.Array:
  """float32 ``tanh(y)``, non-decreasing in ``y`` (within 2.1 ulp of the exact
  value by its roundings, given an ``exp`` within 1 ulp; 1.33 on XLA:CPU over
  every float32; -inf, inf, NaN as ``tanh``'s).

  Softcap's ``tanh``: XLA's float32 ``tanh`` keeps the order of its arguments
  only up to a few ulp (on the CPU one adjacent pair of floats in five, from
  0.5 to 8, decreases), and the sampler's rules (top-k, min-p, the first argmax)
  read the order of the capped logits: a row's largest capped logit must be
  the cap of its largest logit. Here ``|y| >= 0.625`` gives ``1 - 2 / (exp(2
  |y|) + 1)``, non-decreasing wherever ``exp`` is (each step is one correctly
  rounded operation); below, an odd polynomial whose correction is a small
  fraction of ``y``. Checked on every float32 up to 1e38 on XLA:CPU. Each
  branch takes a clamped argument, so derivatives by autodiff stay finite. One
  jitted function, so an eager call rounds as a compiled program does (XLA
  contracts the polynomial's multiply-adds where they are fused)."""
  y = y.astype(_F32)
  a = jnp.abs(y)
  ys = jnp.clip(y, -_TANH_SMALL, _TANH_SMALL)
  s = ys * ys
  q = functools.reduce(lambda acc, c: acc * s + c, _TANH_Q[-2::-1], jnp.asarray(_TANH_Q[-1], _F32))
  small = ys + ys * s * q
  # exp(32) is finite; past |y| = 9.1 the quotient rounds to 1 anyway.
  large = 1.0 - 2.0 / (jnp.exp(2.0 * jnp.minimum(a, 16.0)) + 1.0)
  return jnp.where(a < _TANH_SMALL, small, jnp.where(y < 0, -large, large))


def capped(x: jax.Array, softcap: float | None) -> jax.Array:
  """``z = softcap(x) = softcap * tanh(x / softcap)`` in float32
  (:func:`monotone_tanh`, so ``z`` keeps the order of ``x``); ``-inf`` stays
  ``-inf`` under softcap."""
  z = x.astype(_F32)
  if softcap is not None:
    z = jnp.where(z == -jnp.inf, -jnp.inf, softcap * monotone_tanh(z / softcap))
  return z


def scaled(d: jax.Array, tau: jax.Array | None) -> jax.Array:
  """``d / tau`` (``d`` itself without a temperature): the temperature applied to a
  difference of capped logits, never to a capped logit itself."""
  return d if tau is None else d / tau


def scaled_where(possible: jax.Array, d: jax.Array, tau: jax.Array | None) -> jax.Array:
  """:func:`scaled` where ``possible``, ``-inf`` elsewhere; an impossible ``d``
  (``-inf``) never meets the temperature, whose derivative would be 0 x inf, NaN."""
  return jnp.where(possible, scaled(jnp.where(possible, d, 0.0), tau), -jnp.inf)


def transform_grad(x: jax.Array, tau: jax.Array | None, softcap: float | None) -> jax.Array | float:
  """``dy / dx`` of ``y = softcap(x) / tau`` elementwise (a Python 1.0 when neither applies)."""
  d: jax.Array | float = 1.0
  if softcap is not None:
    d = 1.0 - jnp.square(monotone_tanh(x.astype(_F32) / softcap))
  if tau is not None:
    d = d / tau
  return d


def grad_x(dy: jax.Array, x: jax.Array, tau: jax.Array | None, softcap: float | None):
  """``d x`` from ``d y`` through ``y = softcap(x) / tau``, elementwise (float32).

  Zero wherever ``dy`` is zero: a dead row's logits may hold NaN, whose
  ``transform_grad`` would otherwise turn ``0 * NaN`` into a NaN gradient.
  """
  return jnp.where(dy != 0, dy * transform_grad(x, tau, softcap), 0.0)


def empty(shape: int | tuple[int, ...], with_entropy: bool = False) -> RowPartials:
  """The partials of no columns (the identity of :func:`combine`), each field of ``shape``."""
  return RowPartials(
    m=jnp.full(shape, -jnp.inf, _F32),
    s=jnp.zeros(shape, _F32),
    t=jnp.full(shape, -jnp.inf, _F32),
    arg=jnp.full(shape, NO_COLUMN, jnp.int32),
    sy=jnp.zeros(shape, _F32) if with_entropy else None,
  )


def block_partials(
  z: jax.Array,
  cols: jax.Array,
  targets: jax.Array,
  tau: jax.Array | None,
  keepdims: bool = False,
  with_entropy: bool = True,
  stats=None,
) -> RowPartials:
  """The partials of one block of capped logits ``z [N, W]`` at global columns ``cols``.

  ``targets`` is ``[N]`` and every field ``[N]``; with ``keepdims`` both are
  ``[N, 1]`` (the 2-D layout TPU kernels keep). ``tau`` is ``[N, 1]`` or None.
  Columns outside the array must already be ``-inf`` in ``z``. ``stats``: the
  block's maximum ``m``, first column of it ``arg`` (counted from the block's
  first, ``W`` where none) and target value ``t``, ``[N]`` each, where a kernel
  took them (:class:`lpkernel.ops.processed.cpu_top_k.BlockStats`: XLA's
  reductions give the same; not with ``keepdims``), else reduced here.
  """
  target_col = targets if keepdims else targets[:, None]
  if stats is None:
    m = jnp.max(z, axis=-1, keepdims=True)
    t = jnp.max(jnp.where(cols == target_col, z, -jnp.inf), axis=-1, keepdims=True)
    arg = jnp.min(jnp.where(z == m, cols, NO_COLUMN), axis=-1, keepdims=True)
  else:
    m, t = stats.m[:, None], stats.t[:, None]
    arg = jnp.where(stats.arg < z.shape[-1], cols[:, :1] + stats.arg[:, None], NO_COLUMN)
  y_c = scaled(z - shift_of(m), tau)
  e = jnp.exp(y_c)
  p = RowPartials(
    m=m,
    s=jnp.sum(e, axis=-1, keepdims=True),
    t=t,
    arg=arg,
    sy=jnp.sum(e * finite_or_zero(y_c), axis=-1, keepdims=True) if with_entropy else None,
  )
  return p if keepdims else jax.tree.map(lambda a: a[:, 0], p)


class Reducers(NamedTuple):
  """How :func:`combine` reduces over the blocks: an array axis or a mesh axis.

  ``max`` and ``sum`` take an array or a tuple of arrays.
  """

  max: Callable
  sum: Callable
  min: Callable


def over_axis(axis: int) -> Reducers:
  """Reduce partials stacked along ``axis`` of each field."""
  return Reducers(
    max=lambda x: jax.tree.map(lambda a: jnp.max(a, axis=axis), x),
    sum=lambda x: jax.tree.map(lambda a: jnp.sum(a, axis=axis), x),
    min=lambda x: jnp.min(x, axis=axis),
  )


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _pmax(x, axis_name: str):
  """``lax.pmax`` with a derivative (JAX has none): the tangent of the devices
  holding the max, averaged over ties. Only a derivative of a derivative meets
  it (the custom VJPs' rules are differentiated then): the shift's tangent
  cancels in every result, and the target's logit lives on one device."""
  return lax.pmax(x, axis_name)


@_pmax.defjvp
def _pmax_jvp(axis_name, primals, tangents):
  (x,), (dx,) = primals, tangents
  m = _pmax(x, axis_name)

  def tangent(x, m, dx):
    at = x == m
    ties = lax.psum(at.astype(dx.dtype), axis_name)
    return lax.psum(jnp.where(at, dx, 0), axis_name) / jnp.maximum(ties, 1)

  return m, jax.tree.map(tangent, x, m, dx)


def over_mesh(axis_name: str) -> Reducers:
  """Reduce partials held by the devices along a mesh axis (inside ``shard_map``).

  A tuple is reduced by one all-reduce of several operands.
  """
  return Reducers(
    max=lambda x: _pmax(x, axis_name),
    sum=lambda x: lax.psum(x, axis_name),
    min=lambda x: lax.pmin(x, axis_name),
  )


def combine(
  p: RowPartials, reduce: Reducers, tau: jax.Array | None, expand=lambda x: x
) -> RowPartials:
  """The online-softmax merge of the blocks' partials: the only one in lpkernel.

  Args:
    p: partials of several blocks of the same rows.
    reduce: reductions over the blocks (:func:`over_axis` or :func:`over_mesh`).
    tau: the rows' temperatures ``[N]`` (as the reduced values), or None.
    expand: puts a reduced ``[N]`` value back beside the blocks (e.g. a
      ``[:, None]`` for blocks along axis 1; identity for a mesh axis).
  """
  m, t = reduce.max((p.m, p.t))
  tau = None if tau is None else expand(tau)
  # 0 for an empty block, with no derivative (a derivative of -inf / tau is
  # NaN in a gradient of a gradient); NaN stays NaN.
  gap = p.m - expand(shift_of(m))
  empty_block = gap == -jnp.inf
  scale = jnp.where(empty_block, 0.0, jnp.exp(scaled(jnp.where(empty_block, 0.0, gap), tau)))
  # Ties go to the lowest column; a block whose max is below the row's never wins.
  arg = reduce.min(jnp.where(p.m == expand(m), p.arg, NO_COLUMN))
  if p.sy is None:
    return RowPartials(m=m, s=reduce.sum(p.s * scale), t=t, arg=arg)
  # Re-centre each block's sum of p * (y - shift) on the row's shift.
  delta = jnp.where(p.s > 0, scaled(shift_of(p.m) - expand(shift_of(m)), tau), 0.0)
  # A block without weight in the row adds nothing (its delta may be -inf).
  recentred = jnp.where(scale == 0, 0.0, (p.sy + p.s * delta) * scale)
  s, sy = reduce.sum((p.s * scale, recentred))
  return RowPartials(m=m, s=s, t=t, arg=arg, sy=sy)


def block_offset(axis_name: str | None, block_columns: int) -> jax.Array | int:
  """The first global column of this device's block (0 without a mesh axis)."""
  return 0 if axis_name is None else lax.axis_index(axis_name) * block_columns


def combine_shards(p: RowPartials, axis_name: str | None, offset, tau) -> RowPartials:
  """Merges the partials of every device's vocabulary block along ``axis_name``
  (inside ``shard_map``; ``tau`` the rows' temperatures or None); block-local
  argmax columns become global ones."""
  if axis_name is None:
    return p
  with jax.named_scope("vocab_parallel_combine"):
    return combine(at_offset(p, offset), over_mesh(axis_name), tau)


def at_offset(p: RowPartials, offset) -> RowPartials:
  """A block's partials with its block-local argmax columns moved to global ones
  (the block starts at column ``offset``); the merges' greedy flags are unchanged."""
  return p._replace(arg=jnp.where(p.arg == NO_COLUMN, NO_COLUMN, p.arg + offset))


def merge(a: RowPartials, b: RowPartials, tau: jax.Array | None) -> RowPartials:
  """Merges two blocks' partials of the same rows (e.g. a running sweep and a new
  block); ``tau`` the rows' temperatures or None."""
  stacked = jax.tree.map(lambda x, y: jnp.stack([x, y]), a, b)
  return combine(stacked, over_axis(0), tau)


class Finished(NamedTuple):
  """What :func:`finish` gives per row, all ``[N]``.

  Attributes:
    logprob: log Pr(target); NaN for an id outside ``[0, V)``.
    greedy: bool, the target is the first argmax of its row (False where NaN).
    shift: float32 shift of the row's capped logits ``z`` (their max, or 0).
    log_s: ``log(sum exp((z - shift) / tau))``.
    centred: ``E_p[(z - shift) / tau]`` (0 without ``sy``); the entropy is
      ``log_s - centred`` (0 for a row of ``-inf`` logits).
    lse: the log-sum-exp of ``y = z / tau``, ``shift / tau + log_s``
      (``inf`` only where it exceeds float32).
  """

  logprob: jax.Array
  greedy: jax.Array
  shift: jax.Array
  log_s: jax.Array
  centred: jax.Array
  lse: jax.Array

  @property
  def entropy(self) -> jax.Array:
    # A row of -inf logits holds no possible token: 0, by 0 log 0 = 0, as the plain form.
    return jnp.where(self.log_s == -jnp.inf, 0.0, self.log_s - self.centred)


def finish(p: RowPartials, targets: jax.Array, vocab_size: int, tau: jax.Array | None) -> Finished:
  """Log-probability, greedy flag and normaliser of each row from its merged partials.

  Args:
    p: the partials of whole rows.
    targets: int32[N] global ids; outside ``[0, vocab_size)`` gives NaN.
    tau: the rows' temperatures (shaped as ``targets``), or None.
  """
  shift = shift_of(p.m)
  log_s = jnp.log(p.s)
  nan_row = jnp.isnan(p.m) | jnp.isnan(log_s)
  logprob = jnp.where((p.t == -jnp.inf) & ~nan_row, -jnp.inf, scaled(p.t - shift, tau) - log_s)
  in_range = (targets >= 0) & (targets < vocab_size)
  logprob = jnp.where(in_range, logprob, jnp.nan)
  # An impossible (-inf) target is never greedy, nor is a NaN value.
  greedy = (p.arg == targets) & (p.t == p.m) & (p.t > -jnp.inf) & ~jnp.isnan(logprob)
  centred = jnp.zeros_like(shift) if p.sy is None else jnp.where(p.s > 0, p.sy / p.s, 0.0)
  return Finished(logprob, greedy, shift, log_s, centred, scaled(shift, tau) + log_s)


def poisoned_rows(targets, tau, vocab_size) -> tuple[jax.Array, jax.Array]:
  """bool[N] masks of rows whose values are NaN by policy: (id outside
  ``[0, vocab_size)``, temperature not finite and positive)."""
  bad_id = (targets < 0) | (targets >= vocab_size)
  # |tau| < inf rather than isfinite, so that kernels can call it (see finite_or_zero).
  bad_tau = jnp.zeros_like(bad_id) if tau is None else ~((jnp.abs(tau) < jnp.inf) & (tau > 0))
  return bad_id, bad_tau


class LossRows(NamedTuple):
  """What a training loss tells an implementation about its rows in the forward pass.

  A loss whose per-row cotangents are known once each row's statistics are (a
  weighted log-likelihood, z-loss) lets an implementation write the gradients
  while the logits are at hand, instead of recomputing them in the backward.

  Attributes:
    targets: int32[N] target ids local to the implementation's columns.
    cotangents: ``(partials of rows [lo, lo + width), lo, width) -> (finished,
      g, out)``: the rows' :class:`Finished` statistics, their cotangents
      ``(g_lp, g_lse, g_entropy)`` (``[width]`` each, None for an absent term)
      and their per-row outputs (a pytree of ``[width]`` arrays).
    weights: float32[N], the rows' loss weights, and ``tau`` the caller's
      float32[N] temperatures or None (both for :attr:`row_terms`).
    row_terms: ``(finished, targets, tau, weights) -> (g_lp, g_lse or None,
      out)`` of the same rows, elementwise, so that a kernel can call it on the
      rows it holds (``tau`` the caller's temperatures or None); None where the
      rows' partials must first be merged across devices.
  """

  targets: jax.Array
  cotangents: Callable
  weights: jax.Array | None = None
  tau: jax.Array | None = None
  row_terms: Callable | None = None


def nll_terms(f: Finished, targets, tau, weights, *, z_loss: float, vocab_size: int):
  """Row by row, the loss ``w * (z_loss * lse ** 2 - lp)`` and its cotangents.

  Elementwise on ``[N]`` rows (kernels call it too). Rows of weight 0 give
  exactly 0 whatever they hold; a weighted row with an id outside
  ``[0, vocab_size)`` or a bad temperature (``tau``: the caller's, or None)
  gives NaN, and a NaN ``g_lp`` so that its gradients are NaN too; a NaN
  weight wins.

  Returns:
    (g_lp, g_lse or None without z-loss, the rows' terms), float32 ``[N]``.
  """
  bad_id, bad_tau = poisoned_rows(targets, tau, vocab_size)
  lp = jnp.where(bad_id | bad_tau, jnp.nan, f.logprob)
  live = weights != 0
  term, g_lse = -lp, None
  if z_loss != 0:
    lse = jnp.where(bad_tau, jnp.nan, f.lse)
    term = z_loss * jnp.square(lse) - lp
    g_lse = jnp.where(live, 2 * z_loss * weights * lse, 0.0)
  g_lp = jnp.where(live & (bad_id | bad_tau), jnp.nan, -weights)
  return g_lp, g_lse, jnp.where(live, weights * term, 0.0)


def nll_rows(
  targets, tau, used_tau, weights, z_loss: float, vocab_size: int, axis_name, offset
) -> LossRows:
  """The :class:`LossRows` of ``sum_n w_n * (z_loss * lse_n ** 2 - lp_n)`` on this shard.

  Args:
    targets: int32[N] global ids; ``tau``: the caller's float32[N] temperatures
      or None, ``used_tau`` those the implementation transforms with
      (:func:`safe_tau`); ``weights``: float32[N].
    axis_name, offset: the mesh axis the columns are split over (or None) and
      this device's first column (:func:`block_offset`).
  """

  def cotangents(p: RowPartials, lo, width):
    def cut(a):
      return None if a is None else lax.dynamic_slice_in_dim(a, lo, width)

    t = cut(targets)
    used = cut(used_tau)
    f = finish(combine_shards(p, axis_name, offset, used), t, vocab_size, used)
    g_lp, g_lse, out = nll_terms(f, t, cut(tau), cut(weights), z_loss=z_loss, vocab_size=vocab_size)
    return f, (g_lp, g_lse, None), out

  def row_terms(f, t, tau, w):
    return nll_terms(f, t, tau, w, z_loss=z_loss, vocab_size=vocab_size)

  return LossRows(
    targets - offset, cotangents, weights, tau, row_terms if axis_name is None else None
  )


def nll_inputs(targets, tau, weights, z_loss: float, vocab_size: int, axis_name, block_columns):
  """The loss's :func:`nll_rows` on this shard (``block_columns`` of the
  vocabulary) and the temperatures the implementation transforms with: the
  caller's, 1 on dead and poisoned rows (None without temperatures)."""
  offset = block_offset(axis_name, block_columns)
  used = safe_tau(tau, weights != 0, poisoned_rows(targets, tau, vocab_size)[1])
  return nll_rows(targets, tau, used, weights, z_loss, vocab_size, axis_name, offset), used


def safe_tau(tau, live, bad):
  """The temperatures to transform with: 1 on dead (not ``live``) and poisoned
  (``bad``) rows, whose logits may hold anything; None stays None."""
  return None if tau is None else jnp.where(live & ~bad, tau, 1.0)


def dense_cotangents(g, like: jax.Array) -> list[jax.Array]:
  """``(g_lp, g_lse, g_entropy)`` with zeros (shaped like ``like``) for absent terms."""
  return [jnp.zeros_like(like) if c is None else c for c in g]


def softmax(
  z: jax.Array, shift: jax.Array, log_s: jax.Array, tau: jax.Array | None, exp=jnp.exp
) -> jax.Array:
  """``p = exp((z - shift) / tau - log_s)`` with per-row ``shift``, ``log_s`` and
  ``tau`` (or None) broadcast to the capped logits ``z``.

  A row with no mass (all ``-inf``: ``log_s = -inf``) has ``p = 0``, not
  ``exp(-inf + inf)``; a row holding ``+inf`` (``log_s = +inf``) has ``p = 0`` at
  its finite columns and NaN at its ``+inf`` ones; NaN stays NaN. ``exp`` may be
  a kernel's own exponential.
  """
  return exp(scaled(z - shift, tau) - jnp.where(log_s == -jnp.inf, 0.0, log_s))


def grad_y(
  is_target: jax.Array,
  p: jax.Array,
  g_lp: jax.Array,
  g_lse: jax.Array | None = None,
  g_ent: jax.Array | None = None,
  y_c: jax.Array | None = None,
  centred: jax.Array | None = None,
  *,
  z: jax.Array,
) -> jax.Array:
  """d/dy of ``g_lp * lp + g_lse * lse + g_ent * entropy`` over a block of rows' ``y``.

  Every implementation's backward, once: ``(onehot - p)``, ``p`` and
  ``p * (E_p[y] - y)``, with per-row cotangents broadcast to the block (``[N, 1]``
  against ``[N, W]``). A term whose cotangent is zero is left out, so ``inf * 0``
  never makes NaN on a dead row. A ``-inf`` logit is a constant (impossible
  under every option): no derivative reaches it, not even from its own
  impossible target, and not NaN from a row with no mass.

  Args:
    z: the block's capped logits (only their ``-inf`` entries matter here).
    is_target: bool, the block's target column of each row.
    p: the softmax over the block (:func:`softmax`).
    g_lse, g_ent: None where only log-probabilities are differentiated.
    y_c: :func:`centred_y`; ``centred``: ``E_p[y_c]`` (:class:`Finished`),
      both needed with ``g_ent``.
  """
  dy = jnp.where(g_lp != 0, g_lp * (jnp.where(is_target, 1.0, 0.0) - p), 0.0)
  if g_lse is not None:
    dy = dy + jnp.where(g_lse != 0, g_lse * p, 0.0)
  if g_ent is not None:
    assert y_c is not None and centred is not None, "the entropy's term needs y_c and centred"
    dy = dy + jnp.where(g_ent != 0, g_ent * p * (centred - y_c), 0.0)
  return jnp.where(z == -jnp.inf, 0.0, dy)


def centred_y(z: jax.Array, shift: jax.Array, tau: jax.Array | None) -> jax.Array:
  """``y - shift / tau = (z - shift) / tau`` where finite, else 0: the centred
  transformed logits the entropy and the temperature's derivative read."""
  return finite_or_zero(scaled(z - shift, tau))


def grad_tau(
  dy: jax.Array,
  y_c: jax.Array,
  tau: jax.Array,
  shift: jax.Array,
  p: jax.Array,
  g_lse: jax.Array | None,
) -> jax.Array:
  """``d/d tau`` of a row block given its ``dy``; rows ``[N, 1]`` in, ``[N, 1]`` out.

  ``y = z / tau``, so ``dy/dtau = -y / tau`` with ``y = y_c + shift / tau``
  (``shift`` in ``z``'s units). The constant ``shift / tau`` meets ``sum(dy)``,
  whose log-probability and entropy parts cancel over a row's blocks: only the
  log-sum-exp's part, ``g_lse`` times the block's mass (``p``, zero outside the
  array), is kept, exactly, instead of a sum of rounding errors that
  ``shift / tau`` (past float32 near the format's maximum) would blow up. An
  impossible target's ``y`` is a constant ``-inf`` (centred: no shift part).
  """
  d = jnp.sum(dy * y_c, axis=-1, keepdims=True)
  if g_lse is not None:
    shifted = lse_shift(jnp.sum(p, axis=-1, keepdims=True), shift, tau)
    d = d + jnp.where(g_lse != 0, g_lse * shifted, 0.0)
  return -d / tau


def lse_shift(mass: jax.Array, shift: jax.Array, tau: jax.Array) -> jax.Array:
  """A block's part of ``E_p[y]`` that the row's shift makes, ``mass * shift / tau``
  (``mass`` the block's share of the softmax): 0 where the block has no mass, so
  that a ``shift / tau`` past float32 never makes NaN."""
  return jnp.where(mass > 0, mass * (shift / tau), 0.0)
