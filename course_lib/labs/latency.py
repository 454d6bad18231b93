"""What a user of a server feels, measured on the course's engine: time to first token, time per output token
and throughput, for one batch of requests served together (lab 20, ``examples/latency_bench.py``).

* **TTFT** (time to first token): from submitting the batch to a request's first token, averaged over the
  requests. It pays for the prompt's prefill, and for waiting behind the other prompts of the batch.
* **TPOT** (time per output token): the mean gap between a request's later tokens, one decode step each.
* **throughput**: output tokens of the whole batch over the wall time.

The lab also draws the decode roofline model of a real model against the batch (:func:`draw_decode_model`),
with the batch the KV cache can hold marked on it: for an 8B-class model on one H100 that ceiling comes before
the compute knee. And it says what a live sweep in CPU mode can and cannot show (:func:`sweep_caveat`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from course_lib import backend
from course_lib.engine.llm import LLM
from course_lib.engine.sampling import SamplingParams


def measure_latency(llm: LLM, batch: int, prompt_length: int, output_length: int,
                    rng: np.random.Generator) -> dict[str, float]:
    """Serve ``batch`` random prompts of ``prompt_length`` tokens, ``output_length`` tokens each (greedy, no early
    stop), timing every token as the stream hands it out."""
    prompts = [list(rng.integers(0, llm.config.vocab_size, size=prompt_length)) for _ in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=output_length, ignore_eos=True)
    arrivals: list[list[float]] = [[] for _ in range(batch)]
    start = time.perf_counter()
    for event in llm.stream(prompts, params):
        backend.synchronize()
        arrivals[event.request_id].append(time.perf_counter() - start)
    wall = time.perf_counter() - start
    ttft = float(np.mean([times[0] for times in arrivals]))
    gaps = [np.diff(times) for times in arrivals if len(times) > 1]
    tpot = float(np.mean(np.concatenate(gaps))) if gaps else float("nan")
    return {"batch": batch, "prompt_length": prompt_length, "output_length": output_length, "wall_s": wall,
            "ttft_s": ttft, "tpot_s": tpot, "tokens_per_s": batch * output_length / wall}


def sweep_caveat(mode: str) -> str:
    """What the live sweep of the tiny model shows in ``mode`` ("cpu" or "gpu"), and what it does not."""
    if mode == "cpu":
        return ("CPU mode: the tiny model on NumPy, on this CPU. This sweep does NOT show a GPU's decode roofline: "
                "NumPy's cost grows with the batch from the start, so TPOT rises with the batch here, the opposite "
                "of a GPU below its knee. It shows the engine's mechanics (prefill before decode, one token a step "
                "for every sequence). The GPU's flat curve is in the recorded H100 data above.")
    return ("GPU mode: the tiny model on this GPU. Its steps are so small that launching kernels, not moving "
            "weights, sets their time: a flat TPOT here is launch overhead, not yet the weights' roofline.")


def draw_decode_model(axes: Sequence[plt.Axes], batches: np.ndarray, steps: Mapping[str, np.ndarray], knee: float,
                      capacity: Mapping[str, int], context: int) -> None:
    """The decode roofline model of each model in ``steps`` (step time in seconds, by batch) on two panels,
    TPOT and output tokens a second, with the compute knee and each model's KV-capacity batch at ``context``.

    The knee ``s F / (2 beta)`` does not depend on the model; the KV capacity does: past it the batch does not fit.
    """
    left, right = axes
    for (name, step), colour in zip(steps.items(), ("tab:blue", "tab:orange", "tab:green"), strict=False):
        left.loglog(batches, step * 1e3, base=2, color=colour, label=name)
        right.loglog(batches, batches / step, base=2, color=colour, label=name)
        if name in capacity:
            for ax in (left, right):
                ax.axvline(max(capacity[name], 1), color=colour, linestyle="--", linewidth=1,
                           label=f"KV capacity, {name}: {capacity[name]:,} at {context:,} tokens")
    for ax, title in ((left, "decode step = TPOT (ms)"), (right, "output tokens / s")):
        ax.axvline(knee, color="grey", linestyle=":", label=f"compute knee B* = {knee:.0f}")
        ax.set_xlabel("batch size B")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, which="both")
    right.legend(fontsize=7)
