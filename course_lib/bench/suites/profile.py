"""Nsight Compute profiles of the GEMM steps (chapter 03), the paged decode kernels (chapter 04) and the prefill
kernel (chapter 04b).

One ncu run (``course_lib.bench.nsight.run_profile``) profiles every kernel of ``course_lib.bench.profile_target``
once: each GEMM step at 4096^3 bf16, paged decode v1 and v2 (partitions and merge) at batch 64 x context 4096, and
paged prefill on one 4096-token prompt.
Each kernel is one measurement: its time under the profiler as the timing (clock ``ncu``, one sample: a profiler's
time, not a benchmark's), SM and DRAM throughput, achieved occupancy and cycles per issued instruction as derived
figures, and ``profile``, its whole record with the stalls by reason, which the chapters draw. A step this GPU
cannot run is recorded as skipped, with why. GPU only, and only where ncu is installed.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from course_lib.bench import nsight
from course_lib.bench.profile_target import DECODE_SHAPE, GEMM_SIZE, planned_launches
from course_lib.bench.runner import Step, measurement
from course_lib.bench.suites.gemm import skipped
from course_lib.bench.timing import Timing

DESCRIPTION = ("profile: Nsight Compute throughputs, occupancy and warp stall reasons of the GEMM steps, paged decode "
               "and paged prefill")
PARAMETERS = {"profiler": "Nsight Compute (ncu --clock-control none --page raw)", "gemm_size": GEMM_SIZE,
              "decode_batch_context": list(DECODE_SHAPE), "metrics": nsight.metric_names(),
              "kernel_filter": nsight.KERNEL_FILTER}
HEADLINE_FIGURE = {"gemm": "sm_throughput_pct", "decode": "dram_throughput_pct",  # what each group is bound by
                   "prefill": "sm_throughput_pct"}


def steps(quick: bool) -> list[Step]:
    nsight.require_profiler()  # no GPU or no ncu: a RuntimeError that says which
    return [Step(f"ncu {entry['group']} {entry['label']}", functools.partial(measure_kernel, entry["label"], quick))
            for entry in planned_launches(quick)]


@functools.cache
def profiled(quick: bool) -> dict[str, Any]:
    """The one ncu run every step reads from."""
    return nsight.run_profile(quick)


def measure_kernel(label: str, quick: bool) -> dict[str, Any]:
    """The profiled record of the kernel ``label`` (a GEMM step, "v1", "v2", "v2 merge" or "prefill") as a
    measurement."""
    run = profiled(quick)
    entry = next(entry for entry in run["launches"] if entry["label"] == label)
    parameters = {"group": entry["group"], "label": label, "function": entry["function"], "shape": entry["shape"],
                  "dropped_metrics": run["dropped"]}
    if entry.get("skipped"):
        return skipped(f"ncu {label}", parameters, entry["skipped"])
    record = next(kernel for kernel in run["kernels"] if kernel["label"] == label)
    seconds = (record["duration_us"] or 0.0) * 1e-6
    derived = {key: record[key] for key in nsight.FIGURES if key != "duration_us" and record[key] is not None}
    result = measurement(f"ncu {label}", Timing.from_samples(np.array([seconds]), "ncu"), parameters, **derived)
    result["profile"] = record
    return result


def headline(measurements: list[dict[str, Any]]) -> dict[str, float]:
    """SM throughput (%) of each GEMM step and of the prefill kernel, DRAM throughput (%) of each decode kernel."""
    figures = {}
    for m in measurements:
        group = m["parameters"]["group"]
        key = HEADLINE_FIGURE[group]
        if not m.get("skipped") and key in m["derived"]:
            figures[f"{nsight.slug(m['parameters']['label'])}_{key}"] = m["derived"][key]
    return figures
