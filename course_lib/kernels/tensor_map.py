"""Tensor maps: how a Hopper kernel describes a matrix to the TMA copy engine (GEMM step 7).

A TMA copy does not take an address per thread: it takes a *tensor map*, 128 bytes the driver encodes
on the host (``cuTensorMapEncodeTiled``) that say where a row-major matrix lives, its shape and row
stride, the box (tile) one copy moves, and how to swizzle the box in shared memory. The kernel then
asks for "the box at (column, row)" and the engine does the address arithmetic and the bounds checks,
filling whatever lies past the edges with zeros.

The course keeps the encoded maps in device memory and hands kernels their address. A map only
depends on the pointer, shape and box, so maps are cached on those: timing loops that call the same
GEMM again do not re-encode.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

TMA_ELEMENT_TYPES = ("float16", "bfloat16")
MAP_BYTES = 128


def tiled_map(matrix: Any, dtype: str, box_rows: int, box_cols: int) -> Any:
    """A device copy of the tensor map for 2-D row-major ``matrix`` in boxes of ``box_rows x box_cols``.

    The boxes land in shared memory with the 128-byte swizzle (so ``box_cols`` elements must fill
    at most 128 bytes). Rows must start 16-byte aligned: the TMA engine's rule for global strides.
    """
    if dtype not in TMA_ELEMENT_TYPES:
        raise TypeError(f"tensor maps here describe float16 or bfloat16 matrices, got {dtype}")
    rows, cols = matrix.shape
    if (cols * 2) % 16 or matrix.data.ptr % 16:
        raise ValueError(f"TMA needs 16-byte aligned rows: the row length ({cols}) must be a multiple of 8")
    if box_cols * 2 > 128:
        raise ValueError(f"with the 128-byte swizzle a box row holds at most 64 elements, got {box_cols}")
    return _encoded(matrix.data.ptr, rows, cols, dtype, box_rows, box_cols)


@functools.lru_cache(maxsize=64)
def _encoded(pointer: int, rows: int, cols: int, dtype: str, box_rows: int, box_cols: int) -> Any:
    import cupy
    from cuda.bindings import driver

    kinds = {"float16": driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
             "bfloat16": driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16}
    sizes, strides = driver.cuuint64_t, driver.cuuint32_t  # the C types the binding wants
    status, tensor_map = driver.cuTensorMapEncodeTiled(
        kinds[dtype], 2, pointer,
        [sizes(cols), sizes(rows)],              # sizes, innermost (contiguous) dimension first
        [sizes(cols * 2)],                       # bytes from one row to the next
        [strides(box_cols), strides(box_rows)],  # the box one copy moves
        [strides(1), strides(1)],                # no element striding
        driver.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        driver.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        driver.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        driver.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,  # zeros past the edges
    )
    if status != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed ({status.name}) for a {rows} x {cols} {dtype} matrix "
                           f"in {box_rows} x {box_cols} boxes")
    return cupy.asarray(np.array(tensor_map.opaque, dtype=np.uint64))
