"""Roofline arithmetic: is a kernel limited by bytes moved or by arithmetic, and how close is it?

A kernel that moves ``B`` bytes and does ``F`` floating-point operations cannot finish faster than
``max(F / peak_flops, B / peak_bandwidth)``. Peaks are *measured* on the same card (a large
device-to-device copy, a large library matmul), never taken from a datasheet.
"""

from __future__ import annotations

from dataclasses import dataclass


def achieved_gbps(bytes_moved: float, seconds: float) -> float:
    """GB/s (1e9 bytes a second) for ``bytes_moved``, counting bytes read plus bytes written."""
    _check_positive(seconds=seconds)
    return bytes_moved / seconds / 1e9


def achieved_tflops(flops: float, seconds: float) -> float:
    """TFLOP/s (1e12 operations a second); a multiply-add counts as two operations."""
    _check_positive(seconds=seconds)
    return flops / seconds / 1e12


def roofline_time(flops: float, bytes_moved: float, peak_flops_per_s: float, peak_bytes_per_s: float) -> float:
    """The time floor: the slower of doing the arithmetic and moving the bytes at peak rate."""
    _check_positive(peak_flops_per_s=peak_flops_per_s, peak_bytes_per_s=peak_bytes_per_s)
    return max(flops / peak_flops_per_s, bytes_moved / peak_bytes_per_s)


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


@dataclass(frozen=True)
class Roofline:
    """Two measured ceilings of one card: bytes a second and operations a second."""

    peak_bytes_per_s: float
    peak_flops_per_s: float
    label: str = ""

    @property
    def ridge_intensity(self) -> float:
        """FLOP per byte where the two ceilings meet: below it a kernel is memory-bound."""
        return self.peak_flops_per_s / self.peak_bytes_per_s

    def attainable_flops_per_s(self, intensity: float) -> float:
        """The roof at ``intensity`` FLOP/byte."""
        return min(self.peak_flops_per_s, intensity * self.peak_bytes_per_s)

    def fraction_of_roof(self, flops: float, bytes_moved: float, seconds: float) -> float:
        """Achieved time floor over measured time: 1.0 means the kernel runs at the roof."""
        return roofline_time(flops, bytes_moved, self.peak_flops_per_s, self.peak_bytes_per_s) / seconds
