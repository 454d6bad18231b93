"""The figures of the GEMM chapters (02, 03, 03b), drawn from a results file or from figures measured now.

Each function draws one figure and returns it; the chapter shows it. Every figure of measured numbers carries
their source in its caption (``plots.caption``): the card, date and versions of the results file, or the
GPU it was measured on in this run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

from course_lib.bench import Roofline, plots
from course_lib.bench.suites import gemm as gemm_suite
from course_lib.kernels import gemm
from course_lib.labs.gemm_records import (
    CUDA_CORE_STEPS,
    DECODE_BACKENDS,
    DECODE_WEIGHTS,
    GemmResults,
    SpeedFigures,
    percent,
    tflops,
)
from course_lib.labs.gemm_steps import knee, problem_intensity

KIND_COLOURS = {"CUDA cores": "tab:blue", "tensor cores": "tab:green", "library": "0.45"}


def plot_speeds(figures: SpeedFigures, n: int) -> plt.Figure:
    """Bars of TFLOP/s, one per name (CUDA-core steps blue, tensor-core steps green, libraries grey)."""
    fig, ax = plots.figure(f"GEMM, bf16 {n}^3: steps 4-7 and the libraries", width=8, height=3.6)
    positions = np.arange(len(figures.names))[::-1]
    for y, name in zip(positions, figures.names, strict=True):
        if name in figures.tflops:
            colour = "0.5" if name in gemm_suite.LIBRARIES else ("tab:blue" if name in CUDA_CORE_STEPS else "tab:green")
            ax.barh(y, figures.tflops[name], color=colour)
            ax.annotate(f" {figures.tflops[name]:,.0f}", xy=(figures.tflops[name], y), va="center", fontsize=8)
        else:
            ax.text(0, y, f"  {figures.missing[name]}", va="center", fontsize=8, color="0.4")
    ax.set_yticks(positions, [f"{name} (CUDA cores)" if name in CUDA_CORE_STEPS else name for name in figures.names])
    ax.set_xlabel("TFLOP/s (2 n^3 operations / median time)")
    ax.set_xlim(0, 1.15 * max(figures.tflops.values(), default=1))
    plots.caption(fig, figures.source)
    return fig


def draw_tiling(ax: plt.Axes) -> None:
    """A, B and C; one block's tile of C, the strips of A and B it reads, and the slices of one step along K."""
    m, n, k = 8.0, 10.0, 7.0  # drawing units, not a real shape
    bm, bn, bk, tile_row, tile_col, step = 2.0, 2.5, 1.0, 1, 2, 3
    c_x, b_y = k + 1, m + 1  # C sits right of A, B sits above C
    top = m - tile_row * bm  # y of the tile's upper edge (y grows upwards)
    left = c_x + tile_col * bn
    shapes = [  # (x, y, width, height, colour, alpha)
        (0, 0, k, m, "white", 1), (c_x, 0, n, m, "white", 1), (c_x, b_y, n, k, "white", 1),
        (0, top - bm, k, bm, "tab:blue", 0.25), (left, b_y, bn, k, "tab:orange", 0.25),
        (step * bk, top - bm, bk, bm, "tab:blue", 0.8), (left, b_y + k - (step + 1) * bk, bn, bk, "tab:orange", 0.8),
        (left, top - bm, bn, bm, "tab:green", 0.8),
    ]
    for x, y, w, h, colour, alpha in shapes:
        ax.add_patch(Rectangle((x, y), w, h, facecolor=colour, alpha=alpha, edgecolor="black"))
    ax.text(k / 2, -0.6, "A  [M, K]", ha="center")
    ax.text(c_x + n / 2, -0.6, "C  [M, N]", ha="center")
    ax.text(c_x + n + 0.3, b_y + k / 2, "B  [K, N]", va="center")
    ax.annotate(r"$B_M \times B_K$ slice of A", (step * bk + bk / 2, top - bm), (0.3, 1.2),
                arrowprops={"arrowstyle": "->"}, fontsize=9)
    ax.annotate(r"$B_K \times B_N$ slice of B", (left + bn, b_y + k - (step + 0.5) * bk), (c_x + n + 0.3, b_y + 1),
                arrowprops={"arrowstyle": "->"}, fontsize=9)
    ax.annotate(r"$B_M \times B_N$ tile of C (one block)", (left + bn, top - bm / 2), (c_x + n + 0.3, 2),
                arrowprops={"arrowstyle": "->"}, fontsize=9)
    ax.annotate("", (k - 0.2, top + 0.4), (0.2, top + 0.4), arrowprops={"arrowstyle": "->", "color": "tab:blue"})
    ax.text(k / 2, top + 0.6, "steps along K", ha="center", color="tab:blue", fontsize=9)
    ax.annotate("", (left - 0.4, b_y + 0.2), (left - 0.4, b_y + k - 0.2),
                arrowprops={"arrowstyle": "->", "color": "tab:orange"})
    ax.text(left - 0.6, b_y + k / 2, "steps along K", ha="right", va="center", color="tab:orange", fontsize=9)
    ax.set_xlim(-0.5, c_x + n + 6)
    ax.set_ylim(-1.2, b_y + k + 0.5)
    ax.set_aspect("equal")
    ax.axis("off")


def draw_progression(ax: plt.Axes, results: GemmResults, n: int) -> list[str]:
    """TFLOP/s bars (log scale) for every step and library at n^3; returns the rows that hold no figure, with why."""
    cublas = results.square("cuBLAS", n)
    rows = [(f"{i}. {step}", step, "tensor cores" if step in gemm.TENSOR_CORE_STEPS else "CUDA cores")
            for i, step in enumerate(gemm.STEPS, 1)] + [(name, name, "library") for name in gemm_suite.LIBRARIES]
    gaps = []
    for y, (label, name, kind) in enumerate(rows):
        m = results.square(name, n)
        if why := gemm_suite.missing_reason(m):
            gaps.append(f"{label}: {why}")
            ax.text(1.2, y, "skipped" if m else "not measured", va="center", fontsize=7, color="0.4")
            continue
        ax.barh(y, tflops(m), color=KIND_COLOURS[kind])
        compared = name != "cuBLAS" and not gemm_suite.missing_reason(cublas)
        share = f", {percent(tflops(m) / tflops(cublas))} of cuBLAS" if compared else ""
        ax.text(tflops(m), y, f" {tflops(m):,.1f}{share}", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [label for label, *_ in rows])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(1, 1e4)
    ax.set_xlabel("TFLOP/s (log scale)")
    ax.set_title(f"bf16 {n}^3")
    return gaps


def plot_progression(results: GemmResults) -> tuple[plt.Figure, list[str]]:
    """The progression at each square size, largest first, side by side; and every row without a figure."""
    fig, axes = plt.subplots(1, len(gemm_suite.SQUARE_SIZES), figsize=(12, 4.2), layout="constrained")
    gaps = []
    for ax, n in zip(axes, sorted(gemm_suite.SQUARE_SIZES, reverse=True), strict=True):
        gaps += [f"{n}^3, {gap}" for gap in draw_progression(ax, results, n)]
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour) for colour in KIND_COLOURS.values()]
    axes[0].legend(handles, KIND_COLOURS.keys(), fontsize=8, loc="upper right")
    plots.caption(fig, f"recorded: {results.source}")
    return fig, gaps


def plot_steps_on_roofline(roof: Roofline, points: Sequence[dict[str, Any]], fp32_tflops: float,
                           results: GemmResults, roofs_source: str) -> plt.Figure:
    """Each step at its tile intensity and recorded TFLOP/s, under the bf16 roof and the fp32 CUDA-core roof.

    Also drawn: cuBLAS's bf16 rate at the largest cube it was measured on, and the intensity of that cube read
    once (n/3 FLOP/byte), which no tile reaches from HBM alone.
    """
    biggest = max(gemm_suite.SQUARE_SIZES)
    fig, ax = plots.figure("The GEMM steps on the roofline (bf16, measured)", width=8, height=5)
    plots.roofline(ax, roof, points)
    intensities = np.logspace(-2, 4, 200)
    ax.loglog(intensities, np.minimum(fp32_tflops, intensities * roof.peak_bytes_per_s / 1e12), "--",
              color="tab:blue", label="fp32 CUDA cores (cuBLAS fp32)")
    if found := results.largest_measured("cuBLAS"):
        ax.axhline(tflops(found[1]), color="0.5", linestyle=":", label=f"cuBLAS bf16 {found[0]}^3")
    ax.axvline(problem_intensity(biggest, biggest, biggest), color="tab:red", linestyle="-.", linewidth=1,
               label=f"{biggest}^3 read once: n/3 = {problem_intensity(biggest, biggest, biggest):,.0f} FLOP/byte")
    ax.set_xlim(0.1, 1e4)
    ax.set_ylim(0.5, 2e3)
    ax.legend(loc="lower right", fontsize=7)
    plots.caption(fig, f"recorded: {results.source}; roofs: {roofs_source}")
    return fig


def plot_candidates(record: dict[str, Any], source: str) -> plt.Figure:
    """cuBLASLt's candidates for one product, in the heuristic's order, timed with the weights read from HBM."""
    candidates = record["parameters"]["candidates"]
    rows, cols, depth = record["parameters"]["shape"]
    times = [c["timing"]["median_s"] * 1e6 for c in candidates]
    fastest = int(np.argmin(times))
    fig, ax = plots.figure(f"cuBLASLt's candidates for [{rows} x {depth}] @ [{depth} x {cols}] bf16 (measured)",
                           width=8, height=0.4 * len(candidates) + 1.5)
    labels = [f"#{c['heuristic_rank']} id {c['id']}, tile {c['tile']}, stages {c['stages']}, split-K {c['split_k']}"
              for c in candidates]
    ax.barh(range(len(candidates)), times, color=["tab:green" if i == fastest else "0.6" for i in range(len(times))])
    ax.set_yticks(range(len(candidates)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("microseconds per product, weights from HBM (green: the fastest)")
    plots.caption(fig, f"recorded: {source}")
    return fig


def plot_decode(roof: Roofline, results: GemmResults, roofs_source: str) -> plt.Figure:
    """Decode GEMMs: on the roofline (left), and as bytes per second against the copy bandwidth (right).

    Left: the model (hidden 4096 at the roof, M = 1 to 256) and cuBLASLt's recorded points for every weight
    matrix. Right: every decode backend on the widest square weights, against the copy bandwidth, which is
    also the roofline model there when the knee lies beyond the sweep.
    """
    m_sweep = 2 ** np.arange(0, 9)  # 1 ... 256, the model's points
    copy_gbps, ridge = roof.peak_bytes_per_s / 1e9, roof.ridge_intensity
    wide = max(gemm_suite.DECODE_HIDDEN)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    plots.roofline(left, roof)
    model = [problem_intensity(m, 4096, 4096) for m in m_sweep]
    left.loglog(model, [roof.attainable_flops_per_s(i) / 1e12 for i in model], "o", mfc="none", color="0.5",
                label="model: hidden 4096 at the roof")
    for m_label in (1, 16, 256):
        intensity = problem_intensity(m_label, 4096, 4096)
        left.annotate(f"M={m_label}", (intensity, roof.attainable_flops_per_s(intensity) / 1e12),
                      textcoords="offset points", xytext=(-12, 8), fontsize=7)
    for (n, k, label), colour in zip(DECODE_WEIGHTS, ("tab:blue", "tab:orange", "tab:green", "tab:purple"),
                                     strict=True):
        if points := results.decode_series("cuBLASLt", n, k):
            x = [problem_intensity(*m["parameters"]["shape"]) for m in points]
            left.loglog(x, [tflops(m) for m in points], "s-", color=colour, label=f"cuBLASLt, {label}")
    for name, style in zip(DECODE_BACKENDS, ("o-", "D-", "^--", "s-"), strict=True):
        if points := results.decode_series(name, wide, wide):
            rows = [m["parameters"]["shape"][0] for m in points]
            right.plot(rows, [m["derived"]["gbps"] for m in points], style, label=name)
    wide_model = [problem_intensity(m, wide, wide) for m in m_sweep]
    if knee(wide, ridge) > m_sweep[-1]:  # the model is the copy bandwidth over the whole sweep: one line says both
        right.axhline(copy_gbps, color="black", linewidth=1,
                      label=f"copy bandwidth = roofline model (knee at M = {knee(wide, ridge):,.0f})")
    else:
        bf16_tflops = roof.peak_flops_per_s / 1e12
        right.semilogx(m_sweep, [min(copy_gbps, bf16_tflops * 1e3 / i) for i in wide_model], ":", color="0.5",
                       label="roofline model")
        right.axhline(copy_gbps, color="black", linewidth=1, label="copy bandwidth")
    left.annotate(f"ridge = knee:\nM = {knee(4096, ridge):,.0f} at hidden 4096", (ridge, 30),
                  textcoords="offset points", xytext=(4, 0), fontsize=7, color="0.3")
    left.set_xlim(0.3, 1e4)
    left.set_ylim(0.3, 2e3)
    left.set_title("decode GEMMs on the roofline: the knee is the ridge", fontsize=10)
    left.legend(fontsize=7, loc="lower right")
    right.set_xscale("log", base=2)
    right.set_xticks(m_sweep, [str(m) for m in m_sweep])
    right.set_xlabel("M (tokens in the batch)")
    right.set_ylabel("GB/s (weights + activations + output)")
    right.set_title(f"hidden {wide}: bytes per second against the copy bandwidth", fontsize=10)
    right.set_ylim(bottom=0)
    right.grid(True, alpha=0.3)
    right.legend(fontsize=7)
    measured = (f"recorded: {results.source}" if results.has_decode_shapes()
                else "model only: no decode shapes in this file")
    plots.caption(fig, f"{measured}; roofs: {roofs_source}")
    return fig
