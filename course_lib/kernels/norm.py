"""RMSNorm, fused residual-add + RMSNorm and LayerNorm: launchers, input checks and references.

Every transformer layer normalises its activations twice. The kernels in ``norm.cu`` do it at the
speed of a copy: one block per row, 16-byte loads, the row kept in registers, fp32 accumulation.
On a GPU the functions here launch them; in CPU mode they compute the same thing with NumPy (fp32
accumulation, output rounded to the input's type), so the engine runs unchanged on a laptop.

Shapes: ``x`` is ``[..., hidden]`` and C-contiguous; ``weight`` and ``bias`` are ``[hidden]`` of the
same element type. Element types: float32, float16, bfloat16 (see ``course_lib.dtypes``).
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from course_lib import backend, dtypes
from course_lib import compile as cuda_compile

SOURCE = "norm.cu"
PACK_BYTES = 16  # one load or store instruction moves 16 bytes
ITEMS_CHOICES = (1, 2, 4, 8)  # 16-byte packs each thread keeps in registers (instantiated in norm.cu)
TARGET_ITEMS = 4  # packs per thread the launch aims for: enough loads in flight, few registers
MAX_THREADS = 1024
OPS = ("rms_norm", "add_rms_norm", "layer_norm")


# ---- references: float64 NumPy, the ground truth every kernel is compared with ---------------------------


def _float64(array: Any, dtype: str | None = None) -> np.ndarray:
    return dtypes.to_float32(array, dtype).astype(np.float64)


def rms_norm_reference(x: Any, weight: Any, eps: float, dtype: str | None = None) -> np.ndarray:
    """``x / sqrt(mean(x**2, over the last axis) + eps) * weight`` in float64."""
    x64, w64 = _float64(x, dtype), _float64(weight, dtype)
    return x64 / np.sqrt(np.mean(x64**2, axis=-1, keepdims=True) + eps) * w64


def add_rms_norm_reference(
    x: Any, residual: Any, weight: Any, eps: float, dtype: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(rms_norm(x + residual), x + residual)`` in float64: the output and the new residual stream."""
    total = _float64(x, dtype) + _float64(residual, dtype)
    return total / np.sqrt(np.mean(total**2, axis=-1, keepdims=True) + eps) * _float64(weight, dtype), total


def layer_norm_reference(x: Any, weight: Any, bias: Any, eps: float, dtype: str | None = None) -> np.ndarray:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last axis, in float64."""
    x64 = _float64(x, dtype)
    centred = x64 - x64.mean(axis=-1, keepdims=True)
    return centred / np.sqrt(np.mean(centred**2, axis=-1, keepdims=True) + eps) * _float64(weight, dtype) + _float64(
        bias, dtype
    )


# ---- input checks: a bad shape or type is a clear error here, never an out-of-bounds read in a kernel ----


@dataclass(frozen=True)
class Rows:
    """What the kernels need to know about validated inputs."""

    dtype: str  # "float32", "float16" or "bfloat16"
    rows: int
    hidden: int


def check_inputs(x: Any, params: dict[str, Any], eps: float, dtype: str | None) -> Rows:
    """Validate ``x`` and the per-feature ``params`` (weight, bias, residual); raise what was expected."""
    for name, array in {"x": x, **params}.items():
        dtypes.require_device_array(name, array)
    kind = dtypes.element_type(x, dtype)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape [..., hidden] with hidden >= 1, got {tuple(x.shape)}")
    if not x.flags.c_contiguous:
        raise ValueError("x must be C-contiguous (the kernels index rows by stride); use xp.ascontiguousarray(x)")
    hidden = x.shape[-1]
    for name, value in params.items():
        expected_shape = x.shape if name == "residual" else (hidden,)
        if tuple(value.shape) != tuple(expected_shape):
            raise ValueError(f"{name} must have shape {tuple(expected_shape)} to match x, got {tuple(value.shape)}")
        if dtypes.element_type(value, dtype) != kind:
            raise TypeError(f"{name} must hold {kind} like x, got {value.dtype}")
        if not value.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
    if isinstance(eps, bool) or not (isinstance(eps, numbers.Real) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    return Rows(kind, math.prod(x.shape[:-1]), hidden)


# ---- the launch plan: which instantiation, how many threads --------------------------------------------


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``kernel`` names an instantiation in norm.cu; one block of ``threads`` per row."""

    kernel: str
    threads: int


def plan(op: str, dtype: str, hidden: int, aligned: bool = True, target_items: int = TARGET_ITEMS) -> Launch:
    """Choose the kernel and block size for rows of ``hidden`` elements.

    Rows that fit in registers (at most 1024 threads x 8 packs of 16 bytes) use ``<op>_rows`` with
    ``ITEMS`` packs per thread; longer rows use ``<op>_long``, which reads the row twice. A row whose
    length is not a whole number of packs, or data not 16-byte aligned, takes ``<op>_long`` with
    one element per load.
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    cuda_type = dtypes.CUDA_TYPES[dtype]
    pack = PACK_BYTES // dtypes.ITEM_BYTES[dtype]
    if hidden % pack or not aligned:
        return Launch(f"{op}_long<{cuda_type}, 1>", _warps(hidden))
    packs = hidden // pack
    threads = _warps(math.ceil(packs / target_items))
    items = next((i for i in ITEMS_CHOICES if i * threads >= packs), None)
    if items is None:
        return Launch(f"{op}_long<{cuda_type}, {pack}>", MAX_THREADS)
    return Launch(f"{op}_rows<{cuda_type}, {items}>", threads)


def _warps(count: int) -> int:
    """``count`` threads rounded up to whole warps, between one warp and 1024 threads."""
    return min(MAX_THREADS, max(32, 32 * math.ceil(count / 32)))


def kernel_names() -> tuple[str, ...]:
    """Every instantiation in norm.cu, as name expressions (for CuPy and the compile report)."""
    names = []
    for dtype, cuda_type in dtypes.CUDA_TYPES.items():
        pack = PACK_BYTES // dtypes.ITEM_BYTES[dtype]
        for op in OPS:
            names += [f"{op}_rows<{cuda_type}, {items}>" for items in ITEMS_CHOICES]
            names += [f"{op}_long<{cuda_type}, {pack}>", f"{op}_long<{cuda_type}, 1>"]
    return tuple(names)


@functools.cache
def _module() -> Any:
    return cuda_compile.load_file(SOURCE, name_expressions=kernel_names())


def launch_kernel(op: str, shape: Rows, arrays: list[Any], eps: float, launch: Launch | None = None) -> None:
    """Launch ``op`` on validated device ``arrays`` (outputs first, as in norm.cu's signatures).

    ``launch`` overrides the plan: the benchmark uses it to compare block shapes.
    """
    aligned = all(array.data.ptr % PACK_BYTES == 0 for array in arrays)
    launch = launch or plan(op, shape.dtype, shape.hidden, aligned)
    kernel = _module().get_function(launch.kernel)
    kernel((shape.rows,), (launch.threads,), (*arrays, np.float32(eps), np.int32(shape.hidden)))


# ---- the public functions ------------------------------------------------------------------------------


def rms_norm(x: Any, weight: Any, eps: float = 1e-6, *, dtype: str | None = None) -> Any:
    """RMSNorm over the last axis: ``x / sqrt(mean(x**2) + eps) * weight``, in x's element type."""
    shape = check_inputs(x, {"weight": weight}, eps, dtype)
    out = dtypes.empty(x.shape, shape.dtype)
    if shape.rows == 0:
        return out
    if backend.has_gpu():
        launch_kernel("rms_norm", shape, [out, x, weight], eps)
    else:
        out[...] = _numpy_rms_norm(_float32(x, dtype), _float32(weight, dtype), eps).astype(out.dtype)
    return out


def add_rms_norm(x: Any, residual: Any, weight: Any, eps: float = 1e-6, *, dtype: str | None = None) -> Any:
    """``residual += x`` (in place, as Llama-style blocks carry their residual stream), then return
    ``rms_norm(residual, weight, eps)``: one pass over memory instead of two kernels."""
    shape = check_inputs(x, {"residual": residual, "weight": weight}, eps, dtype)
    out = dtypes.empty(x.shape, shape.dtype)
    if shape.rows == 0:
        return out
    if backend.has_gpu():
        launch_kernel("add_rms_norm", shape, [out, residual, x, weight], eps)
    else:
        total = _float32(x, dtype) + _float32(residual, dtype)
        residual[...] = total.astype(residual.dtype)
        out[...] = _numpy_rms_norm(total, _float32(weight, dtype), eps).astype(out.dtype)
    return out


def layer_norm(x: Any, weight: Any, bias: Any, eps: float = 1e-5, *, dtype: str | None = None) -> Any:
    """LayerNorm over the last axis: ``(x - mean) / sqrt(var + eps) * weight + bias``."""
    shape = check_inputs(x, {"weight": weight, "bias": bias}, eps, dtype)
    out = dtypes.empty(x.shape, shape.dtype)
    if shape.rows == 0:
        return out
    if backend.has_gpu():
        launch_kernel("layer_norm", shape, [out, x, weight, bias], eps)
    else:
        x32 = _float32(x, dtype)
        centred = x32 - x32.mean(axis=-1, keepdims=True)
        inv_std = 1.0 / np.sqrt(np.mean(centred**2, axis=-1, keepdims=True) + np.float32(eps))
        out[...] = (centred * inv_std * _float32(weight, dtype) + _float32(bias, dtype)).astype(out.dtype)
    return out


def _float32(array: Any, dtype: str | None) -> np.ndarray:
    return dtypes.to_float32(array, dtype)


def _numpy_rms_norm(x32: np.ndarray, w32: np.ndarray, eps: float) -> np.ndarray:
    """The CPU-mode computation: float32 throughout, as the kernels accumulate."""
    return x32 / np.sqrt(np.mean(x32 * x32, axis=-1, keepdims=True) + np.float32(eps)) * w32
