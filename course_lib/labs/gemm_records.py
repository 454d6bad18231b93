"""The GEMM suite's results file read back by name and shape, for chapters 02, 03 and 03b.

``python -m course_lib.bench gemm`` records, in one run on one card, every step of the progression, cuBLAS and
cuBLASLt on square, decode and prefill shapes, each checked against float64 before it was timed. A record
either holds a figure or says why not (never measured, or skipped with the reason). ``GemmResults`` answers
the chapters' questions about that file ("step 5 at 8192^3?", "the fastest CUDA-core step?") so that each
chapter cell holds the comparison it teaches, not the bookkeeping.

On a GPU, ``speed_figures`` measures the same products now instead, in one run, so that every ratio a
chapter prints compares figures from one card and one run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from course_lib import backend
from course_lib.bench import load_result, provenance
from course_lib.bench.suites import gemm as gemm_suite
from course_lib.device_facts import device_facts
from course_lib.kernels import gemm

CUDA_CORE_STEPS = tuple(step for step in gemm.STEPS if step not in gemm.TENSOR_CORE_STEPS)
DECODE_BACKENDS = (*gemm_suite.FAST_STEPS, *gemm_suite.LIBRARIES)
# The decode group's weight matrices, (N, K, label): square h x h, and the MLP's up-projection
DECODE_WEIGHTS = ([(h, h, f"hidden {h}") for h in gemm_suite.DECODE_HIDDEN]
                  + [(4 * gemm_suite.MLP_HIDDEN, gemm_suite.MLP_HIDDEN,
                      f"MLP {gemm_suite.MLP_HIDDEN} -> {4 * gemm_suite.MLP_HIDDEN}")])


def tflops(record: dict[str, Any]) -> float:
    """The TFLOP/s a record holds (2 M N K over its median time)."""
    return record["derived"]["tflops"]


def percent(fraction: float) -> str:
    """A share written with one decimal below 10% and none above: '3.2%', '87%'."""
    return f"{fraction:.1%}" if fraction < 0.1 else f"{fraction:.0%}"


@dataclass(frozen=True)
class GemmResults:
    """One ``gemm.json`` results file (``record``), or none (``record`` is None and ``missing`` says why)."""

    record: dict[str, Any] | None
    missing: str = ""

    @classmethod
    def load(cls) -> GemmResults:
        """The results file of the card this process runs on, else the course's recorded card."""
        try:
            return cls(load_result("gemm"))
        except FileNotFoundError as error:
            return cls(None, str(error))

    @property
    def measurements(self) -> list[dict[str, Any]]:
        """Every record of the file; none when there is no file."""
        return self.record["measurements"] if self.record else []

    @property
    def source(self) -> str:
        """Where the figures came from: card, date, driver and library versions."""
        return provenance(self.record) if self.record else "no recorded GEMM results"

    def find(self, name: str, group: str, mnk: list[int]) -> dict[str, Any] | None:
        """The record of ``name`` (a step, "cuBLAS" or "cuBLASLt") on one shape of one group, or None."""
        return gemm_suite.find(self.measurements, name, group, mnk)

    def square(self, name: str, n: int) -> dict[str, Any] | None:
        """The record of ``name`` on the bf16 n^3 product, or None."""
        return self.find(name, "square", [n, n, n])

    def best_cuda_core(self, n: int) -> dict[str, Any] | None:
        """The fastest of steps 1-4 on bf16 n^3, or None if none of them holds a figure."""
        found = (self.square(step, n) for step in CUDA_CORE_STEPS)
        return max((m for m in found if not gemm_suite.missing_reason(m)), key=tflops, default=None)

    def largest_measured(self, name: str) -> tuple[int, dict[str, Any]] | None:
        """(n, record) of the largest cube on which ``name`` holds a figure, or None."""
        for n in sorted(gemm_suite.SQUARE_SIZES, reverse=True):
            if not gemm_suite.missing_reason(m := self.square(name, n)):
                return n, m
        return None

    def decode_series(self, name: str, n: int, k: int) -> list[dict[str, Any]]:
        """``name``'s decode records against [k, n] weights that hold a figure, by increasing M."""
        found = (self.find(name, "decode", [m, n, k]) for m in gemm_suite.DECODE_ROWS)
        return [m for m in found if not gemm_suite.missing_reason(m)]

    def has_decode_shapes(self) -> bool:
        """Whether any decode backend holds a figure on any decode weight matrix."""
        return any(self.decode_series(name, n, k) for name in DECODE_BACKENDS for n, k, _ in DECODE_WEIGHTS)

    def recorded_lines(self, step: str) -> list[str]:
        """A step's recorded TFLOP/s at each square size, its share of cuBLAS, and its own check's error."""
        lines = [f"Recorded: {self.source}"]
        for n in gemm_suite.SQUARE_SIZES:
            m, cublas = self.square(step, n), self.square("cuBLAS", n)
            if why := gemm_suite.missing_reason(m):
                lines.append(f"  {n}^3: {why}")
                continue
            share = ("" if gemm_suite.missing_reason(cublas)
                     else f" = {percent(tflops(m) / tflops(cublas))} of cuBLAS")
            error = m["parameters"].get("relative_error")
            checked = f" (its check: relative error {error:.1e})" if error is not None else ""
            lines.append(f"  {n}^3: {tflops(m):>6,.1f} TFLOP/s{share}{checked}")
        return lines


@dataclass(frozen=True)
class SpeedFigures:
    """TFLOP/s by name, why a name has no figure, and where the numbers come from."""

    tflops: dict[str, float]
    missing: dict[str, str]
    source: str
    names: tuple[str, ...]


def measure_now(name: str, n: int) -> dict[str, Any]:
    """The gemm suite's check-then-time of ``name`` on bf16 n^3; a library this machine lacks is a skipped record."""
    try:
        return gemm_suite.measure(name, gemm_suite.Shape(n, n, n, "square"))
    except ImportError as error:
        return {"skipped": f"it needs a library this machine lacks ({error})"}


def speed_figures(results: GemmResults, names: tuple[str, ...], n: int) -> SpeedFigures:
    """The bf16 n^3 speed of each of ``names``: measured now, in one run, on a GPU; else read from ``results``.

    Measuring takes tens of seconds (every product is first checked against float64). A name with no figure
    keeps the reason, with "on the recorded GPU" turned into "here" when the GPU is this one.
    """
    if backend.has_gpu():
        print(f"Measuring now: {len(names)} products of bf16 {n}^3 on {device_facts()['name']}, each "
              "checked against float64, then timed, all in this run...")
        records = {name: measure_now(name, n) for name in names}
    else:
        records = {name: results.square(name, n) for name in names}
    figures = {name: tflops(m) for name, m in records.items() if not gemm_suite.missing_reason(m)}
    missing = {name: why for name, m in records.items() if (why := gemm_suite.missing_reason(m))}
    if backend.has_gpu():
        missing = {name: why.replace("on the recorded GPU", "here") for name, why in missing.items()}
        source = f"measured now on {device_facts()['name']}, all in this run (CUDA-graph replays)"
    else:
        source = f"recorded in one run: {results.source}"
    return SpeedFigures(figures, missing, source, names)
