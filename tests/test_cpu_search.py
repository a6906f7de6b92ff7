"""The compiled search of a kept set (lpkernel/ops/processed/cpu_search.cc) and
XLA's bisection (:func:`lpkernel.ops.processed.select.kept_within`) against a
float64 NumPy oracle: the same kept sets, masses and sizes, on rows with ties,
``-inf``, min-p and a floor, by count (top-k) and by probability (top-p)."""

import contextlib
import functools
import os
from unittest import mock

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lpkernel as lpk
from lpkernel.ops.processed import cpu_search
from lpkernel.ops.processed import select as S
from tests.helpers import holds_cpu_kernels, without_cpu_kernels

# Where a running weight comes within this share of the budget, float32 sums
# (XLA's; the kernel's, flushed to float64 every 256 values) may decide otherwise;
# counts are exact.
_AMBIGUOUS = 1e-5


def _keys(z: np.ndarray) -> np.ndarray:
  return np.asarray(S.order_key(jnp.asarray(z, jnp.float32)))


def _oracle(key, e, floor, share, min_p, by_count):
  """(kept bool[n], the least distance of a running weight from the budget,
  relative; inf by count): A's tie groups, ascending, dropped while their
  running weight (float64) stays within the budget (``|A| - k`` by count, else
  ``(1 - p)`` of A's mass); the largest group is always kept."""
  a = (e >= min_p) & (key >= floor)
  if not a.any():
    return a, np.inf
  w = np.where(a, 1.0 if by_count else e.astype(np.float64), 0.0)
  budget = w.sum() - share if by_count else (1.0 - share) * w.sum()
  groups, group = np.unique(key[a], return_inverse=True)
  run = np.cumsum(np.bincount(group, weights=w[a]))[:-1]  # after each group but the largest
  over = np.flatnonzero(run > budget)
  stop = over[0] + 1 if over.size else run.size  # the groups weighed before the cut
  cut = groups[over[0]] if over.size else groups[-1]
  gap = np.min(np.abs(run[:stop] - budget)) / max(abs(budget), 1e-30) if stop else np.inf
  return a & (key >= cut), np.inf if by_count else gap


def _rows(z, min_p, by_count, share, floor_share):
  """The arguments of a search of rows ``z [R, n]`` and each row's oracle (kept
  set, gap): ``share`` each row's ``k`` or ``p``; floors at keys of the row
  (``floor_share`` of the way up its sorted keys; 0 where negative)."""
  z = np.asarray(z, np.float32)
  share = np.asarray(share, np.float32)  # as the search is given it
  key = _keys(z)
  top = np.max(z, axis=1, keepdims=True)
  e = np.exp(np.where(np.isfinite(top), z - top, -np.inf)).astype(np.float32)
  floors, kept, gaps = [], [], []
  for r in range(z.shape[0]):
    ordered = np.sort(key[r])
    f = ordered[int(floor_share[r] * (len(ordered) - 1))] if floor_share[r] >= 0 else 0
    k, g = _oracle(key[r], e[r], f, float(share[r]), min_p[r], by_count)
    floors.append(f)
    kept.append(k)
    gaps.append(g)
  ceiling = _keys(np.max(z, axis=1)) + np.uint32(1)
  args = (key, e, np.asarray(floors, np.uint32), ceiling, np.asarray(share, np.float32), top[:, 0])
  return args, (np.asarray(kept), np.asarray(gaps))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _kept_within(by_count, compiled, key, e, floor, ceiling, share, shift, min_p, active):
  """:func:`select.kept_within` as one program; ``compiled`` (static) is what
  ``cpu_search.available()`` said when it was traced, so each search keeps its own."""
  del compiled
  r, n = key.shape
  params = S.Params(None, jnp.zeros(r, jnp.int32), jnp.ones(r), min_p, shift)
  c = S.Chunk(e, key)
  kappa, mass, count = S.kept_within(c, params, floor, ceiling, by_count, share, active, n)
  return c.in_a(params, floor) & (c.key >= kappa[:, None]), mass, count


def _search(args, min_p, by_count, active):
  """(kept bool[R, n], mass, count) of :func:`select.kept_within`."""
  arrays = (jnp.asarray(a) for a in (*args, min_p, active))
  kept, mass, count = _kept_within(by_count, cpu_search.available(), *arrays)
  return np.asarray(kept), mass, count


def _agree(got, args, want, gap, active, ambiguous=_AMBIGUOUS):
  """The oracle's kept sets where the rows are clear of rounding (their gaps
  over ``ambiguous``), and the kept sets' masses and sizes (A whole where not
  active)."""
  kept, mass, count = got
  clear = np.asarray(active) & (gap > ambiguous)
  np.testing.assert_array_equal(kept[clear], want[clear])
  e = np.asarray(args[1], np.float64)
  np.testing.assert_array_equal(count, kept.sum(axis=1))
  np.testing.assert_allclose(mass, np.where(kept, e, 0.0).sum(axis=1), rtol=1e-5, atol=1e-30)


def _both(args, min_p, by_count, active, want, gap):
  """The compiled kernel and XLA's bisection, each the oracle's kept sets."""
  assert cpu_search.available() or os.environ.get("LPKERNEL_CPU_KERNELS") == "0"
  _agree(_search(args, min_p, by_count, active), args, want, gap, active)
  with mock.patch.object(cpu_search, "available", lambda: False):
    _agree(_search(args, min_p, by_count, active), args, want, gap, active)


def _on_logits(z, by_count, share, floor_share, active):
  """The compiled search from the logits themselves (min-p off: A is ``{key >=
  floor}``), each weight its own ``exp``, the rows it declines (count -1: to
  weigh mostly) given to :func:`cpu_search.kept_set` as the library does, held
  to the oracle. Below a sampled pivot A's weight is the row's float32 total
  (XLA's sum) less the list's: off by about 2^-20 of the total (under 2^-15 of
  the budget, ``1 - p`` at least 1/32 there), so rounding reaches that much
  further. Returns the gaps (relative to that reach) and which rows were declined."""
  args, (want, gap) = _rows(z, np.zeros(len(z), np.float32), by_count, share, floor_share)
  key, e, floor, ceiling, share, shift = (jnp.asarray(a) for a in args)
  active = jnp.asarray(active)
  total = jnp.sum(e, axis=1)
  got = cpu_search.kept_set_of_logits(
    jnp.asarray(z, jnp.float32), None, shift, None, total, floor, ceiling, share, active, by_count
  )
  declined = got[2] < 0
  assert not (by_count and bool(jnp.any(declined)))  # counting is cheap: never declined
  weighed = cpu_search.kept_set(
    key, e, floor, ceiling, share, jnp.zeros_like(e[:, 0]), active & declined, by_count
  )
  got = [jnp.where(declined, w, g) for w, g in zip(weighed, got, strict=True)]
  kept = (key >= floor[:, None]) & (key >= got[0][:, None])
  if by_count:  # each value weighs 1: the mass is the size
    np.testing.assert_array_equal(got[1], got[2])
    args = (key, jnp.ones_like(e), *args[2:])
  dropped = np.maximum(1 - np.asarray(share, np.float64), 1 / 32)
  ambiguous = _AMBIGUOUS + (0.0 if by_count else 2.0**-20 / dropped)
  _agree((np.asarray(kept), got[1], got[2]), args, want, gap, active, ambiguous)
  return gap / ambiguous * _AMBIGUOUS, np.asarray(declined)


def test_the_compiled_search_is_built_here():
  """CI and this machine have a C++ compiler: a top-p search on the CPU runs
  the compiled kernel (without one, XLA's bisection; this test then says why)."""
  if os.environ.get("LPKERNEL_CPU_KERNELS") == "0":
    pytest.skip("LPKERNEL_CPU_KERNELS=0")
  assert cpu_search.available()
  x = jax.ShapeDtypeStruct((8, 1000), jnp.float32)
  t = jax.ShapeDtypeStruct((8,), jnp.int32)
  fn = jax.jit(lambda x, t: lpk.processed_token_stats(x, t, lpk.Sampling(1.0, 0, 0.9)).logprobs)
  assert "lpkernel_cpu_kept_set" in fn.lower(x, t).compile().as_text()


@pytest.mark.parametrize(
  "dtype, softcap, in_place, v",
  [
    (jnp.float32, None, True, 2000),
    (jnp.float32, 30.0, False, 2000),
    (jnp.bfloat16, None, False, 2000),
    (jnp.float32, None, True, 1000),
    (jnp.bfloat16, None, False, 1000),
  ],
)
def test_the_search_reads_float32_logits_in_place(dtype, softcap, in_place, v):
  """From uncapped float32 logits the search reads its chunk's rows where they
  are (the kernel's first operand is all of the logits), with no gather of the
  chunk (16 ms of 131 at B8 T512 V32000, top-p alone); capped or narrow logits
  are gathered and converted a chunk at a time (``[3, V]`` here). Short rows
  (V = 1000, whose forward runs a chunk of rows at a time:
  :func:`~lpkernel.ops.processed.xla.forward_chunk`) are read in their chunk's
  copy, and gathered in steps of 3 rows still (sized by all the rows)."""
  from lpkernel.ops.processed.xla import forward_chunk

  n = 300
  x = jax.ShapeDtypeStruct((n, v), dtype)
  t = jax.ShapeDtypeStruct((n,), jnp.int32)
  sampling = lpk.Sampling(1.0, 0, 0.9)
  k = lpk.ProcessedConfig().k_for(sampling, v)
  fn = jax.jit(lambda x, t: lpk.processed_token_stats(x, t, sampling, softcap=softcap).logprobs)
  calls = [line for line in fn.lower(x, t).as_text().splitlines() if "kept_set_of_logits" in line]
  assert calls
  rows = forward_chunk(n, v, k, dtype, softcap) if in_place else n // 100
  assert not in_place or (rows < n) == (v == 1000)  # the forward in chunks at V = 1000
  assert all(f"(tensor<{rows}x{v}xf32>" in line for line in calls), calls


_SPECIAL = [0.0, -0.0, 1.0, -1.0, 2.5, -np.inf, -3.0]


@settings(max_examples=60, deadline=None)
@given(
  data=st.data(),
  n=st.sampled_from([1, 2, 3, 5, 63, 64, 65, 257, 300]),
  by_count=st.booleans(),
)
def test_the_kept_sets_are_the_float64_oracles(data, n, by_count):
  """Ties (values drawn from a few), ``-inf``, min-p, floors, ``k`` past A's size
  and inactive rows (A whole); lists short enough for halvings alone and long enough for the sampled
  pivots (64 values, from 256)."""
  rows = 4
  elements = st.one_of(st.sampled_from(_SPECIAL), st.floats(-6, 6, width=32))
  z = data.draw(hnp.arrays(np.float32, (rows, n), elements=elements))
  z[:, 0] = np.where(np.isfinite(z[:, 0]), z[:, 0], 0.0)  # a finite value per row
  fractions = st.floats(0, 1)
  shares = st.integers(1, n + 2).map(float) if by_count else st.floats(0.001, 1.0)
  share = data.draw(st.lists(shares, min_size=rows, max_size=rows))
  floor_share = data.draw(
    st.lists(st.one_of(st.just(-1.0), fractions), min_size=rows, max_size=rows)
  )
  min_p = np.asarray(
    data.draw(st.lists(st.sampled_from([0.0, 1e-3, 0.05, 0.5]), min_size=rows, max_size=rows)),
    np.float32,
  )
  active = np.asarray(data.draw(st.lists(st.booleans(), min_size=rows, max_size=rows)))
  args, (want, gap) = _rows(z, min_p, by_count, share, floor_share)
  _both(args, min_p, by_count, active, want, gap)
  _on_logits(z, by_count, share, floor_share, active)


@pytest.mark.parametrize("by_count", [False, True], ids=["by_weight", "by_count"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_long_rows_whose_pivots_misjudge(by_count, dtype):
  """V 32003 (not a multiple of 4): flat, peaked, heavy-tailed and bfloat16 rows
  (runs of hundreds of equal values), from a nucleus of nearly all of A to a
  sliver, ``k`` from 1 to V: the sampled pivots' passes, the passes again
  where a sample misjudged, and a list left long by ties; from the logits
  themselves too (their lists sparse and dense)."""
  rng = np.random.default_rng(3)
  v = 32003
  z = np.concatenate(
    [
      rng.normal(size=(3, v)),
      rng.normal(size=(3, v)) * 4,
      rng.standard_cauchy(size=(3, v)),
      np.round(rng.normal(size=(3, v)) * 2),  # 20-odd distinct values
    ]
  )
  z[1, :5] += 40.0  # a few dominant tokens
  z = np.asarray(jnp.asarray(z, dtype).astype(jnp.float32))
  r = z.shape[0]
  if by_count:
    share = np.resize([1.0, 65.0, 1000.0, 30000.0, 32003.0], r)
  else:
    share = np.resize([0.999999, 0.95, 0.5, 0.1, 0.001], r)
  min_p = np.resize(np.float32([0.0, 0.0, 1e-4]), r)
  args, (want, gap) = _rows(z, min_p, by_count, share, np.resize([-1.0, 0.1], r))
  _both(args, min_p, by_count, np.ones(r, bool), want, gap)
  assert int((gap > _AMBIGUOUS).sum()) >= r - 2  # the oracle's sets are checked, not excused
  gap, declined = _on_logits(z, by_count, share, np.resize([-1.0, 0.1], r), np.ones(r, bool))
  assert int((gap > _AMBIGUOUS).sum()) >= r - 2
  if (
    not by_count
  ):  # some rows searched from the logits, the flattest (nuclei of most of A) declined
    assert 0 < int(declined.sum()) < r


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "xla"])
def test_a_nan_row_searched_beside_others_is_nan_and_leaves_them_alone(compiled):
  """NaN wins and ``-inf`` stays impossible through the search: flat rows whose
  nuclei run past the candidates (searched, in one chunk) with a NaN row and a
  row of ``-inf`` columns among them; every row's kept set and values are the
  reference's (the kernel, or XLA's bisection), the NaN row's NaN in both."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 3000)).astype(np.float32) * 2
  x[2, 5] = np.nan
  x[4, :100] = -np.inf
  t = jnp.array([1, 2, 3, 50, 5, 6])  # row 4's target is impossible
  s = lpk.Sampling(1.0, 0, 0.95)
  with contextlib.nullcontext() if compiled else without_cpu_kernels():
    assert holds_cpu_kernels(lambda x: lpk.processed_token_stats(x, t, s), x) == compiled
    got = lpk.processed_token_stats(jnp.asarray(x), t, s)
  want = lpk.processed_token_stats(jnp.asarray(x), t, s, implementation="reference")
  for stats in (got, want):
    assert np.isnan(stats.logprobs[2]) and int(stats.kept_count[2]) == 0
    assert not stats.kept[2] and np.isnan(stats.log_kept_mass[2])
    assert float(stats.logprobs[4]) == -np.inf and not stats.kept[4]
  others = np.array([0, 1, 3, 4, 5])
  assert int(np.min(np.asarray(got.kept_count)[others])) > lpk.ProcessedConfig().candidates
  np.testing.assert_array_equal(got.kept_count, want.kept_count)
  np.testing.assert_array_equal(got.kept, want.kept)
  np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=1e-5)
