"""How an implementation chooses a backend path: one mechanism, at lowering time.

A path that pays on one backend (the CPU's vocabulary chunks, block widths,
bit-view carries and operand layouts) is chosen for the platform the program is
*lowered for*, with ``jax.lax.platform_dependent``: both paths are traced and
only the chosen one is lowered. Never by ``jax.default_backend()`` at trace
time, which takes the host's path when a program is lowered for another device
(``jax.export`` for a GPU on a CPU host, or an AOT compile for a TPU).
``tests/test_implementations.py`` lowers for a platform other than the one
running and checks which path it holds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from jax import lax

T = TypeVar("T")


def on_cpu_or(cpu: Callable[[], T], default: Callable[[], T]) -> T:
  """``cpu()`` in a program lowered for the CPU, ``default()`` for any other platform.

  Both must return the same pytree of array types (they compute the same values
  another way).
  """
  return lax.platform_dependent(cpu=cpu, default=default)
