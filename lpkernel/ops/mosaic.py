"""The Mosaic TPU ``pallas_call`` that both TPU implementations (logits and fused) make."""

from __future__ import annotations

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
