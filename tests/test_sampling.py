"""The processed distribution, every implementation (the reference in
lpkernel.sampling, the XLA paths from logits and from hidden states in both
layouts) against a NumPy port of vLLM V1's sampler (temperature, min-p, then
``apply_top_k_top_p``'s sort-and-cumsum), per example parameters mixed in one
batch; the tie rule; the gradients of a kept set held constant.

The hidden-state paths score ``eye(N) @ logits`` (exact in any dtype), so the
same oracle and the same gradient (``d unembed = d logits``) hold them.
"""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lpkernel as lpk
from lpkernel.sampling import ProcessedStats, Sampling, kept_mask, processed_logprobs_reference

IMPLEMENTATIONS = [
  "reference", "logits", "hidden", "hidden_tied", "pallas_gpu", "pallas_tpu", "pallas_gpu_hidden",
  "pallas_tpu_hidden",
]  # fmt: skip
# The Pallas kernels in interpret mode, several tiles per row: the GPU's 256
# columns wide; the TPU's forward tiles 128 * 8 (group 8), backward 256.
PALLAS = {
  "pallas_gpu": (
    lpk.PallasGpuProcessed(lpk.PallasGpuLogits(block_v=256, bwd_block_v=256), interpret=True),
    lpk.ProcessedConfig(),
  ),
  "pallas_tpu": (
    lpk.PallasTpuProcessed(lpk.PallasTpuLogits(block_rows=8, block_v=256), interpret=True),
    lpk.ProcessedConfig(candidates=32, group=8),
  ),
}
# From hidden states: token chunks of 8 through the GPU kernels (a tail chunk too).
PALLAS_GPU_HIDDEN = dataclasses.replace(
  PALLAS["pallas_gpu"][0], fused=lpk.PallasGpuFused(chunk_tokens=8)
)
# TPU MXU tiles: 8 rows; forward 128 * 32 columns (a narrow table padded to one
# tile, a wide one with a partial last tile), backward 2048.
PALLAS_TPU_HIDDEN = lpk.PallasTpuProcessed(
  fused=lpk.PallasTpuFused(block_rows=8, block_v=2048), interpret=True
)


GROUPED = lpk.FusedConfig(vocab_block=8, grad_blocks=3)


def _reference(logits, targets, sampling, softcap):
  """The reference as one compiled program (called eagerly it dispatches and
  compiles every primitive on its own); Python numbers stay Python numbers."""
  if softcap is not None and not isinstance(softcap, (int, float)):
    return processed_logprobs_reference(logits, targets, sampling, softcap=softcap)
  fields = sampling._asdict()
  numbers = {k: v for k, v in fields.items() if isinstance(v, (int, float))}
  arrays = {k: v for k, v in fields.items() if k not in numbers}
  return _compiled_reference(logits, targets, arrays, tuple(numbers.items()), softcap)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _compiled_reference(logits, targets, arrays, numbers, softcap):
  sampling = Sampling(**arrays, **dict(numbers))
  return processed_logprobs_reference(logits, targets, sampling, softcap=softcap)


def processed(impl: str, logits, targets, sampling, softcap=None) -> ProcessedStats:
  """``ProcessedStats`` of ``logits [..., V]`` by one implementation (differentiable in logits)."""
  if impl == "reference":
    return _reference(logits, targets, sampling, softcap)
  if impl == "logits":
    return lpk.processed_token_stats(logits, targets, sampling, softcap=softcap)
  if impl in PALLAS:
    implementation, config = PALLAS[impl]
    return lpk.processed_token_stats(
      logits, targets, sampling, softcap=softcap, implementation=implementation, config=config
    )
  v = logits.shape[-1]
  n = int(np.prod(targets.shape))
  hidden = jnp.eye(n, dtype=logits.dtype).reshape(*targets.shape, n)
  w = logits.reshape(n, v)
  if impl == "hidden":
    return lpk.fused_processed_token_stats(hidden, w, targets, sampling, softcap=softcap)
  if impl == "hidden_grouped":  # backward steps of three 8-column blocks, the last overlapping
    return lpk.fused_processed_token_stats(
      hidden, w, targets, sampling, softcap=softcap, fused_config=GROUPED
    )
  if impl in ("pallas_gpu_hidden", "pallas_tpu_hidden"):
    implementation = PALLAS_GPU_HIDDEN if impl == "pallas_gpu_hidden" else PALLAS_TPU_HIDDEN
    return lpk.fused_processed_token_stats(
      hidden, w, targets, sampling, softcap=softcap, implementation=implementation
    )
  return lpk.fused_processed_token_stats(
    hidden, w.T, targets, sampling, softcap=softcap, vocab_axis=0
  )


def vllm_kept(logits: np.ndarray, temperature, top_k, top_p, min_p) -> np.ndarray:
  """bool[V]: vLLM V1's kept set of one row, in float64 (distinct logits: its sort
  order then decides nothing)."""
  y = np.asarray(logits, np.float64) / temperature
  v = y.shape[-1]
  probs = np.exp(y - y.max())
  probs /= probs.sum()
  if min_p > 0:  # apply_min_p
    y = np.where(probs < min_p * probs.max(), -np.inf, y)
  order = np.argsort(y, kind="stable")  # apply_top_k_top_p: ascending
  y_sort = y[order]
  if 0 < top_k < v:
    y_sort = np.where(y_sort < y_sort[v - top_k], -np.inf, y_sort)
  if top_p < 1:
    p_sort = np.exp(y_sort - y_sort.max())
    p_sort /= p_sort.sum()
    mask = np.cumsum(p_sort) <= 1 - top_p
    mask[-1] = False
    y_sort = np.where(mask, -np.inf, y_sort)
  kept = np.zeros(v, bool)
  kept[order] = y_sort > -np.inf
  return kept


def _oracle(logits, targets, params):
  """float64 processed / raw log-probabilities, log S and kept flags of rows."""
  out = {"lp": [], "raw": [], "log_s": [], "kept": [], "count": []}
  for row, t, (tau, k, p, m) in zip(logits, targets, params, strict=True):
    if tau < 1e-5:  # vLLM's greedy request: its SamplingParams turn truncation off, at T = 1
      tau, k, p, m = 1.0, 0, 1.0, 0.0
    y = np.asarray(row, np.float64) / tau
    raw = y - y.max() - np.log(np.exp(y - y.max()).sum())
    kept = vllm_kept(row, tau, k, p, m)
    log_s = np.log(np.exp(raw[kept]).sum())
    out["lp"].append(raw[t] - log_s if kept[t] else -np.inf)
    out["raw"].append(raw[t])
    out["log_s"].append(log_s)
    out["kept"].append(kept)
    out["count"].append(kept.sum())
  return {k: np.array(v) for k, v in out.items()}


TOP_K = [1, 20, 512, 0]  # 0: off (as is V)
TOP_P = [0.5, 0.9, 0.95, 0.999, 1.0]
MIN_P = [0.0, 0.05]


@functools.cache
def _every_combination(v):
  """float64 rows ``[b, V]`` (distinct logits, each exact in float32), targets,
  temperatures, every (top_k, top_p, min_p) combination one row each, and the
  port's answers: made once per ``V`` for every implementation."""
  combos = list(itertools.product(TOP_K, TOP_P, MIN_P))
  b = len(combos)
  rng = np.random.default_rng(v)
  scale = np.where(np.arange(b) % 2 == 0, 4.0, 0.5)[:, None]  # peaked and flat rows
  logits = (rng.permutation(v * b).reshape(b, v) / (v * b) * 2 - 1) * scale * 8
  logits = np.asarray(logits.astype(np.float32), np.float64)
  targets = rng.integers(0, v, b)
  targets[::3] = np.argsort(logits[::3], axis=-1)[:, -2]  # often kept: the second most likely
  tau = np.where(np.arange(b) % 3 == 0, 0.7, 1.0)
  params = [(t, k, p, m) for t, (k, p, m) in zip(tau, combos, strict=True)]
  return logits, targets, tau, combos, _oracle(logits, targets, params)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("v", [1000, 32003, 151936])
def test_kept_sets_and_values_equal_vllms_with_per_example_parameters(v, impl):
  """Every (top_k, top_p, min_p) combination at once, one example each, peaked and
  flat rows, temperatures mixed: the kept sets equal the port's, values to
  float32 rounding."""
  logits, targets, tau, combos, want = _every_combination(v)
  b = len(combos)
  sampling = Sampling(
    temperature=jnp.asarray(tau, jnp.float32),
    top_k=jnp.array([c[0] for c in combos]),
    top_p=jnp.array([c[1] for c in combos], jnp.float32),
    min_p=jnp.array([c[2] for c in combos], jnp.float32),
  )
  got = jax.jit(functools.partial(processed, impl))(
    jnp.asarray(logits, jnp.float32), jnp.asarray(targets), sampling
  )
  np.testing.assert_array_equal(got.kept_count, want["count"])
  np.testing.assert_array_equal(got.kept, want["kept"][np.arange(b), targets])
  np.testing.assert_allclose(got.raw_logprobs, want["raw"], rtol=2e-6, atol=2e-5)
  np.testing.assert_allclose(got.log_kept_mass, want["log_s"], rtol=2e-6, atol=2e-5)
  kept = want["kept"][np.arange(b), targets]
  np.testing.assert_allclose(got.logprobs[kept], want["lp"][kept], rtol=2e-6, atol=2e-5)
  assert np.all(np.asarray(got.logprobs)[~kept] == -np.inf)
  assert kept.sum() >= b // 4  # the comparison is not vacuous


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_greedy_request_is_scored_as_vllm_reports_it(impl):
  """A temperature below 1e-5 (0 included) is vLLM's greedy request: the engine
  reports its log-probabilities at temperature 1 with min-p, top-k and top-p
  off; array and Python temperatures alike. The other rows keep their sampler,
  and no derivative reaches a greedy row's temperature."""
  rng = np.random.default_rng(5)
  logits = np.asarray(rng.normal(size=(4, 300)).astype(np.float32) * 3, np.float64)
  targets = np.argsort(logits, -1)[:, -4]  # outside top-3: kept by greedy rows only
  tau = np.array([0.0, 5e-6, 0.7, 1.0])
  want = _oracle(logits, targets, [(t, 3, 0.8, 0.05) for t in tau])
  x, t = jnp.asarray(logits, jnp.float32), jnp.asarray(targets)

  def total(x, tau):
    s = processed(impl, x, t, Sampling(tau, 3, 0.8, 0.05))
    return jnp.sum(jnp.where(s.kept, s.logprobs, 0.0)), s

  (_, got), (dx, dtau) = jax.jit(jax.value_and_grad(total, (0, 1), has_aux=True))(
    x, jnp.asarray(tau, jnp.float32)
  )
  np.testing.assert_array_equal(got.kept_count, want["count"])
  np.testing.assert_array_equal(got.kept, [True, True, False, False])
  np.testing.assert_allclose(got.logprobs[:2], want["raw"][:2], rtol=2e-6, atol=2e-5)
  np.testing.assert_allclose(got.raw_logprobs, want["raw"], rtol=2e-6, atol=2e-5)
  np.testing.assert_allclose(got.log_kept_mass[:2], 0.0, atol=2e-6)
  np.testing.assert_array_equal(dtau[:2], 0.0)
  p = np.exp(logits[:2] - logits[:2].max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  onehot = np.arange(300) == targets[:2, None]
  np.testing.assert_allclose(dx[:2], onehot - p, atol=1e-6)  # d log_softmax at T = 1
  python = processed(impl, x[:2], t[:2], Sampling(0.0, 3, 0.8, 0.05))
  np.testing.assert_allclose(python.logprobs, want["raw"][:2], rtol=2e-6, atol=2e-5)
  np.testing.assert_array_equal(python.kept_count, [300, 300])


@given(
  ties=st.integers(2, 5),
  rest=st.lists(st.integers(-20, 0), min_size=1, max_size=6, unique=True),
  top_k=st.integers(1, 12),
  impl=st.sampled_from(IMPLEMENTATIONS),
)
def test_ties_at_the_top_k_boundary_are_kept(ties, rest, top_k, impl):
  row = np.array([1.0] * ties + [float(r) - 21 for r in rest], np.float32)
  s = processed(impl, jnp.asarray(row)[None], jnp.array([0]), Sampling(top_k=top_k))
  # The tied maxima survive together; a k past them keeps the k largest (all when k >= V).
  assert int(s.kept_count[0]) == (ties if top_k <= ties else min(row.size, top_k))


@given(
  ties=st.integers(2, 6),
  p=st.sampled_from([0.05, 0.3, 0.5, 0.9, 0.999]),
  impl=st.sampled_from(IMPLEMENTATIONS),
)
def test_tokens_equal_to_the_top_p_boundary_share_its_fate(ties, p, impl):
  """Equal logits at the boundary are all kept (vLLM would keep some by sort order)."""
  row = jnp.asarray([2.0] * ties + [0.0, -1.0], jnp.float32)
  s = processed(impl, row[None], jnp.array([ties - 1]), Sampling(top_p=p))
  assert bool(s.kept[0])
  assert int(s.kept_count[0]) >= ties


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_equal_means_equal_logits_before_the_shift_and_temperature(impl, tau):
  """-8 and the float above it are distinct logits, but ``z - 8`` rounds both to
  -16 (and the temperature may merge others): top-k 4 of five keeps four, as
  every path compares the logits themselves (the reference ranked ``(z - max)
  / tau`` and kept five). ``kept_mask`` ranks by ``order`` where given."""
  above = np.nextafter(np.float32(-8.0), np.float32(0.0))
  row = jnp.asarray([[8.0, 1.0, 0.0, above, -8.0]], jnp.float32)
  assert float(row[0, 3] - 8.0) == float(row[0, 4] - 8.0)  # merged by the shift
  s = processed(impl, row, jnp.array([3]), Sampling(temperature=tau, top_k=4))
  assert int(s.kept_count[0]) == 4 and bool(s.kept[0])
  y = (row - 8.0) / tau
  np.testing.assert_array_equal(kept_mask(y, Sampling(top_k=4), order=row)[0], [1, 1, 1, 1, 0])
  assert int(jnp.sum(kept_mask(y, Sampling(top_k=4)))) == 5  # ranked by y, ties kept


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_nucleus_below_float32_rounding_keeps_the_most_likely_token(impl):
  """``1 - p`` rounds to 1 in float32, above every sum of the renormalised mass
  that rounds under it: top-p still keeps the most likely token (vLLM's
  ``mask[:, -1] = False``), and only it."""
  logits = jax.random.normal(jax.random.key(5), (8, 1000), jnp.float32) * 2
  best = jnp.argmax(logits, axis=-1)
  s = processed(impl, logits, best, Sampling(top_p=1e-9))
  np.testing.assert_array_equal(s.kept_count, 1)
  assert bool(jnp.all(s.kept))
  np.testing.assert_allclose(s.logprobs, 0.0, atol=1e-6)


@pytest.mark.parametrize("impl", [*IMPLEMENTATIONS, "hidden_grouped"])
def test_gradients_keep_the_kept_set_constant(impl):
  """d processed_lp / d logits = (onehot - p_kept) / tau on kept columns, 0 elsewhere;
  d / d tau by finite differences of the same kept set."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 50)) * 3, jnp.float32)
  t = jnp.asarray(np.argsort(np.asarray(x), -1)[:, -3])
  tau = jnp.array([0.7, 1.0, 1.3])

  def lp(x, tau):
    s = Sampling(temperature=tau, top_k=jnp.array([10, 0, 5]), top_p=jnp.array([0.9, 0.8, 1.0]))
    return processed(impl, x, t, s)

  def total(x, tau):  # one program for the values and both gradients
    stats = lp(x, tau)
    return jnp.sum(stats.logprobs), stats

  (_, stats), (dx, dtau) = jax.jit(jax.value_and_grad(total, (0, 1), has_aux=True))(x, tau)
  assert isinstance(stats, ProcessedStats) and bool(jnp.all(stats.kept))
  s = Sampling(temperature=tau, top_k=jnp.array([10, 0, 5]), top_p=jnp.array([0.9, 0.8, 1.0]))
  y = np.asarray(x, np.float64) / np.asarray(tau)[:, None]

  keep = np.asarray(kept_mask(jnp.asarray(y, jnp.float32), s))
  assert keep.sum() < keep.size  # the sets truncate
  p = np.where(keep, np.exp(y - y.max(-1, keepdims=True)), 0.0)
  p /= p.sum(-1, keepdims=True)
  onehot = np.arange(50) == np.asarray(t)[:, None]
  np.testing.assert_allclose(dx, (onehot - p) / np.asarray(tau)[:, None], atol=1e-6)
  assert np.all(np.asarray(dx)[~keep] == 0)
  # d lp / d tau with the kept set held: (E_p_kept[y] - y_t) / tau, in float64.
  y_t = y[np.arange(3), np.asarray(t)]
  want = ((p * y).sum(-1) - y_t) / np.asarray(tau, np.float64)
  np.testing.assert_allclose(dtau, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_python_parameters_are_checked_and_array_ones_poison(impl):
  x, t = jnp.zeros((2, 5)), jnp.array([0, 1])
  run = functools.partial(processed, impl)
  for bad in [
    Sampling(temperature=-0.5),
    Sampling(temperature=float("nan")),
    Sampling(top_p=0.0),
    Sampling(top_p=1.5),
    Sampling(min_p=-0.1),
    Sampling(top_k=2.5),
  ]:
    with pytest.raises(ValueError, match="Sampling"):
      run(x, t, bad)
  s = run(x, t, Sampling(temperature=jnp.array([1.0, -1.0])))
  assert np.isfinite(s.logprobs[0]) and np.isnan(s.logprobs[1])
  assert np.isnan(run(x, jnp.array([0, 5]), Sampling()).logprobs[1])
  s = run(x, t, Sampling(top_p=jnp.array([0.5, 1.5]), min_p=jnp.array([0.1, 0.0])))
  assert np.isfinite(s.logprobs[0]) and np.isnan(s.logprobs[1])


@pytest.mark.parametrize("impl", ["logits", "hidden", "pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_per_example_top_k_at_the_candidates_boundary(impl, top_p):
  """Array top_k at, below and past K (the exact candidates per row), and a tie
  running past K: the kept sets are the reference's (a k equal to K once kept
  half the row: the cut below the K-th value had no smaller value to go to)."""
  k_max = (PALLAS[impl][1] if impl in PALLAS else lpk.ProcessedConfig()).candidates
  v = 3000
  rng = np.random.default_rng(0)
  logits = rng.permutation(v * 5).reshape(5, v).astype(np.float32) / v
  order = np.argsort(-logits[4])
  logits[4, order[9 : k_max + 20]] = logits[4, order[9]]  # ties from the 10th value to past K
  top_k = jnp.array([k_max - 1, k_max, k_max + 1, k_max, 12])
  sampling = Sampling(temperature=0.5, top_k=top_k, top_p=top_p)
  x, targets = jnp.asarray(logits), jnp.asarray(np.argsort(-logits, axis=-1)[:, 5])
  got = jax.jit(functools.partial(processed, impl))(x, targets, sampling)
  want = processed("reference", x, targets, sampling)
  np.testing.assert_array_equal(got.kept_count, want.kept_count)
  np.testing.assert_array_equal(got.kept, want.kept)
  np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-5)
  if top_p == 1.0:
    assert list(np.asarray(want.kept_count)) == [k_max - 1, k_max, k_max + 1, k_max, k_max + 20]
