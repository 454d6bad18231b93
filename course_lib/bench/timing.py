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

        result = benchmark(fn, args, n_repeat=repeats, n_warmup=warmup)
        return Timing.from_samples(np.asarray(result.gpu_times[0]), "cuda-events")
    for _ in range(warmup):
        fn(*args)
    samples = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        fn(*args)
        samples[i] = time.perf_counter() - start
    return Timing.from_samples(samples, "perf_counter")
