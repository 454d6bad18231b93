"""The small kernels of chapter 01, each in CUDA C (``basics.cu``) and in Numba, with launchers.

* ``vector_add``: one thread per element (its CUDA C is ``vector_add.cu``, chapter 00's kernel);
* ``vector_add_grid_stride``: a fixed grid that loops over any number of elements;
* ``strided_copy``: the coalescing experiment, the same bytes moved through a varying read pattern;
* ``tree_sum`` and ``shuffle_sum``: summing an array in a shared-memory tree or with warp shuffles.

Every launcher checks its arrays before a launch and raises a ``TypeError`` or ``ValueError`` that
says what was expected. ``implementation="numba"`` runs the Numba kernel (compiled for the GPU, or in
the simulator in CPU mode); ``implementation="cuda_c"`` runs the CUDA C kernel: through CuPy on a GPU,
and in CPU mode on the course's warp emulator (``course_lib.emulator``: the same source, compiled for
the CPU, each GPU thread a fiber). The ``*_reference`` functions compute the same results with NumPy
in float64.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import numpy as np

from course_lib import backend, emulator
from course_lib.compile import kernel_path, load_file

cuda = backend.numba_cuda()

IMPLEMENTATIONS = ("numba", "cuda_c")
THREADS = 256  # the default block size: a multiple of the warp size, between 128 and 512
MAX_THREADS = 1024  # the most threads a block may have on every GPU the course targets
REDUCE_THREADS = 256  # the block size the reductions are written for (REDUCE_THREADS in basics.cu)
ACCUMULATORS = ("float32", "float64")
MAX_INT32 = 2**31 - 1  # strided_copy indexes with 32-bit ints
MAX_GRID_Y = 65535  # the most blocks along a grid's y axis: strided_copy puts one column on each


# Numba kernels: the same code as basics.cu, in Python.


@cuda.jit
def vector_add_kernel(a, b, out):
    """One thread per element; the guard keeps the last block's spare threads out of bounds."""
    i = cuda.grid(1)  # blockIdx.x * blockDim.x + threadIdx.x
    if i < out.size:
        out[i] = a[i] + b[i]


@cuda.jit
def vector_add_grid_stride_kernel(a, b, out):
    """Start at the global index and step by the number of threads in the grid."""
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = a[i] + b[i]


@cuda.jit
def strided_copy_kernel(x, out, rows, stride):
    """Copy the ``rows x stride`` matrix ``x`` column by column; block row ``blockIdx.y`` is the column."""
    row, column = cuda.grid(2)  # column = blockIdx.y: the blocks are one thread tall
    if row < rows:
        out[column * rows + row] = x[row * stride + column]


@functools.cache
def tree_sum_kernel(accumulate: str) -> Any:
    """The shared-memory tree sum with a ``float32`` or ``float64`` accumulator.

    Numba's simulator has no warp shuffles, so the Numba sum is this tree only; ``shuffle_sum`` is
    CUDA C. Like the CUDA C kernel it is written for blocks of ``REDUCE_THREADS`` threads.
    """
    acc = np.dtype(_accumulator(accumulate)).type

    @cuda.jit
    def tree_sum(x, total):
        partial = cuda.shared.array(REDUCE_THREADS, acc)
        t = cuda.threadIdx.x
        thread_sum = acc(0)
        for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
            thread_sum += x[i]
        partial[t] = thread_sum
        cuda.syncthreads()
        half = REDUCE_THREADS // 2
        while half > 0:
            if t < half:
                partial[t] += partial[t + half]
            cuda.syncthreads()
            half //= 2
        if t == 0:
            cuda.atomic.add(total, 0, partial[0])

    return tree_sum


# Launchers


def default_blocks(blocks_per_sm: int = 4) -> int:
    """Blocks for a grid-stride launch: a few per SM on a GPU, so every SM has work to switch between.

    The simulator runs one block at a time on the CPU and gains nothing from more: there it is
    ``blocks_per_sm`` (as if for one SM).
    """
    if blocks_per_sm < 1:
        raise ValueError(f"blocks_per_sm must be >= 1, got {blocks_per_sm}")
    return blocks_per_sm * (backend.sm_count() if backend.has_gpu() else 1)


def vector_add(a: Any, b: Any, out: Any = None, *, implementation: str = "numba", threads: int = THREADS) -> Any:
    """``out = a + b`` for float32 vectors, one thread per element; returns ``out``."""
    _require_vector("a", a)
    _require_vector("b", b)
    _require_same_size(a, b)
    _require_int32_indices("a", a.size)
    out = _output(out, a.size, np.float32)
    blocks = _blocks_for(a.size, threads)
    if _implementation(implementation) == "numba":
        vector_add_kernel[blocks, threads](a, b, out)
    else:
        _cuda_kernel("vector_add.cu", "vector_add")((blocks,), (threads,), (a, b, out, np.int32(a.size)))
    return out


def vector_add_grid_stride(
    a: Any, b: Any, out: Any = None, *, implementation: str = "numba", blocks: int | None = None,
    threads: int = THREADS,
) -> Any:
    """``out = a + b`` with a grid-stride loop: ``blocks`` (default: :func:`default_blocks`) covers any size."""
    _require_vector("a", a)
    _require_vector("b", b)
    _require_same_size(a, b)
    out = _output(out, a.size, np.float32)
    _require_threads(threads)
    blocks = _grid_stride_blocks(blocks)
    if _implementation(implementation) == "numba":
        vector_add_grid_stride_kernel[blocks, threads](a, b, out)
    else:
        kernel = _cuda_kernel("basics.cu", "vector_add_grid_stride")
        kernel((blocks,), (threads,), (a, b, out, np.int64(a.size)))
    return out


def strided_copy(x: Any, stride: int, out: Any = None, *, implementation: str = "numba", threads: int = THREADS) -> Any:
    """Copy ``x`` as a ``rows x stride`` matrix column by column, so that a warp's reads lie ``stride`` apart.

    ``out[column * rows + row] = x[row * stride + column]``: every element is read once and written
    once, the writes of a warp are side by side, and only the distance between its reads changes
    with ``stride``. So every stride moves the same useful bytes (``2 * x.nbytes``), and any drop
    in bandwidth is the cost of the access pattern alone. Stride 1 is a plain copy.
    """
    _require_vector("x", x)
    rows = _rows(x.size, stride)
    out = _output(out, x.size, np.float32)
    grid = (_blocks_for(rows, threads), stride)
    if _implementation(implementation) == "numba":
        strided_copy_kernel[grid, threads](x, out, rows, stride)
    else:
        _cuda_kernel("basics.cu", "strided_copy")(grid, (threads,), (x, out, np.int32(rows), np.int32(stride)))
    return out


def tree_sum(
    x: Any, out: Any = None, *, accumulate: str = "float64", implementation: str = "numba", blocks: int | None = None
) -> Any:
    """The sum of float32 ``x`` in a one-element ``accumulate`` array: per-block shared-memory trees.

    Each thread sums a grid-stride share of ``x``, each block combines its threads' sums in a tree
    in shared memory, and each block adds its sum to ``out[0]`` with one atomic add. ``out`` is
    zeroed first. A float32 accumulator loses digits over millions of additions; float64 does not.
    """
    _require_vector("x", x)
    out = _output(out, 1, _accumulator(accumulate))
    blocks = _grid_stride_blocks(blocks)
    use_numba = _implementation(implementation) == "numba"
    kernel = tree_sum_kernel(accumulate) if use_numba else _cuda_kernel("basics.cu", f"tree_sum_{accumulate}")
    out.fill(0)  # the blocks add their sums to it
    if use_numba:
        kernel[blocks, REDUCE_THREADS](x, out)
    else:
        kernel((blocks,), (REDUCE_THREADS,), (x, out, np.int64(x.size)))
    return out


def shuffle_sum(x: Any, out: Any = None, *, accumulate: str = "float64", blocks: int | None = None) -> Any:
    """:func:`tree_sum` with warp shuffles (``__shfl_down_sync``) inside each warp: CUDA C only.

    There is no Numba version: the Numba simulator has no shuffles (the warp emulator has).
    """
    _require_vector("x", x)
    out = _output(out, 1, _accumulator(accumulate))
    blocks = _grid_stride_blocks(blocks)
    kernel = _cuda_kernel("basics.cu", f"shuffle_sum_{accumulate}")
    out.fill(0)  # the blocks add their sums to it
    kernel((blocks,), (REDUCE_THREADS,), (x, out, np.int64(x.size)))
    return out


# NumPy references, in float64


def vector_add_reference(a: Any, b: Any) -> np.ndarray:
    """``a + b`` in float64 on the host."""
    return _float64(a) + _float64(b)


def strided_copy_reference(x: Any, stride: int) -> np.ndarray:
    """``x`` read as a ``rows x stride`` matrix and written column by column: its transpose, flattened."""
    values = _float64(x)
    return values.reshape(_rows(values.size, stride), stride).T.ravel()


def sum_reference(x: Any) -> float:
    """The sum of ``x`` in float64 (NumPy's pairwise summation keeps the rounding error tiny)."""
    return float(np.sum(_float64(x)))


def cuda_source(function: str, file: str = "basics.cu") -> str:
    """The comment and code of one function in a course ``.cu`` file, to show in a chapter.

    The course's ``.cu`` files keep each function and the comment above it in one paragraph, with
    no blank line inside: this returns the paragraph that defines ``function``.
    """
    paragraphs = kernel_path(file).read_text().split("\n\n")
    definition = re.compile(rf"^(?=[^\s/]).*\b{re.escape(function)}\s*\(", re.MULTILINE)  # unindented, not a comment
    for paragraph in paragraphs:
        if definition.search(paragraph):
            return paragraph.strip("\n")
    raise ValueError(f"{file} defines no function {function!r}")


# Checks before a launch


def _require_vector(name: str, array: Any) -> None:
    """A float32, one-dimensional, contiguous, non-empty array on this process's device."""
    if not isinstance(array, backend.xp.ndarray):
        expected = "a CuPy array on the GPU (backend.xp.asarray(...))" if backend.has_gpu() else "a NumPy array"
        raise TypeError(f"{name} must be {expected}, got {type(array).__name__}")
    if array.dtype != np.float32:
        raise TypeError(f"{name} must be float32, got {array.dtype}")
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {array.shape}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} must be contiguous: the kernel reads element i at address i (use ascontiguousarray)")


def _require_same_size(a: Any, b: Any) -> None:
    if a.size != b.size:
        raise ValueError(f"a and b must have the same size, got {a.size} and {b.size}")


def _output(out: Any, size: int, dtype: Any) -> Any:
    """``out`` checked to be a contiguous ``size``-element ``dtype`` vector, or a new one."""
    dtype = np.dtype(dtype)
    if out is None:
        return backend.xp.empty(size, dtype=dtype)
    if not isinstance(out, backend.xp.ndarray) or out.dtype != dtype:
        raise TypeError(f"out must be a {dtype} array of {backend.xp.__name__}, got {type(out).__name__} "
                        f"of {getattr(out, 'dtype', None)}")
    if out.shape != (size,) or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous array of shape ({size},), got shape {out.shape}")
    return out


def _require_threads(threads: int) -> None:
    if not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"threads must be between 1 and {MAX_THREADS}, got {threads}")


def _require_blocks(blocks: int) -> int:
    if not 1 <= blocks <= MAX_INT32:
        raise ValueError(f"blocks must be between 1 and {MAX_INT32}, got {blocks}")
    return blocks


def _grid_stride_blocks(blocks: int | None) -> int:
    return _require_blocks(default_blocks() if blocks is None else blocks)


def _blocks_for(size: int, threads: int) -> int:
    """Enough blocks of ``threads`` for one thread per element: the last block is partly idle."""
    _require_threads(threads)
    return _require_blocks((size + threads - 1) // threads)


def _require_int32_indices(name: str, size: int) -> None:
    if size > MAX_INT32:
        raise ValueError(f"this kernel indexes with 32-bit ints: {name} may hold at most {MAX_INT32} elements, "
                         f"got {size} (vector_add_grid_stride and the sums index with 64-bit ints)")


def _rows(size: int, stride: int) -> int:
    """The rows of ``size`` elements read as a matrix ``stride`` wide."""
    if not isinstance(stride, (int, np.integer)):
        raise TypeError(f"stride must be an integer, got {type(stride).__name__}")
    if not 1 <= stride <= MAX_GRID_Y:
        raise ValueError(f"stride must be between 1 and {MAX_GRID_Y}, got {stride}")
    if size % stride:
        raise ValueError(f"x must hold whole rows: its size {size} is not a multiple of the stride {stride}")
    _require_int32_indices("x", size)
    return size // stride


def _accumulator(accumulate: str) -> str:
    if accumulate not in ACCUMULATORS:
        raise ValueError(f"accumulate must be one of {ACCUMULATORS}, got {accumulate!r}")
    return accumulate


def _implementation(implementation: str) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    return implementation


def where(implementation: str) -> str:
    """Where ``implementation`` runs in this process, for a label: ``"cuda_c on the warp emulator"``."""
    kind = _implementation(implementation)
    if backend.has_gpu():
        return f"{kind} on the GPU"
    return f"{kind} in the simulator" if kind == "numba" else f"{kind} on the warp emulator"


@functools.cache
def _cuda_module(file: str) -> Any:
    """The CuPy RawModule of a course ``.cu`` file, compiled once per process."""
    return load_file(file)


@functools.cache
def _cuda_kernel(file: str, name: str) -> Any:
    """A CUDA C kernel: CuPy's on a GPU; in CPU mode the warp emulator's, which CuPy's launch calls also fit."""
    if backend.has_gpu():
        return _cuda_module(file).get_function(name)
    if problem := emulator.emulator_problem():
        raise RuntimeError(f"the CUDA C kernels need a GPU, or the warp emulator on the CPU, which cannot run here: "
                           f"{problem} ({backend.mode_text()})")
    return emulator.load_file(file, (name,)).get_function(name)


def _float64(values: Any) -> np.ndarray:
    return np.asarray(backend.to_numpy(values), dtype=np.float64)
