"""Static validation of kernel block shapes.

Interpret mode runs any block shape, so the CPU test suite cannot see a block
the hardware cannot tile. These checks run when a kernel is built (and the
tests call them on every kernel's default and tested configurations): Triton
tiles must be powers of two and fit in registers; TPU blocks must respect the
``(8, 128)`` tiling of 32-bit types (``(16, 128)`` for 16-bit ones) unless a
block spans the whole axis.
"""

from __future__ import annotations

import numpy as np

# Elements of one float32 tile a Triton program keeps live (registers + spills).
MAX_GPU_TILE = 1 << 16


def check_power_of_two(name: str, value: int) -> None:
  if not (isinstance(value, int) and value >= 1 and value & (value - 1) == 0):
    raise ValueError(f"{name}={value!r} must be a positive power of two")


def check_gpu_block(what: str, block: tuple[int, ...], dtype) -> None:
  """A Triton tile: power-of-two sides, at most ``MAX_GPU_TILE`` elements."""
  for i, side in enumerate(block):
    check_power_of_two(f"{what} block[{i}]", side)
  if int(np.prod(block)) > MAX_GPU_TILE:
    raise ValueError(f"{what} block {block} has more than {MAX_GPU_TILE} elements")
  del dtype  # tiles are upcast to float32 in registers whatever the input dtype


def sublane_multiple(dtype) -> int:
  """Rows of a TPU vreg tile for ``dtype``: 8 for 32-bit, 16 for 16-bit, 32 for 8-bit."""
  return 8 * (4 // np.dtype(dtype).itemsize)


def check_tpu_block(what: str, block: tuple[int, int], shape: tuple[int, int], dtype) -> None:
  """A Mosaic TPU block of a 2-D array: ``(sublane, 128)`` multiples or whole axes."""
  rows, cols = block
  sub = sublane_multiple(dtype)
  if rows != shape[0] and rows % sub:
    raise ValueError(
      f"{what} block rows={rows} must be a multiple of {sub} for {np.dtype(dtype).name} "
      f"(or equal the array's {shape[0]} rows)"
    )
  if cols != shape[1] and cols % 128:
    raise ValueError(
      f"{what} block columns={cols} must be a multiple of 128 (or equal the array's {shape[1]})"
    )


def check_tpu_tile_sizes(owner: str, block_rows: int, block_v: int) -> None:
  """A TPU kernel's configured ``(block_rows, block_v)``: multiples of ``(8, 128)``."""
  if block_rows < 8 or block_rows % 8 or block_v % 128 or block_v < 128:
    raise ValueError(f"{owner} blocks ({block_rows}, {block_v}) must be multiples of (8, 128)")
