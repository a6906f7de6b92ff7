"""Many devices: jit with NamedSharding, and vocab-parallel scoring on 8 CPU devices."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lpkernel as lpk
from lpkernel import sharding
from lpkernel.losses import dpo_loss, sft_loss
from tests.helpers import (
  FUSED_IMPLEMENTATIONS,
  LOGITS_IMPLEMENTATIONS,
  gradient_derivatives,
  jitted,
)

B, T, V, D = 4, 6, 32, 8

pytestmark = pytest.mark.skipif(
  jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets them)"
)


MESHES = [(2, 4), (1, 8)]


def _mesh_id(shape):
  return "x".join(map(str, shape))


@pytest.fixture(scope="module", params=MESHES, ids=_mesh_id)
def mesh(request):
  return Mesh(np.array(jax.devices()[:8]).reshape(request.param), ("data", "model"))


def _inputs(seed=0):
  k = jax.random.split(jax.random.key(seed), 5)
  logits = 2 * jax.random.normal(k[0], (B, T, V))
  tokens = jax.random.randint(k[1], (B, T), 0, V)
  response = jnp.arange(T)[None] >= jnp.array([[2], [3], [1], [4]])
  hidden = jax.random.normal(k[2], (B, T, D))
  unembed = jax.random.normal(k[3], (D, V)) / D**0.5
  seg = jnp.array([[1, 1, 1, 2, 2, 2], [1] * 6, [1, 1, 1, 1, 0, 0], [1, 1, 2, 2, 3, 3]])
  return logits, tokens, response, hidden, unembed, seg


def _put(mesh, x, *spec):
  return jax.device_put(x, NamedSharding(mesh, P(*spec)))


def _assert_scores_close(a, b):
  for name in ("prompt_logprob", "response_logprob", "joint_logprob", "token_logprobs"):
    np.testing.assert_allclose(
      getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-5, err_msg=name
    )
  for name in ("prompt_tokens", "response_tokens", "response_greedy"):
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_jit_with_named_sharding_matches_one_device(mesh):
  logits, tokens, response, hidden, unembed, seg = _inputs()
  xs, ts, rs, ss = (_put(mesh, a, "data") for a in (logits, tokens, response, seg))
  hs = _put(mesh, hidden, "data")

  @jax.jit
  def run(x, t, r, s, h):
    a = lpk.score(x, t, r, segment_ids=s, num_segments=3)
    b = lpk.score_hidden(h, unembed, t, r, segment_ids=s)
    lp = lpk.token_logprobs(x, t)
    loss = (
      sft_loss(a)
      + dpo_loss(
        b.response_logprob[:2],
        b.response_logprob[2:],
        b.response_logprob[2:],
        b.response_logprob[:2],
      )[0]
    )
    return a, b, lp, loss

  got = run(xs, ts, rs, ss, hs)
  want = run(logits, tokens, response, seg, hidden)  # one device
  _assert_scores_close(got[0], want[0])
  _assert_scores_close(got[1], want[1])
  np.testing.assert_allclose(got[2], want[2], rtol=1e-6)
  np.testing.assert_allclose(got[3], want[3], rtol=1e-5)
  if mesh.shape["data"] > 1:  # outputs stay sharded along the batch
    assert got[0].joint_logprob.sharding.spec[0] == "data"


@pytest.mark.parametrize("num_segments", [None, 3])
def test_vocab_parallel_logits_values_and_grads(mesh, num_segments):
  logits, tokens, response, _, _, seg = _inputs(1)
  xs = _put(mesh, logits, "data", None, "model")
  tau = jnp.array([[0.5], [1.0], [1.5], [2.0]])

  def loss(fn, x, tau, **kw):
    s = fn(
      x,
      tokens,
      response,
      segment_ids=seg,
      num_segments=num_segments,
      temperature=tau,
      softcap=5.0,
      **kw,
    )
    return jnp.sum(s.response_logprob) + 0.3 * jnp.sum(s.prompt_logprob), s

  vp = jax.jit(
    jax.value_and_grad(
      lambda x, tau: loss(sharding.vocab_parallel_score, x, tau, mesh=mesh, batch_axis="data"),
      argnums=(0, 1),
      has_aux=True,
    )
  )
  ref = jax.value_and_grad(lambda x, tau: loss(lpk.score, x, tau), argnums=(0, 1), has_aux=True)
  (v1, s1), (gx1, gt1) = vp(xs, tau)
  (v2, s2), (gx2, gt2) = ref(logits, tau)
  _assert_scores_close(s1, s2)
  np.testing.assert_allclose(gx1, gx2, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gt1, gt2, rtol=1e-5, atol=1e-6)
  assert gx1.sharding.spec[-1] == "model"


def _vocab_parallel_fused_matches_one_device(mesh, impl, vocab_axis):
  _, tokens, response, hidden, unembed, seg = _inputs(2)
  if vocab_axis == 0:  # a tied table [V, D], sharded along its first axis
    unembed = unembed.T.copy()
  ws = _put(mesh, unembed, *((None, "model") if vocab_axis else ("model", None)))
  hs = _put(mesh, hidden, "data")

  def loss(fn, h, w, **kw):
    s = fn(
      h,
      w,
      tokens,
      response,
      segment_ids=seg,
      implementation=impl,
      vocab_axis=vocab_axis,
      **kw,
    )
    return jnp.sum(s.joint_logprob), s

  vp = jax.jit(
    jax.value_and_grad(
      lambda h, w: loss(sharding.vocab_parallel_score_hidden, h, w, mesh=mesh, batch_axis="data"),
      argnums=(0, 1),
      has_aux=True,
    )
  )
  (v1, s1), (gh1, gw1) = vp(hs, ws)
  (v2, s2), (gh2, gw2) = jax.jit(
    jax.value_and_grad(lambda h, w: loss(lpk.score_hidden, h, w), argnums=(0, 1), has_aux=True)
  )(hidden, unembed)
  _assert_scores_close(s1, s2)
  np.testing.assert_allclose(gh1, gh2, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gw1, gw2, rtol=1e-5, atol=1e-6)

  stats = jax.jit(
    lambda h, w: sharding.vocab_parallel_fused_token_stats(
      h, w, tokens, mesh, batch_axis="data", vocab_axis=vocab_axis, implementation=impl
    )
  )(hs, ws)
  want = jitted(lpk.fused_token_stats, hidden, unembed, tokens, vocab_axis=vocab_axis)
  np.testing.assert_allclose(stats.entropy, want.entropy, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats.lse, want.lse, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("vocab_axis", [-1, 0], ids=["DV", "tied-VD"])
def test_vocab_parallel_fused_values_and_grads(mesh, vocab_axis):
  config = lpk.FusedConfig(vocab_block=3)  # several blocks and a tail per shard
  _vocab_parallel_fused_matches_one_device(mesh, lpk.XlaFused(config), vocab_axis)


@pytest.mark.parametrize(
  "name,shape,vocab_axis", [("pallas_gpu", (1, 8), 0), ("pallas_tpu", (2, 4), -1)]
)
def test_vocab_parallel_fused_runs_the_pallas_kernels_on_each_shard(name, shape, vocab_axis):
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(shape), ("data", "model"))
  _vocab_parallel_fused_matches_one_device(mesh, FUSED_IMPLEMENTATIONS[name], vocab_axis)


def test_vocab_parallel_fused_nll_loss_matches_one_device(mesh):
  """Each shard writes its block of d unembed in the forward pass from the rows'
  merged statistics (token chunks on one mesh, the sweeps on the other); values
  and gradients equal one device's."""
  loss_chunks = mesh.shape["data"] > 1
  _, tokens, response, hidden, unembed, _ = _inputs(4)
  config = lpk.FusedConfig(vocab_block=3, loss_chunks=loss_chunks, loss_chunk_tokens=5)
  impl = lpk.XlaFused(config)
  weights = jnp.where(response, 0.25, 0.0).at[0, 0].set(1.0)
  tau = jnp.linspace(0.5, 2.0, B * T).reshape(B, T)
  hidden = hidden.at[1, 0].set(jnp.nan)  # a zero-weight row stays out everywhere

  def loss(fn, h, w, tau, **kw):
    return fn(
      h,
      w,
      tokens,
      weights=weights,
      z_loss=1e-2,
      temperature=tau,
      softcap=5.0,
      implementation=impl,
      **kw,
    )

  vp = jax.jit(
    jax.value_and_grad(
      lambda h, w, tau: loss(
        sharding.vocab_parallel_fused_nll_loss, h, w, tau, mesh=mesh, batch_axis="data"
      ),
      argnums=(0, 1, 2),
    )
  )
  value, grads = vp(_put(mesh, hidden, "data"), _put(mesh, unembed, None, "model"), tau)
  want, want_grads = jax.jit(
    jax.value_and_grad(lambda h, w, tau: loss(lpk.fused_nll_loss, h, w, tau), argnums=(0, 1, 2))
  )(hidden, unembed, tau)
  np.testing.assert_allclose(value, want, rtol=1e-6)
  for a, b in zip(grads, want_grads, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert np.isfinite(grads[0]).all()


@pytest.mark.parametrize("implementation", ["xla", "pallas_gpu"])
def test_vocab_parallel_nll_loss_matches_one_device(mesh, implementation):
  """Each shard writes its block of d logits in the forward pass from the rows'
  merged statistics; the loss, d logits and d tau (z-loss, softcap and per-token
  temperature on) equal one device's, and no gradient reaches the weights."""
  impl = {"xla": "xla", "pallas_gpu": LOGITS_IMPLEMENTATIONS["pallas_gpu"]}[implementation]
  logits, tokens, response, _, _, _ = _inputs(5)
  weights = jnp.where(response, 0.25, 0.0).at[0, 0].set(1.0)
  tau = jnp.linspace(0.5, 2.0, B * T).reshape(B, T)
  logits = logits.at[1, 0].set(jnp.nan)  # a zero-weight row stays out everywhere

  def loss(fn, x, tau, **kw):
    opts = dict(z_loss=1e-2, temperature=tau, softcap=5.0, implementation=impl)
    return fn(x, tokens, weights=weights, **opts, **kw)

  vp = jax.jit(
    jax.value_and_grad(
      lambda x, tau: loss(sharding.vocab_parallel_nll_loss, x, tau, mesh=mesh, batch_axis="data"),
      argnums=(0, 1),
    )
  )
  value, grads = vp(_put(mesh, logits, "data", None, "model"), tau)
  want, want_grads = jax.jit(
    jax.value_and_grad(lambda x, tau: loss(lpk.nll_loss, x, tau), argnums=(0, 1))
  )(logits, tau)
  np.testing.assert_allclose(value, want, rtol=1e-6)
  for a, b in zip(grads, want_grads, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert np.isfinite(grads[0]).all() and grads[0].sharding.spec[-1] == "model"
  with pytest.raises(TypeError, match="weights are constants"):  # never a silent zero
    jax.grad(
      lambda w: sharding.vocab_parallel_nll_loss(
        logits, tokens, mesh, weights=w, batch_axis="data", implementation=impl
      )
    )(weights)


def test_vocab_parallel_out_of_range_ids_are_nan(mesh):
  logits, tokens, _, _, _, _ = _inputs(3)
  tokens = tokens.at[0, 1].set(V).at[1, 2].set(-1)
  xs = _put(mesh, logits, "data", None, "model")
  lp, _ = jax.jit(
    lambda x: sharding.vocab_parallel_token_logprobs_and_greedy(x, tokens, mesh, batch_axis="data")
  )(xs)
  assert np.isnan(lp[0, 1]) and np.isnan(lp[1, 2])
  assert np.isfinite(np.delete(np.asarray(lp).ravel(), [1, 8])).all()


def test_vocab_must_divide_the_model_axis(mesh):
  with pytest.raises(ValueError, match="must divide"):
    sharding.vocab_parallel_token_logprobs_and_greedy(
      jnp.zeros((4, 30)), jnp.zeros(4, jnp.int32), mesh
    )


_KINDS = "all-gather|all-to-all|all-reduce|reduce-scatter|collective-permute"
_COLLECTIVE = re.compile(r"= (\(?[a-z0-9\[\]{}, ]*?\)?) (" + _KINDS + r")(-start)?\(")
_OPERAND = re.compile(r"([a-z0-9]+)\[([\d,]*)\]")
_BYTES = {"f32": 4, "bf16": 2, "s32": 4, "pred": 1, "f16": 2, "u32": 4}


def collectives(hlo: str):
  """(kind, dtype, shape) of every operand of every collective in an optimised HLO module."""
  found = []
  for result, kind, _ in _COLLECTIVE.findall(hlo):
    for dtype, dims in _OPERAND.findall(result):
      found.append((kind, dtype, tuple(int(d) for d in dims.split(",") if d)))
  return found


@pytest.mark.parametrize("path", ["logits", "fused", "loss"])
@pytest.mark.parametrize("with_grad", [False, True], ids=["forward", "forward+backward"])
def test_hlo_never_gathers_the_vocabulary_and_moves_few_bytes_per_token(path, with_grad):
  """Per token: max, target logit, sum-exp and first-argmax column, 16 bytes (the fused
  path's entropy sum is not read by Scores, so XLA drops it). The scores' loss reads
  greedy flags; the training loss does not."""
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
  v, n_local = 4096, B * T // 2
  logits, tokens, response, hidden, _, _ = _inputs(4)
  logits = jnp.zeros((B, T, v))
  unembed = jnp.zeros((D, v))
  if path == "logits":
    args = (_put(mesh, logits, "data", None, "model"),)
    fn = lambda x: _loss(
      sharding.vocab_parallel_score(x, tokens, response, mesh, batch_axis="data")
    )
  elif path == "loss":
    args = (_put(mesh, logits, "data", None, "model"),)
    fn = lambda x: sharding.vocab_parallel_nll_loss(x, tokens, mesh, response, batch_axis="data")
  else:
    args = (_put(mesh, hidden, "data"), _put(mesh, unembed, None, "model"))
    fn = lambda h, w: _loss(
      sharding.vocab_parallel_score_hidden(h, w, tokens, response, mesh, batch_axis="data")
    )
  if with_grad:
    fn = jax.grad(fn, argnums=tuple(range(len(args))))
  hlo = jax.jit(fn).lower(*args).compile().as_text()
  found = collectives(hlo)
  for kind, _, shape in found:
    assert not (kind in ("all-gather", "all-to-all") and any(d >= v // 4 for d in shape)), (
      kind,
      shape,
    )
  per_token = sum(
    np.prod(shape) * _BYTES[dtype]
    for kind, dtype, shape in found
    if kind == "all-reduce" and shape and shape[-1] == n_local
  )
  # Under grad only what the gradient needs survives: max and sum-exp (and the fused
  # path's entropy sum, a residual); no backward collective per token.
  expected = {("logits", False): 16, ("fused", False): 16, ("logits", True): 8, ("fused", True): 12}
  expected |= {("loss", False): 12, ("loss", True): 8}
  assert per_token == expected[path, with_grad] * n_local, found


def _loss(scores):
  return scores.joint_logprob.sum() + scores.response_greedy.sum()


@pytest.mark.parametrize("path", ["score", "nll_loss", "fused_nll_loss"])
def test_vocab_parallel_second_derivatives_match_one_device(path):
  """A Hessian-vector product (forward over reverse) and a gradient of a
  gradient through the vocab-parallel functions equal one device's reference:
  each shard's rules (Pallas GPU kernels on the logits paths) are
  differentiated as the XLA implementation's, collectives included."""
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
  logits, tokens, response, hidden, unembed, _ = _inputs(9)
  weights = jnp.where(response, 0.25, 0.0)
  tau = jnp.linspace(0.5, 2.0, B * T).reshape(B, T)
  impl = LOGITS_IMPLEMENTATIONS["pallas_gpu"]
  opts = dict(temperature=tau, softcap=5.0)
  if path == "score":
    args = (_put(mesh, logits, "data", None, "model"),)
    vp = lambda x: jnp.sum(  # noqa: E731
      sharding.vocab_parallel_score(
        x, tokens, response, mesh=mesh, batch_axis="data", implementation=impl, **opts
      ).response_logprob
    )
    one = lambda x: jnp.sum(  # noqa: E731
      lpk.score(x, tokens, response, implementation="reference", **opts).response_logprob
    )
  elif path == "nll_loss":
    args = (_put(mesh, logits, "data", None, "model"),)
    kw = dict(weights=weights, z_loss=1e-2, **opts)
    vp = lambda x: sharding.vocab_parallel_nll_loss(  # noqa: E731
      x, tokens, mesh=mesh, batch_axis="data", implementation=impl, **kw
    )
    one = lambda x: lpk.nll_loss(x, tokens, implementation="reference", **kw)  # noqa: E731
  else:
    args = (_put(mesh, hidden, "data"), _put(mesh, unembed, None, "model"))
    kw = dict(weights=weights, z_loss=1e-2, **opts)
    vp = lambda h, w: sharding.vocab_parallel_fused_nll_loss(  # noqa: E731
      h, w, tokens, mesh=mesh, batch_axis="data", **kw
    )
    one = lambda h, w: lpk.fused_nll_loss(h, w, tokens, implementation="reference", **kw)  # noqa: E731

  got = gradient_derivatives(vp, args)
  want = gradient_derivatives(one, tuple(np.asarray(a) for a in args))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(b))))


# The processed paths (sampling=): small candidate sets so that rows need the searches.
_PROCESSED_CONFIG = lpk.ProcessedConfig(candidates=8, group=4, sweep_block=16)
_PV = 256


def _processed_inputs(seed):
  k = jax.random.split(jax.random.key(seed), 4)
  scale = jnp.array([4.0, 0.5, 2.0, 0.05])[:, None, None]  # peaked to flat rows
  logits = scale * jax.random.normal(k[0], (B, T, _PV))
  tokens = jax.random.randint(k[1], (B, T), 0, _PV)
  hidden = jax.random.normal(k[2], (B, T, D))
  unembed = jax.random.normal(k[3], (D, _PV)) * scale.reshape(B, 1)[:2].mean()
  return logits, tokens, hidden, unembed


def _samplings():
  per_example = lpk.Sampling(
    temperature=jnp.array([0.7, 1.0, 1.3, 0.9]),
    top_k=jnp.array([0, 5, 40, 300]),  # off, settled by the candidates, searched, off (>= V)
    top_p=jnp.array([0.9, 1.0, 0.99, 0.5]),
    min_p=jnp.array([0.0, 0.05, 0.0, 0.0]),
  )
  return {
    "per-example": per_example,
    "top_p": lpk.Sampling(top_p=0.95),
    "top_k": lpk.Sampling(top_k=20),
  }


def _processed_loss(stats):
  kept_lp = jnp.where(stats.kept, stats.logprobs, 0.0)
  return jnp.sum(kept_lp) + 0.3 * jnp.sum(stats.raw_logprobs) + 0.2 * jnp.sum(stats.log_kept_mass)


def _assert_processed_equal(got, want):
  for name in ("logprobs", "raw_logprobs", "log_kept_mass"):
    np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=2e-5, atol=2e-5)
  for name in ("kept", "kept_count", "greedy"):
    np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


_PALLAS_GPU = lpk.PallasGpuProcessed(
  lpk.PallasGpuLogits(block_v=16, bwd_block_v=16), interpret=True
)
_PALLAS_TPU = lpk.PallasTpuProcessed(lpk.PallasTpuLogits(block_rows=8), interpret=True)


SAMPLERS = ("per-example", "top_p", "top_k")


# XLA's steps on both meshes; each Pallas kernel on one (the kernels see a
# shard's columns, and both meshes' collectives are XLA's steps' own).
@pytest.mark.parametrize(
  "mesh,which,impl",
  [
    *(
      pytest.param(s, which, None, id=f"{_mesh_id(s)}-{which}")
      for s in MESHES
      for which in SAMPLERS
    ),
    pytest.param((1, 8), "per-example", _PALLAS_GPU, id="1x8-per-example-pallas_gpu"),
    pytest.param((2, 4), "per-example", _PALLAS_TPU, id="2x4-per-example-pallas_tpu"),
  ],
  indirect=["mesh"],
)  # fmt: skip
def test_vocab_parallel_processed_logits_values_and_grads(mesh, which, impl):
  """Sharded along V, the kept sets, processed log-probabilities and their
  gradients (logits and per-example temperature) equal one device's, and the
  kept sets equal the sorting reference's; the Pallas GPU kernels (interpret
  mode) on each shard too."""
  sampling = _samplings()[which]
  logits, tokens, _, _ = _processed_inputs(11)
  xs = _put(mesh, logits, "data", None, "model")
  tau_of = lambda t: sampling._replace(temperature=t)  # noqa: E731
  tau = sampling.temperature

  def run(fn, x, t, **kw):
    stats = fn(x, tokens, tau_of(t), softcap=8.0, config=_PROCESSED_CONFIG, **kw)
    return _processed_loss(stats), stats

  vp = lambda x, t: run(  # noqa: E731
    sharding.vocab_parallel_processed_token_stats,
    x,
    t,
    mesh=mesh,
    batch_axis="data",
    implementation=impl,
  )
  argnums = (0, 1) if which == "per-example" else (0,)
  (l1, s1), g1 = jax.jit(jax.value_and_grad(vp, argnums=argnums, has_aux=True))(xs, tau)
  (l2, s2), g2 = jax.jit(
    jax.value_and_grad(lambda x, t: run(lpk.processed_token_stats, x, t), argnums, has_aux=True)
  )(logits, tau)
  _assert_processed_equal(s1, s2)
  ref = lpk.processed_token_stats(logits, tokens, sampling, softcap=8.0, implementation="reference")
  np.testing.assert_array_equal(s1.kept_count, ref.kept_count)
  assert np.any(~np.asarray(s1.kept)) and np.any(np.asarray(s1.kept))
  for a, b in zip(g1, g2, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert g1[0].sharding.spec[-1] == "model"


@pytest.mark.parametrize(
  "mesh,vocab_axis,impl",
  [
    *(
      pytest.param(s, axis, None, id=f"{_mesh_id(s)}-{name}")
      for s in MESHES
      for axis, name in ((-1, "DV"), (0, "tied-VD"))
    ),
    pytest.param(
      (1, 8), -1, dataclasses.replace(_PALLAS_GPU, fused=lpk.PallasGpuFused(8)),
      id="1x8-DV-pallas_gpu",
    ),
    pytest.param(
      (2, 4), 0, dataclasses.replace(_PALLAS_TPU, fused=lpk.PallasTpuFused(8, 128)),
      id="2x4-tied-VD-pallas_tpu",
    ),
  ],
  indirect=["mesh"],
)  # fmt: skip
def test_vocab_parallel_fused_processed_values_and_grads(mesh, vocab_axis, impl):
  sampling = _samplings()["per-example"]
  _, tokens, hidden, unembed = _processed_inputs(12)
  unembed = 3 * unembed
  if vocab_axis == 0:
    unembed = unembed.T.copy()
  ws = _put(mesh, unembed, *((None, "model") if vocab_axis else ("model", None)))
  hs = _put(mesh, hidden, "data")

  def run(fn, h, w, t, **kw):
    stats = fn(
      h,
      w,
      tokens,
      sampling._replace(temperature=t),
      vocab_axis=vocab_axis,
      config=_PROCESSED_CONFIG,
      **kw,
    )
    return _processed_loss(stats), stats

  vp = lambda h, w, t: run(  # noqa: E731
    sharding.vocab_parallel_fused_processed_token_stats,
    h,
    w,
    t,
    mesh=mesh,
    batch_axis="data",
    implementation=impl,
  )
  one = lambda h, w, t: run(lpk.fused_processed_token_stats, h, w, t)  # noqa: E731
  tau = sampling.temperature
  (_, s1), g1 = jax.jit(jax.value_and_grad(vp, (0, 1, 2), has_aux=True))(hs, ws, tau)
  (_, s2), g2 = jax.jit(jax.value_and_grad(one, (0, 1, 2), has_aux=True))(hidden, unembed, tau)
  _assert_processed_equal(s1, s2)
  for a, b in zip(g1, g2, strict=True):
    # The Pallas paths' logits add in another order than XLA's dot (the TPU
    # kernel's tiles; the GPU path's candidates, dot products of gathered rows):
    # logits of several tens differ in their last bits, and so do the
    # probabilities (~2e-5 relative), and a row's kept mass where the candidates
    # settle its nucleus.
    tol = 1e-5 if impl is None else 1e-4
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_vocab_parallel_score_under_a_sampler_matches_one_device(path):
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
  # The second example is a greedy request (truncation off at temperature 1).
  sampling = lpk.Sampling(
    temperature=jnp.array([0.8, 0.0, 0.8, 1.2]), top_k=jnp.array([3, 50, 0, 9]), top_p=0.9
  )
  logits, tokens, hidden, unembed = _processed_inputs(13)
  response = jnp.arange(T)[None] >= jnp.array([[2], [3], [1], [4]])
  if path == "logits":
    got = jax.jit(
      lambda x: sharding.vocab_parallel_score(
        x, tokens, response, mesh, batch_axis="data", sampling=sampling
      )
    )(_put(mesh, logits, "data", None, "model"))
    want = lpk.score(logits, tokens, response, sampling=sampling)
  else:
    got = jax.jit(
      lambda h, w: sharding.vocab_parallel_score_hidden(
        h, w, tokens, response, mesh, batch_axis="data", sampling=sampling
      )
    )(_put(mesh, hidden, "data"), _put(mesh, unembed, None, "model"))
    want = lpk.score_hidden(hidden, unembed, tokens, response, sampling=sampling)
  _assert_scores_close(got, want)
  # The greedy row: unprocessed, at temperature 1.
  if path == "logits":
    plain = lpk.score(logits, tokens, response)
  else:
    plain = lpk.score_hidden(hidden, unembed, tokens, response)
  np.testing.assert_allclose(got.token_logprobs[1], plain.token_logprobs[1], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="Sampling.temperature"):
    sharding.vocab_parallel_score(
      logits, tokens, response, mesh, temperature=0.5, sampling=sampling
    )


@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_vocab_parallel_processed_never_gathers_the_vocabulary(path):
  """Forward and backward: the only gather is each device's K candidates per row
  (``d unembed``'s all-reduce over the data axis is data parallelism's)."""
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
  v = 4096
  _, tokens, hidden, _ = _processed_inputs(14)
  sampling = lpk.Sampling(temperature=0.7, top_k=jnp.array([0, 50, 2000, 7]), top_p=0.95)
  if path == "logits":
    args = (_put(mesh, jnp.zeros((B, T, v)), "data", None, "model"),)
    fn = lambda x: _processed_loss(  # noqa: E731
      sharding.vocab_parallel_processed_token_stats(x, tokens, sampling, mesh, batch_axis="data")
    )
  else:
    args = (_put(mesh, hidden, "data"), _put(mesh, jnp.zeros((D, v)), None, "model"))
    fn = lambda h, w: _processed_loss(  # noqa: E731
      sharding.vocab_parallel_fused_processed_token_stats(
        h, w, tokens, sampling, mesh, batch_axis="data"
      )
    )
  hlo = jax.jit(jax.grad(fn, argnums=tuple(range(len(args))))).lower(*args).compile().as_text()
  found = collectives(hlo)
  assert any(kind == "all-gather" for kind, _, _ in found), found
  for kind, _, shape in found:
    gathers = kind in ("all-gather", "all-to-all")
    assert not (gathers and any(d >= v // 4 for d in shape)), (kind, shape)


@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_vocab_parallel_replay_all_reduces_only_the_kept_logits(path):
  """Forward and backward of the vocab-parallel replay: nothing gathered, and
  over the model axis only the ``[N, K]`` kept logits' ``psum`` (4 K bytes per
  token) plus, from hidden states, ``d hidden``'s sum (and ``d unembed``'s
  all-reduce over the data axis, data parallelism's)."""
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
  v, k, n_local = 4096, 6, B * T // 2
  ids, targets, _, _ = _replay_inputs(np.random.default_rng(6))
  if path == "logits":
    args = (_put(mesh, jnp.zeros((B, T, v)), "data", None, "model"),)
    fn = lambda x: sharding.vocab_parallel_replay_token_logprobs(  # noqa: E731
      x, targets % v, ids, mesh, batch_axis="data"
    ).sum()
  else:
    args = (_put(mesh, jnp.ones((B, T, D)), "data"), _put(mesh, jnp.zeros((D, v)), None, "model"))
    fn = lambda h, w: sharding.vocab_parallel_fused_replay_token_logprobs(  # noqa: E731
      h, w, targets % v, ids, mesh, batch_axis="data"
    ).sum()
  hlo = jax.jit(jax.grad(fn, argnums=tuple(range(len(args))))).lower(*args).compile().as_text()
  found = collectives(hlo)
  assert not any(kind in ("all-gather", "all-to-all") for kind, _, _ in found), found
  reduced = sorted(shape for kind, _, shape in found if kind == "all-reduce")
  hidden_sums = [(n_local, D)] if path == "hidden" else []
  unembed_sums = [(D, v // 4)] if path == "hidden" else []
  assert reduced == sorted([(n_local, k), *hidden_sums, *unembed_sums]), found


@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_vocab_parallel_processed_bad_inputs_match_one_device(mesh, path):
  """Through the mesh as on one device: an id outside ``[0, V)`` (negative too,
  never wrapped) and an out-of-range parameter give NaN (kept count 0), a target
  at ``-inf`` a ``-inf`` log-probability, and a NaN row masked out of the loss
  leaves every other row's value and gradient clean (finite, zero on that row)."""
  logits, tokens, hidden, unembed = _processed_inputs(15)
  # Row (2, 0): its target at -inf (impossible); row (3, 4): NaN, masked out below.
  logits = logits.at[2, 0, tokens[2, 0]].set(-jnp.inf).at[3, 4, 7].set(jnp.nan)
  hidden = hidden.at[3, 4, 2].set(jnp.nan)
  sampling = lpk.Sampling(
    temperature=jnp.array([0.7, 1.0, 1.3, 0.9]),
    top_k=jnp.array([0, 5, 40, 3]),
    top_p=jnp.array([0.9, 1.0, 0.99, 0.5]),
    min_p=jnp.array([0.0, 0.05, 0.0, 0.0]),
  )
  nan_row = np.zeros((B, T), bool)
  nan_row[3, 4] = True

  def loss(stats):
    lp = jnp.where(nan_row | ~stats.kept, 0.0, stats.logprobs)
    return jnp.sum(lp) + 0.3 * jnp.sum(jnp.where(nan_row, 0.0, stats.raw_logprobs)), stats

  if path == "logits":
    args = (logits,)
    sharded = (_put(mesh, logits, "data", None, "model"),)

    def vp(x, tokens=tokens, sampling=sampling):
      return loss(
        sharding.vocab_parallel_processed_token_stats(
          x, tokens, sampling, mesh, batch_axis="data", config=_PROCESSED_CONFIG
        )
      )

    def one(x, tokens=tokens, sampling=sampling):
      return loss(lpk.processed_token_stats(x, tokens, sampling, config=_PROCESSED_CONFIG))
  else:
    args = (hidden, unembed)
    sharded = (_put(mesh, hidden, "data"), _put(mesh, unembed, None, "model"))

    def vp(h, w, tokens=tokens, sampling=sampling):
      return loss(
        sharding.vocab_parallel_fused_processed_token_stats(
          h, w, tokens, sampling, mesh, batch_axis="data", config=_PROCESSED_CONFIG
        )
      )

    def one(h, w, tokens=tokens, sampling=sampling):
      return loss(lpk.fused_processed_token_stats(h, w, tokens, sampling, config=_PROCESSED_CONFIG))

  argnums = tuple(range(len(args)))
  (_, s1), g1 = jax.jit(jax.value_and_grad(vp, argnums, has_aux=True))(*sharded)
  (_, s2), g2 = jax.jit(jax.value_and_grad(one, argnums, has_aux=True))(*args)
  assert np.isnan(s1.logprobs[3, 4]) and s1.kept_count[3, 4] == 0
  if path == "logits":
    assert s1.logprobs[2, 0] == -np.inf and s1.raw_logprobs[2, 0] == -np.inf
  _assert_processed_equal(s1, s2)
  for a, b in zip(g1, g2, strict=True):
    assert np.all(np.isfinite(np.asarray(a))), "the masked NaN row leaked into a gradient"
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  g = np.asarray(g1[0])
  assert np.all(g[3, 4] == 0) and np.all(g[~nan_row].any(axis=-1))

  # Bad ids and parameters: NaN values (their gradients are NaN by policy: loud).
  bad_tokens = tokens.at[0, 1].set(_PV).at[1, 2].set(-1)
  bad_sampling = sampling._replace(top_p=sampling.top_p.at[2].set(1.5))  # example 2: all NaN
  s1 = jax.jit(lambda *a: vp(*a, tokens=bad_tokens, sampling=bad_sampling)[1])(*sharded)
  s2 = one(*args, tokens=bad_tokens, sampling=bad_sampling)[1]
  bad = nan_row.copy()
  bad[0, 1] = bad[1, 2] = True
  bad[2] = True
  for s in (s1, s2):
    for name in ("logprobs", "raw_logprobs", "log_kept_mass"):
      np.testing.assert_array_equal(np.isnan(getattr(s, name)), bad, err_msg=name)
    assert not np.any(np.asarray(s.kept)[bad]) and np.all(np.asarray(s.kept_count)[bad] == 0)
  _assert_processed_equal(s1, s2)


def _replay_inputs(rng):
  """Kept ids [B, T, 6] spread over every shard (some -1 padded), targets (one
  not kept: -inf; one outside [0, V): NaN), temperatures and loss weights."""
  drawn = np.stack([rng.permutation(V)[:7] for _ in range(B * T)]).reshape(B, T, 7)
  ids, targets = drawn[..., :6].copy(), drawn[..., 0].copy()
  ids[0, :, 4:] = -1
  targets[1, 2] = drawn[1, 2, 6]  # not kept: -inf
  targets[2, 3] = V  # out of range: NaN
  tau = jnp.asarray(rng.uniform(0.6, 1.4, (B, T)), jnp.float32)
  weights = jnp.asarray(rng.uniform(0.5, 1.5, (B, T)), jnp.float32)
  return jnp.asarray(ids, jnp.int32), jnp.asarray(targets, jnp.int32), tau, weights


def test_vocab_parallel_replay_from_logits_matches_one_device(mesh):
  """Replay of recorded kept ids with the logits sharded along V: values,
  ``d logits`` (on its shard) and ``d temperature`` equal one device's, a
  ``-inf`` logit among the kept ones included."""
  rng = np.random.default_rng(5)
  logits = jnp.asarray(rng.normal(size=(B, T, V)) * 3, jnp.float32)
  ids, targets, tau, weights = _replay_inputs(rng)
  logits = logits.at[3, 0, ids[3, 0, 2]].set(-jnp.inf)

  def loss(fn, x, t, **kw):
    lp = fn(x, targets, ids, temperature=t, softcap=5.0, **kw)
    return jnp.sum(jnp.where(jnp.isfinite(lp), lp * weights, 0.0)), lp

  vp = lambda x, t: loss(  # noqa: E731
    sharding.vocab_parallel_replay_token_logprobs, x, t, mesh=mesh, batch_axis="data"
  )
  one = lambda x, t: loss(lpk.replay_token_logprobs, x, t)  # noqa: E731
  xs = _put(mesh, logits, "data", None, "model")
  (_, lp1), g1 = jax.jit(jax.value_and_grad(vp, (0, 1), has_aux=True))(xs, tau)
  (_, lp2), g2 = jax.jit(jax.value_and_grad(one, (0, 1), has_aux=True))(logits, tau)
  assert np.isneginf(lp1[1, 2]) and np.isnan(lp1[2, 3]) and np.isfinite(lp1[3, 0])
  np.testing.assert_allclose(lp1, lp2, rtol=1e-6, atol=1e-6)
  for a, b in zip(g1, g2, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert g1[0].sharding.spec[-1] == "model"  # d logits stays on its shard


@pytest.mark.parametrize(
  "vocab_axis,impl",
  [(-1, None), (0, None), (0, lpk.PallasGpuProcessed(interpret=True))],
  ids=["DV", "tied-VD", "tied-VD-pallas_gpu"],
)
def test_vocab_parallel_replay_from_hidden_states_matches_one_device(mesh, vocab_axis, impl):
  """Replay of recorded kept ids with the unembedding sharded along V: values,
  ``d hidden``, ``d unembed`` (on its shard) and ``d temperature`` equal one
  device's; kept ids spread over every shard, ``-1`` padding, a target outside
  its kept set (-inf) and one outside ``[0, V)`` (NaN) where it was."""
  rng = np.random.default_rng(4)
  hidden = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  unembed = jnp.asarray(rng.normal(size=(D, V)) / D**0.5, jnp.float32)
  table = unembed.T.copy() if vocab_axis == 0 else unembed
  ids, targets, tau, weights = _replay_inputs(rng)

  def loss(fn, h, w, t, **kw):
    lp = fn(h, w, targets, ids, temperature=t, softcap=5.0, vocab_axis=vocab_axis, **kw)
    return jnp.sum(jnp.where(jnp.isfinite(lp), lp * weights, 0.0)), lp

  spec = (None, "model") if vocab_axis == -1 else ("model", None)
  vp = lambda h, w, t: loss(  # noqa: E731
    sharding.vocab_parallel_fused_replay_token_logprobs, h, w, t, mesh=mesh,
    batch_axis="data", implementation=impl,
  )  # fmt: skip
  one = lambda h, w, t: loss(lpk.fused_replay_token_logprobs, h, w, t)  # noqa: E731
  args = (_put(mesh, hidden, "data"), _put(mesh, table, *spec), tau)
  (_, lp1), g1 = jax.jit(jax.value_and_grad(vp, (0, 1, 2), has_aux=True))(*args)
  (_, lp2), g2 = jax.jit(jax.value_and_grad(one, (0, 1, 2), has_aux=True))(hidden, table, tau)
  assert np.isneginf(lp1[1, 2]) and np.isnan(lp1[2, 3])
  np.testing.assert_allclose(lp1, lp2, rtol=1e-6, atol=1e-6)
  for a, b in zip(g1, g2, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert g1[1].sharding.spec[vocab_axis] == "model"  # d unembed stays on its shard
