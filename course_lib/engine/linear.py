"""The engine's projections, ``x @ weight.T``: one cuBLAS call on a GPU, NumPy on the CPU.

Hugging Face (and PyTorch) store a linear layer's weight as ``[out_features, in_features]``, row-major.
cuBLAS thinks in column-major matrices, and reading row-major memory column-major is a free transpose:
``weight`` [N, K] row-major *is* a column-major [K, N], and ``x`` [M, K] row-major a column-major [K, M].
So ``C = x @ weight.T`` [M, N] row-major, which is column-major ``C^T = weight @ x^T`` [N, M], is one
``cublasGemmEx`` with the first operand transposed: no copy of either matrix.

The call goes to cuBLAS through nvmath-python's bindings rather than through CuPy's ``matmul`` for one
reason: a CUDA graph. CuPy refuses every cuBLAS call while a stream is being captured; cuBLAS itself
records its kernels like any other, and ``course_lib.engine.graphs`` captures the decode step. The same
call serves eager steps too, so a replayed step and an eager one run the same GEMM and give the same logits.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from course_lib import backend, dtypes

ONE, ZERO = np.ones(1, np.float32), np.zeros(1, np.float32)  # alpha and beta, read by cuBLAS from the host


def linear(x: Any, weight: Any, dtype: str | None = None, *, float32_out: bool = False) -> Any:
    """``x @ weight.T`` for ``x`` [M, K] and a ``[N, K]`` weight of the same element type, accumulated in fp32.

    ``dtype`` names the element type (needed for bf16 on a GPU, stored as uint16 bits). The result has that
    type, or float32 with ``float32_out`` (the logits: cuBLAS writes its fp32 sums without rounding them).
    NumPy has no fast bfloat16 product, so in CPU mode bf16 is multiplied in fp32, as a GPU would.
    """
    kind = dtypes.element_type(x, dtype)
    if dtypes.element_type(weight, dtype) != kind:
        raise TypeError(f"linear takes x and weight of one element type, got {x.dtype} and {weight.dtype}")
    if not backend.has_gpu():
        wide = kind == "bfloat16" or float32_out  # fp32 products: NumPy's fp16 product would round its sums
        product = x.astype(np.float32) @ weight.T.astype(np.float32) if wide else x @ weight.T
        return product.astype(np.float32 if float32_out else dtypes.host_dtype(kind))
    return _gemm_ex(x, weight, kind, float32_out)


@functools.cache
def _handle() -> int:
    """This process's cuBLAS handle (one per device is plenty: a call names its stream)."""
    from nvmath.bindings import cublas

    return cublas.create()


def _gemm_ex(x: Any, weight: Any, kind: str, float32_out: bool) -> Any:
    import cupy
    from nvmath.bindings import cublas

    types = {"float32": cupy.cuda.runtime.CUDA_R_32F, "float16": cupy.cuda.runtime.CUDA_R_16F,
             "bfloat16": cupy.cuda.runtime.CUDA_R_16BF}
    (m, k), (n, k_weight) = x.shape, weight.shape
    if k != k_weight or not (x.flags.c_contiguous and weight.flags.c_contiguous):
        raise ValueError(f"linear needs row-major x [M, K] and weight [N, K], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    out = cupy.empty((m, n), dtype=cupy.float32 if float32_out else x.dtype)
    data_type, handle = types[kind], _handle()
    out_type = types["float32"] if float32_out else data_type
    cublas.set_stream(handle, cupy.cuda.get_current_stream().ptr)
    cublas.gemm_ex(handle, cublas.Operation.T, cublas.Operation.N, n, m, k,
                   ONE.ctypes.data, weight.data.ptr, data_type, k, x.data.ptr, data_type, k,
                   ZERO.ctypes.data, out.data.ptr, out_type, n, cublas.ComputeType.COMPUTE_32F,
                   cublas.GemmAlgo.DEFAULT)
    return out
