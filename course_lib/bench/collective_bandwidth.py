"""How fast a collective ran: algorithm and bus bandwidth as nccl-tests define them, and the alpha-beta fit.

NVIDIA's nccl-tests print two bandwidths for a collective on ``S`` bytes that took ``t`` seconds (their
doc/PERFORMANCE.md, https://github.com/NVIDIA/nccl-tests/blob/master/doc/PERFORMANCE.md):

* **algorithm bandwidth**, ``algbw = S / t``: divide any size by it to get its time. What ``S`` counts depends on
  the collective: for an all-reduce, the buffer each rank holds; for an all-gather, the gathered result (every
  rank's part, ``n`` of them); for a reduce-scatter, the buffer each rank reduces; for an all-to-all, the whole
  buffer each rank sends (its own share included).
* **bus bandwidth**, ``busbw = algbw * factor``: ``2 (n - 1) / n`` for an all-reduce, ``(n - 1) / n`` for an
  all-gather, a reduce-scatter or an all-to-all, 1 for a broadcast (``n`` ranks).

Why the factor: it is the share of ``S`` that each rank must at least send over its own link. An all-reduce
needs every element added ``n - 1`` times and copied back ``n - 1`` times, spread over ``n`` links:
``2 (n - 1) / n * S`` bytes a link (the ring reaches it). Those bytes over the time are what the busiest link
carried each second, and that does **not** depend on ``n``: busbw is the number to compare with the link's
datasheet bandwidth, and between runs on 2, 4 or 8 GPUs. algbw does depend on ``n``: an all-reduce on fast links
has half the algbw on 8 GPUs (where each rank sends ``1.75 S``) that it has on 2 (``S``), for the same
hardware running at the same speed.

With one rank nothing crosses a link: the factor of the operations that exchange data is 0, and so is their
busbw (nccl-tests print 0 as well). A one-rank run measures the library's fixed cost and a local copy, not a
link.

**The alpha-beta fit.** A collective's time is about ``t = alpha + k * S / B``: a fixed cost ``alpha`` (launch,
handshakes, the hops of every step) plus the bytes a rank sends, ``k * S``, over its link bandwidth ``B``.
``fit_alpha_beta`` finds ``alpha`` and ``B`` from measured ``(S, t)`` pairs. With ``k`` the bus factor, ``B``
is the bus bandwidth of large messages, the ``B`` of ``course_lib.scaling.collectives``' formulas; with
``k = 1`` it is their algorithm bandwidth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "broadcast")


def bus_factor(collective: str, ranks: int) -> float:
    """busbw / algbw for ``collective`` on ``ranks`` ranks: the share of ``S`` each rank sends over its link."""
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"a collective runs on a whole number of ranks >= 1, got {ranks!r}")
    if collective == "all_reduce":
        return 2 * (ranks - 1) / ranks
    if collective in ("reduce_scatter", "all_gather", "all_to_all"):
        return (ranks - 1) / ranks
    if collective == "broadcast":  # the root sends all S bytes through its one link
        return 1.0
    raise ValueError(f"collective must be one of {COLLECTIVES}, got {collective!r}")


def algorithm_bandwidth(nbytes: float, seconds: float) -> float:
    """algbw = S / t, in bytes a second (nccl-tests: the size ``S`` of ``bus_factor``'s collectives)."""
    if nbytes < 0:
        raise ValueError(f"a message has >= 0 bytes, got {nbytes}")
    if not seconds > 0:
        raise ValueError(f"a measured time must be > 0 s, got {seconds!r}")
    return nbytes / seconds


def bus_bandwidth(collective: str, nbytes: float, seconds: float, ranks: int) -> float:
    """busbw = algbw * bus_factor, in bytes a second: comparable across rank counts and with the link's peak."""
    return algorithm_bandwidth(nbytes, seconds) * bus_factor(collective, ranks)


@dataclass(frozen=True)
class AlphaBetaFit:
    """``t = alpha_s + byte_factor * S * seconds_per_byte``, fitted to measured times.

    ``seconds_per_byte`` is the model's beta; ``bytes_per_s`` is its inverse, the bandwidth (``inf`` when the
    time does not grow with the size at all). ``residual`` is the root mean square of the relative errors of
    the fitted times: 0.05 means the line is about 5 % off a typical point.
    """

    alpha_s: float
    seconds_per_byte: float
    byte_factor: float
    residual: float

    @property
    def bytes_per_s(self) -> float:
        return 1 / self.seconds_per_byte if self.seconds_per_byte > 0 else math.inf

    def time_s(self, nbytes: float | np.ndarray) -> float | np.ndarray:
        """The fitted time of a message of ``nbytes`` (or an array of sizes)."""
        return self.alpha_s + self.byte_factor * np.asarray(nbytes, dtype=float) * self.seconds_per_byte

    def asdict(self) -> dict[str, Any]:
        """JSON-ready: the four numbers, and the bandwidth (None where it is infinite)."""
        bandwidth = self.bytes_per_s
        return {**asdict(self), "bytes_per_s": bandwidth if math.isfinite(bandwidth) else None}


def fit_alpha_beta(sizes: Sequence[float], times: Sequence[float], byte_factor: float = 1.0) -> AlphaBetaFit:
    """Least squares of ``t = alpha + byte_factor * S / B`` over measured sizes ``S`` (bytes) and times ``t`` (s).

    Sizes span many decades (8 B to 1 GiB), so each point's error is taken relative to its time: plain least
    squares would let the largest messages alone decide ``alpha``, which only the small ones measure. Both
    unknowns are kept >= 0 (noise can pull a free fit below zero): the best of the free fit, if it is
    feasible, and the two fits with one unknown held at 0.
    """
    size, seconds = np.asarray(sizes, dtype=float), np.asarray(times, dtype=float)
    if size.ndim != 1 or size.shape != seconds.shape or len(np.unique(size)) < 2:
        raise ValueError(f"fit_alpha_beta needs one time per size and at least two different sizes, got "
                         f"{size.size} sizes ({len(np.unique(size))} different) and {seconds.size} times")
    if (size < 0).any() or not (seconds > 0).all():
        raise ValueError("sizes must be >= 0 bytes and times > 0 s")
    if not byte_factor > 0:
        raise ValueError(f"byte_factor must be > 0 (the bytes a rank sends per byte of S), got {byte_factor!r}")
    # Divided by t, the model reads alpha * (1/t) + beta * (k S / t) = 1 for every point.
    columns = np.stack([1 / seconds, byte_factor * size / seconds], axis=1)
    ones = np.ones_like(seconds)
    free = np.linalg.lstsq(columns, ones, rcond=None)[0]
    candidates = [free] if (free >= 0).all() else []
    for kept in (0, 1):  # alpha alone, then beta alone
        column = columns[:, kept]
        one = np.zeros(2)
        one[kept] = column @ ones / (column @ column)
        candidates.append(one)
    alpha, beta = min(candidates, key=lambda c: float(np.sum((columns @ c - 1) ** 2)))
    relative = columns @ np.array([alpha, beta]) - 1
    return AlphaBetaFit(float(alpha), float(beta), float(byte_factor), float(np.sqrt(np.mean(relative ** 2))))
