"""How accurate a matrix product is in each tensor-core input format: the experiments and figures of chapter 02.

Every experiment multiplies random normal matrices with the inputs rounded to a format and the products
summed in IEEE float32 (``precision.emulated_matmul``), and measures ``||D - exact|| / ||exact||`` against
float64 on the unrounded inputs. Three views:

* **error against K**: with fp32 accumulators the error is set by rounding the inputs and does not grow with
  K; fp16 accumulators (``fp16_accumulators``) make it grow;
* **what a kernel adds**: inputs drawn in the format, C rounded once, against the emulation, with the
  recorded errors of the benchmark runs and, on a GPU, the course's kernels run now;
* **range**: inputs scaled by ``2**e``, where each format underflows and overflows.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

from course_lib import backend
from course_lib.bench import plots
from course_lib.bench.suites import gemm as gemm_suite
from course_lib.device_facts import device_facts
from course_lib.kernels import gemm, precision
from course_lib.labs.gemm_records import CUDA_CORE_STEPS, GemmResults

FP16_ACC = "float16, fp16 accumulators"
COLOURS = dict(zip((*precision.FORMATS, FP16_ACC), ("black", "tab:purple", "tab:blue", "tab:orange", "tab:red",
                                                    "tab:brown", "tab:cyan"), strict=True))
LIBRARIES_GROUP = " and ".join(gemm_suite.LIBRARIES)
MARKERS = {**dict(zip(gemm.TENSOR_CORE_STEPS, ("^", "D", "*"), strict=True)), LIBRARIES_GROUP: "s"}  # else "o"


def fp16_accumulators(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` with fp16 inputs and an fp16 accumulator, as ``mma.sync`` with an fp16 C computes it.

    A chain of k = 16 steps: each step's products are summed (exactly enough, in float32) and the running sum
    is rounded to fp16 before the next step adds to it.
    """
    a16, b16 = precision.round_to(a, "float16"), precision.round_to(b, "float16")
    acc = np.zeros((a.shape[0], b.shape[1]), dtype=np.float32)
    for k0 in range(0, a.shape[1], 16):
        acc = precision.round_to(acc + a16[:, k0:k0 + 16] @ b16[k0:k0 + 16], "float16")
    return acc


def _mode_caption(what: str) -> str:
    return f"computed now ({backend.DECISION.mode.upper()} mode) with course_lib.kernels.precision{what}"


def plot_errors_by_k(errors_by_k: dict[str, list[float]], k_values: Sequence[int], size: int) -> plt.Figure:
    """One line per format (and fp16 accumulators): relative error of ``[size, K] @ [K, size]`` against K."""
    fig, ax = plots.figure(f"Error of A @ B against float64, A [{size}, K], B [K, {size}], normal inputs", width=8)
    styles = {FP16_ACC: "s--", "tf32": "x:"}  # tf32 lies on top of float16: same mantissa
    for fmt, errors in errors_by_k.items():
        label = fmt if fmt == FP16_ACC else f"{fmt} inputs, fp32 accumulators"
        if fmt.startswith("float8"):  # Hopper's fp8 wgmma keeps fewer bits in its sums than this
            label = f"{fmt} inputs, ideal fp32 accumulation"
        ax.loglog(k_values, errors, styles.get(fmt, "o-"), color=COLOURS[fmt], label=label,
                  zorder=3 if fmt == "tf32" else 2)
    ax.set_xticks(k_values, [str(k) for k in k_values])
    ax.set_xlabel("K (length of each dot product)")
    ax.set_ylabel("||D - exact|| / ||exact||")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    plots.caption(fig, _mode_caption("; inputs rounded to nearest even, products summed in IEEE float32 (for fp8 "
                                     "too)"))
    return fig


def plot_kernel_errors(runs: dict[str, list[tuple[float, dict[str, float]]]], k_values: Sequence[int], size: int,
                       results: GemmResults) -> plt.Figure:
    """What a kernel adds: the emulation's line per dtype, the kernels measured now, and the recorded errors.

    ``runs[dtype][i]`` is (the emulation's error, {step: error measured now}) at ``k_values[i]``; the recorded
    points are the errors the gemm benchmark measured on the first rows of the products it timed.
    """
    fig, ax = plots.figure("What a kernel adds: fp32 sums and C rounded once, against float64 on the same inputs",
                           width=8)
    for dtype, dtype_runs in runs.items():
        colour = COLOURS[dtype]
        ax.loglog(k_values, [emulated for emulated, _ in dtype_runs], "-", color=colour, label=f"{dtype}: emulation")
        for step in gemm.TENSOR_CORE_STEPS:
            points = [(k, measured[step]) for k, (_, measured) in zip(k_values, dtype_runs, strict=True)
                      if step in measured]
            if points:
                ax.loglog(*zip(*points, strict=True), MARKERS[step], color=colour, linestyle="none",
                          label=f"{dtype}: {step} kernel, measured now")
    sources = []
    if results.record:
        recorded_dtype = results.record["parameters"]["dtype"]
        checked = [m["parameters"] for m in results.measurements if "relative_error" in m["parameters"]]
        groups = {"steps 1-4 (CUDA cores)": CUDA_CORE_STEPS, **{step: (step,) for step in gemm.TENSOR_CORE_STEPS},
                  LIBRARIES_GROUP: gemm_suite.LIBRARIES}
        for name, members in groups.items():
            points = [(p["shape"][2], p["relative_error"]) for p in checked if p["backend"] in members]
            if not points:
                print(f"{name}: no recorded error (not measured yet)")
                continue
            ax.loglog(*zip(*points, strict=True), MARKERS.get(name, "o"), markerfacecolor="none", linestyle="none",
                      color=COLOURS[recorded_dtype], label=f"{recorded_dtype}: {name}, recorded")
        sources.append(f"recorded points (first rows of C of the timed products; K as recorded): {results.source}")
    ax.set_xticks(k_values, [str(k) for k in k_values])
    ax.set_xlabel("K")
    ax.set_ylabel("||C - exact|| / ||exact||")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    mode = "measured now on " + device_facts()["name"] if backend.has_gpu() else "emulated now in CPU mode"
    plots.caption(fig, "; ".join([f"lines: NumPy emulation, {size} x K x {size}; markers: {mode}", *sources]))
    return fig


def error_at_scale(a: np.ndarray, b: np.ndarray, fmt: str, scale: float, round_c_to: str | None = None) -> float:
    """Relative error of ``(s a) @ (s b)`` in ``fmt`` against float64; with ``round_c_to``, C rounded to it too.

    At the edges of a format's window the result is inf or NaN, and so is the error: that is the point.
    """
    a, b = a * np.float32(scale), b * np.float32(scale)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        product = precision.emulated_matmul(a, b, fmt)
        if round_c_to:
            product = precision.round_to(product, round_c_to)
    return precision.relative_error(product, exact)


def plot_range(a: np.ndarray, b: np.ndarray, scale_exponents: np.ndarray) -> plt.Figure:
    """Error of ``a @ b`` in every format with both inputs scaled by ``2**e``, and fp16 with C stored in fp16.

    An overflowed curve (inf or NaN) continues above the line at 1, each at its own height, from an x on.
    """
    rows, inner = a.shape
    fig, ax = plots.figure(f"Error of a {rows} x {b.shape[1]} x {inner} product against float64, inputs scaled by s",
                           width=9, height=4.5)
    curves = {fmt: (fmt, None, "-") for fmt in precision.FORMATS}
    curves["float16, C stored in fp16"] = ("float16", "float16", "--")
    overflow_level = 1.5
    for label, (fmt, round_c_to, style) in curves.items():
        errors = np.array([error_at_scale(a, b, fmt, 2.0**e, round_c_to) for e in scale_exponents])
        finite = np.isfinite(errors)
        ax.semilogy(scale_exponents[finite], np.minimum(errors[finite], 1.0), style, color=COLOURS[fmt],
                    marker="." if style == "-" else None, label=label)
        if not finite.all():
            overflowed = scale_exponents[~finite]
            ax.semilogy(overflowed, np.full(overflowed.size, overflow_level), style, color=COLOURS[fmt])
            ax.semilogy(overflowed[0], overflow_level, "x", color=COLOURS[fmt], markersize=9, markeredgewidth=2)
            overflow_level *= 1.5
    ax.axhline(1.0, color="0.5", linewidth=0.8)
    ax.text(scale_exponents[0], 1.6, "above 1: overflow (inf or NaN) from the x on", fontsize=8)
    ax.set_xlabel("log2 of the input scale s")
    ax.set_ylabel("relative error (1 = all lost)")
    ax.set_ylim(1e-8, 10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    plots.caption(fig, _mode_caption(""))
    return fig
