"""Where the eager decode step's time goes, from the engine suite's results file (``engine.json``).

Four recorded figures answer it, all from one run on one card: the eager step's wall time, the graphed step's
wall time, the host cost of one eager launch (an empty kernel launched from Python), and the GPU time of the
graphed step's kernels (read with the profiler, group by group). Two are derived:

* **launch costs**: the graph's node count times one eager launch of an empty kernel. An estimate of what the
  eager step spends launching: the nodes include copies and memsets, which cost the host less than a kernel
  launch, and real kernels with many arguments cost more than an empty one;
* **other host work**: the eager step minus that estimate. Python between the launches, building the step's
  metadata and sending it to the GPU, checking the token ids (a read back to the host, which waits for the
  GPU). This, not the launches, is most of an eager step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import matplotlib.pyplot as plt

from course_lib.bench import plots

KERNEL_GROUPS = ("projections", "attention", "norms", "rotary_cache_write", "activation", "other")


@dataclass(frozen=True)
class StepTime:
    """The recorded batch-1 decode step, eager and graphed, in seconds; ``gpu_kernels_s`` is None if not recorded."""

    eager_s: float
    graph_s: float
    launch_s: float  # one eager launch of an empty kernel
    graph_nodes: int
    gpu_kernels_s: float | None

    @property
    def launches_s(self) -> float:
        """The eager step's launch costs, estimated as one empty-kernel launch per node of the captured step."""
        return self.graph_nodes * self.launch_s

    @property
    def other_host_s(self) -> float:
        return self.eager_s - self.launches_s


def step_time(engine: dict[str, Any]) -> StepTime:
    """The figures of an ``engine.json`` result; KeyError names a measurement the file lacks."""
    found = {m["parameters"].get("role"): m for m in engine["measurements"]}
    missing = {"eager", "graph", "launch eager"} - found.keys()
    if missing:
        raise KeyError(f"engine.json lacks the measurements {sorted(missing)}: run `python -m course_lib.bench engine`")
    graph = found["graph"]
    groups = [graph["derived"][f"us_{group}"] for group in KERNEL_GROUPS if f"us_{group}" in graph["derived"]]
    return StepTime(eager_s=found["eager"]["timing"]["median_s"], graph_s=graph["timing"]["median_s"],
                    launch_s=found["launch eager"]["derived"]["us_per_launch"] * 1e-6,
                    graph_nodes=int(graph["parameters"]["graph_nodes"]),
                    gpu_kernels_s=sum(groups) * 1e-6 if groups else None)


def plot_step_time(budget: StepTime, source: str) -> plt.Figure:
    """Bars in milliseconds: the eager step split into launch costs and other host work, the graphed step, and
    the GPU's kernel time (or a note that it was not recorded)."""
    fig, ax = plots.figure("Batch-1 decode step, 1B-parameter shape: where the eager step's time goes", 8.0, 3.6)
    ms = 1e3
    rows = ["eager step", "graphed step (replay)", "GPU kernel time"]
    ax.barh(0, budget.launches_s * ms, color="tab:blue",
            label=f"launch costs, about {budget.graph_nodes} x {budget.launch_s * 1e6:.1f} us")
    ax.barh(0, budget.other_host_s * ms, left=budget.launches_s * ms, color="tab:gray",
            label="other host work (Python, metadata, checks, copies)")
    ax.barh(1, budget.graph_s * ms, color="tab:green", label="one graph replay")
    if budget.gpu_kernels_s is not None:
        ax.barh(2, budget.gpu_kernels_s * ms, color="tab:orange", label="kernels of the graphed step (profiler)")
    else:
        ax.annotate(" not recorded", xy=(0, 2), va="center", fontsize=8)
    for y, seconds in enumerate((budget.eager_s, budget.graph_s, budget.gpu_kernels_s)):
        if seconds is not None:
            ax.annotate(f" {seconds * ms:.2f} ms", xy=(seconds * ms, y), va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), rows)
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds per step")
    ax.legend(fontsize=7, loc="lower right")
    plots.caption(fig, f"GPU mode, recorded: {source}")
    return fig
