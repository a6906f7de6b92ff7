"""Derivatives of derivatives: every implementation differentiates as XLA's does.

An op's custom VJP runs an implementation in its forward and backward rules.
Differentiating a gradient (``jax.grad`` of ``jax.grad``, the Hessian-vector
product ``jax.jvp(jax.grad(f), ...)``, ``jax.hessian``) differentiates those
rules in turn, and a Pallas kernel has no derivative of its own (JAX's rule for
``pallas_call`` fails on these kernels). So each rule that calls a kernel is
given the derivatives of the same rule run by the XLA implementation, which is
plain differentiable ``jnp`` at any order (its bit views carry their own rules):
second derivatives are the reference's on every implementation, never a
silently dropped term.

This costs nothing at first order: a ``custom_jvp``'s rule runs only when the
function it guards is itself differentiated.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax


def differentiated_as(rule: Callable, impl, plain) -> Callable:
  """``rule(impl, *args)`` as a function of ``args``, differentiated as ``rule(plain, *args)``.

  Args:
    rule: ``(implementation, *args) -> outputs``: arrays (or pytrees of them,
      integer ones included) in and out; static options are bound beforehand.
    impl: the implementation (or static choice) that computes the values.
    plain: one whose code JAX differentiates exactly (the XLA implementation).
      When ``impl`` is ``plain`` or declares ``differentiable = True`` (as the
      XLA implementations do), ``rule`` runs as is.

  Returns:
    A function of ``args`` with ``impl``'s values and ``plain``'s derivatives
    of every order (the rule calls the function itself for its values, so an
    outer derivative meets the same rule again).
  """
  if impl is plain or getattr(impl, "differentiable", False):
    return functools.partial(rule, impl)
  fn = jax.custom_jvp(functools.partial(rule, impl))

  @fn.defjvp
  def _jvp(primals, tangents):
    return fn(*primals), jax.jvp(functools.partial(rule, plain), primals, tangents)[1]

  return fn
