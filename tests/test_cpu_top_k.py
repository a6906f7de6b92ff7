"""The compiled CPU top-k (lpkernel/ops/processed/cpu_top_k.cc) against
``lax.top_k``: the same values, bit for bit, and the same indices, on rows with
ties, NaN of both signs, signed zeros and infinities, at every ``k``."""

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

from lpkernel import partials as P
from lpkernel.ops.processed import cpu_library, cpu_top_k
from lpkernel.ops.processed.cpu_top_k import top_k
from lpkernel.ops.processed.xla import _logits_group_maxima

# A few values drawn often: ties, and every corner of the floats' order.
_SPECIAL = [0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, -np.nan, 3.5, 1e-38, -1e-38]


def _bits(values):
  a = np.asarray(values)
  return a.view(np.uint32 if a.itemsize == 4 else np.uint16)


def _same(got, want):
  """Values bit for bit (NaN's sign and the sign of zero included), and indices."""
  assert got[0].dtype == want[0].dtype
  np.testing.assert_array_equal(_bits(got[0]), _bits(want[0]))
  np.testing.assert_array_equal(got[1], want[1])


def test_the_compiled_top_k_is_built_here():
  """CI and this machine have a C++ compiler: the CPU paths run the compiled
  top-k (a machine without one runs lax.top_k, logged; this test then says why)."""
  if os.environ.get("LPKERNEL_CPU_KERNELS") == "0":
    pytest.skip("LPKERNEL_CPU_KERNELS=0")
  assert cpu_top_k.available()
  text = jax.jit(lambda a: top_k(a, 3)).lower(jnp.zeros((4, 10))).as_text()
  assert "lpkernel_cpu_top_k" in text


def test_the_avx2_build_runs_where_the_cpu_has_avx2():
  """On an x86-64 CPU with AVX2 (this machine and CI) the kernels registered are
  the AVX2 build, whose wide loops run 8 lanes; elsewhere, or with
  ``LPKERNEL_CPU_AVX2=0``, the portable build (4 lanes), which
  :func:`test_the_portable_build_passes_the_kernel_tests` holds to the same tests."""
  if os.environ.get("LPKERNEL_CPU_KERNELS") == "0":
    pytest.skip("LPKERNEL_CPU_KERNELS=0")
  cpuinfo = Path("/proc/cpuinfo")
  flags = cpuinfo.read_text() if cpuinfo.exists() else ""
  has_avx2 = platform.machine() in ("x86_64", "AMD64") and re.search(r"\bavx2\b", flags)
  assert cpu_top_k.available()
  assert cpu_library.avx2() == (bool(has_avx2) and os.environ.get("LPKERNEL_CPU_AVX2") != "0")


# The top-k kernels' and the replay's oracle tests, run again on the portable
# build (the suite runs the AVX2 build here): their loops are written for any
# lane count, 4 there (group maxima, counts, bit masks and ranks by
# groups_top_k and maxima_and_top_k; ForEachAtLeast by top_k; the replay's
# dot products, four vectors of 4 lanes for two of 8). The searches are the
# same code in both builds.
UNDER_THE_PORTABLE_BUILD = [
  "tests/test_cpu_top_k.py::test_the_avx2_build_runs_where_the_cpu_has_avx2",
  "tests/test_cpu_top_k.py::test_values_and_indices_are_lax_top_ks",
  "tests/test_cpu_top_k.py::test_groups_top_k_from_the_group_maxima_is_lax_top_k",
  "tests/test_cpu_top_k.py::test_a_nan_group_hides_no_larger_value",
  "tests/test_cpu_top_k.py::test_a_nan_among_a_vector_of_groups_keeps_its_groups_maximum_nan",
  "tests/test_cpu_top_k.py::test_running_candidates_keep_lax_top_ks_values",
  "tests/test_cpu_top_k.py::test_block_stats_are_xlas_reductions",
  "tests/test_cpu_replay.py::test_dots_and_grads_are_the_oracles",
]


@pytest.mark.long
def test_the_portable_build_passes_the_kernel_tests():
  if os.environ.get("LPKERNEL_CPU_KERNELS") == "0" or not (
    cpu_library.available() and cpu_library.avx2()
  ):
    pytest.skip("the portable build is the one the suite runs")
  env = {**os.environ, "LPKERNEL_CPU_AVX2": "0"}
  command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0"]
  result = subprocess.run(
    [*command, *UNDER_THE_PORTABLE_BUILD], env=env, cwd=Path(__file__).resolve().parents[1],
    capture_output=True, text=True, timeout=900,
  )  # fmt: skip
  tail = result.stdout[-3000:] + result.stderr[-2000:]
  assert result.returncode == 0, tail
  assert re.search(r"\b\d+ passed", result.stdout) and " skipped" not in result.stdout, tail


@settings(max_examples=150, deadline=None)
@given(
  data=st.data(),
  rows=st.sampled_from([(), (1,), (3,), (2, 3)]),
  n=st.integers(1, 300),
)
def test_values_and_indices_are_lax_top_ks(data, rows, n):
  special = st.sampled_from(_SPECIAL)
  normal = st.floats(-5, 5, width=32)
  a = data.draw(hnp.arrays(np.float32, (*rows, n), elements=st.one_of(special, normal)))
  k = data.draw(st.integers(0, n))
  a = jnp.asarray(a)
  _same(jax.jit(top_k, static_argnums=1)(a, k), lax.top_k(a, k))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("n, k", [(1000, 64), (2048, 64), (32000, 64), (1500, 1024), (70, 70)])
def test_long_rows_on_many_threads(dtype, n, k):
  """Rows long enough for every stage (the first bar from block maxima, the
  block filter, buffer cuts) and enough of them for several threads' chunks;
  sorted rows (each value raises the bar), rows of one repeated value, and a row
  of negative subnormals and zeros (XLA:CPU flushes subnormals in float
  arithmetic: the kernel's bars are bit keys)."""
  rng = np.random.default_rng(n + k)
  a = rng.normal(size=(300, n)) * 4
  a[1] = np.sort(a[1])
  a[2] = 7.0
  a[3, ::3] = np.nan
  a[4] = -np.abs(rng.normal(size=n)) * 1e-42
  a[4, ::97] = -0.0
  a = jnp.asarray(a, dtype)
  _same(jax.jit(top_k, static_argnums=1)(a, k), lax.top_k(a, k))


@settings(max_examples=100, deadline=None)
@given(
  data=st.data(),
  rows=st.integers(1, 4),
  n=st.integers(1, 400),
  group=st.sampled_from([1, 3, 4, 8, 32, 50]),
  dtype=st.sampled_from([np.float32, jnp.bfloat16]),
  softcap=st.sampled_from([None, 2.0]),
)
def test_groups_top_k_from_the_group_maxima_is_lax_top_k(data, rows, n, group, dtype, softcap):
  """Each row's ``k`` largest values from the row and XLA's group maxima (a short
  last group), the row's own (taken as values of their groups, or read again)
  or capped ones (the groups are chosen by them):
  ``lax.top_k``'s values bit for bit; ties, NaN of both signs, signed zeros,
  infinities and negative subnormals (XLA:CPU flushes them in its maxima)
  included."""
  if not cpu_top_k.available():  # registered here, whichever test ran first
    pytest.skip("LPKERNEL_CPU_KERNELS=0")
  special = st.sampled_from([*_SPECIAL, -1e-42, -3e-43])
  a = data.draw(hnp.arrays(np.float32, (rows, n), elements=st.one_of(special, st.floats(-5, 5))))
  a = jnp.asarray(a, dtype)
  k = data.draw(st.integers(1, n))
  held = softcap is None and data.draw(st.booleans())  # own maxima, read as such or again

  @jax.jit
  def got(a):
    maxima = P.capped(_logits_group_maxima(a, group, 512), softcap)
    return cpu_top_k.groups_top_k(a, maxima, group, k, held)

  want = lax.top_k(a.astype(jnp.float32), k)[0]
  np.testing.assert_array_equal(_bits(got(a)), _bits(want))
  if dtype == np.float32:  # the kernel's own maxima: XLA's (NaN as NaN), the same values
    maxima, top = jax.jit(cpu_top_k.maxima_and_top_k, static_argnums=(1, 2))(a, group, k)
    _same_maxima(maxima, _group_maxima(np.asarray(a), group))
    np.testing.assert_array_equal(_bits(top), _bits(want))
    # Without the maxima written: the same values (each row's maxima in a scratch).
    alone = jax.jit(cpu_top_k.maxima_and_top_k, static_argnums=(1, 2, 3))(a, group, k, False)
    assert alone[0].shape == (rows, 0)
    np.testing.assert_array_equal(_bits(alone[1]), _bits(want))


def _group_maxima(a, group: int):
  """NumPy's maxima of ``a [rows, n]``'s groups of ``group`` columns (the last
  one shorter), NaN where a group holds one (XLA:CPU's ``jnp.max`` may drop
  it, :func:`test_a_nan_among_a_vector_of_groups_keeps_its_groups_maximum_nan`)."""
  rows, n = a.shape
  padded = np.full((rows, -(-n // group) * group), -np.inf, np.float32)
  padded[:, :n] = a
  return np.max(padded.reshape(rows, -1, group), axis=-1)


def _same_maxima(got, want):
  """Equal as floats (``-0 == 0``: XLA's max may give either), NaN where NaN; zeros
  and subnormals alike (XLA:CPU's comparisons flush them: either may be a max)."""
  got, want = np.asarray(got), np.asarray(want)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  tiny = np.finfo(np.float32).tiny
  flushed = (np.abs(got) < tiny) & (np.abs(want) < tiny)
  assert np.all((got == want) | np.isnan(want) | flushed)


@pytest.mark.parametrize("own_maxima", [False, True], ids=["xla_maxima", "own_maxima"])
def test_a_nan_group_hides_no_larger_value(own_maxima):
  """A group holding NaN has a NaN maximum, whatever its other values: with a
  negative NaN (below ``-inf`` in ``lax.top_k``'s order) its other values are
  small and the row's largest lie in other groups; with a positive NaN, the NaN
  is the largest. Every ``k``, both NaN signs: ``lax.top_k``'s values."""
  assert cpu_top_k.available()  # registered here, whichever test ran first
  negative_nan = np.uint32(0xFFC00000).view(np.float32)
  for nan in (np.float32(np.nan), negative_nan):
    a = jnp.asarray(np.array([[1, nan, 5, 0.5, 0.25, 0.1, 0.2, 0.3, 2, 0.7]], np.float32))
    for k in range(1, 11):
      if own_maxima:
        top = cpu_top_k.maxima_and_top_k(a, 2, k)[1]
      else:
        top = cpu_top_k.groups_top_k(a, _logits_group_maxima(a, 2, 512), 2, k, True)
      np.testing.assert_array_equal(_bits(top), _bits(lax.top_k(a, k)[0]), err_msg=f"{nan} {k}")


def test_a_nan_among_a_vector_of_groups_keeps_its_groups_maximum_nan():
  """``maxima_and_top_k`` takes the maxima of 8 groups (4 in the portable
  build) at a time; a NaN among them sends them one by one: each of the 16
  groups of 32 holds a NaN in turn (both signs): every group's maximum is
  NumPy's (NaN where the group holds one; XLA:CPU's own ``jnp.max`` over
  these ``[16, 16, 32]`` groups drops the NaN, jax 0.10.2), the values
  ``lax.top_k``'s."""
  assert cpu_top_k.available()  # registered here, whichever test ran first
  rng = np.random.default_rng(17)
  base = rng.normal(size=512).astype(np.float32)
  negative_nan = np.uint32(0xFFC00000).view(np.float32)
  rows = []
  for g in range(16):
    row = base.copy()
    row[g * 32 + g] = np.float32(np.nan) if g % 2 else negative_nan
    rows.append(row)
  a = np.stack(rows)
  maxima, top = jax.jit(cpu_top_k.maxima_and_top_k, static_argnums=(1, 2))(jnp.asarray(a), 32, 20)
  want = _group_maxima(a, 32)
  assert np.sum(np.isnan(want)) == 16  # one per row: its own group
  _same_maxima(maxima, want)
  np.testing.assert_array_equal(_bits(top), _bits(lax.top_k(jnp.asarray(a), 20)[0]))


def _want_stats(z, targets):
  """A block's partials as XLA reduces them (:func:`lpkernel.partials.block_partials`)."""
  cols = jnp.arange(z.shape[1])[None, :]
  return jax.jit(lambda z, t: P.block_partials(z, cols, t, None))(z, targets)


def _same_flushed(got, want):
  """Equal floats, bit for bit, except that a zero or subnormal may stand for a
  zero or subnormal of either sign (XLA:CPU's reductions flush subnormals)."""
  got, want = np.asarray(got), np.asarray(want)
  tiny = np.finfo(np.float32).tiny
  np.testing.assert_array_equal(np.abs(got) < tiny, np.abs(want) < tiny)
  plain = ~(np.abs(want) < tiny)
  np.testing.assert_array_equal(_bits(got[plain]), _bits(want[plain]))


def _same_stats(stats, z, targets):
  """The kernel's block statistics are XLA's (:func:`_same_flushed`): the
  maximum (NaN where the row holds one), its first column, the target's value
  (``-inf`` outside the block)."""
  want = _want_stats(z, targets)  # in z's dtype: a bfloat16 one widened exactly
  m, wm = np.asarray(stats.m), np.asarray(want.m, np.float32)
  np.testing.assert_array_equal(np.isnan(m), np.isnan(wm))
  _same_flushed(np.where(np.isnan(m), 0, m), np.where(np.isnan(wm), 0, wm))
  arg = np.where(np.asarray(stats.arg) < z.shape[1], stats.arg, P.NO_COLUMN)
  np.testing.assert_array_equal(arg, want.arg)
  _same_flushed(stats.t, np.asarray(want.t, np.float32))


@settings(max_examples=100, deadline=None)
@given(
  data=st.data(),
  rows=st.integers(1, 5),
  k=st.integers(1, 40),
  widths=st.lists(st.integers(0, 200), min_size=1, max_size=6),
  vocab_size=st.sampled_from([1, 3000, 100000]),
)
def test_running_candidates_keep_lax_top_ks_values(data, rows, k, widths, vocab_size):
  """A row read block by block into the running candidates (the buffer cut back
  when full, the bar raised; its capacity from ``k`` and a quarter to ``4k``,
  as ``vocab_size`` allows) ends with ``lax.top_k``'s values of the whole row,
  bit for bit, ``-inf`` past a row shorter than ``k``; ties, NaN of both signs,
  signed zeros and infinities included. The first block's statistics, taken
  in the same read, are XLA's (:func:`_same_stats`; every case of them:
  :func:`test_block_stats_are_xlas_reductions`)."""
  assert cpu_top_k.available() or os.environ.get("LPKERNEL_CPU_KERNELS") == "0"
  if not cpu_top_k.available():
    pytest.skip("LPKERNEL_CPU_KERNELS=0")
  special = st.sampled_from(_SPECIAL)
  normal = st.floats(-5, 5, width=32)
  blocks = [
    data.draw(hnp.arrays(np.float32, (rows, w), elements=st.one_of(special, normal)))
    for w in widths
  ]
  state = cpu_top_k.running_top_k(rows, k, vocab_size)
  step = jax.jit(cpu_top_k.add_block, static_argnums=2)
  checked = False  # the statistics of the first block read (each is a compile of XLA's)
  for b in blocks:
    targets = jnp.asarray(data.draw(hnp.arrays(np.int32, (rows,), elements=st.integers(-2, 201))))
    state, stats = step(state, jnp.asarray(b), k, targets)
    if b.shape[1] and not checked:
      _same_stats(stats, jnp.asarray(b), targets)
      checked = True
  got = cpu_top_k.running_values(state, k)
  whole = np.concatenate(blocks + [np.full((rows, k), -np.inf, np.float32)], axis=1)
  want = lax.top_k(jnp.asarray(whole), k)[0]
  np.testing.assert_array_equal(_bits(got), _bits(want))


@settings(max_examples=60, deadline=None)
@given(
  data=st.data(),
  rows=st.integers(1, 5),
  width=st.integers(1, 300),
  dtype=st.sampled_from([np.float32, jnp.bfloat16]),
)
def test_block_stats_are_xlas_reductions(data, rows, width, dtype):
  """The fused sweeps' block statistics from the kernel (one read of the block;
  a bfloat16 one read in place, as the logits path's short rows are) are
  XLA's reductions' (:func:`_same_stats`): maxima with NaN, ties of the
  maximum (the first column), signed zeros, infinities, targets in and out of
  the block."""
  if not cpu_top_k.available():
    pytest.skip("LPKERNEL_CPU_KERNELS=0")
  elements = st.one_of(st.sampled_from(_SPECIAL), st.floats(-5, 5, width=32))
  z = jnp.asarray(data.draw(hnp.arrays(np.float32, (rows, width), elements=elements)), dtype)
  targets = data.draw(hnp.arrays(np.int32, (rows,), elements=st.integers(-3, width + 3)))
  _same_stats(jax.jit(cpu_top_k.block_stats)(z, jnp.asarray(targets)), z, jnp.asarray(targets))


def test_vmap_and_no_rows():
  a = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5, 40)), jnp.float32)
  _same(jax.vmap(lambda r: top_k(r, 7))(a), lax.top_k(a, 7))
  _same(top_k(jnp.zeros((0, 9)), 4), lax.top_k(jnp.zeros((0, 9)), 4))
  with pytest.raises(ValueError, match="k=10 exceeds"):
    top_k(jnp.zeros((2, 9)), 10)


@pytest.mark.parametrize("top_k, top_p", [(20, 0.9), (0, 0.9)], ids=["candidates", "searched"])
def test_the_processed_paths_run_under_vmap(top_k, top_p):
  """``jax.vmap`` of the processed ops (from logits and from hidden states, values
  and gradients) batches the compiled kernels' calls: the same as one call each.
  Top-p 0.9 alone keeps 90-280 tokens here, past the 64 candidates: the search
  (reading the float32 logits in place) runs batched too."""
  import lpkernel as lpk

  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 6, 3000)) * 3, jnp.float32)
  t = jnp.asarray(rng.integers(0, 3000, (2, 6)))
  h = jnp.asarray(rng.normal(size=(2, 6, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(16, 3000)), jnp.float32)
  sampling = lpk.Sampling(0.7 if top_k else 1.0, top_k, top_p)

  def logits(x, t):
    return jnp.sum(lpk.processed_token_stats(x, t, sampling).logprobs)

  def hidden(h, t):
    return jnp.sum(lpk.fused_processed_token_stats(h, w, t, sampling).logprobs)

  for fn, a in ((logits, x), (hidden, h)):
    got = jax.jit(jax.vmap(jax.value_and_grad(fn)))(a, t)
    want = [jax.value_and_grad(fn)(a[i], t[i]) for i in range(2)]
    np.testing.assert_allclose(got[0], [v for v, _ in want], rtol=1e-6)
    np.testing.assert_allclose(got[1], np.stack([g for _, g in want]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("top_k", [0, 20], ids=["nothing-truncated", "top-k"])
def test_a_sampler_that_truncates_nothing_offers_no_candidates(top_k):
  """From hidden states on the CPU, a sampler that truncates nothing (``K`` 1)
  takes its blocks' statistics alone (the row's largest value is their
  maximum): no running candidates, whose buffer of 4 took every value one at a
  time (2.3x the fused forward); with top-k, the candidates' kernel. The
  values are the full-vocabulary log-probabilities under the temperature, and
  every token is kept."""
  import lpkernel as lpk

  if not cpu_top_k.available():
    pytest.skip("LPKERNEL_CPU_KERNELS=0")
  rng = np.random.default_rng(5)
  h = jnp.asarray(rng.normal(size=(37, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(16, 3001)), jnp.float32)
  t = jnp.asarray(rng.integers(0, 3001, 37), jnp.int32)
  sampling = lpk.Sampling(0.7, top_k)

  def stats(h):
    return lpk.fused_processed_token_stats(h, w, t, sampling)

  text = jax.jit(stats).lower(h).as_text()
  assert ("lpkernel_cpu_block_stats_top_k" in text) == (top_k > 0)
  assert "lpkernel_cpu_block_stats" in text
  if top_k:
    return
  got = jax.jit(stats)(h)
  want = lpk.fused_token_logprobs(h / 0.7, w, t)  # no softcap: the temperature scales h @ w
  np.testing.assert_allclose(got.logprobs, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got.raw_logprobs, want, rtol=1e-5, atol=1e-5)
  assert bool(jnp.all(got.kept)) and bool(jnp.all(got.kept_count == 3001))
  np.testing.assert_allclose(got.log_kept_mass, 0.0, atol=1e-6)


def test_float64_and_a_compiler_less_machine_take_lax_top_k(monkeypatch):
  """float64 (wider than the compiled top-k) and, without the library, every
  dtype: ``lax.top_k`` kept from XLA:CPU's rewrite into a sort."""
  a = jnp.asarray(np.random.default_rng(1).normal(size=(3, 50)), jnp.float32)
  with jax.enable_x64(True):
    text = jax.jit(lambda a: top_k(a, 5)).lower(a.astype(jnp.float64)).as_text()
    assert "lpkernel_cpu_top_k" not in text and "chlo.top_k" in text
  monkeypatch.setattr(cpu_top_k, "available", lambda: False)
  text = jax.jit(lambda a: top_k(a, 5)).lower(a).as_text()
  assert "lpkernel_cpu_top_k" not in text and "chlo.top_k" in text
  _same(jax.jit(lambda a: top_k(a, 5))(a), lax.top_k(a, 5))


# A stand-in compiler: logs each call's start and end, takes 0.3 s, writes the
# file after -o, and fails where its flags hold -DFAIL.
_FAKE_COMPILER = """#!/bin/sh
echo "start $$" >> "$FAKE_LOG"
sleep 0.3
out=""; prev=""
for a in "$@"; do
  [ "$prev" = "-o" ] && out="$a"
  [ "$a" = "-DFAIL" ] && { echo "end $$ failed" >> "$FAKE_LOG"; echo "bad flag" >&2; exit 1; }
  prev="$a"
done
: > "$out"
echo "end $$ $*" >> "$FAKE_LOG"
"""


def _fake_compiler(monkeypatch, tmp_path) -> Path:
  compiler = tmp_path / "fake-c++"
  compiler.write_text(_FAKE_COMPILER)
  compiler.chmod(0o755)
  log = tmp_path / "calls.log"
  monkeypatch.setenv("CXX", str(compiler))
  monkeypatch.setenv("FAKE_LOG", str(log))
  monkeypatch.setenv("LPKERNEL_CACHE", str(tmp_path / "cache"))
  return log


def _most_at_once(log: Path) -> int:
  running = most = 0
  for line in log.read_text().splitlines():
    running += 1 if line.startswith("start") else -1
    most = max(most, running)
  return most


def test_variants_compile_their_sources_at_once_and_a_failed_one_alone_fails(monkeypatch, tmp_path):
  """Every source of every variant a compiler of its own, as many at once as
  cores; each variant linked; a variant whose compile fails comes back as its
  ``OSError``, the others built; built ones are cached (no call the next time)."""
  log = _fake_compiler(monkeypatch, tmp_path)
  portable, fast, failed = cpu_library._build((), ("-DFAST",), ("-DFAIL",))
  assert portable.exists() and fast.exists() and portable != fast
  assert isinstance(failed, OSError) and "bad flag" in str(failed)
  calls = [line for line in log.read_text().splitlines() if line.startswith("end")]
  compiles = [c for c in calls if " -c " in c]
  assert len(compiles) == 2 * len(cpu_library.SOURCES)  # the failed variant's: logged as failed
  assert sum(" -shared " in c for c in calls) == 2  # not the failed one
  if (os.cpu_count() or 1) > 1:
    assert _most_at_once(log) > 1
  log.write_text("")
  assert cpu_library._build((), ("-DFAST",)) == [portable, fast]
  assert log.read_text() == ""


def test_processes_building_at_once_build_once(monkeypatch, tmp_path):
  """Two builds of the same variant at once (a test run's workers): one builds
  under the cache's lock, the other waits and finds it built."""
  import threading

  log = _fake_compiler(monkeypatch, tmp_path)
  results = []
  threads = [threading.Thread(target=lambda: results.append(cpu_library._build())) for _ in "ab"]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert results[0] == results[1] and results[0][0].exists()
  calls = [line for line in log.read_text().splitlines() if line.startswith("end")]
  assert len(calls) == len(cpu_library.SOURCES) + 1  # compiled and linked once


def test_a_failed_build_is_reported_and_falls_back(monkeypatch, tmp_path, caplog):
  """No compiler: the build raises ``OSError`` naming it, and registering logs
  the reason and says False (nothing raised, nothing registered)."""
  monkeypatch.setenv("CXX", "no-such-compiler-here")
  monkeypatch.setenv("LPKERNEL_CACHE", str(tmp_path))
  with pytest.raises(OSError, match="no-such-compiler-here"):
    cpu_library._build()
  with caplog.at_level("WARNING"):
    assert not cpu_library._register()
  assert "no-such-compiler-here" in caplog.text
  monkeypatch.setenv("LPKERNEL_CPU_KERNELS", "0")
  assert not cpu_library._register()
