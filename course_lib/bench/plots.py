"""Figures the chapters share: one style, the provenance of every measured number on the plot."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from course_lib.bench.roofline import Roofline


def figure(title: str, width: float = 7.0, height: float = 4.0) -> tuple[plt.Figure, plt.Axes]:
    """A new figure with the course's look."""
    fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    return fig, ax


def caption(fig: plt.Figure, text: str) -> None:
    """Where the numbers came from, in small print along the bottom (card, date, versions, mode).

    Only constrained layout makes room for the caption below the axes' labels; a figure without it (a plain
    ``plt.subplots``) would print the caption over the x-axis labels, so the caption switches it on.
    """
    fig.set_layout_engine("constrained")
    one_line = " ".join(text.split())  # text that arrives wrapped for an output box (a mode line) is refilled here
    fig.supxlabel(textwrap.fill(one_line, 140), fontsize=7, color="0.35")


def bar_chart(ax: plt.Axes, labels: Sequence[str], values: Sequence[float], unit: str, log: bool = False) -> None:
    """Horizontal bars with their values written at the ends."""
    positions = np.arange(len(labels))
    ax.barh(positions, values, color="tab:green")
    ax.set_yticks(positions, labels)
    ax.set_xlabel(unit)
    if log:
        ax.set_xscale("log")
    for y, value in zip(positions, values, strict=True):
        ax.annotate(f" {value:,.4g}", xy=(value, y), va="center", fontsize=8)


def roofline(ax: plt.Axes, roof: Roofline, points: Sequence[dict[str, Any]] = ()) -> None:
    """Draw ``roof`` (log-log, FLOP/byte against TFLOP/s) and kernels as labelled points.

    Each point is ``{"label": str, "intensity": flop_per_byte, "tflops": achieved}``.
    """
    intensities = np.logspace(-2, 4, 200)
    roof_tflops = [roof.attainable_flops_per_s(i) / 1e12 for i in intensities]
    ax.loglog(intensities, roof_tflops, color="black", label=roof.label or "measured roof")
    ax.axvline(roof.ridge_intensity, color="0.6", linestyle=":", linewidth=1)
    for point in points:
        ax.loglog(point["intensity"], point["tflops"], "o")
        ax.annotate(point["label"], (point["intensity"], point["tflops"]), textcoords="offset points",
                    xytext=(5, -10), fontsize=8)
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("TFLOP/s")
    ax.legend(loc="lower right", fontsize=8)
