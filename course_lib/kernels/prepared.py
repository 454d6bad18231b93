"""A kernel call checked once and launched many times: how an engine keeps host copies off its hot path.

Checking that every block-table entry or cache slot lies inside its buffer means reading the index
arrays on the host: a device-to-host copy, which waits for the GPU. An engine step reads the same
tables in every layer, each layer with its own caches and activations, and a CUDA graph cannot
capture such a copy at all. So the check runs once, when the step is prepared; each launch then only
compares the arrays it is handed with the layouts that were checked (shape, element type, contiguity:
no copy), and the index arrays themselves cannot be swapped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


def layout(array: Any) -> tuple[Any, ...]:
    """What a launch relies on besides the values: the array's library, shape, element type, contiguity."""
    return type(array).__module__.split(".")[0], tuple(array.shape), str(array.dtype), bool(array.flags.c_contiguous)


class PreparedStep:
    """``launch(arrays)`` with its inputs already checked; call it with other arrays of the same layouts.

    ``arrays`` are the checked arrays by name; only those named in ``swappable`` (data, never indices)
    may be replaced by a call. A call returns what ``launch`` returns.
    """

    def __init__(self, arrays: dict[str, Any], swappable: Iterable[str], launch: Callable[[dict[str, Any]], Any]):
        self._arrays = dict(arrays)
        self._swappable = {name: layout(arrays[name]) for name in swappable}
        self._launch = launch

    def __call__(self, **arrays: Any) -> Any:
        bound = dict(self._arrays)
        for name, array in arrays.items():
            if name not in self._swappable:
                raise TypeError(f"{name!r} cannot be swapped in this step; it takes new {', '.join(self._swappable)} "
                                "(index arrays were checked when the step was prepared: prepare a new step)")
            if layout(array) != self._swappable[name]:
                raise ValueError(f"{name} must keep the layout the step was checked with, {self._swappable[name]}, "
                                 f"got {layout(array)}")
            bound[name] = array
        return self._launch(bound)
