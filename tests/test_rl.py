"""Policy-gradient objectives (lpkernel.rl): values and gradients against a float64
NumPy oracle written from the formulas, against TRL's own loss code (when PyTorch
is installed), packing, the fused one-pass form and its temporaries, errors."""

import dataclasses
import itertools
import subprocess
import sys
import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lpkernel as lpk
from lpkernel import rl
from tests.helpers import assert_close

B, T = 4, 7
AGGREGATIONS = rl.TRL_AGGREGATIONS + rl.TUNIX_AGGREGATIONS


def _batch(seed=0):
  k = jax.random.split(jax.random.key(seed), 6)
  lp = -jax.random.uniform(k[0], (B, T), minval=0.05, maxval=3.0)
  old = lp + 0.3 * jax.random.normal(k[1], (B, T))
  ref = lp + 0.3 * jax.random.normal(k[2], (B, T))
  rollout_lp = old - 0.3 * jax.random.normal(k[3], (B, T))
  entropy = jax.random.uniform(k[4], (B, T), minval=0.0, maxval=4.0)
  mask = jnp.ones((B, T)).at[2, 4:].set(0).at[3, :].set(0).at[0, 0].set(0)
  adv = jnp.array([1.0, -1.0, 0.5, 0.2])
  return lp, entropy, rl.Rollout(mask, adv, old, ref, rollout_lp)


# --- the float64 oracle, written from the formulas, one sequence at a time -----


def _oracle_aggregate(x, m, mode, max_length):
  """agg over rows as sequences (float64)."""
  rows = [(x[b] * m[b]).sum() for b in range(x.shape[0])]
  n = m.sum(axis=1)
  nonempty = max(int((n > 0).sum()), 1)
  norm = x.shape[1] if max_length is None else max_length
  if mode in ("bnpo", "token-mean", "dapo"):
    return sum(rows) / max(m.sum(), 1)
  if mode == "grpo":
    return np.mean([r / max(c, 1) for r, c in zip(rows, n, strict=True)])
  if mode == "dr_grpo":
    return sum(rows) / (x.shape[0] * norm)
  if mode == "sequence-mean-token-mean":
    return sum(r / c for r, c in zip(rows, n, strict=True) if c > 0) / nonempty
  if mode == "sequence-mean-token-scale":
    return sum(rows) / norm / nonempty
  return sum(rows) / nonempty  # seq-mean-token-sum, sequence-mean-token-sum-norm


def oracle_loss(lp, entropy, rollout, obj):
  """float64 loss from the written-out formulas (rows are sequences)."""
  lp, ent = np.asarray(lp, np.float64), np.asarray(entropy, np.float64)
  m = np.asarray(rollout.mask, np.float64)
  old = np.asarray(rollout.old_logprobs, np.float64)
  ref = np.asarray(rollout.ref_logprobs, np.float64)
  adv = np.asarray(rollout.advantages, np.float64)[:, None] * np.ones_like(lp)
  log_ratio = lp - old
  if obj.log_ratio_clamp is not None:
    log_ratio = np.clip(log_ratio, -obj.log_ratio_clamp, obj.log_ratio_clamp)
  seq_mean = np.array([(log_ratio[b] * m[b]).sum() / max(m[b].sum(), 1) for b in range(len(lp))])
  if obj.ratio == "token":
    w = np.exp(log_ratio)
  else:  # the value of GSPO and gspo-token is the sequence ratio
    w = np.exp(seq_mean)[:, None] * np.ones_like(lp)
    if obj.ratio == "gspo-token":
      w = np.exp(np.minimum(np.log(w), 10.0))
  eps_hi = obj.eps_high
  capped = w if obj.delta is None else np.minimum(w, obj.delta)
  loss_t = np.maximum(-adv * capped, -adv * np.clip(w, 1 - obj.epsilon, 1 + eps_hi))
  if obj.epsilon_c is not None:
    loss_t = np.where(adv < 0, np.minimum(loss_t, -obj.epsilon_c * adv), loss_t)
  keep = m > 0
  if obj.top_entropy_quantile < 1:
    threshold = np.quantile(ent[keep], 1 - obj.top_entropy_quantile)
    keep = keep & (ent >= threshold)
    loss_t = loss_t * keep
  if obj.importance_sampling is not None:
    diff = (old - np.asarray(rollout.rollout_logprobs, np.float64)) * m
    if obj.importance_sampling.startswith("sequence"):
      diff = diff.sum(axis=1, keepdims=True) * np.ones_like(lp)
    isw = np.exp(diff)
    lo = -np.inf if obj.is_clip_min is None else obj.is_clip_min
    hi = np.inf if obj.is_clip_max is None else obj.is_clip_max
    isw = np.clip(isw, lo, hi) if obj.importance_sampling.endswith("truncate") else isw
    isw = np.where((isw < lo) | (isw > hi), 0, isw)
    loss_t = loss_t * isw
  total = _oracle_aggregate(loss_t, m, obj.aggregation, obj.max_length)
  d = ref - lp
  kl = {"k1": -d, "k2": 0.5 * d**2, "k3": np.exp(d) - d - 1}[obj.kl]
  if obj.kl_ratio_weighted:
    kl = kl * w
  total += obj.beta * _oracle_aggregate(kl, m, obj.aggregation, obj.max_length)
  return total - obj.entropy_coef * (ent * keep * m).sum() / max((keep * m).sum(), 1)


def _numeric_grad(f, x, h=1e-6):
  x = np.asarray(x, np.float64)
  g = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    e = np.zeros_like(x)
    e[i] = h
    g[i] = (f(x + e) - f(x - e)) / (2 * h)
  return g


OBJECTIVES = {
  f"{agg}-{ratio}-{extra}": rl.PolicyObjective(aggregation=agg, ratio=ratio, **options)
  for agg, ratio, (extra, options) in itertools.product(
    AGGREGATIONS,
    ("token", "sequence", "gspo-token"),
    [
      ("plain", {}),
      (
        "all-terms",
        dict(
          epsilon_high=0.28,
          epsilon_c=3.0,
          beta=0.04,
          kl="k2",
          entropy_coef=0.01,
          top_entropy_quantile=0.5,
          importance_sampling="token_truncate",
          is_clip_max=1.5,
          log_ratio_clamp=0.5,
        ),
      ),
    ],
  )
}
OBJECTIVES["dapo-delta-k1-sequence-mask"] = rl.PolicyObjective(
  delta=1.1, beta=0.1, kl="k1", importance_sampling="sequence_mask", is_clip_min=0.5
)
OBJECTIVES["bnpo-k3-weighted-sequence-truncate"] = rl.PolicyObjective(
  aggregation="bnpo",
  beta=0.1,
  kl_ratio_weighted=True,
  importance_sampling="sequence_truncate",
  is_clip_max=1.2,
  max_length=9,
)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_loss_and_gradients_match_the_float64_oracle(name):
  obj = OBJECTIVES[name]
  lp, ent, rollout = _batch()
  (loss, _), (d_lp, d_ent) = jax.jit(
    jax.value_and_grad(
      lambda a, e: rl.policy_loss(a, rollout, obj, entropy=e), argnums=(0, 1), has_aux=True
    )
  )(lp, ent)
  assert_close(loss, oracle_loss(lp, ent, rollout, obj), rtol=1e-5, atol=1e-6, what="loss")
  expected = _numeric_grad(lambda a: oracle_loss(a, ent, rollout, obj), lp)
  if obj.ratio != "gspo-token":  # its gradient is not its value's (the test below)
    assert_close(d_lp, expected, rtol=1e-4, atol=1e-6, what="d loss / d logprobs")
  expected_ent = _numeric_grad(lambda e: oracle_loss(lp, e, rollout, obj), ent)
  assert_close(d_ent, expected_ent, rtol=1e-4, atol=1e-6, what="d loss / d entropy")


def test_gspo_token_gradient_is_each_tokens_own():
  """gspo-token: d ratio_t / d lp_t = ratio_t (the sequence ratio), nothing across tokens."""
  lp, ent, rollout = _batch()
  obj = rl.PolicyObjective(ratio="gspo-token", aggregation="token-mean", epsilon=0.9)
  g = jax.grad(lambda a: rl.policy_loss(a, rollout, obj)[0])(lp)
  m = np.asarray(rollout.mask)
  w = np.exp(
    [(np.asarray(lp - rollout.old_logprobs)[b] * m[b]).sum() / max(m[b].sum(), 1) for b in range(B)]
  )
  expected = -np.asarray(rollout.advantages)[:, None] * w[:, None] * m / m.sum()
  assert_close(g, expected, rtol=1e-5, atol=1e-7, what="gspo-token gradient")


def test_on_policy_token_ratio_is_the_policy_gradient():
  """Without old log-probs the ratio is 1 and the gradient is -A m / N (REINFORCE)."""
  lp, _, rollout = _batch()
  rollout = rollout._replace(old_logprobs=None, ref_logprobs=None)
  g = jax.grad(lambda a: rl.policy_loss(a, rollout, rl.PolicyObjective(aggregation="bnpo"))[0])(lp)
  m = np.asarray(rollout.mask)
  assert_close(g, -np.asarray(rollout.advantages)[:, None] * m / m.sum(), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
  "name", ["dapo-token-all-terms", "grpo-sequence-all-terms", "token-mean-gspo-token-all-terms"]
)
def test_masked_positions_contribute_exactly_zero(name):
  """Whatever masked positions hold (-inf or NaN log-probabilities and entropies,
  NaN constants, as padding does), the loss and the metrics are those of finite
  values there, and their gradients there are exactly 0."""
  obj = dataclasses.replace(OBJECTIVES[name], importance_sampling="token_mask")
  lp, ent, rollout = _batch()
  off = rollout.mask == 0
  rollout = rollout._replace(advantages=jnp.broadcast_to(rollout.advantages[:, None], (B, T)))

  def poison(x, value):
    return jnp.where(off, value, x)

  dirty = rollout._replace(
    advantages=poison(rollout.advantages, jnp.nan),
    old_logprobs=poison(rollout.old_logprobs, jnp.nan),
    ref_logprobs=poison(rollout.ref_logprobs, -jnp.inf),
    rollout_logprobs=poison(rollout.rollout_logprobs, jnp.nan),
  )

  def run(lp, ent, r):
    return jax.value_and_grad(
      lambda a, e: rl.policy_loss(a, r, obj, entropy=e), argnums=(0, 1), has_aux=True
    )(lp, ent)

  (loss, metrics), (d_lp, d_ent) = run(poison(lp, -jnp.inf).at[0, 0].set(jnp.nan),
                                       poison(ent, jnp.nan), dirty)  # fmt: skip
  (want, want_metrics), _ = run(lp, ent, rollout)
  assert_close(loss, want, rtol=1e-6, atol=1e-7, what="loss")
  for key, value in want_metrics.items():
    assert_close(metrics[key], value, rtol=1e-6, atol=1e-7, what=key)
  for g, what in ((d_lp, "d logprobs"), (d_ent, "d entropy")):
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), what
    assert np.all(g[np.asarray(off)] == 0), what


def test_fused_objective_ignores_nan_hidden_states_at_masked_positions():
  """Padding rows of NaN hidden states: a finite loss and finite gradients for
  the hidden states (0 on those rows) and the whole unembedding."""
  h, w, targets = _fused_inputs(2, 5, 16, 301, jnp.float32)
  mask = jnp.ones((2, 5)).at[1, 3:].set(0)
  h = jnp.where((mask == 0)[..., None], jnp.nan, h)
  constant = jnp.full((2, 5), -5.0)
  rollout = rl.Rollout(mask, jnp.array([1.0, -0.5]), constant, constant, constant)
  loss, (dh, dw) = jax.value_and_grad(
    lambda h, w: rl.policy_loss_hidden(h, w, targets, rollout, ALL_TERMS)[0], argnums=(0, 1)
  )(h, w)
  assert np.isfinite(loss) and np.all(np.isfinite(dw))
  assert np.all(np.asarray(dh)[1, 3:] == 0) and np.all(np.isfinite(dh))


def test_kl_estimators_are_the_written_formulas():
  lp, ref = jnp.array([-1.0, -2.0]), jnp.array([-1.5, -0.5])
  d = np.asarray(ref - lp, np.float64)
  for kind, expected in [("k1", -d), ("low_var_kl", np.exp(d) - d - 1), ("mse_kl", d * d / 2)]:
    assert_close(rl.kl_estimate(lp, ref, kind), expected, rtol=1e-6, atol=1e-7, what=kind)
  assert float(rl.kl_estimate(lp, ref, "k3", clamp=0.5).max()) == 0.5


def test_packed_sequences_equal_one_sequence_per_row():
  """Segments of a packed row are sequences: the loss and gradients equal the
  unpacked batch's for every aggregation and ratio level."""
  k = jax.random.split(jax.random.key(1), 5)
  lengths = [3, 4, 2, 5]
  unpacked_mask = jnp.array([[1.0] * n + [0.0] * (5 - n) for n in lengths])
  lp = -jax.random.uniform(k[0], (4, 5), minval=0.1, maxval=2)
  old = lp + 0.2 * jax.random.normal(k[1], (4, 5))
  ref = lp + 0.2 * jax.random.normal(k[2], (4, 5))
  adv = jnp.array([0.5, -1.0, 1.5, -0.3])

  def pack(x, fill=0.0):  # rows 0+1 and 2+3 in two rows of 9 and 7 -> width 9
    rows = [
      jnp.concatenate([x[0, :3], x[1, :4], jnp.full((2,), fill)]),
      jnp.concatenate([x[2, :2], x[3, :5], jnp.full((2,), fill)]),
    ]
    return jnp.stack(rows)

  seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0, 0], [1, 1, 2, 2, 2, 2, 2, 0, 0]])
  packed_adv = pack(jnp.broadcast_to(adv[:, None], (4, 5)))
  for agg, ratio in itertools.product(AGGREGATIONS, ("token", "sequence", "gspo-token")):
    obj = rl.PolicyObjective(aggregation=agg, ratio=ratio, beta=0.05, max_length=6)
    flat = rl.Rollout(unpacked_mask, adv, old, ref)
    packed = rl.Rollout(pack(unpacked_mask), packed_adv, pack(old), pack(ref), segment_ids=seg)
    loss_u, g_u = jax.value_and_grad(lambda a, r=flat, o=obj: rl.policy_loss(a, r, o)[0])(lp)
    loss_p, g_p = jax.value_and_grad(lambda a, r=packed, o=obj: rl.policy_loss(a, r, o)[0])(
      pack(lp)
    )
    assert_close(loss_p, loss_u, rtol=1e-6, atol=1e-7, what=f"{agg} {ratio} loss")
    assert_close(g_p, pack(g_u), rtol=1e-5, atol=1e-7, what=f"{agg} {ratio} gradient")


def test_importance_weights_follow_the_modes():
  lp, _, rollout = _batch()
  m = np.asarray(rollout.mask)
  diff = (np.asarray(rollout.old_logprobs) - np.asarray(rollout.rollout_logprobs)) * m
  seqs = rl._sequences(lp.shape, None)
  for mode, expected in [
    ("token_truncate", np.clip(np.exp(diff), 0.8, 1.2)),
    ("token_mask", np.where((np.exp(diff) < 0.8) | (np.exp(diff) > 1.2), 0, np.exp(diff))),
    ("sequence_truncate", np.clip(np.exp(diff.sum(1, keepdims=True)), 0.8, 1.2) * np.ones_like(m)),
  ]:
    obj = rl.PolicyObjective(importance_sampling=mode, is_clip_min=0.8, is_clip_max=1.2)
    w = rl._importance_weights(
      rollout.old_logprobs, rollout.rollout_logprobs, rollout.mask, seqs, obj
    )
    assert_close(w, expected, rtol=1e-6, atol=1e-7, what=mode)
  nan_rollout = rollout.rollout_logprobs.at[0, 1].set(jnp.nan)  # not reported by the engine
  obj = rl.PolicyObjective(importance_sampling="token_truncate")
  w = rl._importance_weights(rollout.old_logprobs, nan_rollout, rollout.mask, seqs, obj)
  assert float(w[0, 1]) == 1.0


def test_metrics_are_the_libraries_keys():
  lp, ent, rollout = _batch()
  _, trl = rl.policy_loss(lp, rollout, rl.PolicyObjective(beta=0.1), entropy=ent)
  assert {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "kl"} <= set(trl)
  _, tunix = rl.policy_loss(
    lp, rollout, rl.PolicyObjective(aggregation="token-mean", beta=0.1), entropy=ent
  )
  assert {"kl", "pg_clipfrac", "ppo_kl", "entropy", "is_ratio/mean", "pg_loss"} <= set(tunix)
  # the clip fraction by its definition: the clipped branch is the larger loss
  m = np.asarray(rollout.mask)
  w = np.exp(np.asarray(lp - rollout.old_logprobs, np.float64))
  a = np.asarray(rollout.advantages)[:, None]
  clipped = (-a * np.clip(w, 0.8, 1.2) > -a * w) * m
  assert_close(tunix["pg_clipfrac"], clipped.sum() / m.sum(), rtol=1e-6, atol=1e-7)
  low = ((w < 0.8) & (a < 0)) * m
  assert_close(trl["clip_ratio/low_mean"], low.sum() / m.sum(), rtol=1e-6, atol=1e-7)


def test_bad_arguments_are_named():
  lp, ent, rollout = _batch()
  with pytest.raises(ValueError, match="mask"):
    rl.policy_loss(lp, rollout._replace(mask=rollout.mask[:, :3]))
  with pytest.raises(ValueError, match="advantages"):
    rl.policy_loss(lp, rollout._replace(advantages=jnp.ones((3,))))
  with pytest.raises(ValueError, match="entropy"):
    rl.policy_loss(lp, rollout, rl.PolicyObjective(entropy_coef=0.1))
  with pytest.raises(ValueError, match="ref_logprobs"):
    rl.policy_loss(lp, rollout._replace(ref_logprobs=None), rl.PolicyObjective(beta=0.1))
  with pytest.raises(ValueError, match="rollout_logprobs"):
    rl.policy_loss(
      lp,
      rollout._replace(rollout_logprobs=None),
      rl.PolicyObjective(importance_sampling="token_mask"),
    )
  for bad in [
    dict(aggregation="mean"),
    dict(kl="k4"),
    dict(epsilon=1.5),
    dict(epsilon_c=0.5),
    dict(ratio="seq"),
    dict(top_entropy_quantile=2.0),
    dict(importance_sampling="token"),
  ]:
    with pytest.raises(ValueError, match="PolicyObjective"):
      rl.PolicyObjective(**bad)


# --- the fused form: one sweep, no [N, V] temporaries ---------------------------


def _fused_inputs(n_b, n_t, d, v, dtype, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  h = jax.random.normal(k[0], (n_b, n_t, d), dtype)
  w = (jax.random.normal(k[1], (d, v)) / d**0.5).astype(dtype)
  targets = jax.random.randint(k[2], (n_b, n_t), 0, v)
  return h, w, targets


ALL_TERMS = rl.PolicyObjective(
  epsilon_high=0.28,
  epsilon_c=3.0,
  beta=0.04,
  entropy_coef=0.01,
  top_entropy_quantile=0.8,
  importance_sampling="token_truncate",
)


@pytest.mark.parametrize("vocab_axis", [-1, 0])
def test_fused_objective_equals_the_objective_on_materialised_logits(vocab_axis):
  h, w, targets = _fused_inputs(2, 5, 16, 301, jnp.float32)
  table = w if vocab_axis == -1 else w.T
  logits = jnp.einsum("btd,dv->btv", h, w) / 0.7
  lp0 = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
  k = jax.random.split(jax.random.key(5), 3)
  old = lp0 + 0.2 * jax.random.normal(k[0], lp0.shape)
  mask = jnp.ones((2, 5)).at[1, 3:].set(0)
  rollout = rl.Rollout(mask, jnp.array([1.0, -0.5]), old, old + 0.1, old - 0.05)

  def materialised(h, table):
    y = jnp.einsum("btd,dv->btv", h, table if vocab_axis == -1 else table.T) / 0.7
    logp = jax.nn.log_softmax(y)
    lp = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp) * logp, -1)
    return rl.policy_loss(lp, rollout, ALL_TERMS, entropy=entropy)[0]

  def fused(h, table):
    return rl.policy_loss_hidden(
      h, table, targets, rollout, ALL_TERMS, temperature=0.7, vocab_axis=vocab_axis
    )[0]

  value, grads = jax.value_and_grad(fused, argnums=(0, 1))(h, table)
  value_ref, grads_ref = jax.value_and_grad(materialised, argnums=(0, 1))(h, table)
  assert_close(value, value_ref, rtol=1e-5, atol=1e-6, what="loss")
  for g, g_ref, name in zip(grads, grads_ref, ("d hidden", "d unembed"), strict=True):
    assert_close(g, g_ref, rtol=1e-4, atol=1e-6, what=name)


def test_fused_objective_under_a_sampler_uses_processed_logprobs():
  h, w, targets = _fused_inputs(2, 4, 16, 211, jnp.float32)
  sampling = lpk.Sampling(temperature=0.8, top_k=20, top_p=0.9)
  processed = lpk.fused_processed_token_stats(h, w, targets, sampling).logprobs
  mask = jnp.isfinite(processed).astype(jnp.float32)
  rollout = rl.Rollout(mask, jnp.array([1.0, -1.0]), jnp.where(mask > 0, processed - 0.1, 0.0))
  loss, _ = rl.policy_loss_hidden(h, w, targets, rollout, sampling=sampling)
  expected, _ = rl.policy_loss(jnp.where(mask > 0, processed, 0.0), rollout)
  assert_close(loss, expected, rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="entropy"):
    rl.policy_loss_hidden(h, w, targets, rollout, ALL_TERMS, sampling=sampling)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_objective_has_no_logits_sized_temporaries(dtype):
  """Every term on, forward+backward, N = 2048, V = 32000: temporaries under 10%
  of the float32 logits (one sweep forward, one backward)."""
  n_b, n_t, d, v = 2, 1024, 64, 32000
  h, w, targets = _fused_inputs(n_b, n_t, d, v, dtype)
  lp = jnp.zeros((n_b, n_t))
  rollout = rl.Rollout(jnp.ones((n_b, n_t)), jnp.ones((n_b,)), lp, lp, lp)

  def step(h, w):
    return rl.policy_loss_hidden(h, w, targets, rollout, ALL_TERMS)[0]

  compiled = jax.jit(jax.grad(step, argnums=(0, 1))).lower(h, w).compile()
  fraction = compiled.memory_analysis().temp_size_in_bytes / (n_b * n_t * v * 4)
  assert fraction < 0.10, f"temporaries are {fraction:.1%} of the float32 logits"


# --- TRL's own loss code on the same inputs (needs PyTorch) ---------------------


class _OneProcess:
  """The accelerator TRL's loss reads: one process, no gradient accumulation."""

  num_processes = 1
  sync_gradients = True

  def gather(self, x):
    return x

  gather_for_metrics = gather

  def reduce(self, x, reduction="sum"):
    return x

  def pad_across_processes(self, x, dim=0, pad_index=0):
    return x


def _trl_compute_loss(lp, entropy, inputs, **config):
  """``GRPOTrainer._compute_loss`` on given per-token log-probs and entropies (float64)."""
  torch = pytest.importorskip("torch")
  grpo = pytest.importorskip("trl.trainer.grpo_trainer")
  lp_t = torch.tensor(np.asarray(lp), dtype=torch.float64, requires_grad=True)
  ent_t = torch.tensor(np.asarray(entropy), dtype=torch.float64, requires_grad=True)
  trainer = types.SimpleNamespace(
    _get_per_token_logps_and_entropies=lambda *a, **k: (lp_t, ent_t, None),
    aux_loss_enabled=False,
    off_policy_mask_threshold=None,
    args=types.SimpleNamespace(
      use_bias_correction_kl=config.pop("use_bias_correction_kl"),
      delta=config.pop("delta"),
      steps_per_generation=1,
    ),
    model=types.SimpleNamespace(training=True),
    current_gradient_accumulation_steps=1,
    accelerator=_OneProcess(),
    _entropy_bonus_enabled=config["entropy_coef"] != 0,
    use_adaptive_entropy=False,
    use_vllm=False,
    vllm_importance_sampling_correction=False,
    _metrics={"train": defaultdict(list)},
    **config,
  )
  trainer.get_high_entropy_mask = lambda e, m, q: grpo.GRPOTrainer.get_high_entropy_mask(
    trainer, e, m, q
  )
  tensors = {k: torch.tensor(np.asarray(v), dtype=torch.float64) for k, v in inputs.items()}
  loss = grpo.GRPOTrainer._compute_loss(trainer, None, tensors)
  loss.backward()
  metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
  return loss.detach().item(), lp_t.grad.numpy(), ent_t.grad.numpy(), metrics


@pytest.mark.parametrize("loss_type", rl.TRL_AGGREGATIONS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_matches_trls_grpo_loss(loss_type, level):
  lp, ent, rollout = _batch()
  inputs = dict(
    prompt_ids=np.zeros((B, 1)),
    prompt_mask=np.ones((B, 1)),
    completion_ids=np.zeros((B, T)),
    completion_mask=np.asarray(rollout.mask),
    advantages=np.asarray(rollout.advantages),
    old_per_token_logps=np.asarray(rollout.old_logprobs),
    ref_per_token_logps=np.asarray(rollout.ref_logprobs),
    num_items_in_batch=np.asarray(rollout.mask.sum()),
  )
  trl_loss, trl_d_lp, trl_d_ent, trl_metrics = _trl_compute_loss(
    lp,
    ent,
    inputs,
    loss_type=loss_type,
    importance_sampling_level=level,
    beta=0.04,
    epsilon_low=0.2,
    epsilon_high=0.28,
    delta=1.5,
    top_entropy_quantile=0.5,
    entropy_coef=0.01,
    use_bias_correction_kl=True,
    max_completion_length=T,
  )
  obj = rl.PolicyObjective(
    aggregation=loss_type,
    ratio=level,
    beta=0.04,
    epsilon_high=0.28,
    delta=1.5,
    top_entropy_quantile=0.5,
    entropy_coef=0.01,
    kl_ratio_weighted=True,
  )
  (loss, metrics), (d_lp, d_ent) = jax.value_and_grad(
    lambda a, e: rl.policy_loss(a, rollout, obj, entropy=e), argnums=(0, 1), has_aux=True
  )(lp, ent)
  assert_close(loss, trl_loss, rtol=1e-5, atol=1e-7, what="loss")
  assert_close(d_lp, trl_d_lp, rtol=1e-5, atol=1e-7, what="d logprobs")
  assert_close(d_ent, trl_d_ent, rtol=1e-5, atol=1e-7, what="d entropy")
  for key, value in trl_metrics.items():
    if key != "entropy_coef":  # TRL's controller state, not a number of this batch
      assert_close(metrics[key], value, rtol=1e-5, atol=1e-7, what=key)


def test_grpo_example_learns_the_toy_reward():
  from lpkernel.examples import grpo

  rewards = grpo.main(steps=8)
  assert rewards[0] < 0.3 and max(rewards[-3:]) > 0.8, rewards


def test_lpkernel_and_its_objectives_import_without_tunix():
  """tunix is an extra: lpkernel and lpkernel.rl import without it; lpkernel.tunix
  says what is missing."""
  program = (
    "import sys; sys.modules['tunix'] = None\n"
    "import lpkernel, lpkernel.rl\n"
    "try:\n  import lpkernel.tunix\nexcept ImportError as e:\n  print('refused', e)\n"
  )
  result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("refused") and "lpkernel[tunix]" in result.stdout
