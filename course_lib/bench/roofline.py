"""Roofline arithmetic: is a kernel limited by bytes moved or by arithmetic, and how close is it?

A kernel that moves ``B`` bytes and does ``F`` floating-point operations cannot finish faster than
``max(F / peak_flops, B / peak_bandwidth)`` at the card's *true* peaks, its datasheet figures
(``course_lib.scaling.hardware``). The course draws a *practical* roof from what it measured on the card
instead (a large device-to-device copy, a large library matmul): the rates real code reaches. A kernel can
beat a measured ceiling (it moves its bytes another way than the copy did, finds some of them in L2, or
multiplies at a shape the library run did not time); it cannot beat the datasheet.

Copy bandwidth has one canonical figure per card, :func:`reference_copy`, which every chapter's roofline
reads; ratios that a suite takes against a copy of the same size in the same run stay as the suite defines them.
"""

from __future__ import annotations

from dataclasses import dataclass

from course_lib.bench.results import card_folder, load_result, provenance

# The canonical copy: chapter 00's env suite, measurement "copy" (cudaMemcpyAsync device to device, 256 MiB).
REFERENCE_COPY = ("env", "copy")
REFERENCE_COPY_REASON = (
    "the env suite's 256 MiB device-to-device copy, counting bytes read + written: both buffers are five times "
    "the L2 and more, so the bytes cross HBM, and it is the fastest rate a copy that large reached in the "
    "recorded runs; larger copies ran slower, and chapter 00 shows every recorded size")


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


@dataclass(frozen=True)
class CopyBandwidth:
    """The one copy-bandwidth figure the chapters' rooflines use for a card, and where it came from."""

    gbps: float  # 1e9 bytes a second, bytes read + bytes written
    buffer_bytes: int  # the size of each of the two buffers: the copy reads and writes this many bytes
    how: str
    card: str
    folder: str  # the results folder of the card (``course_lib/results/<folder>``)
    source: str  # the results file's provenance line

    @property
    def bytes_per_s(self) -> float:
        return self.gbps * 1e9

    def line(self) -> str:
        """One printable line: the figure, the size, how it was measured."""
        return f"{self.gbps:,.0f} GB/s: {self.buffer_bytes / 2**20:,.0f} MiB copied ({self.how}), read + written"


def reference_copy(card: str | None = None) -> CopyBandwidth:
    """The canonical copy bandwidth of ``card`` (a results folder; default: as ``load_result`` picks).

    Why this one (``REFERENCE_COPY_REASON``): a roofline needs the rate at which bytes stream through HBM, so the
    buffers must be far larger than the L2; among such copies the 256 MiB one is the fastest the course recorded.
    """
    name, label = REFERENCE_COPY
    result = load_result(name, card)
    copy = next((m for m in result["measurements"] if m["label"] == label), None)
    if copy is None:
        raise ValueError(f"{name}.json of {result['card']} has no {label!r} measurement to read the copy from")
    return CopyBandwidth(copy["derived"]["gbps"], copy["parameters"]["bytes"], copy["parameters"]["how"],
                         result["card"], card_folder(result["device"]), provenance(result))


def measured_roofline(card: str | None = None) -> Roofline:
    """The practical roof of ``card``: the canonical copy bandwidth and the env suite's bf16 matmul (its fastest
    matmul where it recorded no bf16 one), the rate a datasheet's dense bf16 figure is compared with."""
    copy = reference_copy(card)
    figures = load_result("env", copy.folder)["headline"]
    fastest = max(value for key, value in figures.items() if key.startswith("matmul"))
    matmul = figures.get("matmul_bf16_tflops", fastest)
    return Roofline(copy.bytes_per_s, matmul * 1e12, label=f"{copy.card}, measured (practical roof)")
