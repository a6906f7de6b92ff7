"""Each op runs as one compiled program when called or differentiated eagerly
(lpkernel/ops/staged.py), and an unhashable implementation still runs."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lpkernel as lpk


class _Compiles(logging.Handler):
  """Counts the programs XLA compiles (``jax_log_compiles`` logs one line each)."""

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.count = 0

  def emit(self, record):
    self.count += record.getMessage().startswith("Finished XLA compilation")


def _compiles(fn) -> int:
  handler, logger = _Compiles(), logging.getLogger("jax")
  level = logger.level
  logger.addHandler(handler)
  logger.setLevel(logging.DEBUG)
  try:
    with jax.log_compiles():
      jax.block_until_ready(fn())
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)
  return handler.count


H, W = jax.random.normal(jax.random.key(0), (5, 8)), jax.random.normal(jax.random.key(1), (8, 41))
T = jnp.arange(5)
SAMPLING = lpk.Sampling(0.7, 5, 0.9)
EAGER_GRADIENTS = {
  "token_logprobs": lambda x: jnp.sum(lpk.token_logprobs(x, T)),
  "processed": lambda x: jnp.sum(lpk.processed_token_stats(x, T, SAMPLING).logprobs),
  "fused": lambda h: jnp.sum(lpk.fused_token_logprobs(h, W, T)),
  "fused_processed": lambda h: jnp.sum(lpk.fused_processed_token_stats(h, W, T, SAMPLING).logprobs),
}


@pytest.mark.parametrize("name", EAGER_GRADIENTS)
def test_an_eager_gradient_compiles_a_few_programs_not_one_per_primitive(name):
  """Unstaged, these gradients compiled 46 to 174 programs each (one per primitive
  of the rules), staged 5 to 19: the op's forward and backward one each, the rest
  from the eager code around it (the sampler's rows, the sum)."""
  x = H @ W if name in ("token_logprobs", "processed") else H
  count = _compiles(lambda: jax.grad(EAGER_GRADIENTS[name])(x))
  assert 0 < count <= 25, count


def test_an_unhashable_implementation_runs_unstaged():
  @dataclasses.dataclass  # eq without frozen: no __hash__, so it cannot be a static argument
  class Mutable:
    name = "mutable"
    platforms = None

    def partials(self, x, targets, tau, softcap):
      return lpk.XlaLogits().partials(x, targets, tau, softcap)

    def grad_logits(self, *args):
      return lpk.XlaLogits().grad_logits(*args)

    def centred_expected_y(self, *args):
      return lpk.XlaLogits().centred_expected_y(*args)

  with pytest.raises(TypeError):
    hash(Mutable())
  x = H @ W

  def loss(x, impl):
    return jnp.sum(lpk.token_logprobs(x, T, temperature=0.7, implementation=impl))

  got = jax.value_and_grad(loss)(x, Mutable())
  want = jax.value_and_grad(loss)(x, "reference")
  for a, b in zip(got, want, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
