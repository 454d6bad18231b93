"""Checkers for chapter 00: bandwidth arithmetic, the roofline time floor, and a first CUDA kernel."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np

from course_lib import backend
from course_lib.bench.roofline import achieved_gbps as reference_gbps
from course_lib.bench.roofline import roofline_time as reference_roofline_time
from course_lib.check.compare import assert_close
from course_lib.check.exercise import checks_an_exercise
from course_lib.check.failure import CheckFailed
from course_lib.check.inputs import nonzero_float32
from course_lib.check.learner import call_learner, launch_learner_kernel
from course_lib.check.mistakes import Mistake
from course_lib.check.poison import is_poison, poison
from course_lib.check.run import CheckRun

SCALAR_CASES = 20


def _rounded(value: float, digits: int = 4) -> float:
    """``value`` to a few significant digits, so the numbers in a message are the exact inputs."""
    return float(f"{value:.{digits}g}")


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """A value between ``low`` and ``high`` with every order of magnitude equally likely."""
    return _rounded(10 ** rng.uniform(np.log10(low), np.log10(high)))


def _call_text(name: str, args: tuple[float, ...]) -> str:
    """'roofline_time(24600000000, 7541000, 5.152e+14, 2.181e+12)': the call, with its exact inputs."""
    return f"{name}({', '.join(f'{arg:g}' if isinstance(arg, float) else str(arg) for arg in args)})"


def _scaled_by(factor: float) -> Callable[[np.ndarray, np.ndarray], bool]:
    """A symptom: the output is the reference times ``factor``."""
    return lambda out, ref: bool(np.isclose(out, ref * factor, rtol=1e-9, atol=0))


# --- achieved_gbps ---------------------------------------------------------------------------------


def _check_scalar_case(
    fn: Callable[..., Any], name: str, signature: str, args: tuple, expected: float, mistakes: tuple[Mistake, ...]
) -> None:
    """Call the learner's ``fn(*args)`` and compare its answer with ``expected``, naming known mistakes."""
    __tracebackhide__ = True
    out = call_learner(fn, *args, name=name, expected_signature=signature)
    assert_close(out, expected, what=_call_text(name, args), mistakes=mistakes, inputs=args)


ACHIEVED_GBPS_MISTAKES = (
    Mistake(
        "only bytes read",
        "this is what you get when you count only the bytes read; a copy reads AND writes each byte",
        wrong_reference=lambda read, written, seconds: read / seconds / 1e9,
    ),
    Mistake(
        "only bytes written",
        "this is what you get when you count only the bytes written; the traffic is bytes read + bytes written",
        wrong_reference=lambda read, written, seconds: written / seconds / 1e9,
    ),
    Mistake(
        "GiB/s",
        "this is GiB/s (dividing by 2**30); GB/s, as on the data sheets, divides by 1e9",
        wrong_reference=lambda read, written, seconds: (read + written) / seconds / 2**30,
    ),
    Mistake(
        "milliseconds",
        "off by a factor of 1000: `seconds` is in seconds, not milliseconds",
        symptom=lambda out, ref: _scaled_by(1e3)(out, ref) or _scaled_by(1e-3)(out, ref),
    ),
)


@checks_an_exercise
def check_achieved_gbps(achieved_gbps: Callable[[int, int, float], float]) -> None:
    """Check ``achieved_gbps(bytes_read, bytes_written, seconds)`` = (read + written) / seconds / 1e9."""
    __tracebackhide__ = True
    with CheckRun("achieved_gbps") as run:
        for _ in range(SCALAR_CASES):
            bytes_read = int(_log_uniform(run.rng, 1e3, 1e11))
            bytes_written = int(_log_uniform(run.rng, 1e3, 1e11))
            seconds = _rounded((bytes_read + bytes_written) / (_log_uniform(run.rng, 1, 4000) * 1e9))
            _check_scalar_case(
                achieved_gbps, "achieved_gbps", "achieved_gbps(bytes_read, bytes_written, seconds)",
                (bytes_read, bytes_written, seconds), reference_gbps(bytes_read + bytes_written, seconds),
                ACHIEVED_GBPS_MISTAKES,
            )
        run.passed(SCALAR_CASES)


# --- roofline_time ---------------------------------------------------------------------------------


ROOFLINE_TIME_MISTAKES = (
    Mistake(
        "sum",
        "this is compute time + memory time; the GPU overlaps the two, so the floor is the larger one: max(...)",
        wrong_reference=lambda flops, moved, peak_flops, peak_bytes: flops / peak_flops + moved / peak_bytes,
    ),
    Mistake(
        "min",
        "this is the smaller of the two times; a kernel is done only when its math AND its memory traffic are: max",
        wrong_reference=lambda flops, moved, peak_flops, peak_bytes: min(flops / peak_flops, moved / peak_bytes),
    ),
    Mistake(
        "inverted ratios",
        "the ratios are upside down: a time is work / rate, e.g. flops / peak_flops_per_s",
        wrong_reference=lambda flops, moved, peak_flops, peak_bytes: max(peak_flops / flops, peak_bytes / moved),
    ),
)


@checks_an_exercise
def check_roofline_time(roofline_time: Callable[[float, float, float, float], float]) -> None:
    """Check ``roofline_time(flops, bytes_moved, peak_flops_per_s, peak_bytes_per_s)``: the larger of the two times.

    Cases alternate between compute-bound and memory-bound, at least a factor 2 from the ridge point.
    """
    __tracebackhide__ = True
    with CheckRun("roofline_time") as run:
        for case in range(SCALAR_CASES):
            peak_flops = _log_uniform(run.rng, 1e12, 2e15)  # 1 TFLOP/s to 2 PFLOP/s
            peak_bytes = _log_uniform(run.rng, 1e11, 4e12)  # 100 GB/s to 4 TB/s
            bytes_moved = int(_log_uniform(run.rng, 1e6, 1e11))
            ridge = peak_flops / peak_bytes  # flops per byte at which both times are equal
            distance = 10 ** run.rng.uniform(0.3, 2)
            intensity = ridge * distance if case % 2 == 0 else ridge / distance
            flops = int(_rounded(bytes_moved * intensity))
            args = (flops, bytes_moved, peak_flops, peak_bytes)
            _check_scalar_case(
                roofline_time, "roofline_time", "roofline_time(flops, bytes_moved, peak_flops_per_s, peak_bytes_per_s)",
                args, reference_roofline_time(*args), ROOFLINE_TIME_MISTAKES,
            )
        run.passed(SCALAR_CASES, detail="compute-bound and memory-bound")


# --- vector_add ------------------------------------------------------------------------------------

THREADS_PER_BLOCK = 128
GUARD = "guard with `if i < out.size`"


def _only_first_block_written(out: np.ndarray, ref: np.ndarray) -> bool:
    never_written = is_poison(out)
    return (
        out.size > THREADS_PER_BLOCK
        and not never_written[:THREADS_PER_BLOCK].any()
        and never_written[THREADS_PER_BLOCK:].all()
    )


VECTOR_ADD_MISTAKES = (
    Mistake(
        "no blockIdx term",
        f"elements from index {THREADS_PER_BLOCK} on were never written: did you forget blockIdx.x * blockDim.x? "
        "i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x (or cuda.grid(1))",
        symptom=_only_first_block_written,
    ),
    Mistake(
        "subtraction",
        "this is a - b: vector_add should compute a + b",
        wrong_reference=lambda a, b: a.astype(np.float64) - b,
    ),
)


def _vector_sizes(rng: np.random.Generator) -> list[int]:
    """Sizes never a multiple of the block size, so the last block has threads with nothing to do.

    One size is below a block; the simulator runs each CUDA thread in Python, so CPU sizes stay small.
    """
    ranges = [(1, THREADS_PER_BLOCK), (THREADS_PER_BLOCK + 1, 1_000), (1_000, 2_000)]
    if backend.has_gpu():
        ranges += [(2_000, 10_000), (100_000, 3_000_000)]
    sizes = [int(rng.integers(low, high)) for low, high in ranges]
    return [n + 1 if n % THREADS_PER_BLOCK == 0 else n for n in sizes]


def _explain_out_of_bounds(error: BaseException) -> str | None:
    """The simulator bounds-checks every access: an IndexError means the kernel needs a guard."""
    if not isinstance(error, IndexError):
        return None
    found = re.search(r"index (\d+) is out of bounds for axis \d+ with size (\d+)", str(error))
    if found and found[1] == found[2]:
        return f"index {found[1]} is one past the end: {GUARD} (`<`, not `<=`)"
    return f"threads past the last element must do nothing: {GUARD}"


def _require_nothing_written_past(buffer: np.ndarray, n: int) -> None:
    """On a GPU nothing stops a write past the end; the poisoned padding after ``out`` shows it."""
    __tracebackhide__ = True
    written = np.flatnonzero(~is_poison(buffer[n:]))
    if written.size == 0:
        return
    if written.tolist() == [0]:
        raise CheckFailed(f"your kernel wrote out[{n}], one past the end of out (size {n}): {GUARD} (`<`, not `<=`)")
    raise CheckFailed(f"your kernel wrote past the end of out (size {n}), up to out[{n + written[-1]}]: {GUARD}")


@checks_an_exercise
def check_vector_add(vector_add: Any) -> None:
    """Check the kernel ``vector_add(a, b, out)``: out[i] = a[i] + b[i], one thread per element.

    Launched with 128 threads per block on float32 inputs whose size is not a multiple of 128, into
    ``out`` = the first n elements of a poisoned buffer one block longer, so that unwritten elements
    and writes past the end both show.
    """
    __tracebackhide__ = True
    xp = backend.xp
    with CheckRun("vector_add") as run:
        sizes = _vector_sizes(run.rng)
        for n in sizes:
            blocks = -(-n // THREADS_PER_BLOCK)
            run.case = f"n = {n}, {blocks} block{'s' if blocks > 1 else ''} of {THREADS_PER_BLOCK} threads"
            padded = n + THREADS_PER_BLOCK  # a guard-less kernel writes at most a block minus one past n
            a_host, b_host = nonzero_float32(run.rng, padded), nonzero_float32(run.rng, padded)
            a, b, buffer = xp.asarray(a_host), xp.asarray(b_host), poison(padded, np.float32)
            launch_learner_kernel(
                vector_add,
                blocks,
                THREADS_PER_BLOCK,
                a[:n],
                b[:n],
                buffer[:n],
                name="vector_add",
                expected_signature="vector_add(a, b, out)",
                explain_error=_explain_out_of_bounds,
            )
            written = backend.to_numpy(buffer)
            _require_nothing_written_past(written, n)
            inputs = (a_host[:n], b_host[:n])
            expected = inputs[0].astype(np.float64) + inputs[1]
            assert_close(written[:n], expected, np.float32, what="out", mistakes=VECTOR_ADD_MISTAKES, inputs=inputs)
        run.passed(len(sizes), detail=f"n up to {max(sizes)}", show_mode=True)
