"""A card's two kinds of ceiling, side by side, and its copy bandwidth against size (chapter 00).

* The **datasheet** peaks (``course_lib.scaling.hardware``) are the true upper bounds: no kernel moves bytes
  faster than the memory's pins carry them, or multiplies faster than the tensor cores' clock allows.
* The **measured** ceilings (``course_lib.bench.roofline.measured_roofline``) are a *practical* roof: what a
  large copy and a large library matmul reached on the card. A kernel can beat them, and the chapters show
  kernels that do, so a fraction of a measured ceiling above 1 is a finding, not an error.

Copy bandwidth is not one number: it depends on the size of the copy, and the recorded runs show it.
:func:`recorded_copies` gathers every copy the results files of one card hold, whichever suite measured it
(the ``copy_sizes`` suite's sweep included), for the chapter's figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np

from course_lib.bench import plots
from course_lib.bench.results import load_result
from course_lib.bench.roofline import CopyBandwidth, Roofline
from course_lib.bench.suites import paged_attention

# Suites whose results may hold kernels faster than the practical roof (GB/s or TFLOP/s figures).
KERNEL_SUITES = ("basics", "coalescing", "norm", "gemm", "paged_attention", "copy_sizes")
# Suites whose results hold device-to-device copies (measurement label "copy" with the bytes of each buffer).
COPY_SUITES = ("env", "basics", "coalescing", "norm", "engine", "copy_sizes")
MIB = 1 << 20


@dataclass(frozen=True)
class CopyPoint:
    """One recorded copy: the size of each buffer, GB/s (read + written), which file, which way it copied."""

    buffer_bytes: int
    gbps: float
    suite: str
    method: str  # "cudaMemcpyAsync" or "copy kernel"


def recorded_copies(card: str) -> list[CopyPoint]:
    """Every copy recorded for ``card`` (a results folder), sorted by size.

    The paged-attention suite records its copies as a figure beside each kernel, not as measurements of their
    own: the size is recomputed with the suite's own arithmetic (half the K and V bytes of the shape, capped).
    """
    points: set[CopyPoint] = set()
    for suite in COPY_SUITES:
        try:
            result = load_result(suite, card)
        except FileNotFoundError:
            continue
        for m in result["measurements"]:
            if m["label"].startswith(("copy", "kernel")) and "bytes" in m["parameters"] and "gbps" in m["derived"]:
                method = "copy kernel" if m["label"].startswith("kernel") else "cudaMemcpyAsync"
                points.add(CopyPoint(m["parameters"]["bytes"], m["derived"]["gbps"], suite, method))
    try:
        paged = load_result("paged_attention", card)
    except FileNotFoundError:
        paged = {"measurements": []}
    for m in paged["measurements"]:
        p = m["parameters"]
        if "copy_gbps" in p:
            kv = min(paged_attention.kv_bytes(p["batch"], p["context"]), paged_attention.COPY_CAP)
            points.add(CopyPoint(kv // 2, p["copy_gbps"], "paged_attention", "cudaMemcpyAsync"))
    return sorted(points, key=lambda point: (point.buffer_bytes, point.suite))


def above_the_roof(card: str, roof: Roofline, datasheet: Roofline | None = None) -> list[dict]:
    """The fastest recorded figure of each suite that beats the practical ``roof``, set against ``datasheet`` too.

    Bandwidths (``gbps``) are compared with the roofs' bytes a second, matmul rates (``tflops``) with their FLOP a
    second; each suite's fastest figure of each kind is kept if it is above ``roof``. Each row: suite, label,
    value, unit, over_measured, over_datasheet (None without a datasheet).
    """
    found = []
    for suite in KERNEL_SUITES:
        try:
            result = load_result(suite, card)
        except FileNotFoundError:
            continue
        for key, unit, scale, field in (("gbps", "GB/s", 1e9, "peak_bytes_per_s"),
                                        ("tflops", "TFLOP/s", 1e12, "peak_flops_per_s")):
            rated = [m for m in result["measurements"] if key in m.get("derived", {})]
            if not rated:
                continue
            best = max(rated, key=lambda m: m["derived"][key])
            value = best["derived"][key]
            if value * scale > getattr(roof, field):
                found.append({"suite": suite, "label": best["label"], "value": value, "unit": unit,
                              "over_measured": value * scale / getattr(roof, field),
                              "over_datasheet": value * scale / getattr(datasheet, field) if datasheet else None})
    return found


def beyond_table(rows: list[dict]) -> str:
    """:func:`above_the_roof`'s rows as text of at most 100 columns."""
    lines = [f"{'suite':<16}{'measurement':<28}{'figure':>16}{'/ measured':>12}{'/ datasheet':>13}"]
    for row in rows:
        against = f"{row['over_datasheet']:>13.2f}" if row["over_datasheet"] is not None else f"{'-':>13}"
        lines.append(f"{row['suite']:<16}{row['label'][:27]:<28}{row['value']:>8,.0f} {row['unit']:<7}"
                     f"{row['over_measured']:>12.2f}{against}")
    return "\n".join(lines)


def copy_table(points: Sequence[CopyPoint], reference: CopyBandwidth, width: int = 96) -> str:
    """The recorded copies as text, one size a line, each figure with its suite; the reference marked ``*``."""
    lines = [f"{'buffer':>14}  GB/s (read + written), by suite; * = the reference copy"]
    for size in sorted({point.buffer_bytes for point in points}):
        here = [point for point in points if point.buffer_bytes == size]
        cells = [f"{point.gbps:,.0f} {point.suite}{' (kernel)' if point.method == 'copy kernel' else ''}"
                 f"{'*' if point.suite == 'env' and size == reference.buffer_bytes else ''}" for point in here]
        label = f"{size / MIB:,.0f} MiB" if size % MIB == 0 else f"{size:,} B"
        line = f"{label:>14}  " + ", ".join(cells)
        lines.append(line if len(line) <= width else line[: width - 3] + "...")
    return "\n".join(lines)


def copy_findings(points: Sequence[CopyPoint], reference: CopyBandwidth, datasheet_gbps: float | None,
                  l2_bytes: int | None) -> list[str]:
    """What the recorded copies show, computed from them: copies above the datasheet (their bytes did not all
    cross HBM), the spread of copies at the reference size, and the range of copies far larger than the L2."""
    lines = []
    if datasheet_gbps:
        for point in points:
            if point.gbps > datasheet_gbps:
                fits = f"; both buffers, {2 * point.buffer_bytes / MIB:,.0f} MiB, fit in the L2" if (
                    l2_bytes and 2 * point.buffer_bytes <= l2_bytes) else ""
                lines.append(f"above the datasheet's HBM bandwidth: {point.buffer_bytes / MIB:,.0f} MiB at "
                             f"{point.gbps:,.0f} GB/s ({point.suite}){fits}")
    same = [point.gbps for point in points if point.buffer_bytes == reference.buffer_bytes]
    lines.append(f"at the reference size, {reference.buffer_bytes / MIB:,.0f} MiB: {len(same)} copies, "
                 f"{min(same):,.0f} to {max(same):,.0f} GB/s")
    if l2_bytes:
        large = [point for point in points if point.buffer_bytes >= 4 * l2_bytes]
        if large:
            slow, fast = min(large, key=lambda p: p.gbps), max(large, key=lambda p: p.gbps)
            lines.append(f"buffers of 4x the L2 or more: {slow.gbps:,.0f} GB/s ({slow.buffer_bytes:,} B, {slow.suite}) "
                         f"to {fast.gbps:,.0f} GB/s ({fast.buffer_bytes:,} B, {fast.suite})")
    return lines


def draw_copy_sizes(ax: plt.Axes, points: Sequence[CopyPoint], reference: CopyBandwidth,
                    datasheet_gbps: float | None = None, l2_bytes: int | None = None) -> None:
    """Recorded copies against buffer size (one marker per suite), the reference copy, the datasheet and L2."""
    markers = dict(zip(sorted({point.suite for point in points}), "osD^v<>p", strict=False))
    for suite, marker in markers.items():
        for method, filled in (("cudaMemcpyAsync", True), ("copy kernel", False)):
            mine = [point for point in points if point.suite == suite and point.method == method]
            if mine:
                ax.semilogx([point.buffer_bytes / MIB for point in mine], [point.gbps for point in mine], marker,
                            base=2, linestyle="none", fillstyle="full" if filled else "none",
                            label=suite + ("" if filled else " (copy kernel)"))
    ax.axhline(reference.gbps, color="black", linewidth=1, label=f"reference copy ({reference.gbps:,.0f} GB/s)")
    if datasheet_gbps:
        ax.axhline(datasheet_gbps, color="tab:red", linestyle="--", linewidth=1,
                   label=f"datasheet HBM ({datasheet_gbps:,.0f} GB/s)")
    if l2_bytes:
        ax.axvline(l2_bytes / MIB, color="0.5", linestyle=":", linewidth=1, label=f"L2 ({l2_bytes / MIB:.0f} MiB)")
    ax.set_xlabel("size of each buffer (MiB)")
    ax.set_ylabel("GB/s (read + written)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, ncol=2)


def draw_roofs(ax: plt.Axes, measured: Roofline, datasheet: Roofline, points: Sequence[dict] = ()) -> None:
    """The practical (measured) roof with ``points`` (``plots.roofline``'s), and the datasheet roof above it."""
    plots.roofline(ax, measured, points)
    intensities = np.logspace(-2, 4, 200)
    ax.loglog(intensities, [datasheet.attainable_flops_per_s(i) / 1e12 for i in intensities], "--",
              color="tab:red", label=datasheet.label)
    ax.axvline(datasheet.ridge_intensity, color="tab:red", linestyle=":", linewidth=1, alpha=0.5)
    ax.legend(loc="lower right", fontsize=8)


def ceilings_table(measured: Roofline, datasheet: Roofline) -> str:
    """Both roofs as text: bandwidth, matmul rate, ridge point, and measured over datasheet."""
    rows = [("memory (GB/s)", measured.peak_bytes_per_s / 1e9, datasheet.peak_bytes_per_s / 1e9),
            ("bf16 matmul (TFLOP/s)", measured.peak_flops_per_s / 1e12, datasheet.peak_flops_per_s / 1e12),
            ("ridge (FLOP/byte)", measured.ridge_intensity, datasheet.ridge_intensity)]
    lines = [f"{'':<24}{'measured':>10}{'datasheet':>11}{'measured/datasheet':>20}"]
    lines += [f"{name:<24}{mine:>10,.0f}{sheet:>11,.0f}{mine / sheet:>20.2f}" for name, mine, sheet in rows]
    return "\n".join(lines)
