"""The element types of the course: float32, float16 and bfloat16, on the host and on the GPU.

bfloat16 keeps float32's 8 exponent bits and cuts the mantissa to 7: the range of float32 at half
the bytes, which is why LLM weights and activations use it. NumPy learns it from ``ml_dtypes``;
CuPy has no bfloat16 dtype, so on the GPU a bf16 array travels as a ``uint16`` array holding the
same bits, and kernels read it as ``__nv_bfloat16``. Functions that take arrays infer the element
type from the dtype; a ``uint16`` array must be declared with ``dtype="bfloat16"``.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from course_lib import backend

bfloat16 = np.dtype(ml_dtypes.bfloat16)
ELEMENT_TYPES = ("float32", "float16", "bfloat16")
ITEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
CUDA_TYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}


def require_device_array(name: str, array: Any, on_host: bool = False) -> None:
    """Kernels take arrays of the current mode: CuPy on a GPU, NumPy in CPU mode. The warp emulator, which runs a
    kernel on the CPU in either mode, takes NumPy arrays (``on_host``)."""
    if on_host:
        if not isinstance(array, np.ndarray):
            raise TypeError(f"{name} must be a numpy array (the warp emulator runs on the CPU), got "
                            f"{type(array).__module__}.{type(array).__name__}; copy it with backend.to_numpy")
        return
    xp = backend.xp
    if not isinstance(array, xp.ndarray):
        raise TypeError(f"{name} must be a {xp.__name__} array in {backend.DECISION.mode.upper()} mode, got "
                        f"{type(array).__module__}.{type(array).__name__}; move it with course_lib.dtypes.to_device")


def element_type(array: Any, dtype: str | None = None) -> str:
    """'float32', 'float16' or 'bfloat16' for ``array``; ``dtype`` is required for uint16 bf16 bits."""
    if dtype is not None:
        if dtype not in ELEMENT_TYPES:
            raise ValueError(f"dtype must be one of {ELEMENT_TYPES}, got {dtype!r}")
        expected = "uint16" if dtype == "bfloat16" else dtype
        if str(array.dtype) not in (expected, "bfloat16", dtype):
            raise TypeError(f"dtype={dtype!r} needs a {expected} array, got {array.dtype}")
        return dtype
    name = str(array.dtype)
    if name in ELEMENT_TYPES:
        return name
    if name == "uint16":
        raise TypeError("a uint16 array may hold bfloat16 bits: say so with dtype='bfloat16'")
    raise TypeError(f"expected float32, float16 or bfloat16 data, got {array.dtype}")


def host_dtype(dtype: str) -> np.dtype:
    """The NumPy dtype for an element type (ml_dtypes' bfloat16 for 'bfloat16')."""
    if dtype not in ELEMENT_TYPES:
        raise ValueError(f"dtype must be one of {ELEMENT_TYPES}, got {dtype!r}")
    return bfloat16 if dtype == "bfloat16" else np.dtype(dtype)


def to_device(host: np.ndarray) -> Any:
    """Move a host array to the current device (bf16 becomes uint16 bits on the GPU)."""
    if str(host.dtype) == "bfloat16" and backend.has_gpu():
        return backend.xp.asarray(host.view(np.uint16))
    return backend.xp.asarray(host)


def to_float32(array: Any, dtype: str | None = None) -> np.ndarray:
    """A host float32 copy of ``array`` (decoding bf16 bits when ``dtype='bfloat16'``)."""
    kind = element_type(array, dtype)
    host = backend.to_numpy(array)
    if kind == "bfloat16" and host.dtype == np.uint16:
        host = host.view(bfloat16)
    return host.astype(np.float32)


def random_normal(shape: tuple[int, ...], dtype: str, rng: np.random.Generator, scale: float = 1.0) -> Any:
    """Normally distributed values rounded to ``dtype``, on the current device (never zeros)."""
    return to_device((rng.standard_normal(shape, dtype=np.float32) * scale).astype(host_dtype(dtype)))


def empty(shape: tuple[int, ...], dtype: str) -> Any:
    """An uninitialised device array for ``dtype`` elements (uint16 storage for bf16 on the GPU)."""
    storage = np.uint16 if dtype == "bfloat16" and backend.has_gpu() else host_dtype(dtype)
    return backend.xp.empty(shape, dtype=storage)


# ---- arithmetic in float32 for types the array library lacks ------------------------------------------------
# CuPy has no bfloat16: on a GPU bf16 values are uint16 bits, and uint16 arithmetic would add the bits as
# integers. Elementwise steps therefore widen to float32, compute, and round back once.


def widen(array: Any, dtype: str) -> Any:
    """``array``'s values as float32 on its device (bf16 bits are the top half of a float32: a shift)."""
    if str(array.dtype) == "uint16":
        element_type(array, dtype)  # says what is wrong unless dtype declares the bits bfloat16
        xp = backend.xp
        return (array.astype(xp.uint32) << 16).view(xp.float32)
    return array.astype(np.float32, copy=False)  # float32 already: the array itself (a weight is large), not a copy


def narrow(values: Any, dtype: str) -> Any:
    """float32 ``values`` rounded to ``dtype`` in the device's storage (round to nearest, ties to even)."""
    if dtype == "bfloat16" and backend.has_gpu():
        return round_to_bfloat16_bits(values)
    return values.astype(host_dtype(dtype))


def round_to_bfloat16_bits(values: Any) -> Any:
    """The bf16 bits (uint16) nearest to float32 ``values``, ties to even: add half an ulp of the kept part
    (0x7FFF, plus 1 when the last kept bit is odd) and drop the low 16 bits. NaNs are not expected here."""
    bits = values.view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
