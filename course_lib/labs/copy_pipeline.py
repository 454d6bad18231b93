"""A schematic of step 6's multistage ``cp.async`` pipeline: when each tile's copy and math start.

With ``S`` buffers (stages) of shared memory a block keeps ``S - 1`` copies in flight while the tensor cores
work on the oldest tile that has landed. The model follows the loop of ``gemm_mma_sync.cu``: a prologue
issues the first ``S - 1`` copies; the copy of tile ``i`` is issued when the block starts computing tile
``i - S + 1`` (whose buffer it will reuse); tile ``i``'s math starts when its copy has landed and tile
``i - 1``'s math is done. The times are in arbitrary units: a picture of overlap, not a measurement.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt

from course_lib.bench import plots


def schedule(stages: int, tiles: int, load_time: float, compute_time: float) -> tuple[list[float], list[float]]:
    """Start times of each tile's copy and of its computation, for ``stages`` buffers."""
    load_start: list[float] = []
    compute_start: list[float] = []
    for i in range(tiles):
        if i < stages - 1:
            issued = 0.0
        elif stages == 1:  # one buffer: the next copy waits until the computation on it is done
            issued = compute_start[i - 1] + compute_time if i else 0.0
        else:
            issued = compute_start[i - stages + 1]
        previous_done = compute_start[i - 1] + compute_time if i else 0.0
        load_start.append(issued)
        compute_start.append(max(issued + load_time, previous_done))
    return load_start, compute_start


def plot_schedules(stage_counts: Sequence[int], tiles: int, load_time: float, compute_time: float) -> plt.Figure:
    """One band per stage count: the copies in flight (blue, stacked) above the tensor-core math (green)."""
    fig, ax = plots.figure(f"Copies in flight (blue) and tensor-core math (green), {tiles} tiles of K; "
                           f"a copy takes {load_time:.0f}x the math (schematic)", width=10, height=5)
    labels, y = [], 0.0
    for stages in stage_counts:
        loads, computes = schedule(stages, tiles, load_time, compute_time)
        in_flight = max(stages - 1, 1)  # rows for the copies: as many as can be in flight at once
        for i, (start, begin) in enumerate(zip(loads, computes, strict=True)):
            row = y + 1 + 0.8 * (i % in_flight)
            ax.barh(row, load_time, left=start, height=0.7, color="tab:blue", alpha=0.6, edgecolor="white")
            ax.text(start + load_time / 2, row, f"copy {i}", ha="center", va="center", fontsize=7)
            ax.barh(y, compute_time, left=begin, height=0.7, color="tab:green", edgecolor="white")
            ax.text(begin + compute_time / 2, y, str(i), ha="center", va="center", fontsize=7, color="white")
        labels += [(y, f"{stages} stage{'s' if stages > 1 else ''}: math"), (y + 1 + 0.4 * (in_flight - 1), "copies")]
        ax.text(computes[-1] + compute_time + 0.3, y, f"done at {computes[-1] + compute_time:.0f}", va="center",
                fontsize=8)
        y += 2 + 0.8 * in_flight
    ax.set_yticks([y for y, _ in labels], [label for _, label in labels], fontsize=8)
    ax.set_xlabel("time (units of one tile's math)")
    ax.grid(False)
    plots.caption(fig, "schematic computed from step 6's loop structure; times are illustrative, not measured")
    return fig
