"""Timing GPU and CPU work honestly: warm up first, repeat, report the median and the spread.

GPU work is asynchronous, so a host clock around a launch measures only the launch. On GPU this
uses CUDA events through ``cupyx.profiler.benchmark``; on CPU, ``time.perf_counter``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from course_lib import backend


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median and the spread of ``repeats`` timed calls."""

    median_s: float
    p10_s: float
    p90_s: float
    min_s: float
    max_s: float
    repeats: int
    clock: str  # "cuda-events" or "perf_counter"

    @classmethod
    def from_samples(cls, seconds: np.ndarray, clock: str) -> Timing:
        p10, median, p90 = np.percentile(seconds, [10, 50, 90])
        return cls(float(median), float(p10), float(p90), float(seconds.min()), float(seconds.max()),
                   len(seconds), clock)

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: how much to trust a difference between two timings."""
        return (self.p90_s - self.p10_s) / self.median_s if self.median_s else float("inf")

    def asdict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        ms = 1e3
        return f"{self.median_s * ms:.4g} ms (p10-p90 {self.p10_s * ms:.4g}-{self.p90_s * ms:.4g} ms, n={self.repeats})"


def time_call(fn: Callable[..., Any], *args: Any, repeats: int = 20, warmup: int = 3) -> Timing:
    """Time ``fn(*args)``: device time with CUDA events in GPU mode, wall time in CPU mode."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    if backend.has_gpu():
        from cupyx.profiler import benchmark

        name = getattr(fn, "__name__", type(fn).__name__)  # any callable: a partial or an LtMatmul has no __name__
        result = benchmark(fn, args, n_repeat=repeats, n_warmup=warmup, name=name)
        return Timing.from_samples(np.asarray(result.gpu_times[0]), "cuda-events")
    for _ in range(warmup):
        fn(*args)
    samples = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        fn(*args)
        samples[i] = time.perf_counter() - start
    return Timing.from_samples(samples, "perf_counter")


def time_graph(launch: Callable[[], Any], calls: int = 50, repeats: int = 20, warmup: int = 3) -> Timing:
    """GPU time of one ``launch()`` with the host's launch cost taken out (GPU mode only).

    A small kernel runs for a few microseconds, while launching it from Python costs about as
    much; timed one launch at a time, the GPU idles between kernels and the clock measures the host.
    Here ``calls`` launches are captured into a CUDA graph, which the GPU replays back to back: the
    time of a replay over ``calls`` is the kernel's own time. ``launch`` must not allocate memory.
    """
    if not backend.has_gpu():
        raise RuntimeError("time_graph needs a GPU: CUDA graphs replay GPU work")
    cupy = backend.xp
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        launch()  # compile and load outside the capture
        stream.begin_capture()
        for _ in range(calls):
            launch()
        graph = stream.end_capture()
    return _time_replays(lambda: graph.launch(stream), stream, calls, repeats, warmup)


def time_torch_graph(fn: Callable[[], Any], calls: int = 50, repeats: int = 20, warmup: int = 3) -> Timing:
    """:func:`time_graph` for PyTorch code, captured with ``torch.cuda.graph`` (its own memory pool)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    stream = backend.xp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
    return _time_replays(graph.replay, stream, calls, repeats, warmup)


def _time_replays(replay: Callable[[], Any], stream: Any, calls: int, repeats: int, warmup: int) -> Timing:
    """Replay a captured graph ``repeats`` times between CUDA events; seconds per captured call."""
    cupy = backend.xp
    for _ in range(warmup):
        replay()
    samples = np.empty(repeats)
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    for i in range(repeats):
        start.record(stream)
        replay()
        end.record(stream)
        end.synchronize()
        samples[i] = cupy.cuda.get_elapsed_time(start, end) / 1e3 / calls
    return Timing.from_samples(samples, "cuda-graph-replay")
