"""Each op as one compiled program, also when called (or differentiated) eagerly.

An op's custom VJP called outside ``jax.jit`` (an eager call, an eager
``jax.grad``, a notebook cell) would run its rules primitive by primitive, each
dispatched and compiled on its own: on the CPU about 5.7 s for the gradient of
a small processed batch that takes 1.7 s as one program. Inside ``jax.jit``
(and ``shard_map``) the staged op is inlined, so nothing changes there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar, cast

import jax

Op = TypeVar("Op", bound=Callable)


def staged(op: Op, static_argnums: tuple[int, ...]) -> Op:
  """``op(*args)`` through ``jax.jit`` with ``static_argnums`` (the custom VJP's
  ``nondiff_argnums``: options and implementations) static, and as is when one
  of them is unhashable (an implementation object a user wrote without ``__hash__``)."""
  compiled = jax.jit(op, static_argnums=static_argnums)

  @functools.wraps(op)
  def call(*args):
    try:
      hash(tuple(args[i] for i in static_argnums))
    except TypeError:
      return op(*args)
    return compiled(*args)

  return cast(Op, call)  # called as op is
