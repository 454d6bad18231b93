"""Poisoned outputs: fill an output with a value no correct kernel writes, so unwritten elements show.

A fresh ``empty`` array often holds zeros or the previous run's answer, so a kernel that skips
elements can look right by luck. NaN (floats) or the most negative integer cannot.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from course_lib import backend
from course_lib.check.failure import CheckFailed


def poison_value(dtype: Any) -> float | int:
    """NaN for floating-point dtypes, the smallest value for signed integers, the largest for unsigned."""
    dtype = np.dtype(dtype)
    if dtype.kind in "fc":
        return float("nan")
    if dtype.kind == "i":
        return int(np.iinfo(dtype).min)
    if dtype.kind == "u":
        return int(np.iinfo(dtype).max)
    raise TypeError(f"no poison value for dtype {dtype}: every value of it is a plausible output")


def poison(shape: int | tuple[int, ...], dtype: Any = np.float32) -> Any:
    """An array of ``backend.xp`` (CuPy or NumPy) filled with the poison value of ``dtype``."""
    return backend.xp.full(shape, poison_value(dtype), dtype=dtype)


def is_poison(values: Any) -> np.ndarray:
    """Host booleans, True where ``values`` still holds the poison value (was never written)."""
    values = np.asarray(backend.to_numpy(values))
    if values.dtype.kind in "fc":
        return np.isnan(values)
    return values == poison_value(values.dtype)


def require_unwritten(padding: Any, what: str, hint: str) -> None:
    """On a GPU nothing stops a write past the end of an array; the poisoned padding after it shows one."""
    __tracebackhide__ = True
    if not is_poison(padding).all():
        raise CheckFailed(f"your kernel wrote past the end of {what}: {hint}")
