"""Chapter 01's small kernels, timed: launch configurations of vector add, and tree vs shuffle sums.

Vector add moves 12 bytes an element (two 4-byte reads, one write); a sum reads 4. Both are set
against a device-to-device copy of the same array in the same run. Times are CUDA-graph replays.
In CPU mode the suite times NumPy's ``a + b`` and ``sum``: a smoke test, never shown as GPU figures.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from course_lib import backend
from course_lib.bench.baselines import copy_bandwidth
from course_lib.bench.roofline import achieved_gbps
from course_lib.bench.runner import Step, measurement
from course_lib.bench.timing import time_call, time_graph
from course_lib.kernels import basics

DESCRIPTION = "vector add launch configurations and tree vs shuffle sums, against copy bandwidth"
ELEMENTS = {"gpu": 2**26 + 17, "cpu": 2**20 + 17}  # float32: 256 MiB per array on a GPU
BLOCKS_PER_SM = (1, 4, 32)
PARAMETERS = {"elements": ELEMENTS, "blocks_per_sm": list(BLOCKS_PER_SM), "threads": basics.THREADS}


def steps(quick: bool) -> list[Step]:
    n = ELEMENTS[backend.DECISION.mode]
    launches = {"one thread per element": None} | {f"grid-stride, {k} blocks per SM": k for k in BLOCKS_PER_SM}
    measured = [Step("copy", lambda: copy_bandwidth(4 * n))]
    measured += [Step(label, lambda label=label, k=k: vector_add(n, label, k)) for label, k in launches.items()]
    measured += [Step(name, lambda name=name: block_sum(n, name)) for name in ("tree_sum", "shuffle_sum")]
    return measured if backend.has_gpu() else measured[:2] + measured[-2:-1]


def _vectors(n: int, count: int) -> list[Any]:
    rng = np.random.default_rng()
    return [backend.xp.asarray(rng.standard_normal(n, dtype=np.float32)) for _ in range(count)]


def _timed(launch: Any) -> Any:
    return time_graph(launch, calls=10) if backend.has_gpu() else time_call(launch, repeats=10)


def vector_add(n: int, label: str, blocks_per_sm: int | None) -> dict[str, Any]:
    """Check, then time one launch configuration of vector add (CUDA C on a GPU, NumPy on CPU)."""
    a, b, out = _vectors(n, 3)
    if not backend.has_gpu():
        def launch() -> Any:
            return np.add(a, b, out=out)
    elif blocks_per_sm is None:
        def launch() -> Any:
            return basics.vector_add(a, b, out, implementation="cuda_c")
    else:
        blocks = basics.default_blocks(blocks_per_sm)

        def launch() -> Any:
            return basics.vector_add_grid_stride(a, b, out, implementation="cuda_c", blocks=blocks)
    launch()
    error = float(np.abs(backend.to_numpy(out) - basics.vector_add_reference(a, b)).max())
    if not error < 1e-5:
        raise RuntimeError(f"{label}: wrong result, max |error| {error:.3g}")
    timing = _timed(launch)
    params = {"elements": n, "blocks_per_sm": blocks_per_sm, "bytes": 3 * a.nbytes}
    return measurement(label, timing, params, gbps=achieved_gbps(3 * a.nbytes, timing.median_s))


def block_sum(n: int, name: str) -> dict[str, Any]:
    """Check, then time a float64-accumulating sum (CUDA C on a GPU, NumPy on CPU)."""
    (x,) = _vectors(n, 1)
    total = backend.xp.empty(1, dtype=np.float64)
    if not backend.has_gpu():
        def launch() -> Any:
            total[0] = np.sum(x, dtype=np.float64)
    elif name == "tree_sum":
        def launch() -> Any:
            return basics.tree_sum(x, total, implementation="cuda_c")
    else:
        def launch() -> Any:
            return basics.shuffle_sum(x, total)
    launch()
    expected = basics.sum_reference(x)
    error = abs(float(backend.to_numpy(total)[0]) - expected)
    if not error <= 1e-9 * float(np.abs(backend.to_numpy(x)).astype(np.float64).sum()):
        raise RuntimeError(f"{name}: wrong sum {float(backend.to_numpy(total)[0])!r}, expected {expected!r}")
    timing = _timed(launch)
    return measurement(name, timing, {"elements": n, "bytes": x.nbytes}, gbps=achieved_gbps(x.nbytes, timing.median_s))


def headline(measurements: list[dict[str, Any]]) -> dict[str, float]:
    gbps = {m["label"]: m["derived"]["gbps"] for m in measurements}
    figures = {"copy_gbps": gbps["copy"], "vector_add_gbps": gbps["one thread per element"]}
    if "shuffle_sum" in gbps:
        figures.update(tree_sum_vs_copy=gbps["tree_sum"] / gbps["copy"],
                       shuffle_sum_vs_copy=gbps["shuffle_sum"] / gbps["copy"])
    return figures
