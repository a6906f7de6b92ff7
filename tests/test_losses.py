"""Losses against hand-computed values."""

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


def test_dpo_by_hand():
  pc, pr, rc, rr = jnp.array([-5.0]), jnp.array([-7.0]), jnp.array([-6.0]), jnp.array([-6.5])
  beta = 0.5
  loss, m = losses.dpo_loss(pc, pr, rc, rr, beta=beta)
  h = beta * ((-5 + 6) - (-7 + 6.5))  # 0.75
  np.testing.assert_allclose(loss, -np.log(_sig(h)), rtol=1e-6)
  np.testing.assert_allclose(m["rewards/chosen"], 0.5)
  np.testing.assert_allclose(m["rewards/rejected"], -0.25)
  np.testing.assert_allclose(m["rewards/accuracy"], 1.0)
  smooth, _ = losses.dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=0.1)
  np.testing.assert_allclose(smooth, -0.9 * np.log(_sig(h)) - 0.1 * np.log(_sig(-h)), rtol=1e-6)


def test_ipo_by_hand():
  loss, _ = losses.ipo_loss(
    jnp.array([-5.0]), jnp.array([-7.0]), jnp.array([-6.0]), jnp.array([-6.5]), beta=0.25
  )
  np.testing.assert_allclose(loss, (1.5 - 2.0) ** 2, rtol=1e-6)


def test_simpo_by_hand():
  chosen, rejected = _scores([-4.0], [2]), _scores([-9.0], [3])
  loss, m = losses.simpo_loss(chosen, rejected, beta=2.0, gamma=0.5)
  np.testing.assert_allclose(loss, -np.log(_sig(2 * (-2.0) - 2 * (-3.0) - 0.5)), rtol=1e-6)
  np.testing.assert_allclose(m["rewards/margin"], 2.0)


def test_z_loss():
  lse = jnp.array([1.0, 2.0, 3.0])
  np.testing.assert_allclose(losses.z_loss(lse, weight=1.0), 14 / 3)
  np.testing.assert_allclose(
    losses.z_loss(lse, jnp.array([True, False, True]), weight=0.5), 0.5 * 10 / 2
  )
