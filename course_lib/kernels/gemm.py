"""The GEMM progression of chapter 03: launchers, input checks and the reference.

``matmul(a, b, step=...)`` computes ``a @ b`` for row-major ``a`` [M, K] and ``b`` [K, N] of one
element type (float32, float16, bfloat16), accumulating in fp32 and rounding once. On a GPU it runs
the chosen kernel; in CPU mode it computes the same product with NumPy in fp32.
Steps 1-4 (``gemm.cu``) run on the CUDA cores; steps 5-7 on the tensor cores: ``wmma`` (``gemm.cu``),
``mma_sync`` (``gemm_mma_sync.cu``, sm_80+) and ``wgmma`` (``gemm_wgmma.cu``, Hopper's sm_90a).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from course_lib import backend, dtypes, emulator
from course_lib import compile as cuda_compile
from course_lib.kernels import tensor_map

STEPS = ("naive", "smem_tiled", "register_blocked", "vectorized", "wmma", "mma_sync", "wgmma")
SOURCES = {"gemm.cu": STEPS[:5], "gemm_mma_sync.cu": ("mma_sync",), "gemm_wgmma.cu": ("wgmma",)}
TENSOR_CORE_STEPS = ("wmma", "mma_sync", "wgmma")
ALIGNED_STEPS = ("vectorized", "mma_sync", "wgmma")  # 16-byte rows: K and N multiples of 8
PACK_ELEMENTS = 8  # a 16-byte load of fp16/bf16
BLOCK_TILE = 128  # register-blocked kernels: a 128 x 128 tile of C per block of 256 threads
SMEM_TILE = 32
WMMA_TILE = 64  # gemm_wmma: a 64 x 64 tile of C per block of 4 warps
# gemm_mma_sync: 128 x 128 tiles of C, 4 stages of A's 128 x 32 and B's 32 x 128 tiles (64 KiB).
MMA_SYNC_TILE, MMA_SYNC_SHARED_BYTES = 128, 4 * (128 * 32 + 32 * 128) * 2
# gemm_wgmma: 128 x 256 tiles of C; TMA boxes of 128 x 64 (A) and 64 x 64 (B); 4 stages of 48 KiB.
WGMMA_ROWS, WGMMA_COLS, WGMMA_BK, WGMMA_PANEL = 128, 256, 64, 64
WGMMA_SHARED_BYTES = 4 * (WGMMA_ROWS * WGMMA_BK + WGMMA_BK * WGMMA_COLS) * 2 + 1024  # + 1024 to align the tiles


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
    product = check_operands(a, b, dtype)
    kind, k, n = product.dtype, product.k, product.n
    if step in TENSOR_CORE_STEPS and kind == "float32":
        raise TypeError("the tensor-core steps take float16 or bfloat16 operands (tf32 is not one of the steps)")
    if step == "vectorized" and kind == "float32":
        raise TypeError("the vectorized step loads 8 fp16/bf16 values at a time: use float16 or bfloat16")
    if step in ALIGNED_STEPS and (k % PACK_ELEMENTS or n % PACK_ELEMENTS):
        raise ValueError(f"the {step} step copies rows in 16-byte pieces, so it needs K and N multiples of "
                         f"{PACK_ELEMENTS}, got K={k}, N={n}; use step='register_blocked' or 'wmma' for other shapes")
    if reason := unsupported_reason(step, kind):
        raise ValueError(f"step {step!r} cannot run here: {reason}")
    return product


def check_operands(a: Any, b: Any, dtype: str | None) -> Product:
    """What every product needs: two row-major device matrices of one element type whose shapes chain."""
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
    return Product(kind, m, n, k)


def unsupported_reason(step: str, dtype: str = "bfloat16") -> str | None:
    """Why this device cannot run ``step`` on ``dtype`` operands, or None when it can.

    In CPU mode every step answers (NumPy computes the product), so the answer is None there.
    """
    if step not in STEPS:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")
    if not backend.has_gpu():
        return None
    major, minor = backend.compute_capability()
    if step == "wgmma" and (major, minor) != (9, 0):
        return f"wgmma and TMA need Hopper (sm_90a, e.g. H100/H200); this GPU is sm_{major}{minor}"
    if step == "mma_sync" and major < 8:
        return f"mma.sync m16n8k16 and cp.async need sm_80 or newer; this GPU is sm_{major}{minor}"
    if step == "wmma" and dtype == "bfloat16" and major < 8:
        return f"bf16 tensor cores need sm_80 or newer; this GPU is sm_{major}{minor}: use float16"
    return None


def source_of(step: str) -> str:
    """The .cu file that holds ``step``'s kernel."""
    return next(source for source, steps in SOURCES.items() if step in steps)


@functools.cache
def _module(source: str) -> Any:
    arch = "sm_90a" if source == "gemm_wgmma.cu" else None  # wgmma exists only in the sm_90a feature set
    return cuda_compile.load_file(source, arch=arch, name_expressions=kernel_names(source))


@functools.cache
def _kernel(source: str, name: str, shared_bytes: int) -> Any:
    """The kernel ``name``, allowed ``shared_bytes`` of dynamic shared memory."""
    return cuda_compile.allow_shared_memory(_module(source).get_function(name), shared_bytes)


def kernel_names(source: str = "gemm.cu") -> tuple[str, ...]:
    """Every instantiation in ``source`` (one of ``SOURCES``), as name expressions."""
    names = []
    for dtype, cuda_type in dtypes.CUDA_TYPES.items():
        if source == "gemm.cu":
            names += [f"gemm_naive<{cuda_type}>", f"gemm_smem_tiled<{cuda_type}>",
                      f"gemm_register_blocked<{cuda_type}, false>"]
            if dtype != "float32":
                names += [f"gemm_register_blocked<{cuda_type}, true>", f"gemm_wmma<{cuda_type}>"]
        elif dtype != "float32" and source == "gemm_mma_sync.cu":
            names += [f"gemm_mma_sync<{cuda_type}>"]
        elif dtype != "float32" and source == "gemm_wgmma.cu":
            names += [f"gemm_wgmma<{cuda_type}>"]
    if not names:
        raise ValueError(f"source must be one of {tuple(SOURCES)}, got {source!r}")
    return tuple(names)


def compile_all(arch: str) -> list[cuda_compile.CompiledSource]:
    """Every GEMM source compiled for ``arch`` with NVRTC (no GPU needed): PTX, cubin, resources."""
    return [cuda_compile.compile_file(source, arch, kernel_names(source)) for source in SOURCES]



def launch_config(step: str, product: Product) -> tuple[str, tuple[int, ...], tuple[int, ...], int]:
    """(kernel name, grid, block, dynamic shared bytes) for ``step``: the grid covers C with the kernel's tile."""
    cuda_type = dtypes.CUDA_TYPES[product.dtype]
    m, n = product.m, product.n
    if step == "naive":
        return f"gemm_naive<{cuda_type}>", (math.ceil(n / 32), math.ceil(m / 8)), (32, 8), 0
    if step == "smem_tiled":
        return f"gemm_smem_tiled<{cuda_type}>", (math.ceil(n / SMEM_TILE), math.ceil(m / SMEM_TILE)), (32, 32), 0
    if step == "wmma":
        return f"gemm_wmma<{cuda_type}>", (math.ceil(n / WMMA_TILE), math.ceil(m / WMMA_TILE)), (128,), 0
    if step == "mma_sync":
        tiles = math.ceil(m / MMA_SYNC_TILE) * math.ceil(n / MMA_SYNC_TILE)
        return f"gemm_mma_sync<{cuda_type}>", (tiles,), (128,), MMA_SYNC_SHARED_BYTES
    if step == "wgmma":
        tiles = math.ceil(m / WGMMA_ROWS) * math.ceil(n / WGMMA_COLS)
        return f"gemm_wgmma<{cuda_type}>", (tiles,), (384,), WGMMA_SHARED_BYTES
    packed = "true" if step == "vectorized" else "false"
    grid = (math.ceil(n / BLOCK_TILE), math.ceil(m / BLOCK_TILE))
    return f"gemm_register_blocked<{cuda_type}, {packed}>", grid, (256,), 0


def launch(step: str, product: Product, c: Any, a: Any, b: Any) -> None:
    """Launch ``step`` on validated device arrays (C first, as in the .cu files)."""
    if step in ALIGNED_STEPS and any(x.data.ptr % 16 for x in (a, b, c)):
        raise ValueError(f"the {step} step needs 16-byte aligned a, b and c (a fresh array is)")
    name, grid, block, shared = launch_config(step, product)
    kernel = _kernel(source_of(step), name, shared)
    if step == "wgmma":  # the kernel reads A and B through TMA tensor maps, not pointers
        a, b = (tensor_map.tiled_map(a, product.dtype, WGMMA_ROWS, WGMMA_BK),
                tensor_map.tiled_map(b, product.dtype, WGMMA_BK, WGMMA_PANEL))
    kernel(grid, block, kernel_arguments(product, c, a, b), shared_mem=shared)


def kernel_arguments(product: Product, c: Any, a: Any, b: Any) -> tuple[Any, ...]:
    """Every step's kernel takes (c, a, b, M, N, K), C first as in the .cu files."""
    return c, a, b, np.int32(product.m), np.int32(product.n), np.int32(product.k)


EMULATED_STEPS = STEPS[:-1]  # every step but wgmma, whose sm_90a instructions the warp emulator does not model


def emulate(a: np.ndarray, b: np.ndarray, *, step: str, dtype: str | None = None) -> np.ndarray:
    """``a @ b`` by ``step``'s own CUDA C kernel, run on the CPU by the warp emulator (``course_lib.emulator``).

    For CPU mode and small shapes (the emulator runs every GPU thread as a fiber): what :func:`matmul` computes with
    NumPy there says nothing about the kernels, this runs them. On a GPU, :func:`matmul` runs them for real.
    """
    if backend.has_gpu():
        raise RuntimeError("emulate() is for CPU mode: on a GPU, matmul(a, b, step=...) runs the kernel itself")
    if step not in EMULATED_STEPS:
        raise ValueError(f"the warp emulator runs the steps {EMULATED_STEPS}; {step!r} needs a GPU")
    product = check_inputs(a, b, step, dtype)
    c = np.full((product.m, product.n), np.nan, dtypes.host_dtype(product.dtype))  # unwritten stays NaN
    name, grid, block, shared = launch_config(step, product)
    source = source_of(step)
    module = emulator.load_file(source, kernel_names(source))
    module.get_function(name)(grid, block, kernel_arguments(product, c, a, b), shared_mem=shared)
    return c


def kernel_cannot_run(step: str, dtype: str) -> str | None:
    """Why ``step``'s kernel cannot run in this process on ``dtype`` (on this GPU, or on the CPU warp emulator)."""
    if backend.has_gpu():
        return unsupported_reason(step, dtype)
    if problem := emulator.cuda_c_problem():
        return problem
    return None if step in EMULATED_STEPS else "the warp emulator does not model wgmma (sm_90a): it needs an H100"


def run_kernel(a: Any, b: Any, *, step: str, dtype: str | None = None) -> Any:
    """``a @ b`` by ``step``'s kernel itself, wherever it can run: on the GPU (:func:`matmul`), in CPU mode on the
    warp emulator (:func:`emulate`). Ask :func:`kernel_cannot_run` first."""
    return matmul(a, b, step=step, dtype=dtype) if backend.has_gpu() else emulate(a, b, step=step, dtype=dtype)


def matmul(a: Any, b: Any, *, step: str = "vectorized", dtype: str | None = None) -> Any:
    """``a @ b`` with the kernel of ``step`` (GPU) or NumPy in fp32 (CPU mode), in a's element type."""
    product = check_inputs(a, b, step, dtype)
    c = dtypes.empty((product.m, product.n), product.dtype)
    if backend.has_gpu():
        launch(step, product, c, a, b)
    else:
        c[...] = (dtypes.to_float32(a, dtype) @ dtypes.to_float32(b, dtype)).astype(c.dtype)
    return c
