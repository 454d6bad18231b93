"""Nsight Compute profiles of the chapters' kernels: what each one keeps busy, and what its warps wait for.

A time says how fast a kernel ran; a profile says why. Nsight Compute, NVIDIA's kernel profiler, replays a kernel
several times and reads the GPU's hardware counters on each pass. Its command line, ``ncu``, runs a small program,
``course_lib.bench.profile_target``, that launches each GEMM step of chapter 03 once (4096^3, bf16) and paged
decode v1 and v2 of chapter 04 once (batch 64 x context 4096), and writes down what it launched, in order. ncu's
report is read back as CSV (``--page raw``: a row of metric names, a row of their units, then one row per kernel
launch) and joined to that list, launch by launch.

What is kept for each kernel (the metrics are listed once, below, with what each means): its time under the
profiler, SM and DRAM throughput as a percentage of their peaks, achieved occupancy, and the warp stall reasons:
for each instruction a warp issues, the cycles it spent stalled, split by what it waited for (Nsight Compute's
"warp state statistics", counted over every cycle of the kernel, not sampled). The stalls add up to the warp's
cycles per issued instruction, so a stacked bar of them is that number taken apart.

ncu is always run with ``--clock-control none``: it leaves the GPU's clocks as they are (by default it would lock
them to the base clock while it profiles). Throughputs are percentages of the peak at the clock the GPU ran at;
times under the profiler are for reading one kernel against another, not for quoting as speeds (the benchmark
suites time kernels without a profiler).

GPU only, and only where ncu is installed: ``require_profiler`` says which is missing. Parsing a CSV, building
the records and drawing them work anywhere, so the chapters and the tests run in CPU mode.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from course_lib import backend
from course_lib.bench import plots
from course_lib.bench.results import load_result, provenance

COMMAND = "python -m course_lib.bench profile"
NOT_MEASURED = f"NOT YET MEASURED: run `{COMMAND}` on an NVIDIA GPU with Nsight Compute"
FIGURE_PROMISE = ("The figure will show, for each kernel, the cycles its warps stall per issued instruction, split by "
                  "what they wait for, under a table of its SM and DRAM throughput and achieved occupancy.")
# ncu profiles only these kernels (function names), not CuPy's fills
KERNEL_FILTER = "regex:gemm_|paged_attention|paged_prefill"

# ---- what is measured: every metric in one place ----------------------------------------------------------------
# Nsight Compute's metric names (sm_70 and newer, sm_90 included): <unit>__<counter>.<rollup>. The record's key,
# the metric, and what it says. "pct_of_peak_sustained_elapsed": a percentage of the unit's peak over the kernel's
# whole duration; "active" instead of "elapsed": over the cycles the SM had work.
FIGURES = {
    "duration_us": ("gpu__time_duration.sum",
                    "the kernel's time under the profiler, start to end (microseconds)"),
    "sm_throughput_pct": ("sm__throughput.avg.pct_of_peak_sustained_elapsed",
                          "SM throughput: the busiest of the SM's units (issue, math pipes, shared memory, ...) "
                          "as % of its peak, Nsight Compute's 'Compute (SM) Throughput'"),
    "dram_throughput_pct": ("dram__throughput.avg.pct_of_peak_sustained_elapsed",
                            "DRAM throughput: HBM's busiest part as % of its peak"),
    "achieved_occupancy_pct": ("sm__warps_active.avg.pct_of_peak_sustained_active",
                               "achieved occupancy: warps resident on an SM, on average over its active cycles, "
                               "as % of the most it can hold (64 on an H100)"),
    "warp_cycles_per_issue": ("smsp__average_warp_latency_per_inst_issued.ratio",
                              "cycles between two instructions issued by one warp: the sum of the stalls below"),
}
# Warp stall reasons: smsp__average_warps_issue_stalled_<reason>_per_issue_active.ratio is the number of warps
# stalled for <reason> per cycle in which the scheduler issued: per issued instruction, the cycles a warp spent
# stalled for it (Nsight Compute's "Warp State Statistics" section and its Kernel Profiling Guide's stall reasons).
STALL_METRIC = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
STALL_REASONS = {  # reason: what the warp waits for
    "long_scoreboard": "data from global or local memory (an L1TEX load: the wait on DRAM or L2)",
    "short_scoreboard": "data from shared memory or a special math unit (MIO: exp, rsqrt, ...)",
    "barrier": "the other warps of its block, at a barrier (__syncthreads)",
    "membar": "a memory fence",
    "wait": "a fixed latency: the result of an earlier arithmetic instruction",
    "math_pipe_throttle": "a free math pipeline (FMA, tensor core, ...): the pipe it needs is busy",
    "mio_throttle": "room in the MIO queue (shared memory, special math, ...)",
    "lg_throttle": "room in the local/global memory queue: too many loads and stores already in flight",
    "tex_throttle": "room in the texture unit's queue",
    "dispatch_stall": "the dispatcher, which could not send a chosen instruction on",
    "drain": "its stores to drain before it exits",
    "imc_miss": "the immediate constant cache (a miss)",
    "branch_resolving": "a branch target to be computed",
    "no_instruction": "an instruction to be fetched (an instruction cache miss, or just after a branch)",
    "sleeping": "nothing: it sleeps (nanosleep) or all its threads are blocked",
    "misc": "something else (miscellaneous)",
    "gmma": "warpgroup MMA (wgmma, Hopper only) resources",
    "not_selected": "nothing: it was ready, and the scheduler issued another warp's instruction",
    "selected": "nothing: it issued (one cycle per issued instruction)",
}
OPTIONAL_METRICS = (STALL_METRIC.format("gmma"),)  # dropped first if an ncu or a GPU does not know them


def stall_metric(reason: str) -> str:
    return STALL_METRIC.format(reason)


def metric_names() -> list[str]:
    """Every metric the profile collects, in the order of ``FIGURES`` then ``STALL_REASONS``."""
    return [metric for metric, _ in FIGURES.values()] + [stall_metric(reason) for reason in STALL_REASONS]


# ---- running ncu -------------------------------------------------------------------------------------------------


def find_ncu() -> str | None:
    """Path of Nsight Compute's command line: ``$NCU``, ``ncu`` on PATH, or the CUDA toolkit's copy; None if none."""
    for candidate in (os.environ.get("NCU"), shutil.which("ncu"), "/usr/local/cuda/bin/ncu"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def require_profiler() -> str:
    """The path of ``ncu``, or a RuntimeError that says what is missing: a GPU, or Nsight Compute."""
    if not backend.has_gpu():
        raise RuntimeError(f"an Nsight Compute profile reads a GPU's hardware counters, and there is no GPU here "
                           f"({backend.mode_text()}). In CPU mode, read a recorded profile: profile_figure() draws "
                           "course_lib/results/<card>/profile.json where one exists.")
    ncu = find_ncu()
    if ncu is None:
        raise RuntimeError("Nsight Compute's command line, ncu, was not found (not in $NCU, not on PATH, not in "
                           "/usr/local/cuda/bin). It comes with the CUDA toolkit, or alone from NVIDIA's site: install "
                           "it, then put its folder on PATH or set NCU=/path/to/ncu.")
    return ncu


def profile_command(ncu: str, metrics: Sequence[str], report: Path, manifest: Path, quick: bool = False) -> list[str]:
    """ncu profiling the target program: the chosen metrics, our kernels only, the GPU's clocks left alone."""
    target = [sys.executable, "-m", "course_lib.bench.profile_target", "--manifest", str(manifest)]
    return [ncu, "--clock-control", "none", "--metrics", ",".join(metrics), "--kernel-name-base", "function",
            "--kernel-name", KERNEL_FILTER, "--export", str(report), "--force-overwrite",
            *target, *(["--quick"] if quick else [])]


def export_command(ncu: str, report: Path) -> list[str]:
    """ncu printing a saved report as CSV: one row per kernel launch, one column per metric, units in base units."""
    return [ncu, "--import", str(report), "--csv", "--page", "raw", "--print-units", "base"]


def run_profile(quick: bool = False,
                run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> dict[str, Any]:
    """Profile the target program under ncu; return ``{"kernels": [...], "launches": [...], "dropped": {...}}``.

    ``kernels`` are ``kernel_records``' records. A metric this ncu or GPU does not know is dropped, once, and named
    in ``dropped`` with why; anything else that fails raises a RuntimeError with the end of ncu's output.
    """
    ncu = require_profiler()
    metrics, dropped = metric_names(), {}
    with tempfile.TemporaryDirectory(prefix="course-profile-") as folder:
        report, manifest = Path(folder) / "profile", Path(folder) / "launches.json"
        for attempt in range(2):
            done = run(profile_command(ncu, metrics, report, manifest, quick), capture_output=True, text=True)
            output = f"{done.stdout}\n{done.stderr}"
            if done.returncode == 0:
                break
            unknown = set() if attempt or "ERR_NVGPUCTRPERM" in output else retry_without(output, metrics)
            if not unknown:
                raise RuntimeError(failure_message(done.returncode, output))
            dropped.update({metric: "not collected: this ncu or GPU does not offer it" for metric in sorted(unknown)})
            metrics = [metric for metric in metrics if metric not in unknown]
        exported = run(export_command(ncu, report.with_suffix(".ncu-rep")), capture_output=True, text=True)
        if exported.returncode != 0:
            raise RuntimeError(failure_message(exported.returncode, f"{exported.stdout}\n{exported.stderr}"))
        launches = json.loads(manifest.read_text())
    return {"kernels": kernel_records(parse_raw_csv(exported.stdout), launches), "launches": launches,
            "dropped": dropped}


def retry_without(output: str, metrics: Sequence[str]) -> set[str]:
    """The metrics to drop after a failed run: those ncu's error or warning lines name (by full name or by base
    name, before the first dot), or, if they name none, the optional ones."""
    flagged = [line for line in output.splitlines() if "==ERROR==" in line or "==WARNING==" in line]
    named = {metric for metric in metrics for line in flagged if metric.split(".")[0] in line}
    return named or set(OPTIONAL_METRICS) & set(metrics)


def failure_message(returncode: int, output: str) -> str:
    """Why ncu failed, with the end of what it printed; the counters' permission error explained."""
    tail = "\n".join(output.strip().splitlines()[-15:])
    if "ERR_NVGPUCTRPERM" in output:
        return ("Nsight Compute may not read this GPU's performance counters (ERR_NVGPUCTRPERM): by default only "
                "administrators may. Run as one, or have the driver loaded with NVreg_RestrictProfilingToAdminUsers=0 "
                f"(NVIDIA's 'ERR_NVGPUCTRPERM' page explains both).\n{tail}")
    return f"ncu exited with status {returncode}; the end of its output:\n{tail}"


# ---- reading ncu's CSV --------------------------------------------------------------------------------------------


def parse_raw_csv(text: str) -> list[dict[str, Any]]:
    """ncu's ``--csv --page raw`` output as one dict per kernel launch, in launch order.

    The CSV has a header row (``"ID","Process ID",...,"Kernel Name",...`` then one column per metric), a row of
    units under it, and a row per launch. Lines before the header (ncu's ``==PROF==`` messages) are skipped. Each
    dict: ``id``, ``kernel`` (the name ncu printed), ``block`` and ``grid`` where present, and ``metrics``:
    ``{name: (value or None, unit)}`` for every column whose name has ncu's ``__`` (a metric).
    """
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID",')), None)
    if start is None:
        raise ValueError("not ncu's CSV: no header row starting with \"ID\" (was it printed with --csv --page raw?)")
    header, *rows = csv.reader(lines[start:])
    if "Kernel Name" not in header:
        raise ValueError(f"ncu's CSV header has no 'Kernel Name' column: {header[:8]}")
    units = rows.pop(0) if rows and not rows[0][0].strip().isdigit() else [""] * len(header)
    launches = []
    for row in rows:
        if not row:
            continue
        if len(row) != len(header):
            raise ValueError(f"a row of ncu's CSV has {len(row)} cells for {len(header)} columns: {row[:5]}")
        cells = dict(zip(header, row, strict=True))
        shape = {key: cells[name] for key, name in (("block", "Block Size"), ("grid", "Grid Size")) if name in cells}
        launches.append({
            "id": int(cells["ID"]), "kernel": cells["Kernel Name"], **shape,
            "metrics": {name: (number(value), unit) for name, value, unit in zip(header, row, units, strict=True)
                        if "__" in name},
        })
    return sorted(launches, key=lambda launch: launch["id"])


def number(text: str) -> float | None:
    """A value as ncu prints it (``1,234.5``: thousands separated by commas) as a float; None for ``n/a`` or ``""``."""
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


TIME_UNITS = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6,
              "s": 1e6}


def kernel_records(launches: list[dict[str, Any]], planned: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Join ncu's launches to the target's list of what it launched, in order: one record per profiled kernel.

    ``planned``: the target program's manifest, ``{"group", "label", "function"}`` per launch, or ``"skipped"``
    with why for a step this GPU cannot run (it launches nothing, so it has no row). Each launch's kernel name
    must contain the function the target meant to launch: a profile joined to the wrong launches is refused.
    """
    launched = [entry for entry in planned if not entry.get("skipped")]
    if len(launched) != len(launches):
        raise ValueError(f"ncu profiled {len(launches)} kernel launches, the target made {len(launched)}: "
                         f"{[launch['kernel'][:40] for launch in launches]} against "
                         f"{[entry['function'] for entry in launched]}")
    records = []
    for entry, launch in zip(launched, launches, strict=True):
        if entry["function"] not in launch["kernel"]:
            raise ValueError(f"launch {launch['id']} is {launch['kernel']!r}, but the target launched "
                             f"{entry['function']} ({entry['label']}) there")
        records.append(kernel_record(entry, launch))
    return records


def kernel_record(entry: dict[str, Any], launch: dict[str, Any]) -> dict[str, Any]:
    """One kernel's figures (``FIGURES``' keys; None where ncu gave no value) and its stalls by reason."""
    metrics = launch["metrics"]
    record = {"group": entry["group"], "label": entry["label"], "kernel": launch["kernel"],
              **{key: launch[key] for key in ("block", "grid") if key in launch}}
    for key, (metric, _) in FIGURES.items():
        value, unit = metrics.get(metric, (None, ""))
        if key == "duration_us" and value is not None:
            value *= TIME_UNITS.get(unit, 1e-3)  # --print-units base gives nanoseconds
        record[key] = value
    record["stalls"] = {reason: metrics.get(stall_metric(reason), (None, ""))[0] for reason in STALL_REASONS}
    record["missing"] = [metric for metric in metric_names() if metrics.get(metric, (None, ""))[0] is None]
    return record


# ---- the chapters: a table and stacked bars from a recorded profile ---------------------------------------------


def group_records(result: dict[str, Any], group: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The profiled kernels of ``group`` ("gemm", "decode" or "prefill") in a results file, and a line per skipped
    one."""
    kernels, gaps = [], []
    for measurement in result.get("measurements", []):
        parameters = measurement.get("parameters", {})
        if parameters.get("group") != group:
            continue
        if measurement.get("skipped"):
            gaps.append(f"{parameters.get('label', measurement['label'])}: skipped on the recorded GPU: "
                        f"{measurement['skipped']}")
        else:
            kernels.append(measurement["profile"])
    return kernels, gaps


def top_stall(kernel: dict[str, Any]) -> tuple[str, float] | None:
    """The reason that holds the most stall cycles, other than issuing itself, and its share of all of them."""
    stalls = {reason: value for reason, value in kernel["stalls"].items() if value}
    total = sum(stalls.values())
    waiting = {reason: value for reason, value in stalls.items() if reason != "selected"}
    if not waiting or not total:
        return None
    reason = max(waiting, key=waiting.get)
    return reason, waiting[reason] / total


def profile_table(kernels: Sequence[dict[str, Any]]) -> str:
    """One line per kernel: time under the profiler, SM and DRAM throughput, occupancy, cycles per issue, top stall."""
    def cell(value: float | None, width: int, digits: str = ".1f") -> str:
        return f"{'-':>{width}}" if value is None else f"{value:>{width}{digits}}"

    lines = [f"{'kernel':<16}{'time':>10}{'SM':>6}{'DRAM':>7}{'occupancy':>11}{'cycles per':>12}  most stalled on",
             f"{'':<16}{'(us)':>10}{'%':>6}{'%':>7}{'%':>11}{'issue':>12}  (share of the cycles)"]
    for kernel in kernels:
        top = top_stall(kernel)
        stalled = f"{top[0]} ({top[1]:.0%})" if top else "-"
        lines.append(f"{kernel['label']:<16}{cell(kernel['duration_us'], 10, ',.1f')}"
                     f"{cell(kernel['sm_throughput_pct'], 6)}{cell(kernel['dram_throughput_pct'], 7)}"
                     f"{cell(kernel['achieved_occupancy_pct'], 11)}{cell(kernel['warp_cycles_per_issue'], 12)}"
                     f"  {stalled}")
    return "\n".join(lines)


def plot_stalls(ax: plt.Axes, kernels: Sequence[dict[str, Any]], least_share: float = 0.03) -> list[str]:
    """Stacked bars, one per kernel: the share of its stall cycles that each reason holds, total cycles on top.

    A reason gets its own colour where it holds at least ``least_share`` of some kernel's stall cycles; the others
    are stacked together as "other". Returns the reasons drawn, bottom to top.
    """
    if not kernels:
        raise ValueError("no profiled kernels to draw: a profile's records come from run_profile()")
    stalls = np.array([[kernel["stalls"].get(reason) or 0.0 for reason in STALL_REASONS] for kernel in kernels])
    totals = stalls.sum(axis=1)
    shares = stalls / np.where(totals > 0, totals, 1.0)[:, None]
    shown = [i for i, _ in enumerate(STALL_REASONS) if shares[:, i].max() >= least_share]
    rest = [i for i in range(len(STALL_REASONS)) if i not in shown]
    columns = [(reason, shares[:, i]) for i, reason in enumerate(STALL_REASONS) if i in shown]
    if rest and shares[:, rest].sum() > 0:
        columns.append(("other", shares[:, rest].sum(axis=1)))
    colours = plt.get_cmap("tab20").colors
    positions, bottom = np.arange(len(kernels)), np.zeros(len(kernels))
    for index, (reason, share) in enumerate(columns):
        ax.bar(positions, 100 * share, bottom=100 * bottom, color=colours[index % len(colours)],
               label=reason.replace("_", " "), width=0.7)
        bottom += share
    for x, kernel, total in zip(positions, kernels, totals, strict=True):
        cycles = kernel.get("warp_cycles_per_issue") or total
        ax.annotate(f"{cycles:.1f}", (x, 100), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=8)
    ax.set_xticks(positions, [kernel["label"] for kernel in kernels], rotation=20, ha="right")
    ax.set_ylabel("share of a warp's cycles per issued instruction (%)")
    ax.set_ylim(0, 110)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), title="stalled on", title_fontsize=8)
    return [reason for reason, _ in columns]


def profile_figure(group: str, title: str, result: dict[str, Any] | None = None) -> plt.Figure | None:
    """What a chapter shows: the recorded profile of ``group`` as a table and stacked bars, labelled with its card
    and date; or, until one is recorded, the NOT YET MEASURED line and what the figure will show. ``result``: a
    results dict (default: the recorded ``profile.json``)."""
    if result is None:
        try:
            result = load_result("profile")
        except FileNotFoundError:
            print(NOT_MEASURED)
            print(wrap(FIGURE_PROMISE))
            return None
    kernels, gaps = group_records(result, group)
    source = f"recorded: {provenance(result)}, Nsight Compute with --clock-control none"
    shapes = sorted({m["parameters"]["shape"] for m in result.get("measurements", [])
                     if m.get("parameters", {}).get("group") == group and "shape" in m["parameters"]})
    print(wrap(f"Nsight Compute profile, {source}"))
    print(wrap(f"each kernel launched once on {' / '.join(shapes) or 'the recorded shape'}", indent="  "))
    for gap in gaps:
        print(wrap(gap, indent="  "))
    if not kernels:
        print(f"  no {group} kernels in this profile")
        return None
    print(profile_table(kernels))
    fig, ax = plots.figure(title, width=9, height=4.5)
    ax.grid(False)
    plot_stalls(ax, kernels)
    ax.set_title(f"{title}\n(number on top: a warp's cycles per issued instruction)", fontsize=10)
    plots.caption(fig, source)
    return fig


def wrap(text: str, indent: str = "") -> str:
    """``text`` in lines of at most ``backend.OUTPUT_COLUMNS``, the width of a chapter's output box."""
    return textwrap.fill(text, backend.OUTPUT_COLUMNS, initial_indent=indent, subsequent_indent=indent + "  ")


def slug(label: str) -> str:
    """``v2 merge`` -> ``v2_merge``: a label as a key of a headline."""
    return re.sub(r"\W+", "_", label).strip("_")

