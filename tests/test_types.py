"""The typed contract: mypy checks lpkernel/ (pyproject's [tool.mypy]) and that
an implementation outside lpkernel satisfies the op's protocol, and the ops run
such an implementation without any registry edit."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lpkernel as lpk
from lpkernel.ops import base

ROOT = Path(__file__).resolve().parents[1]

# A fourth logits implementation, as a user would write it: it delegates to the
# XLA one (and counts its calls), and is in no union or registry of lpkernel's.
USER_IMPLEMENTATION = """
import dataclasses

from lpkernel.ops import XlaLogits
from lpkernel.ops.base import FusedImplementation, LogitsImplementation


@dataclasses.dataclass(frozen=True)
class Delegating:
  inner: XlaLogits = XlaLogits()
  name = "delegating"
  platforms = None

  def partials(self, x, targets, tau, softcap):
    return self.inner.partials(x, targets, tau, softcap)

  def grad_logits(self, x, targets, tau, softcap, shift, log_s, g, g_lse=None):
    return self.inner.grad_logits(x, targets, tau, softcap, shift, log_s, g, g_lse)

  def centred_expected_y(self, x, tau, softcap, shift, log_s):
    return self.inner.centred_expected_y(x, tau, softcap, shift, log_s)


class NoGradient:
  name = "broken"
  platforms = None

  def partials(self, x, targets, tau, softcap):
    return XlaLogits().partials(x, targets, tau, softcap)


ok: LogitsImplementation = Delegating()
missing: LogitsImplementation = NoGradient()  # the one expected error: no grad_logits
wrong_op: FusedImplementation = Delegating()  # and this one: a logits implementation
"""


@pytest.mark.long
def test_mypy_passes_on_lpkernel_and_checks_implementations_against_the_protocols(tmp_path):
  user = tmp_path / "user_implementation.py"
  user.write_text(USER_IMPLEMENTATION)
  result = subprocess.run(
    [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"), "lpkernel", str(user)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  errors = [line for line in result.stdout.splitlines() if ": error:" in line]
  lines = USER_IMPLEMENTATION.splitlines()
  missing = lines.index(next(s for s in lines if s.startswith("missing:"))) + 1
  wrong_op = lines.index(next(s for s in lines if s.startswith("wrong_op:"))) + 1
  assert [e.split(":")[:2] for e in errors] == [
    [str(user), str(missing)],
    [str(user), str(wrong_op)],
  ], result.stdout
  assert "Incompatible types in assignment" in errors[0]


def _delegating_class():
  namespace: dict = {}
  exec(USER_IMPLEMENTATION.split("class NoGradient")[0], namespace)
  return namespace["Delegating"]


def test_an_implementation_outside_lpkernel_runs_through_the_public_entries():
  delegating = _delegating_class()()
  assert isinstance(delegating, base.LogitsImplementation)
  assert not isinstance(delegating, base.FusedImplementation)
  x = jax.random.normal(jax.random.key(0), (2, 5, 33))
  t = jax.random.randint(jax.random.key(1), (2, 5), 0, 33)
  tau = jnp.full((2, 5), 0.7)

  def loss(x, tau, impl):
    return jnp.sum(lpk.token_logprobs(x, t, temperature=tau, implementation=impl))

  got = jax.value_and_grad(loss, argnums=(0, 1))(x, tau, delegating)
  want = jax.value_and_grad(loss, argnums=(0, 1))(x, tau, "reference")
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_an_object_that_satisfies_no_protocol_is_refused_by_name():
  @dataclasses.dataclass(frozen=True)
  class NoTemperatureGradient:
    name = "partial"
    platforms = None

    def partials(self, x, targets, tau, softcap):
      return lpk.XlaLogits().partials(x, targets, tau, softcap)

    def grad_logits(self, *args):
      return lpk.XlaLogits().grad_logits(*args)

  x, t = jnp.zeros((2, 4)), jnp.array([0, 1])
  with pytest.raises(TypeError, match="neither grad_logits_and_tau nor centred_expected_y"):
    lpk.token_logprobs(x, t, implementation=NoTemperatureGradient())
  with pytest.raises(TypeError, match="satisfying lpkernel.ops.base.LogitsImplementation"):
    lpk.token_logprobs(x, t, implementation=object())
