"""assert_close: compare an output with its reference and, when they differ, say where and why."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from course_lib import backend
from course_lib.check.failure import CheckFailed
from course_lib.check.mistakes import Mistake, hint_for
from course_lib.check.poison import is_poison
from course_lib.check.tolerance import as_host_float64, precision_name, relative_error, tolerance_for


def assert_close(
    out: Any,
    ref: Any,
    dtype: Any = None,
    what: str = "output",
    rtol: float | None = None,
    *,
    mistakes: Sequence[Mistake] = (),
    inputs: Sequence[Any] = (),
) -> None:
    """Raise CheckFailed unless ||out - ref|| / ||ref|| is within the tolerance for ``dtype``.

    ``dtype`` is the precision the output was computed in (default: ``out``'s dtype); when given, the
    output must also be stored in it. ``what`` names the output in messages: "out", or a call such as
    "achieved_gbps(10, 20, 0.5)". ``mistakes`` are tried on ``inputs`` to add a hint to a failure.
    """
    __tracebackhide__ = True
    out = _numeric_host_array(out, what)
    ref = np.asarray(backend.to_numpy(ref))
    _require_same_shape(out, ref, what)
    if dtype is not None:
        _require_dtype(out, dtype, what)
    tolerance = rtol if rtol is not None else tolerance_for(dtype if dtype is not None else out.dtype)
    error = relative_error(out, ref)
    if error <= tolerance and (tolerance > 0 or np.array_equal(out, ref)):
        return
    summary = f"relative error {error:.3g}, tolerance {tolerance:g}"
    if out.ndim == 0:
        message = f"{what} = {out[()]}, expected {ref[()]} ({summary})"
    else:
        message = _describe_array(out, ref, what, tolerance, summary)
    hint = hint_for(out, ref, mistakes, inputs, tolerance)
    if hint:
        message += f"\nHint: {hint}"
    raise CheckFailed(message)


def _numeric_host_array(out: Any, what: str) -> np.ndarray:
    __tracebackhide__ = True
    if out is None:
        raise CheckFailed(f"{what} is None: did you forget to `return` the result?")
    array = np.asarray(backend.to_numpy(out))
    if array.dtype.kind not in "biufc" and array.dtype.name != "bfloat16":
        raise CheckFailed(f"{what} is {out!r:.60} (a {type(out).__name__}), expected numbers")
    return array


def _require_same_shape(out: np.ndarray, ref: np.ndarray, what: str) -> None:
    __tracebackhide__ = True
    if out.shape == ref.shape:
        return
    if ref.ndim == 0:
        raise CheckFailed(f"{what} should be a single number, got an array of shape {out.shape}")
    raise CheckFailed(f"{what} has shape {out.shape}, expected {ref.shape}")


def _require_dtype(out: np.ndarray, dtype: Any, what: str) -> None:
    __tracebackhide__ = True
    expected = precision_name(dtype)
    stored_as = "float32" if expected == "tf32" else expected
    if out.dtype.name != stored_as:
        raise CheckFailed(f"{what} has dtype {out.dtype.name}, expected {stored_as}")


def _describe_array(out: np.ndarray, ref: np.ndarray, what: str, tolerance: float, summary: str) -> str:
    """Name the first wrong element (in row-major order), with both values, and how many are wrong."""
    wrong = _wrong_elements(out, ref, tolerance)
    count = int(wrong.sum())
    if count == 0:  # each element is nearly right, but together they are not: show the worst
        difference = np.abs(as_host_float64(out) - as_host_float64(ref))
        index = np.unravel_index(int(np.argmax(difference)), out.shape)
        return (
            f"{what} is a little off everywhere ({summary}). Largest difference: "
            f"{_element(what, index)} = {out[index]}, expected {ref[index]}"
        )
    index = np.unravel_index(int(np.argmax(wrong)), out.shape)
    if is_poison(out[index]):
        first = f"{_element(what, index)} was never written (it still holds the poison value {out[index]})"
    else:
        first = f"{_element(what, index)} = {out[index]}"
    return (
        f"{what} is wrong at {count} of {out.size} elements ({summary}). "
        f"First wrong element: {first}, expected {ref[index]}"
    )


def _wrong_elements(out: np.ndarray, ref: np.ndarray, tolerance: float) -> np.ndarray:
    """Elementwise |out - ref| > atol + rtol |ref|, with atol scaled to ref's typical size; NaN is wrong."""
    if tolerance == 0:
        return out != ref
    out, ref = as_host_float64(out), as_host_float64(ref)
    typical_size = float(np.sqrt(np.mean(np.abs(ref) ** 2)))
    allowed = tolerance * (typical_size + np.abs(ref))
    return ~(np.abs(out - ref) <= allowed)


def _element(what: str, index: tuple[int, ...]) -> str:
    return f"{what}[{', '.join(str(int(i)) for i in index)}]"
