"""Copy bandwidth against the size of the copy, two ways, in one run (chapter 00).

The course's results files hold copies of many sizes, each measured in a different run for a different
suite. This suite measures the size dependence on its own: at every size from 1 MiB to 4 GiB (each of the
two buffers), a device-to-device ``cudaMemcpyAsync`` (``baselines.copy_bandwidth``, the copy every other
suite uses) and a plain copy kernel (chapter 01's ``strided_copy`` at stride 1: one float a thread),
both timed as CUDA-graph replays, GB/s counting bytes read + written. One more size repeats the ``basics``
suite's copy of 2^26 + 17 floats, a byte count that is not a power of two. Two ways of copying the same
bytes at each size tell apart what depends on the size and what on how the copy is made.

On CPU the suite times NumPy's ``copyto`` only (the copy kernel would run in Numba's simulator), on smaller
sizes: those figures describe the CPU, not a GPU.
"""

from __future__ import annotations

from typing import Any

from course_lib import backend
from course_lib.bench.baselines import copy_bandwidth
from course_lib.bench.roofline import achieved_gbps
from course_lib.bench.runner import Step, measurement
from course_lib.bench.timing import time_graph
from course_lib.kernels import basics

DESCRIPTION = "copy bandwidth against size (1 MiB to 4 GiB): cudaMemcpyAsync and a copy kernel"
MIB = 1 << 20
SIZES = {  # bytes of each buffer, by mode; a --quick run is a smoke test
    "gpu": {"quick": [MIB << k for k in range(0, 7)], "full": [MIB << k for k in range(0, 13)]},  # to 64 MiB | 4 GiB
    "cpu": {"quick": [MIB << k for k in range(0, 4)], "full": [MIB << k for k in range(0, 9)]},  # to 8 | 256 MiB
}
ODD_BYTES = 4 * (2**26 + 17)  # the basics suite's copy: 256 MiB + 68 bytes
PARAMETERS = {"methods": ["cudaMemcpyAsync", "copy kernel"], "odd_bytes": ODD_BYTES, "timing": "CUDA graph replay"}


def steps(quick: bool) -> list[Step]:
    sizes = list(SIZES[backend.DECISION.mode]["quick" if quick else "full"])
    if not quick:
        sizes.append(ODD_BYTES)
    chosen = [Step(f"copy {nbytes:,} B", lambda nbytes=nbytes: copy_bandwidth(nbytes)) for nbytes in sizes]
    if backend.has_gpu():
        chosen += [Step(f"kernel {nbytes:,} B", lambda nbytes=nbytes: kernel_copy_bandwidth(nbytes))
                   for nbytes in sizes]
    return chosen


def kernel_copy_bandwidth(nbytes: int) -> dict[str, Any]:
    """Time a copy kernel (``strided_copy`` at stride 1) on ``nbytes`` of float32; GB/s counts read + written."""
    xp = backend.xp
    source = xp.random.default_rng(0).random(nbytes // 4, dtype=xp.float32)
    target = xp.empty_like(source)
    timing = time_graph(lambda: basics.strided_copy(source, 1, target, implementation="cuda_c"), calls=10, repeats=30)
    if not bool((target == source).all()):
        raise RuntimeError("the copy kernel's target differs from its source")
    how = f"CUDA C strided_copy at stride 1, {basics.THREADS} threads a block, one float a thread, CUDA graph replay"
    return measurement("kernel", timing, {"bytes": nbytes, "how": how}, gbps=achieved_gbps(2 * nbytes, timing.median_s))


def bandwidth_by_size(result: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """``{"copy": [(bytes, GB/s), ...], "kernel": [...]}`` from a ``copy_sizes`` result, sorted by size."""
    by_method: dict[str, list[tuple[int, float]]] = {}
    for m in result["measurements"]:
        by_method.setdefault(m["label"], []).append((m["parameters"]["bytes"], m["derived"]["gbps"]))
    return {method: sorted(points) for method, points in by_method.items()}


def headline(measurements: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest copy and its size, and each method at 256 MiB, 1 GiB and the odd size where measured."""
    figures: dict[str, Any] = {}
    for method, points in bandwidth_by_size({"measurements": measurements}).items():
        nbytes, gbps = max(points, key=lambda point: point[1])
        figures[f"{method}_gbps_max"], figures[f"{method}_max_at_mib"] = gbps, nbytes / MIB
        at = dict(points)
        for name, size in (("256mib", 256 * MIB), ("1gib", 1024 * MIB), ("odd", ODD_BYTES)):
            if size in at:
                figures[f"{method}_gbps_{name}"] = at[size]
    return figures
