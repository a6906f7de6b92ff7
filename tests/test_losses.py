"""Losses against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpkernel import losses
from lpkernel.scoring import Scores


def _scores(response_lp, response_tokens, prompt_lp=None, prompt_tokens=None):
  r = jnp.asarray(response_lp, jnp.float32)
  p = jnp.zeros_like(r) if prompt_lp is None else jnp.asarray(prompt_lp, jnp.float32)
  pt = jnp.zeros(r.shape, jnp.int32) if prompt_tokens is None else jnp.asarray(prompt_tokens)
  return Scores(
    prompt_logprob=p,
    response_logprob=r,
    joint_logprob=p + r,
    prompt_tokens=pt,
    response_tokens=jnp.asarray(response_tokens),
    response_greedy=jnp.zeros(r.shape, bool),
    token_logprobs=jnp.zeros(r.shape + (1,)),
  )


def test_sft_normalisations():
  s = _scores([-4.0, -6.0, 0.0], [2, 4, 0], prompt_lp=[-1.0, -1.0, -1.0], prompt_tokens=[1, 1, 1])
  np.testing.assert_allclose(losses.sft_loss(s, "sum"), 10.0)
  np.testing.assert_allclose(losses.sft_loss(s, "tokens"), 10.0 / 6)
  np.testing.assert_allclose(losses.sft_loss(s, "sequences"), 5.0)
  np.testing.assert_allclose(losses.sft_loss(s, "sum", response_only=False), 13.0)
  with pytest.raises(ValueError):
    losses.sft_loss(s, "mean")


def _sig(x):
  return 1 / (1 + np.exp(-x))


PC, PR, RC, RR = (jnp.array(v) for v in ([-5.0, -3.0], [-7.0, -2.5], [-6.0, -3.5], [-6.5, -2.0]))
N_C, N_R = jnp.array([2, 4]), jnp.array([3, 5])


def _log_sig(x):
  return -np.log1p(np.exp(-x))


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_dpo_family_matches_the_papers_values_and_gradients(loss_type, eps):
  beta = 0.5
  h = beta * ((np.asarray(PC) - np.asarray(RC)) - (np.asarray(PR) - np.asarray(RR)))
  if loss_type == "sigmoid":  # Rafailov et al.; conservative DPO with eps
    want = -(1 - eps) * _log_sig(h) - eps * _log_sig(-h)
    dh = -(1 - eps) * _sig(-h) + eps * _sig(h)
  elif loss_type == "robust":  # Chowdhury et al.
    want = (-(1 - eps) * _log_sig(h) + eps * _log_sig(-h)) / (1 - 2 * eps)
    dh = (-(1 - eps) * _sig(-h) - eps * _sig(h)) / (1 - 2 * eps)
  else:  # hinge (SLiC)
    want = np.maximum(0, 1 - h)
    dh = np.where(1 - h > 0, -1.0, 0.0)

  def f(pc):
    return losses.dpo_loss(pc, PR, RC, RR, beta=beta, label_smoothing=eps, loss_type=loss_type)

  (loss, m), g = jax.value_and_grad(f, has_aux=True)(PC)
  np.testing.assert_allclose(loss, want.mean(), rtol=1e-6)
  np.testing.assert_allclose(g, dh * beta / 2, rtol=1e-5, atol=1e-7)  # d mean / d pi_c
  np.testing.assert_allclose(m["rewards/chosen"], beta * np.mean(np.asarray(PC - RC)), rtol=1e-6)
  np.testing.assert_allclose(m["rewards/margins"], np.mean(h), rtol=1e-6)
  np.testing.assert_allclose(m["rewards/accuracies"], np.mean(h > 0))
  np.testing.assert_allclose(m["logps/rejected"], np.mean(np.asarray(PR)))
  assert set(m) == {
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
  }


def test_every_loss_takes_scores_pairs_or_arrays_alike():
  sc, sr = _scores(PC, N_C), _scores(PR, N_R)
  a, _ = losses.dpo_loss(sc, sr, _scores(RC, N_C), _scores(RR, N_R))
  seq = losses.Sequences
  b, _ = losses.dpo_loss(seq(PC, N_C), seq(PR, N_R), seq(RC, N_C), seq(RR, N_R))
  c, _ = losses.dpo_loss(PC, PR, RC, RR)
  np.testing.assert_allclose([a, b], c)
  a, _ = losses.simpo_loss(sc, sr)
  b, _ = losses.simpo_loss(seq(PC, N_C), seq(PR, N_R))
  np.testing.assert_allclose(a, b)
  with pytest.raises(ValueError, match="token counts"):
    losses.simpo_loss(PC, PR)


@pytest.mark.parametrize("average", [True, False])
def test_ipo_length_averaged_like_trl_or_summed_like_the_paper(average):
  beta = 0.25
  norm = (lambda x, n: np.asarray(x) / np.asarray(n)) if average else (lambda x, n: np.asarray(x))
  h = (norm(PC, N_C) - norm(RC, N_C)) - (norm(PR, N_R) - norm(RR, N_R))
  want = (h - 1 / (2 * beta)) ** 2

  def f(pc):
    seq = losses.Sequences
    return losses.ipo_loss(
      seq(pc, N_C), seq(PR, N_R), seq(RC, N_C), seq(RR, N_R), beta=beta, average_log_probs=average
    )

  (loss, m), g = jax.value_and_grad(f, has_aux=True)(PC)
  np.testing.assert_allclose(loss, want.mean(), rtol=1e-6)
  dpc = 2 * (h - 1 / (2 * beta)) / (np.asarray(N_C) if average else 1.0) / 2
  np.testing.assert_allclose(g, dpc, rtol=1e-5)
  # TRL's DPOTrainer logs beta x the *summed* log-ratios and the summed log-probs
  # under its keys whatever the averaging (trl 1.16 dpo_trainer.compute_loss).
  c_sum, r_sum = np.asarray(PC - RC), np.asarray(PR - RR)
  np.testing.assert_allclose(m["rewards/chosen"], beta * c_sum.mean(), rtol=1e-6)
  np.testing.assert_allclose(m["rewards/margins"], beta * np.mean(c_sum - r_sum), rtol=1e-6)
  np.testing.assert_allclose(m["rewards/accuracies"], np.mean(c_sum > r_sum))
  np.testing.assert_allclose(m["logps/chosen"], np.mean(np.asarray(PC)), rtol=1e-6)
  if average:
    np.testing.assert_allclose(
      m["logratios_mean/chosen"], np.mean(norm(PC, N_C) - norm(RC, N_C)), rtol=1e-6
    )
  else:
    assert "logratios_mean/chosen" not in m


def test_ipo_metrics_are_trls_where_averaging_flips_the_margin():
  # Summed log-ratio margin +2.0, averaged margin -0.9: TRL logs the sums.
  pc, rc = losses.Sequences(jnp.array([-10.0]), jnp.array([10])), jnp.array([-13.0])
  pr, rr = losses.Sequences(jnp.array([-2.0]), jnp.array([1])), jnp.array([-3.0])
  _, m = losses.ipo_loss(pc, pr, rc, rr, beta=0.5)
  np.testing.assert_allclose(m["rewards/margins"], 0.5 * (3.0 - 1.0))
  np.testing.assert_allclose(m["rewards/accuracies"], 1.0)
  np.testing.assert_allclose(m["logratios_mean/chosen"] - m["logratios_mean/rejected"], -0.7)


def test_a_bare_tuple_is_refused_not_guessed():
  # Two per-sequence log-probabilities as a tuple look like (logps, tokens).
  with pytest.raises(TypeError, match="Sequences"):
    losses.dpo_loss((-3.0, -4.0), (-5.0, -6.0), (-3.5, -4.0), (-4.0, -6.5), beta=0.5)
  with pytest.raises(TypeError, match="policy_rejected"):
    losses.dpo_loss(PC, [-5.0, -6.0], RC, RR)
  with pytest.raises(TypeError, match="chosen"):
    losses.simpo_loss((PC, N_C), losses.Sequences(PR, N_R))


def test_loss_inputs_are_checked_and_named():
  with pytest.raises(ValueError, match="reference_chosen.*shape"):
    losses.dpo_loss(PC, PR, RC[:, None], RR[:, None])
  with pytest.raises(ValueError, match="policy_rejected has B=1 but policy_chosen has B=2"):
    losses.dpo_loss(PC, PR[:1], RC, RR)
  with pytest.raises(ValueError, match="reference_rejected token counts"):
    losses.ipo_loss(
      losses.Sequences(PC, N_C),
      losses.Sequences(PR, N_R),
      losses.Sequences(RC, N_C),
      losses.Sequences(RR, N_R[:, None]),
    )
  with pytest.raises(TypeError, match="floats"):
    losses.dpo_loss(jnp.array([1, 2]), PR, RC, RR)


def test_an_empty_response_has_no_average_and_nan_is_never_a_win():
  chosen = losses.Sequences(jnp.array([0.0, -5.0]), jnp.array([0, 5]))
  rejected = losses.Sequences(jnp.array([-4.0, -9.0]), jnp.array([2, 3]))
  loss, m = losses.simpo_loss(chosen, rejected)
  assert np.isnan(loss) and np.isnan(m["rewards/accuracies"])
  g = jax.grad(lambda lp: losses.simpo_loss(chosen._replace(logps=lp), rejected)[0])(chosen.logps)
  assert np.isnan(g[0])
  # A NaN log-probability makes its pair's metrics NaN (not a win, not a loss).
  _, m = losses.dpo_loss(jnp.array([jnp.nan, -1.0]), PR, RC, RR)
  assert np.isnan(m["rewards/accuracies"])


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_simpo_matches_the_paper_with_label_smoothing(eps):
  beta, gamma = 2.0, 0.5
  c, r = np.asarray(PC) / np.asarray(N_C), np.asarray(PR) / np.asarray(N_R)
  u = beta * c - beta * r - gamma
  want = -(1 - eps) * _log_sig(u) - eps * _log_sig(-u)

  def f(pc):
    chosen, rejected = losses.Sequences(pc, N_C), losses.Sequences(PR, N_R)
    return losses.simpo_loss(chosen, rejected, beta=beta, gamma=gamma, label_smoothing=eps)

  (loss, m), g = jax.value_and_grad(f, has_aux=True)(PC)
  np.testing.assert_allclose(loss, want.mean(), rtol=1e-6)
  du = -(1 - eps) * _sig(-u) + eps * _sig(u)
  np.testing.assert_allclose(g, du * beta / np.asarray(N_C) / 2, rtol=1e-5)
  np.testing.assert_allclose(m["rewards/chosen"], beta * c.mean(), rtol=1e-6)
  np.testing.assert_allclose(m["logps/chosen"], c.mean(), rtol=1e-6)


def test_bad_options_raise():
  with pytest.raises(ValueError, match="loss_type"):
    losses.dpo_loss(PC, PR, RC, RR, loss_type="kto")
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.dpo_loss(PC, PR, RC, RR, loss_type="robust", label_smoothing=0.5)


def test_z_loss():
  lse = jnp.array([1.0, 2.0, 3.0])
  np.testing.assert_allclose(losses.z_loss(lse, weight=1.0), 14 / 3)
  np.testing.assert_allclose(
    losses.z_loss(lse, jnp.array([True, False, True]), weight=0.5), 0.5 * 10 / 2
  )


@pytest.mark.parametrize("normalise,num_segments", [("tokens", None), ("sequences", 2), ("sum", 2)])
def test_sft_losses_from_hidden_and_logits_are_sft_loss_plus_z_loss(normalise, num_segments):
  import lpkernel as lpk

  k = jax.random.split(jax.random.key(2), 4)
  b, t, d, v = 3, 9, 8, 50
  hidden = jax.random.normal(k[0], (b, t, d))
  unembed = jax.random.normal(k[1], (d, v))
  tokens = jax.random.randint(k[2], (b, t), 0, v)
  mask = jnp.arange(t)[None] >= jnp.array([[3], [5], [9]])  # row 2 has no response
  seg = jnp.array([[1] * 4 + [2] * 5, [1] * 9, [1] * 7 + [0] * 2])
  impl = lpk.XlaFused(lpk.FusedConfig(vocab_block=16, loss_chunks=True, loss_chunk_tokens=5))

  for response_only in (True, False):
    kw = dict(segment_ids=seg, num_segments=num_segments)

    def fused(h, response_only=response_only, kw=kw):
      return losses.sft_loss_hidden(
        h,
        unembed,
        tokens,
        mask,
        normalise=normalise,
        response_only=response_only,
        z_loss=1e-2,
        implementation=impl,
        **kw,
      )

    def plain(h, response_only=response_only, kw=kw):
      scores, stats = lpk.score_hidden(h, unembed, tokens, mask, with_stats=True, **kw)
      nll = losses.sft_loss(scores, normalise, response_only=response_only)
      counted = scores.token_logprobs != 0  # every scored token here has lp < 0
      counted = jnp.concatenate([counted[:, 1:], jnp.zeros((b, 1), bool)], axis=1)
      if response_only:
        counted &= jnp.concatenate([mask[:, 1:], jnp.zeros((b, 1), bool)], axis=1)
      counts = (
        scores.response_tokens if response_only else (scores.prompt_tokens + scores.response_tokens)
      )
      denominator = {"tokens": jnp.sum(counts), "sequences": jnp.sum(counts > 0), "sum": 1}
      z = jnp.sum(jnp.where(counted, stats.lse**2, 0.0)) / denominator[normalise]
      return nll + 1e-2 * z

    def from_logits(h, response_only=response_only, kw=kw):
      return losses.sft_loss_logits(
        h @ unembed,
        tokens,
        mask,
        normalise=normalise,
        response_only=response_only,
        z_loss=1e-2,
        **kw,
      )

    e, ge = jax.jit(jax.value_and_grad(plain))(hidden)
    # d hidden sums (p - onehot) * unembed over V columns in another order: its
    # float32 rounding is a few ulps of the largest term, whatever the machine.
    grad_atol = 8 * np.finfo(np.float32).eps * float(jnp.max(jnp.abs(unembed)))
    for f in (fused, from_logits):
      a, ga = jax.jit(jax.value_and_grad(f))(hidden)
      np.testing.assert_allclose(a, e, rtol=1e-6)
      np.testing.assert_allclose(ga, ge, rtol=1e-5, atol=grad_atol)
  if normalise != "tokens":
    return
  bad = seg.at[1, 4].set(-1)  # invalid segment ids poison the loss where tokens count
  assert np.isnan(jax.jit(losses.sft_loss_hidden)(hidden, unembed, tokens, mask, segment_ids=bad))
  logits = hidden @ unembed
  assert np.isnan(jax.jit(losses.sft_loss_logits)(logits, tokens, mask, segment_ids=bad))
  with pytest.raises(ValueError, match="logits has T"):
    losses.sft_loss_logits(logits[:, 1:], tokens, mask)
  with pytest.raises(ValueError, match="normalise"):
    losses.sft_loss_hidden(hidden, unembed, tokens, mask, normalise="mean")
  with pytest.raises(ValueError, match="hidden has T"):
    losses.sft_loss_hidden(hidden[:, 1:], unembed, tokens, mask)
