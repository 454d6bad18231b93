"""The baselines every ratio in the course is taken against, measured in the same run as the kernel.

Copy bandwidth is a device-to-device ``cudaMemcpy`` (the DMA path the driver tunes for the card),
counting bytes read plus bytes written; on CPU, NumPy's ``copyto``. Library baselines (cuBLAS, SDPA) run
through PyTorch, which must be imported before ``numba.cuda`` (``require_torch``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from course_lib import backend
from course_lib.bench.roofline import achieved_gbps
from course_lib.bench.runner import measurement
from course_lib.bench.timing import time_call, time_graph


def copy_bandwidth(nbytes: int) -> dict[str, Any]:
    """Copy ``nbytes`` of random data between two buffers; GB/s counting read + written bytes."""
    xp = backend.xp
    source = xp.asarray(np.random.default_rng().integers(0, 255, size=nbytes, dtype=np.uint8))
    target = xp.empty_like(source)
    if backend.has_gpu():
        timing = time_graph(lambda: target.data.copy_from_device_async(source.data, nbytes), calls=10, repeats=30)
        how = "cudaMemcpyAsync device to device, CUDA graph replay"
    else:
        timing = time_call(np.copyto, target, source, repeats=20, warmup=3)
        how = "numpy.copyto"
    if not bool((target == source).all()):
        raise RuntimeError("the copy benchmark's target differs from its source")
    return measurement("copy", timing, {"bytes": nbytes, "how": how}, gbps=achieved_gbps(2 * nbytes, timing.median_s))


def require_torch(purpose: str) -> ModuleType:
    """PyTorch, which runs a baseline (cuBLAS, SDPA) for ``purpose``.

    Import it before anything imports ``numba.cuda``: in the other order torch fails to load.
    """
    try:
        import torch
    except ImportError as error:
        raise RuntimeError(f"{purpose} runs through PyTorch: pip install torch") from error
    return torch
