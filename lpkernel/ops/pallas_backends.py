"""Pallas's backend modules, imported once and guarded.

A JAX build without Triton's (GPU) or Mosaic's (TPU) Pallas backend still
imports lpkernel: the module is None here, and an implementation that needs it
raises ``ImportError`` when it runs, naming what is missing and what to use
instead (``tests/test_imports.py`` imports lpkernel with both hidden).
"""

from __future__ import annotations

from types import ModuleType

triton: ModuleType | None
mosaic: ModuleType | None
try:
  from jax.experimental.pallas import triton
except ImportError:
  triton = None
try:
  from jax.experimental.pallas import tpu as mosaic
except ImportError:
  mosaic = None


def _missing(what: str, kind: str) -> ImportError:
  return ImportError(
    f"the Pallas {kind} implementations need jax.experimental.pallas.{what}, which this "
    "JAX build lacks: use implementation='xla' (or None for the backend's default)"
  )


def require_triton() -> ModuleType:
  """``jax.experimental.pallas.triton``, or ``ImportError``."""
  if triton is None:
    raise _missing("triton", "GPU")
  return triton


def require_mosaic() -> ModuleType:
  """``jax.experimental.pallas.tpu``, or ``ImportError``."""
  if mosaic is None:
    raise _missing("tpu", "TPU")
  return mosaic
