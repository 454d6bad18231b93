"""How close is close enough: tolerances by precision, and the one error measure they apply to.

The course measures error as ||out - ref|| / ||ref|| (DESIGN.md, "References"): one number for the
whole output, so a result is judged by how far it is from the reference as a whole, the way rounding
in a lower precision moves it, rather than by its worst single element.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from course_lib import backend

# Relative tolerances: a few units of rounding for each precision, summed over realistic reductions.
_TOLERANCES = {
    "float64": 1e-12,
    "complex128": 1e-12,
    "float32": 1e-5,
    "complex64": 1e-5,
    "tf32": 5e-4,  # float32 storage, a 10-bit mantissa inside tensor-core math
    "float16": 1e-2,
    "bfloat16": 1e-2,
}
_ALIASES = {"fp64": "float64", "fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def precision_name(dtype: Any) -> str:
    """One spelling for a dtype or precision: np.float32, 'f4' and 'fp32' all give 'float32'.

    'tf32' and 'bfloat16' are accepted as names even where NumPy has no such dtype.
    """
    if isinstance(dtype, str):
        name = _ALIASES.get(dtype.lower(), dtype.lower())
        if name in _TOLERANCES:
            return name
    try:
        return np.dtype(dtype).name
    except TypeError:
        raise TypeError(
            f"unknown dtype {dtype!r}: use a NumPy dtype or one of 'tf32', 'bf16', 'fp16', 'fp32', 'fp64'"
        ) from None


def tolerance_for(dtype: Any) -> float:
    """The relative tolerance ||out - ref|| / ||ref|| for outputs computed in ``dtype``; 0 (exact) for integers."""
    name = precision_name(dtype)
    if name in _TOLERANCES:
        return _TOLERANCES[name]
    if np.dtype(name).kind in "biu":
        return 0.0
    raise TypeError(f"no tolerance is defined for dtype {name}")


def as_host_float64(values: Any) -> np.ndarray:
    """A NumPy float64 (or complex128) copy of ``values``, wherever they live."""
    host = np.asarray(backend.to_numpy(values))
    return host.astype(np.complex128 if host.dtype.kind == "c" else np.float64)


def relative_error(out: Any, ref: Any) -> float:
    """||out - ref|| / ||ref|| in float64 on the host; inf when ``out`` holds a NaN or an inf."""
    out, ref = as_host_float64(out), as_host_float64(ref)
    if out.size != ref.size:
        raise ValueError(f"cannot compare {out.size} values with {ref.size}")
    if not np.isfinite(out).all():
        return math.inf
    difference = float(np.linalg.norm((out - ref).ravel()))
    scale = float(np.linalg.norm(ref.ravel()))
    if scale == 0.0:
        return 0.0 if difference == 0.0 else math.inf
    return difference / scale
