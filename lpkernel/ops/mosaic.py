"""What the TPU implementations share: the Mosaic ``pallas_call`` they make, and
the processed paths' lane-group maxima of a VMEM tile."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lpkernel.ops.pallas_backends import require_mosaic


def tpu_call(
  kernel, grid, in_specs, out_specs, out_shape, scratch, semantics, interpret, vmem_limit=None
):
  """``pl.pallas_call`` of a Mosaic TPU kernel over ``grid`` with VMEM ``scratch``;
  ``interpret`` runs it in TPU interpret mode (``pltpu.InterpretParams``);
  ``vmem_limit`` raises Mosaic's scoped VMEM limit (bytes; None: its default)."""
  pltpu = require_mosaic()
  return pl.pallas_call(
    kernel,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=0,
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      scratch_shapes=list(scratch),
    ),
    out_shape=out_shape,
    compiler_params=pltpu.CompilerParams(
      dimension_semantics=semantics, vmem_limit_bytes=vmem_limit
    ),
    interpret=pltpu.InterpretParams() if interpret else False,
  )


def lane_maxima(z: jax.Array) -> jax.Array:
  """``[rows, 128]``: lane ``l``'s max over the tile's columns ``l + 128 c`` of
  ``z [rows, 128 m]`` (elementwise maxima of lane-aligned slices, no relayout)."""
  return functools.reduce(jnp.maximum, [z[:, c : c + 128] for c in range(0, z.shape[1], 128)])
