"""The parallelism planner: of all the ways to lay a model out on N GPUs, which are worth running?

For a GPU budget the planner tries every layout ``tp * pp * dp = N`` (and, for a mixture-of-experts model,
with and without expert parallelism), and for each every batch that fits in memory (powers of two up to the
largest). A candidate survives if

* the layout is legal: tensor parallelism inside one NVLink domain, heads and experts that split evenly;
* the weights and the keys and values of ``batch`` sequences of ``prompt + output`` tokens fit;
* its time per output token (TPOT) meets the latency target.

What is left is a cloud of (speed per user, throughput per GPU) points: a small batch on many GPUs per
replica answers each user fast but spends GPUs; a big batch does the reverse. The planner keeps the
**Pareto front**: the candidates no other candidate beats on both counts at once. Every point off the front
is wasted: some layout serves each user at least as fast *and* each GPU at least as well.

Every figure is a prediction of ``course_lib.scaling.cost`` (a roofline, not a measurement); the rejected
layouts are kept with the reason, so a reader can see why TP16 or PP1 did not make it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from course_lib.scaling import collectives
from course_lib.scaling.cost import PLAIN, Assumptions, Layout, Prediction, memory, min_gpus, predict
from course_lib.scaling.hardware import GIB, Hardware
from course_lib.scaling.shapes import ModelShape


@dataclass(frozen=True)
class Workload:
    """What the users send and what they are promised: prompt and output lengths, a TPOT target."""

    prompt: int
    output: int
    tpot_ms: float
    price_per_gpu_hour: float | None = None

    def __post_init__(self) -> None:
        if self.prompt < 1 or self.output < 1:
            raise ValueError(f"prompt and output must be >= 1 token, got {self.prompt} and {self.output}")
        if not self.tpot_ms > 0:
            raise ValueError(f"the TPOT target must be > 0 ms, got {self.tpot_ms}")
        if self.price_per_gpu_hour is not None and not self.price_per_gpu_hour > 0:
            raise ValueError(f"the price per GPU-hour must be > 0, got {self.price_per_gpu_hour}")


@dataclass
class Plan:
    """The outcome: every candidate that met the target, its Pareto front, and what was turned away and why."""

    model: ModelShape
    hardware: Hardware
    gpus: int
    workload: Workload
    min_gpus: int  # the fewest GPUs that hold the weights alone
    assumptions: Assumptions = PLAIN
    feasible: list[Prediction] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (layout, reason)

    @property
    def front(self) -> list[Prediction]:
        return pareto_front(self.feasible)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model.name, "model_source": self.model.source, "hardware": self.hardware.key,
                "hardware_origin": self.hardware.origin, "gpus": self.gpus, "prompt": self.workload.prompt,
                "output": self.workload.output, "tpot_target_ms": self.workload.tpot_ms,
                "price_per_gpu_hour": self.workload.price_per_gpu_hour, "min_gpus_for_weights": self.min_gpus,
                "weights": self.assumptions.weights, "ttft_is": "the whole batch's prefill",
                "collective_alphas": collectives.alpha_sources(self.assumptions.nvlink_alpha_s,
                                                               self.assumptions.network_alpha_s),
                "pareto_front": [p.as_dict() for p in self.front], "feasible": len(self.feasible),
                "rejected": [{"layout": layout, "reason": reason} for layout, reason in self.rejected],
                "note": "predictions of course_lib.scaling.cost (roofline + alpha-beta), not measurements"}

    def table(self) -> list[str]:
        """The Pareto front as text, fastest per user first, then how many candidates were turned away."""
        w = self.workload
        lines = [f"{self.model.name} on {self.gpus} x {self.hardware.name}: prompt {w.prompt}, output {w.output}, "
                 f"TPOT <= {w.tpot_ms:g} ms (the weights alone need {self.min_gpus} GPUs)",
                 *collectives.alpha_lines(self.assumptions.nvlink_alpha_s, self.assumptions.network_alpha_s),
                 "TTFT is the prefill of the whole batch (its requests arrive together); TPOT one decode step of it",
                 f"{'layout':<20} {'batch':>6} {'TTFT ms':>9} {'TPOT ms':>9} {'tok/s/user':>11} {'tok/s/GPU':>10}"
                 + ("   $/M tok" if w.price_per_gpu_hour else "")]
        for p in self.front:
            cost = f" {p.cost_per_million_tokens:>9.3f}" if p.cost_per_million_tokens is not None else ""
            lines.append(f"{p.layout.label:<20} {p.batch:>6} {p.ttft_s * 1e3:>9.1f} {p.tpot_s * 1e3:>9.2f} "
                         f"{p.tokens_per_s_per_user:>11.1f} {p.tokens_per_s_per_gpu:>10.1f}{cost}")
        if not self.front:
            lines.append("(no layout meets the target: see the reasons below)")
        lines.append(f"{len(self.feasible)} candidates met the target, {len(self.front)} on the Pareto front; "
                     f"{len(self.rejected)} layouts turned away:")
        lines.extend(f"  {layout}: {reason}" for layout, reason in self.rejected)
        return lines


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(model: ModelShape, gpus: int, tp: int | None = None, pp: int | None = None) -> list[Layout]:
    """Every TP x PP x DP (x EP for a mixture of experts) split of ``gpus``, or those with the given tp / pp."""
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"gpus must be a positive integer, got {gpus!r}")
    for name, fixed in (("tp", tp), ("pp", pp)):
        if fixed is not None and gpus % fixed:
            raise ValueError(f"{gpus} GPUs are not divisible by {name}={fixed}")
    if tp is not None and pp is not None and gpus % (tp * pp):
        raise ValueError(f"{gpus} GPUs do not split into TP{tp} x PP{pp}")
    out = []
    for t in [tp] if tp else divisors(gpus):
        for p in [pp] if pp else divisors(gpus // t):
            out.append(Layout.split(gpus, t, p))
            if model.is_moe and gpus // p > 1:
                out.append(Layout.split(gpus, t, p, expert_parallel=True))
    return out


def batch_sizes(largest: int) -> list[int]:
    """Powers of two below ``largest``, and ``largest`` itself."""
    sizes, b = [], 1
    while b < largest:
        sizes.append(b)
        b *= 2
    return [*sizes, largest] if largest >= 1 else []


def plan(model: ModelShape, hw: Hardware, gpus: int, workload: Workload, assumptions: Assumptions = PLAIN,
         tp: int | None = None, pp: int | None = None) -> Plan:
    """Try every layout of ``gpus`` GPUs and batch; keep those that fit and meet ``workload``'s TPOT target."""
    result = Plan(model, hw, gpus, workload, min_gpus(model, hw, assumptions), assumptions)
    context = workload.prompt + workload.output
    for layout in layouts(model, gpus, tp, pp):
        try:
            room = memory(model, hw, layout, assumptions)
            if not room.fits:
                raise ValueError(f"weights take {room.weight_bytes / GIB:.1f} GiB a GPU, more than "
                                 f"{assumptions.memory_utilization:.0%} of {hw.require('hbm_bytes') / GIB:.0f} GiB")
            largest = room.max_batch(context)
            if largest < 1:
                raise ValueError(f"no room left for one sequence of {context} tokens of keys and values")
            predictions = [predict(model, hw, layout, batch, workload.prompt, workload.output, assumptions,
                                   workload.price_per_gpu_hour) for batch in batch_sizes(largest)]
            met = [p for p in predictions if p.tpot_s * 1e3 <= workload.tpot_ms]
            if not met:  # predictions[0] is batch 1, the fastest per user
                raise ValueError(f"misses the target: TPOT {predictions[0].tpot_s * 1e3:.1f} ms even at batch 1")
        except ValueError as why:
            result.rejected.append((layout.label, str(why).removeprefix(f"{layout.label}: ")))
            continue
        result.feasible.extend(met)
    return result


def pareto_front(points: list[Prediction]) -> list[Prediction]:
    """The points no other point beats on both speed per user and throughput per GPU, fastest per user first.

    Sorted by speed per user (ties: more throughput first), a point is on the front when its throughput per GPU
    beats every point before it: those are the faster ones, so one of them with more throughput would dominate.
    """
    ordered = sorted(points, key=lambda p: (-p.tokens_per_s_per_user, -p.tokens_per_s_per_gpu))
    front, best = [], float("-inf")
    for p in ordered:
        if p.tokens_per_s_per_gpu > best:
            front.append(p)
            best = p.tokens_per_s_per_gpu
    return front


def draw(result: Plan, ax: Any) -> Any:
    """Every candidate (grey) and the Pareto front (line) on ``ax``, speed per user against throughput per GPU;
    each layout is named where the front reaches it. Returns ``ax``, for a notebook to add its own marks."""
    ax.scatter([p.tokens_per_s_per_user for p in result.feasible], [p.tokens_per_s_per_gpu for p in result.feasible],
               s=12, color="0.7", label=f"layouts x batches with TPOT <= {result.workload.tpot_ms:g} ms")
    front = result.front
    ax.plot([p.tokens_per_s_per_user for p in front], [p.tokens_per_s_per_gpu for p in front], "o-", ms=4,
            color="tab:green", label="Pareto front")
    starts = [p for before, p in zip([None, *front], front, strict=False)
              if before is None or before.layout != p.layout]
    for i, p in enumerate(starts):  # labels alternately above and below, so neighbours do not overlap
        ax.annotate(p.layout.label, (p.tokens_per_s_per_user, p.tokens_per_s_per_gpu), textcoords="offset points",
                    xytext=(5, 5 if i % 2 else -11), fontsize=7)
    ax.set_xlabel("output tokens/s per user (1 / TPOT)")
    ax.set_ylabel("output tokens/s per GPU")
    return ax


def plot(result: Plan, path: str | Path) -> Path:
    """``draw`` in a figure of its own, captioned, saved to ``path``."""
    import matplotlib.pyplot as plt

    from course_lib.bench import plots

    w = result.workload
    fig, ax = plots.figure(f"{result.model.name} on {result.gpus} x {result.hardware.key}: TPOT <= {w.tpot_ms:g} ms")
    draw(result, ax).legend(fontsize=8)
    plots.caption(fig, f"Predicted by course_lib.scaling (roofline + alpha-beta), not measured. {result.hardware.name} "
                       f"({result.hardware.origin} figures); prompt {w.prompt}, output {w.output} tokens.")
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
