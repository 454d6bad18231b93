"""What a tensor core's input formats cost in accuracy, emulated with NumPy (chapter 02).

A tensor core multiplies small tiles whose inputs are stored in a narrow format (fp16, bf16, tf32,
fp8) and adds the products into fp32 accumulators. The error of such a product against float64
comes almost entirely from rounding the inputs: this module rounds them exactly as the formats do
(round to nearest, ties to even) and accumulates in float32, so the chapter can show each format's
error on a laptop and set it beside the error measured on a GPU.

Formats: float32 (no rounding), tf32 (float32 with 10 mantissa bits), float16, bfloat16, and the two
fp8 formats of Hopper, float8_e4m3 (more precision) and float8_e5m2 (more range).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

FORMATS = ("float32", "tf32", "float16", "bfloat16", "float8_e4m3", "float8_e5m2")
MANTISSA_BITS = {"float32": 23, "tf32": 10, "float16": 10, "bfloat16": 7, "float8_e4m3": 3, "float8_e5m2": 2}
_NUMPY_FORMATS = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}


def round_to(values: np.ndarray, fmt: str) -> np.ndarray:
    """``values`` rounded to ``fmt`` (nearest, ties to even), returned as float32.

    Values beyond a format's range become inf (float16, e5m2) or NaN (e4m3, which has no inf):
    the overflow a kernel would see.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    values = np.asarray(values, dtype=np.float32)
    if fmt == "float32":
        return values.copy()
    if fmt == "tf32":
        return _round_mantissa(values, keep_bits=MANTISSA_BITS["tf32"])
    with np.errstate(over="ignore", invalid="ignore"):
        return values.astype(_NUMPY_FORMATS[fmt]).astype(np.float32)


def _round_mantissa(values: np.ndarray, keep_bits: int) -> np.ndarray:
    """Round float32 ``values`` to ``keep_bits`` mantissa bits, ties to even, by integer arithmetic."""
    drop = 23 - keep_bits
    bits = values.view(np.uint32).astype(np.uint64)
    lowest_kept = (bits >> drop) & 1
    rounded = (bits + ((1 << (drop - 1)) - 1) + lowest_kept) >> drop << drop
    result = rounded.astype(np.uint32).view(np.float32)
    return np.where(np.isfinite(values), result, values)


def emulated_matmul(a: np.ndarray, b: np.ndarray, fmt: str) -> np.ndarray:
    """``a @ b`` as a tensor core computes it: inputs rounded to ``fmt``, sums accumulated in float32."""
    return round_to(a, fmt) @ round_to(b, fmt)


def relative_error(approximate: np.ndarray, exact: np.ndarray) -> float:
    """||approximate - exact|| / ||exact|| in float64; inf if anything overflowed."""
    approximate = np.asarray(approximate, dtype=np.float64)
    if not np.isfinite(approximate).all():
        return float("inf")
    return float(np.linalg.norm(approximate - exact) / np.linalg.norm(exact))


def error_by_format(m: int, n: int, k: int, rng: np.random.Generator, scale: float = 1.0) -> dict[str, float]:
    """Relative error of the emulated product in every format, on fresh normal inputs times ``scale``."""
    a = rng.standard_normal((m, k)).astype(np.float32) * np.float32(scale)
    b = rng.standard_normal((k, n)).astype(np.float32) * np.float32(scale)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    return {fmt: relative_error(emulated_matmul(a, b, fmt), exact) for fmt in FORMATS}
