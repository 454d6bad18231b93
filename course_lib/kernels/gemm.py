"""The GEMM progression of chapter 03 (steps 1-5 so far): launchers, input checks and the reference.

``matmul(a, b, step=...)`` computes ``a @ b`` for row-major ``a`` [M, K] and ``b`` [K, N] of one
element type (float32, float16, bfloat16), accumulating in fp32 and rounding once. On a GPU it runs
the chosen kernel of ``gemm.cu``; in CPU mode it computes the same product with NumPy in fp32.
Steps 1-4 run on the CUDA cores; step 5 (``wmma``) on the tensor cores. ``mma.sync`` and ``wgmma``
come next.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from course_lib import backend, dtypes
from course_lib import compile as cuda_compile

SOURCE = "gemm.cu"
STEPS = ("naive", "smem_tiled", "register_blocked", "vectorized", "wmma")
TENSOR_CORE_STEPS = ("wmma",)
PACK_ELEMENTS = 8  # a 16-byte load of fp16/bf16
BLOCK_TILE = 128  # register-blocked kernels: a 128 x 128 tile of C per block of 256 threads
SMEM_TILE = 32
WMMA_TILE = 64  # gemm_wmma: a 64 x 64 tile of C per block of 4 warps


def gemm_reference(a: Any, b: Any, dtype: str | None = None) -> np.ndarray:
    """``a @ b`` in float64 on the host: the ground truth for every step."""
    return dtypes.to_float32(a, dtype).astype(np.float64) @ dtypes.to_float32(b, dtype).astype(np.float64)


@dataclass(frozen=True)
class Product:
    """The validated shape and element type of ``a @ b``."""

    dtype: str
    m: int
    n: int
    k: int


def check_inputs(a: Any, b: Any, step: str, dtype: str | None) -> Product:
    """Validate operands for ``step``; raise a ValueError/TypeError that says what was expected."""
    if step not in STEPS:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")
    dtypes.require_device_array("a", a)
    dtypes.require_device_array("b", b)
    kind = dtypes.element_type(a, dtype)
    if dtypes.element_type(b, dtype) != kind:
        raise TypeError(f"a and b must hold the same element type, got {a.dtype} and {b.dtype}")
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"a and b must be 2-D, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    (m, k), (k_b, n) = a.shape, b.shape
    if k != k_b:
        raise ValueError(f"inner dimensions differ: a is {tuple(a.shape)}, b is {tuple(b.shape)}")
    if min(m, n, k) < 1:
        raise ValueError(f"M, N and K must be >= 1, got M={m}, N={n}, K={k}")
    if not (a.flags.c_contiguous and b.flags.c_contiguous):
        raise ValueError("a and b must be C-contiguous (row-major); use xp.ascontiguousarray")
    if max(m * k, k * n, m * n) >= 2**31:
        raise ValueError("each matrix must have fewer than 2**31 elements (the kernels index rows with int)")
    if step in TENSOR_CORE_STEPS:
        _require_tensor_core_type(kind)
    if step == "vectorized":
        if kind == "float32":
            raise TypeError("the vectorized step loads 8 fp16/bf16 values at a time: use float16 or bfloat16")
        if k % PACK_ELEMENTS or n % PACK_ELEMENTS:
            raise ValueError(f"the vectorized step needs K and N multiples of {PACK_ELEMENTS} (16-byte rows), "
                             f"got K={k}, N={n}; use step='register_blocked' for other shapes")
    return Product(kind, m, n, k)


def _require_tensor_core_type(kind: str) -> None:
    """WMMA takes fp16 on sm_75 and newer, bf16 on sm_80 and newer."""
    if kind == "float32":
        raise TypeError("the tensor-core steps take float16 or bfloat16 operands (tf32 is a later step)")
    if kind == "bfloat16" and backend.has_gpu():
        major = int(backend.device_facts()["compute_capability"].split(".")[0])
        if major < 8:
            raise ValueError("bf16 tensor cores need sm_80 or newer; use float16 on this GPU")


@functools.cache
def _module() -> Any:
    return cuda_compile.load_file(SOURCE, name_expressions=kernel_names())


def kernel_names() -> tuple[str, ...]:
    """Every instantiation in gemm.cu, as name expressions."""
    names = []
    for dtype, cuda_type in dtypes.CUDA_TYPES.items():
        names += [f"gemm_naive<{cuda_type}>", f"gemm_smem_tiled<{cuda_type}>",
                  f"gemm_register_blocked<{cuda_type}, false>"]
        if dtype != "float32":
            names += [f"gemm_register_blocked<{cuda_type}, true>", f"gemm_wmma<{cuda_type}>"]
    return tuple(names)


def launch_config(step: str, product: Product) -> tuple[str, tuple[int, int], tuple[int, ...]]:
    """(kernel name, grid, block) for ``step``: the grid covers C with the kernel's tile."""
    cuda_type = dtypes.CUDA_TYPES[product.dtype]
    m, n = product.m, product.n
    if step == "naive":
        return f"gemm_naive<{cuda_type}>", (math.ceil(n / 32), math.ceil(m / 8)), (32, 8)
    if step == "smem_tiled":
        return f"gemm_smem_tiled<{cuda_type}>", (math.ceil(n / SMEM_TILE), math.ceil(m / SMEM_TILE)), (32, 32)
    if step == "wmma":
        return f"gemm_wmma<{cuda_type}>", (math.ceil(n / WMMA_TILE), math.ceil(m / WMMA_TILE)), (128,)
    packed = "true" if step == "vectorized" else "false"
    grid = (math.ceil(n / BLOCK_TILE), math.ceil(m / BLOCK_TILE))
    return f"gemm_register_blocked<{cuda_type}, {packed}>", grid, (256,)


def launch(step: str, product: Product, c: Any, a: Any, b: Any) -> None:
    """Launch ``step`` on validated device arrays (C first, as in gemm.cu)."""
    if step == "vectorized" and any(x.data.ptr % 16 for x in (a, b)):
        raise ValueError("the vectorized step needs 16-byte aligned a and b (a fresh array is)")
    name, grid, block = launch_config(step, product)
    args = (c, a, b, np.int32(product.m), np.int32(product.n), np.int32(product.k))
    _module().get_function(name)(grid, block, args)


def matmul(a: Any, b: Any, *, step: str = "vectorized", dtype: str | None = None) -> Any:
    """``a @ b`` with the kernel of ``step`` (GPU) or NumPy in fp32 (CPU mode), in a's element type."""
    product = check_inputs(a, b, step, dtype)
    c = dtypes.empty((product.m, product.n), product.dtype)
    if backend.has_gpu():
        launch(step, product, c, a, b)
    else:
        c[...] = (dtypes.to_float32(a, dtype) @ dtypes.to_float32(b, dtype)).astype(c.dtype)
    return c
