"""The online softmax of one query row, tile by tile, recorded for chapter 04b's figure.

The online softmax reads the keys a tile at a time and keeps three running values: the largest logit so far
``m``, the sum ``l`` of ``exp(logit - m)`` and the accumulator of ``exp(logit - m) * value``. When a tile raises the
max, everything summed before is multiplied by ``exp(m_old - m_new)``. The trace below records those values after
every tile, so a figure can show that ``l`` drops when ``m`` jumps, and that ``l * exp(m - M)`` (``M`` the final
max) only ever grows towards the softmax's denominator.
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np

from course_lib.kernels.paged_prefill_reference import online_softmax_step


@dataclass(frozen=True)
class TileStep:
    """The running state after one key tile."""

    start: int  # the tile's first key
    stop: int
    tile_max: float  # the largest logit of this tile alone
    running_max: float  # m after the tile
    rescale: float  # exp(m_before - m_after): what the earlier sum and accumulator were multiplied by
    running_sum: float  # l after the tile, relative to running_max
    output: np.ndarray  # acc / l: the softmax over the keys read so far


def trace_row(logits: np.ndarray, values: np.ndarray, key_tile: int) -> list[TileStep]:
    """Run ``online_softmax_step`` over one row's ``logits`` [keys] and ``values`` [keys, d], in float64."""
    running_max, running_sum = np.full(1, -np.inf), np.zeros(1)
    acc = np.zeros((1, values.shape[1]))
    steps = []
    for start in range(0, logits.size, key_tile):
        stop = min(start + key_tile, logits.size)
        before = running_max[0]
        running_max, running_sum, acc = online_softmax_step(running_max, running_sum, acc,
                                                            logits[None, start:stop], values[start:stop])
        steps.append(TileStep(start, stop, float(logits[start:stop].max()), float(running_max[0]),
                              float(np.exp(before - running_max[0])), float(running_sum[0]), acc[0] / running_sum[0]))
    return steps


def draw_running_softmax(logits: np.ndarray, steps: list[TileStep]) -> plt.Figure:
    """Three panels: the logits with each tile's max and the running max; the running sum l against the sum
    taken at the final max; the rescale factor each tile applied."""
    final_max = steps[-1].running_max
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(9, 7.5), sharex=True, layout="constrained")
    top.plot(np.arange(logits.size), logits, ".", color="0.6", markersize=4, label="logits of the row")
    for step in steps:
        top.axvline(step.start - 0.5, color="0.85", linewidth=0.8)
        top.hlines(step.tile_max, step.start - 0.5, step.stop - 0.5, color="tab:orange", linewidth=2)
    edges = [s.stop - 0.5 for s in steps]
    top.step(edges, [s.running_max for s in steps], where="post", color="tab:red", linewidth=2,
             label="running max m after each tile")
    top.plot([], [], color="tab:orange", linewidth=2, label="the tile's own max")
    top.set_ylabel("logit")
    top.legend(fontsize=8, loc="lower right")
    top.set_title("online softmax of one query row, one key tile at a time", fontsize=10)
    middle.plot(edges, [s.running_sum for s in steps], "o-", color="tab:blue",
                label="running sum l (relative to the running max m)")
    middle.plot(edges, [s.running_sum * np.exp(s.running_max - final_max) for s in steps], "s--", color="tab:green",
                label="l * exp(m - M): the same sum measured against the final max M")
    middle.axhline(np.exp(logits - final_max).sum(), color="black", linewidth=0.8, linestyle=":",
                   label="the full softmax's denominator, sum exp(logit - M)")
    middle.set_ylabel("sum of exp")
    middle.legend(fontsize=8)
    bottom.bar([s.start + (s.stop - s.start) / 2 - 0.5 for s in steps], [s.rescale for s in steps],
               width=[0.8 * (s.stop - s.start) for s in steps], color="tab:purple")
    bottom.set_ylabel("exp(m_old - m_new)")
    bottom.set_xlabel("key position")
    bottom.set_ylim(0, 1.1)
    bottom.set_title("the factor that rescales the earlier sum and accumulator (1: the max did not grow; "
                     "0: the first tile)", fontsize=9)
    return fig
