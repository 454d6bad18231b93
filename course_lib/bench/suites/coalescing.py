"""Coalescing: the bandwidth of the same copy when a warp's reads lie 1, 2, 4, ... 64 floats apart.

Each step copies one float32 buffer with ``basics.strided_copy``: every element is read once and
written once at every stride, so the useful bytes (read + written) stay ``2 * nbytes`` and only the
read pattern changes. The baseline, a device-to-device copy of the same size, is measured in the
same run. On a GPU the buffer is 1 GiB, twenty times an H100's L2, so every read comes from memory;
both the copy and the strided copies are timed as CUDA-graph replays.
On CPU the same access pattern runs through NumPy (a transposing copy), on a smaller buffer.
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

DESCRIPTION = "bandwidth of a strided copy (strides 1-64) against a device-to-device copy"
STRIDES = (1, 2, 4, 8, 16, 32, 64)
PARAMETERS = {"strides": list(STRIDES), "dtype": "float32"}
BUFFER_BYTES = {  # by mode; a --quick run is a smoke test
    "gpu": {"quick": 128 << 20, "full": 1 << 30},
    "cpu": {"quick": 8 << 20, "full": 64 << 20},
}


def steps(quick: bool) -> list[Step]:
    nbytes = BUFFER_BYTES[backend.DECISION.mode]["quick" if quick else "full"]
    return [Step("copy", lambda: copy_bandwidth(nbytes))] + [
        Step(f"stride {stride}", lambda stride=stride: strided_copy_bandwidth(nbytes, stride)) for stride in STRIDES
    ]


def strided_copy_bandwidth(nbytes: int, stride: int) -> dict[str, Any]:
    """Time the strided copy of an ``nbytes`` float32 buffer; GB/s counts the bytes read + written."""
    xp = backend.xp
    x = xp.random.default_rng(0).random(nbytes // 4, dtype=xp.float32)
    out = xp.empty_like(x)
    if backend.has_gpu():
        timing = time_graph(lambda: _cuda_c_strided_copy(x, stride, out), calls=10, repeats=20)
        implementation = "CUDA C strided_copy (CuPy RawModule), CUDA graph replay"
    else:
        timing = time_call(_numpy_strided_copy, x, stride, out, repeats=20, warmup=3)
        implementation = "NumPy transposing copy"
    if not bool((out.reshape(stride, -1) == x.reshape(-1, stride).T).all()):
        raise RuntimeError(f"the stride-{stride} copy wrote the wrong values")
    parameters = {"bytes": nbytes, "stride": stride, "implementation": implementation}
    return measurement(f"stride {stride}", timing, parameters, gbps=achieved_gbps(2 * nbytes, timing.median_s))


def _cuda_c_strided_copy(x: Any, stride: int, out: Any) -> None:
    basics.strided_copy(x, stride, out, implementation="cuda_c")


def _numpy_strided_copy(x: Any, stride: int, out: Any) -> None:
    """The same reads and writes as the kernel: ``x`` as a ``rows x stride`` matrix, copied transposed."""
    np.copyto(out.reshape(stride, -1), x.reshape(-1, stride).T)


def bandwidth_by_stride(result: dict[str, Any]) -> tuple[list[int], list[float], float]:
    """The strides, their GB/s and the copy's GB/s, read from a ``coalescing`` result."""
    by_label = {m["label"]: m for m in result["measurements"]}
    strides = [m["parameters"]["stride"] for m in result["measurements"] if m["label"].startswith("stride ")]
    gbps = [by_label[f"stride {stride}"]["derived"]["gbps"] for stride in strides]
    return strides, gbps, by_label["copy"]["derived"]["gbps"]


def headline(measurements: list[dict[str, Any]]) -> dict[str, float]:
    strides, gbps, copy_gbps = bandwidth_by_stride({"measurements": measurements})
    ratio = {stride: value / copy_gbps for stride, value in zip(strides, gbps, strict=True)}
    return {"stride1_vs_copy": ratio[1], "stride32_vs_copy": ratio[32]}
