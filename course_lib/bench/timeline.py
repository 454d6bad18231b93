"""Kernel timelines: when the host launched each kernel and when the GPU ran it, as plain records.

A wall-clock time says how long a step took, not why. A timeline says why: if the GPU lane has gaps while
the host lane is busy launching, the host is the bottleneck; if the GPU runs kernel after kernel while the
host waits, the GPU is. CUPTI, NVIDIA's profiling interface, records both lanes with the GPU's clock: every
launch call the host made (CUDA runtime and driver API calls) and every kernel the GPU ran, replayed graph
nodes included.

``record_timeline(run)`` calls ``run`` under CUPTI and returns records
``{"lane": "host" | "gpu", "name": str, "start_us": float, "end_us": float}``, times from the first record.
It reads CUPTI through ``cupti-python`` where it is installed, else through PyTorch's profiler (which reads
CUPTI too, and is what the course's GPU node has). CUDA events cannot replace them: events around a callable
time the whole call, not each of its kernels. ``plot_timeline`` draws records from either source, or from
the capture model of ``course_lib.labs.graph_capture``, which writes the same records.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import matplotlib.pyplot as plt

from course_lib import backend

LANES = ("gpu", "host")  # bottom to top
LANE_COLOURS = {"host": "tab:blue", "gpu": "tab:orange"}
HOST_CALLS = ("Launch", "Memcpy")  # the API calls a host lane shows: launches (graph launches too) and copies


def record_timeline(run: Callable[[], Any], calls: int = 1) -> list[dict[str, Any]]:
    """Host launch and GPU kernel intervals of ``calls`` calls of ``run`` (after one untimed warm-up call)."""
    if not backend.has_gpu():
        raise RuntimeError(f"a kernel timeline records GPU work, and there is no GPU here ({backend.mode_text()}). "
                           "In CPU mode, plot recorded records, or the capture model's "
                           "(course_lib.labs.graph_capture.Device.timeline).")
    run()
    backend.synchronize()
    try:
        from cupti import cupti  # noqa: F401  (only to choose the reader)
    except ImportError:
        raw = _record_with_torch(run, calls)
    else:
        raw = _record_with_cupti(run, calls)
    return relative(raw)


def relative(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``records`` sorted by start, their times shifted so that the first starts at 0."""
    if not records:
        return []
    origin = min(r["start_us"] for r in records)
    return sorted(({**r, "start_us": r["start_us"] - origin, "end_us": r["end_us"] - origin} for r in records),
                  key=lambda r: (r["start_us"], r["lane"]))


def summary(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Span of the records, and the time each lane was busy (intervals of a lane are not double-counted)."""
    figures = {"span_us": max((r["end_us"] for r in records), default=0.0)
               - min((r["start_us"] for r in records), default=0.0)}
    for lane in LANES:
        busy, reach = 0.0, float("-inf")
        for r in sorted((r for r in records if r["lane"] == lane), key=lambda r: r["start_us"]):
            busy += max(0.0, r["end_us"] - max(r["start_us"], reach))
            reach = max(reach, r["end_us"])
        figures[f"{lane}_busy_us"] = busy
    return figures


def plot_timeline(ax: plt.Axes, records: Sequence[dict[str, Any]], title: str = "") -> None:
    """Draw the host lane above the GPU lane, one bar per record, time in microseconds."""
    if not records:
        raise ValueError("no records to draw: record_timeline() or a model's timeline makes them")
    unknown = {r["lane"] for r in records} - set(LANES)
    if unknown:
        raise ValueError(f"records name lanes {sorted(unknown)}; a timeline has only {LANES}")
    for y, lane in enumerate(LANES):
        bars = [(r["start_us"], max(r["end_us"] - r["start_us"], 0.0)) for r in records if r["lane"] == lane]
        ax.broken_barh(bars, (y - 0.35, 0.7), facecolors=LANE_COLOURS[lane], edgecolor="white", linewidth=0.2)
    ax.set_yticks(range(len(LANES)), ["GPU: kernels", "host: launches"])
    ax.set_ylim(-0.6, len(LANES) - 0.4)
    ax.set_xlabel("time (us)")
    if title:
        ax.set_title(title, fontsize=10)


def _record_with_cupti(run: Callable[[], Any], calls: int) -> list[dict[str, Any]]:
    """CUPTI's activity API through cupti-python: kernel records, and runtime and driver API call records."""
    from cupti import cupti

    activities: list[Any] = []
    cupti.activity_register_callbacks(lambda: (8 << 20, 0), activities.extend)  # 8 MiB buffers, as many records
    kinds = (cupti.ActivityKind.CONCURRENT_KERNEL, cupti.ActivityKind.RUNTIME, cupti.ActivityKind.DRIVER)
    for kind in kinds:
        cupti.activity_enable(kind)
    try:
        for _ in range(calls):
            run()
        backend.synchronize()
    finally:
        cupti.activity_flush_all(1)
        for kind in kinds:
            cupti.activity_disable(kind)
    domains = {cupti.ActivityKind.RUNTIME: cupti.CallbackDomain.RUNTIME_API,
               cupti.ActivityKind.DRIVER: cupti.CallbackDomain.DRIVER_API}
    records = []
    for activity in activities:
        if activity.kind == cupti.ActivityKind.CONCURRENT_KERNEL:
            records.append(_record("gpu", activity.name, activity.start / 1e3, activity.end / 1e3))
        elif activity.kind in domains:
            name = cupti.get_callback_name(domains[activity.kind], activity.cbid)
            if any(call in name for call in HOST_CALLS):
                records.append(_record("host", name, activity.start / 1e3, activity.end / 1e3))
    return records


def _record_with_torch(run: Callable[[], Any], calls: int) -> list[dict[str, Any]]:
    """The same records through PyTorch's profiler, which reads CUPTI for its CUDA runtime, driver and kernel events."""
    try:
        from torch.profiler import ProfilerActivity, profile
    except ImportError as missing:
        raise RuntimeError("a kernel timeline reads CUPTI through cupti-python or PyTorch's profiler, and neither "
                           "is installed: pip install cupti-python") from missing
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        for _ in range(calls):
            run()
        backend.synchronize()
    records = []
    for event in profiler.events():
        lane = "gpu" if event.device_type.name == "CUDA" else "host"
        if lane == "gpu" or any(call in event.name for call in HOST_CALLS):
            records.append(_record(lane, event.name, event.time_range.start, event.time_range.end))
    return records


def _record(lane: str, name: str, start_us: float, end_us: float) -> dict[str, Any]:
    return {"lane": lane, "name": str(name), "start_us": float(start_us), "end_us": float(end_us)}
