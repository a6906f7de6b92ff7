"""The compiled CPU replay kernels (lpkernel/ops/processed/cpu_replay.cc) against
a float64 NumPy oracle, and the replay they serve against its gathered XLA steps:
values and gradients, float32 and bfloat16, ids outside ``[0, V)``, awkward
widths, several token blocks, vmap, and the program for another platform."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lpkernel as lpk
from lpkernel.ops.processed import cpu_library, cpu_replay
from tests.helpers import holds_cpu_kernels, without_cpu_kernels


def _require_kernels():
  """CI and this machine have a C++ compiler: the kernels are built (a machine
  without one takes XLA's steps, logged; these tests then say why)."""
  if os.environ.get("LPKERNEL_CPU_KERNELS") == "0":
    pytest.skip("LPKERNEL_CPU_KERNELS=0")
  assert cpu_library.available()


def _oracle(h, w, ids, dx):
  """float64 ``(x, dh, dw)``: the kept dot products and their gradients for ``dx``."""
  h, w, dx = (np.asarray(a, np.float64) for a in (h, w, dx))
  ids = np.asarray(ids)
  ok = (ids >= 0) & (ids < w.shape[0])
  rows = w[np.where(ok, ids, 0)] * ok[..., None]  # [N, K, D]
  x = np.einsum("nd,nkd->nk", h, rows)
  g = dx * ok
  dh = np.einsum("nk,nkd->nd", g, rows)
  dw = np.zeros_like(w)
  np.add.at(
    dw, np.where(ok, ids, 0).reshape(-1), (g[..., None] * h[:, None, :]).reshape(-1, h.shape[1])
  )
  return x, dh, dw


def _gamma(t: int) -> float:
  """A float32 sum of ``t`` rounded products is within ``gamma_t = t u / (1 - t u)``
  (``u = 2^-24``) of the sum of their magnitudes, in any order; this bounds it."""
  return (t + 1) * 2.0**-24


def _close(got, want, scale, rtol):
  """``got`` within ``rtol`` of ``scale`` (the sum of the terms' magnitudes) of ``want``."""
  np.testing.assert_array_less(np.abs(np.asarray(got, np.float64) - want), rtol * scale + 1e-30)


@settings(max_examples=60, deadline=None)
@given(
  data=st.data(),
  n=st.integers(1, 9),
  d=st.sampled_from([1, 3, 4, 7, 8, 13, 33]),
  v=st.sampled_from([1, 2, 5, 40, 200]),  # 200: ids past one 64-bit word
  k=st.integers(1, 7),
  block=st.sampled_from([0, 1, 2, 4]),
  width=st.sampled_from([0, 8, 16]),  # hidden-state columns per pass of the forward
  dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
  vocab_axis=st.sampled_from([0, 1, -1]),
)
def test_dots_and_grads_are_the_oracles(data, n, d, v, k, block, width, dtype, vocab_axis):
  rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
  h = jnp.asarray(rng.normal(size=(n, d)), dtype)
  w = jnp.asarray(rng.normal(size=(v, d)), dtype)
  ids = jnp.asarray(rng.integers(-3, v + 3, (n, k)), jnp.int32)  # -1 padding, bad ids, repeats
  dx = jnp.asarray(rng.normal(size=(n, k)), jnp.float32)
  _require_kernels()
  x, dh, dw = _oracle(h.astype(jnp.float32), w.astype(jnp.float32), ids, dx)
  table = w if vocab_axis == 0 else w.T  # [D, V]: read in place
  dots = functools.partial(cpu_replay.kept_dots, block=block, vocab_axis=vocab_axis, width=width)
  got_x = jax.jit(dots)(h, table, ids)
  a = np.asarray(ids)
  twice = (a >= 0) & (a < v) & (np.sum(a[:, :, None] == a[:, None, :], axis=-1) > 1)
  repeated = jax.jit(cpu_replay.repeated, static_argnums=1)(ids, v)
  np.testing.assert_array_equal(repeated, twice.any(-1))  # a token naming an id twice
  grads = functools.partial(cpu_replay.kept_grads, block=block, vocab_axis=vocab_axis, width=width)
  got_dh, got_dw = jax.jit(grads)(h, table, ids, dx)
  got_dw = got_dw if vocab_axis == 0 else got_dw.T
  habs, wabs = np.abs(np.asarray(h, np.float64)), np.abs(np.asarray(w, np.float64))
  ones = np.ones_like(dx)
  scale_x = _oracle(habs, wabs, ids, ones)[0]
  _, scale_dh, scale_dw = _oracle(habs, wabs, ids, np.abs(np.asarray(dx)))

  # t = D per dot product, K per d hidden element, up to N * K per d unembed element.
  _close(got_x, x, scale_x, _gamma(d))
  _close(got_dh, dh, scale_dh, _gamma(k))
  _close(got_dw, dw, scale_dw, _gamma(n * k))
  bad = (np.asarray(ids) < 0) | (np.asarray(ids) >= v)
  assert np.all(np.asarray(got_x)[bad] == 0)


def test_d_unembed_sums_each_rows_pairs_in_order_whatever_the_threads():
  """The pairs are grouped by row in the workers' shares at once (here two
  shares of 4096 pairs or more): each row's pairs still come in ascending
  (token, slot) order, so ``d w`` is the float32 sum of ``dx[t, j] h[t]``
  taken in that order, bit for bit (a product rounded, then added: the
  kernels do not contract), in one block and in several."""
  _require_kernels()
  rng = np.random.default_rng(13)
  n, d, v, k = 80, 12, 40, 128  # 10240 pairs, about 256 per row
  h = rng.normal(size=(n, d)).astype(np.float32)
  w = rng.normal(size=(v, d)).astype(np.float32)
  ids = rng.integers(-1, v, (n, k)).astype(np.int32)
  dx = rng.normal(size=(n, k)).astype(np.float32)
  want = np.zeros((v, d), np.float32)
  for t in range(n):
    for j in range(k):
      if ids[t, j] >= 0:
        want[ids[t, j]] += dx[t, j] * h[t]  # float32 product, then float32 sum
  for block in (0, 48):
    grads = jax.jit(functools.partial(cpu_replay.kept_grads, block=block))
    np.testing.assert_array_equal(np.asarray(grads(h, w, ids, dx)[1]), want)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_dv_matrix_gives_the_rows_tables_numbers_exactly(dtype):
  """A ``[D, V]`` table is copied into rows a tile at a time (256 or 512 rows,
  16 columns at a time): over several tiles, a ragged last one, ``D`` not a
  multiple of 16, several token blocks (``d w`` carried from one to the
  next through the ``[D, V]`` output) and passes over pieces of ``D``
  (``width``, the same on both), the same bits as the ``[V, D]`` table
  (``d hidden`` to rounding: the workers' shares are added in the order they
  finish)."""
  _require_kernels()
  rng = np.random.default_rng(3)
  n, d, v, k = 7, 37, 1300, 48
  h = jnp.asarray(rng.normal(size=(n, d)), dtype)
  w = jnp.asarray(rng.normal(size=(v, d)), dtype)
  ids = jnp.asarray(rng.integers(-2, v + 2, (n, k)), jnp.int32)
  dx = jnp.asarray(rng.normal(size=(n, k)), jnp.float32)
  habs, wabs = (np.abs(np.asarray(a, np.float64)) for a in (h, w))
  scale_dh = _oracle(habs, wabs, ids, np.abs(np.asarray(dx)))[1]
  for block, width in ((0, 0), (2, 0), (0, 16), (2, 8)):
    rows = jax.jit(functools.partial(cpu_replay.kept_dots, block=block, width=width))(h, w, ids)
    dots = functools.partial(cpu_replay.kept_dots, block=block, vocab_axis=1, width=width)
    np.testing.assert_array_equal(jax.jit(dots)(h, w.T, ids), rows)
    rows_grads = functools.partial(cpu_replay.kept_grads, block=block, width=width)
    dh, dw = jax.jit(rows_grads)(h, w, ids, dx)
    grads = functools.partial(cpu_replay.kept_grads, block=block, vocab_axis=1, width=width)
    dh_t, dw_t = jax.jit(grads)(h, w.T, ids, dx)
    # Two sums of the same K terms in other orders: within twice the bound.
    _close(dh_t, np.asarray(dh, np.float64), scale_dh, 2 * _gamma(k))
    np.testing.assert_array_equal(dw_t, dw.T)


def test_a_dv_matrix_is_never_transposed_whole_on_the_cpu():
  """The replay from a ``[D, V]`` unembedding (the default layout) reads it in
  place on the CPU: forward and backward hold no table-sized temporary. XLA's
  steps transpose it a slab of ``D`` at a time (``[V, 16]`` here, a
  sixteenth of the table; XLA holds a few such arrays)."""
  _require_kernels()
  n, d, v, k = 64, 256, 4096, 16
  h = jax.ShapeDtypeStruct((n, d), jnp.float32)
  w = jax.ShapeDtypeStruct((d, v), jnp.float32)
  t = jax.ShapeDtypeStruct((n,), jnp.int32)
  ids = jax.ShapeDtypeStruct((n, k), jnp.int32)

  def replayed(h, w, t, ids):
    return jnp.sum(lpk.fused_replay_token_logprobs(h, w, t, ids, temperature=0.7))

  def temporaries(f):
    return jax.jit(f).lower(h, w, t, ids).compile().memory_analysis().temp_size_in_bytes

  table = d * v * 4
  for f in (replayed, jax.grad(replayed, (0, 1))):
    assert holds_cpu_kernels(f, h, w, t, ids)
    assert temporaries(f) < 0.1 * table
  with without_cpu_kernels():
    assert temporaries(replayed) < table / 4
    assert temporaries(jax.grad(replayed, (0, 1))) < table / 4


def test_the_replay_runs_the_compiled_kernels_here():
  """CI and this machine have a C++ compiler: the replay's forward and backward
  are the two custom calls on the CPU, and a program for a GPU holds none."""
  _require_kernels()
  h = jax.ShapeDtypeStruct((8, 16), jnp.float32)
  w = jax.ShapeDtypeStruct((100, 16), jnp.float32)
  t = jax.ShapeDtypeStruct((8,), jnp.int32)
  ids = jax.ShapeDtypeStruct((8, 5), jnp.int32)

  def loss(h, w, t, ids):
    return jnp.sum(lpk.fused_replay_token_logprobs(h, w, t, ids, vocab_axis=0))

  traced = jax.jit(jax.grad(loss, (0, 1))).trace(h, w, t, ids)
  cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
  assert "lpkernel_cpu_replay_dots" in cpu and "lpkernel_cpu_replay_grads" in cpu
  gpu = traced.lower(lowering_platforms=("cuda",)).as_text()
  assert "lpkernel_cpu_replay" not in gpu


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("vocab_axis", [0, -1])
def test_the_compiled_replay_gives_the_gathered_steps_numbers(dtype, vocab_axis):
  """The whole replay (values, and gradients into hidden states, table and
  temperature) on the CPU's kernels and on the XLA steps every other platform
  runs, at a size that spreads the rows over the threads."""
  rng = np.random.default_rng(7)
  n, d, v, k = 300, 40, 5000, 64
  h = jnp.asarray(rng.normal(size=(n, d)), dtype)
  w = jnp.asarray(rng.normal(size=(v, d)) * 0.3, dtype)
  table = w if vocab_axis == 0 else w.T
  t = jnp.asarray(rng.integers(0, v, n), jnp.int32)
  others = rng.permuted(np.tile(np.arange(1, v), (n, 1)), axis=1)[:, : k - 1]  # distinct, not 0
  ids = jnp.asarray(
    (np.asarray(t)[:, None] + np.concatenate([np.zeros((n, 1), int), others], 1)) % v
  )
  ids = ids.astype(jnp.int32).at[::7, -5:].set(-1)  # the target kept first; some rows padded
  tau = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)

  def loss(h, table, tau):
    lp = lpk.fused_replay_token_logprobs(h, table, t, ids, temperature=tau, vocab_axis=vocab_axis)
    return jnp.sum(lp * jnp.linspace(0.5, 1.5, n))

  grads = jax.value_and_grad(loss, (0, 1, 2))
  got = jax.jit(grads)(h, table, tau)
  assert holds_cpu_kernels(grads, h, table, tau)
  with without_cpu_kernels():
    assert not holds_cpu_kernels(grads, h, table, tau)
    want = jax.jit(grads)(h, table, tau)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(got[0], want[0], rtol=tol)
  for a, b in zip(got[1], want[1], strict=True):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.max(np.abs(b)))


def test_vmap_of_the_replay():
  """``jax.vmap`` of the replay (values and gradients) calls the kernels once per
  example: the same numbers as one call each."""
  rng = np.random.default_rng(11)
  h = jnp.asarray(rng.normal(size=(3, 6, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(50, 8)), jnp.float32)
  t = jnp.asarray(rng.integers(0, 50, (3, 6)), jnp.int32)
  ids = jnp.concatenate([t[..., None], jnp.asarray(rng.integers(-1, 50, (3, 6, 4)), jnp.int32)], -1)

  def loss(h, w, t, ids):
    lp = lpk.fused_replay_token_logprobs(h, w, t, ids, vocab_axis=0)
    return jnp.sum(jnp.where(jnp.isfinite(lp), lp, 0.0))

  got = jax.jit(jax.vmap(jax.value_and_grad(loss, (0, 1)), (0, None, 0, 0)))(h, w, t, ids)
  for i in range(3):
    value, (dh, dw) = jax.value_and_grad(loss, (0, 1))(h[i], w, t[i], ids[i])
    np.testing.assert_allclose(got[0][i], value, rtol=1e-6)
    np.testing.assert_allclose(got[1][0][i], dh, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1][1][i], dw, rtol=1e-5, atol=1e-6)


def test_a_dv_matrix_is_read_in_passes_when_the_hidden_states_outgrow_the_cache():
  """The forward and backward from a ``[D, V]`` table read ``D`` in passes of
  128 columns once a block's hidden states pass 512 KB and 128 columns of
  them fit (1000 tokens of 160 float32 here): the oracle's numbers, the same
  bits as passes of 128 asked for, other bits than one pass; a ``[V, D]``
  table is read in one pass."""
  _require_kernels()
  rng = np.random.default_rng(5)
  n, d, v, k = 1000, 160, 3000, 16
  h = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(v, d)), jnp.float32)
  ids = jnp.asarray(rng.integers(-1, v, (n, k)), jnp.int32)

  def dots(table, vocab_axis, width):
    call = functools.partial(cpu_replay.kept_dots, vocab_axis=vocab_axis, width=width)
    return np.asarray(jax.jit(call)(h, table, ids))

  got = dots(w.T, 1, 0)
  x = _oracle(h, w, ids, np.ones((n, k)))[0]
  scale = _oracle(np.abs(np.asarray(h)), np.abs(np.asarray(w)), ids, np.ones((n, k)))[0]
  _close(got, x, scale, _gamma(d))
  np.testing.assert_array_equal(got, dots(w.T, 1, 128))
  assert np.any(got != dots(w.T, 1, d))
  np.testing.assert_array_equal(dots(w, 0, 0), dots(w, 0, d))
  # The backward in the same passes: the oracle's gradients.
  dx = rng.normal(size=(n, k)).astype(np.float32)
  dh, dw_t = jax.jit(functools.partial(cpu_replay.kept_grads, vocab_axis=1))(h, w.T, ids, dx)
  _, want_dh, want_dw = _oracle(h, w, ids, dx)
  habs, wabs = np.abs(np.asarray(h)), np.abs(np.asarray(w))
  _, scale_dh, scale_dw = _oracle(habs, wabs, ids, np.abs(dx))
  _close(dh, want_dh, scale_dh, _gamma(k))
  _close(np.asarray(dw_t).T, want_dw, scale_dw, _gamma(n * k))
