"""Checkers for chapter 01: a grid-stride SAXPY, a shared-memory block sum, and an RMSNorm kernel.

Each kernel is launched so that its classic mistake shows: SAXPY on a grid with fewer threads than
elements (and once in place), the block sum with a last block only partly filled, RMSNorm on rows
whose length is never a multiple of the block size. Outputs start poisoned (NaN), so an element no
thread wrote is named as such; on a GPU, poisoned padding after an output catches writes past its end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from course_lib import backend
from course_lib.check.compare import assert_close
from course_lib.check.cuda_source import (
    CannotRunHere,
    builds_source,
    cannot_compile_here,
    compile_learner_source,
    launch_learner_source_kernel,
    learner_source,
    load_learner_kernel,
    report_compiled_only,
    where_it_runs,
)
from course_lib.check.exercise import checks_an_exercise
from course_lib.check.inputs import nonzero_float32, size_past
from course_lib.check.learner import launch_learner_kernel
from course_lib.check.mistakes import Mistake
from course_lib.check.poison import is_poison, poison, require_unwritten
from course_lib.check.run import CheckRun
from course_lib.check.tolerance import relative_error
from course_lib.kernels.norm import rms_norm_reference

Symptom = Callable[[np.ndarray, np.ndarray], bool]  # (out, ref) -> does the output show this mistake?


def _written_only_before(column: int) -> Symptom:
    """A symptom: columns before ``column`` all written, every column from it on never written."""

    def symptom(out: np.ndarray, ref: np.ndarray) -> bool:
        never = np.atleast_2d(is_poison(out))  # one row for a vector
        unwritten = never[:, column:]
        return unwritten.size > 0 and bool(unwritten.all()) and not never[:, :column].any()

    return symptom


# --- saxpy: a grid-stride loop -------------------------------------------------------------------

SAXPY_SIGNATURE = "saxpy(a, x, y, out)"
STRIDE_LOOP = "for i in range(cuda.grid(1), out.size, cuda.gridsize(1))"


def _saxpy_grids(rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """(n, blocks, threads): always fewer threads than elements, so every thread must do several.

    n lies between one and four passes of the grid and is never a multiple of the block size.
    """
    grids = [(int(rng.integers(2, 5)), 64), (int(rng.integers(2, 5)), 128)]
    if backend.has_gpu():
        grids += [(int(rng.integers(8, 64)), 256), (int(rng.integers(100, 400)), 256)]
    return [(size_past(rng, blocks * threads + 1, 4 * blocks * threads, threads), blocks, threads)
            for blocks, threads in grids]


def _saxpy_mistakes(covered: int) -> tuple[Mistake, ...]:
    """The known mistakes for a launch of ``covered`` threads in all."""
    return (
        Mistake(
            "no grid-stride loop",
            f"only the first blocks * threads = {covered} elements were written, one per thread: the grid has "
            f"fewer threads than out has elements, so loop with a stride of cuda.gridsize(1): {STRIDE_LOOP}",
            symptom=_written_only_before(covered),
        ),
        Mistake(
            "x and y swapped",
            "this is a * y + x: saxpy scales x, out[i] = a * x[i] + y[i]",
            wrong_reference=lambda a, x, y: np.float64(a) * y + x,
        ),
    )


def _updated_more_than_once(a: np.float32, x: np.ndarray, y: np.ndarray) -> Symptom:
    """A symptom of the in-place run: out[i] = y[i] + k * a * x[i] with a whole k > 1, i.e. i updated k times."""

    def symptom(out: np.ndarray, ref: np.ndarray) -> bool:
        times = (out.astype(np.float64) - y) / (np.float64(a) * x)
        whole = np.round(times)
        return bool(np.any((whole > 1) & np.isclose(times, whole, rtol=0, atol=1e-2)))

    return symptom


SEVERAL_THREADS = (
    "run in place (out is y), some elements came out as y + k * a * x with k > 1: several threads updated them. "
    "Each element needs exactly one thread: step by cuda.gridsize(1), the number of threads in the whole grid "
    "(not cuda.blockDim.x), starting from cuda.grid(1)"
)


def _explain_saxpy_error(error: BaseException) -> str | None:
    """The simulator bounds-checks every access: an IndexError means the loop ran past the end."""
    if isinstance(error, IndexError):
        return f"an index reached past the end of the arrays: the loop must stop before out.size, {STRIDE_LOOP}"
    return None


def _launch_saxpy(kernel: Any, blocks: int, threads: int, *args: Any) -> None:
    __tracebackhide__ = True
    launch_learner_kernel(
        kernel, blocks, threads, *args,
        name="saxpy", expected_signature=SAXPY_SIGNATURE, explain_error=_explain_saxpy_error,
    )


def _check_saxpy_out_of_place(kernel: Any, run: CheckRun, n: int, blocks: int, threads: int) -> None:
    """out = the first n elements of a poisoned buffer: unwritten elements and writes past the end both show."""
    __tracebackhide__ = True
    xp = backend.xp
    padded = n + threads
    a = nonzero_float32(run.rng, 1)[0]
    x_host, y_host = nonzero_float32(run.rng, padded), nonzero_float32(run.rng, padded)
    buffer = poison(padded, np.float32)
    _launch_saxpy(kernel, blocks, threads, a, xp.asarray(x_host)[:n], xp.asarray(y_host)[:n], buffer[:n])
    written = backend.to_numpy(buffer)
    require_unwritten(written[n:], "out", f"the loop must stop before out.size, {STRIDE_LOOP}")
    inputs = (a, x_host[:n], y_host[:n])
    expected = np.float64(a) * inputs[1] + inputs[2]
    assert_close(written[:n], expected, np.float32, what="out", mistakes=_saxpy_mistakes(blocks * threads),
                 inputs=inputs)


def _check_saxpy_in_place(kernel: Any, run: CheckRun, n: int, blocks: int, threads: int) -> None:
    """y = a * x + y, out being y itself (as BLAS's saxpy works): an element updated twice shows.

    Numba device arrays keep the aliasing in both modes (the simulator copies each NumPy argument).
    """
    __tracebackhide__ = True
    cuda = backend.numba_cuda()
    a = nonzero_float32(run.rng, 1)[0]
    x_host, y_host = nonzero_float32(run.rng, n), nonzero_float32(run.rng, n)
    y = cuda.to_device(y_host)
    _launch_saxpy(kernel, blocks, threads, a, cuda.to_device(x_host), y, y)
    expected = np.float64(a) * x_host + y_host
    several_threads = Mistake("several threads", SEVERAL_THREADS, symptom=_updated_more_than_once(a, x_host, y_host))
    assert_close(y.copy_to_host(), expected, np.float32, what="y", mistakes=(several_threads,))


@checks_an_exercise
def check_saxpy(saxpy: Any) -> None:
    """Check the kernel ``saxpy(a, x, y, out)``: out[i] = a * x[i] + y[i] with a grid-stride loop.

    Every launch has fewer threads than elements (2 to 4 blocks of 64 or 128 threads on CPU), so a
    kernel that handles one element per thread leaves the rest unwritten. The last run is in place
    (out is y), where an element handled by several threads comes out wrong.
    """
    __tracebackhide__ = True
    with CheckRun("saxpy") as run:
        grids = _saxpy_grids(run.rng)
        for n, blocks, threads in grids:
            run.case = f"n = {n}, {blocks} blocks of {threads} threads"
            _check_saxpy_out_of_place(saxpy, run, n, blocks, threads)
        n, blocks, threads = grids[-1]  # the most blocks: on a GPU, the most chances to see an element updated twice
        run.case = f"n = {n}, {blocks} blocks of {threads} threads, in place (out is y)"
        _check_saxpy_in_place(saxpy, run, n, blocks, threads)
        detail = f"n up to {max(n for n, _, _ in grids)}, fewer threads than elements, one run in place"
        run.passed(len(grids) + 1, detail=detail, show_mode=True)


# --- block_sum: a shared-memory tree reduction ---------------------------------------------------

THREADS = 128  # the notebook's THREADS: block_sum's shared array holds one value per thread
ZERO_TAIL = "`x[i] if i < x.size else 0`"


def _blocks_for(n: int) -> int:
    return -(-n // THREADS)


def _block_sums(values: np.ndarray, blocks: int) -> np.ndarray:
    """The float64 sum of each run of THREADS values: ``blocks`` partials, missing values counted as 0."""
    padded = np.zeros(blocks * THREADS)
    count = min(values.size, padded.size)
    padded[:count] = values[:count]
    return padded.reshape(blocks, THREADS).sum(axis=1)


# Each wrong reference takes (buffer, n): x is buffer[:n], and the buffer goes on past x's end.
BLOCK_SUM_MISTAKES = (
    Mistake(
        "only thread 0's value",
        f"partial[b] is x[b * {THREADS}] alone, the first element of block b: every thread must store its "
        "element in the shared array, and the tree must add them all into element 0 before thread 0 writes it",
        wrong_reference=lambda buffer, n: buffer[:n:THREADS].astype(np.float64),
    ),
    Mistake(
        "tail not zero-padded",
        "the last block added the values that lie past the end of x: in the last block, threads with "
        f"i >= x.size have no element and must put 0 in the shared array: {ZERO_TAIL}",
        wrong_reference=lambda buffer, n: _block_sums(buffer, _blocks_for(n)),
    ),
    Mistake(
        "one past the end",
        "the last partial includes x[x.size], one past the end of x: the guard is `i < x.size` (`<`, not `<=`)",
        wrong_reference=lambda buffer, n: _block_sums(buffer[: n + 1], _blocks_for(n)),
    ),
    Mistake(
        "last element dropped",
        "the last partial is missing the last element, x[x.size - 1]: the guard is `i < x.size`, "
        "not `i < x.size - 1`",
        wrong_reference=lambda buffer, n: _block_sums(buffer[: n - 1], _blocks_for(n)),
    ),
)

NO_BARRIER = Mistake(
    "no barrier",
    "your kernel never calls cuda.syncthreads(). A thread may read a shared value only after the thread that "
    "writes it has done so: put cuda.syncthreads() after storing x into the shared array and after each step "
    "of the tree (outside any `if`, so that every thread of the block reaches it)",
    symptom=lambda out, ref: True,  # listed only for kernels whose code has no barrier at all
)


def _block_sum_mistakes(kernel: Any) -> tuple[Mistake, ...]:
    """The known mistakes, led by a missing barrier when the kernel's own code never names cuda.syncthreads."""
    if "syncthreads" in kernel.py_func.__code__.co_names:
        return BLOCK_SUM_MISTAKES
    return (NO_BARRIER, *BLOCK_SUM_MISTAKES)


def _explain_block_sum_error(error: BaseException) -> str | None:
    if isinstance(error, IndexError):
        return ("an index ran past the end of an array (the line above says which). In the last block, threads "
                f"with i >= x.size have no element and must put 0 in the shared array: {ZERO_TAIL} "
                "(`<`, not `<=`)")
    return None


def _block_sum_sizes(rng: np.random.Generator) -> list[int]:
    """Sizes whose last block is partly filled: at least 3 elements in it and at least 2 idle threads.

    Three elements keep "its first element alone" apart from "all but its last"; two idle threads keep
    "read one past the end" apart from "read the whole last block". One size is below a block; the
    simulator runs each CUDA thread in Python, so CPU sizes stay at a few blocks.
    """
    full_blocks = [0, int(rng.integers(1, 4))]
    if backend.has_gpu():
        full_blocks += [int(rng.integers(10, 100)), int(rng.integers(1_000, 10_000))]
    return [blocks * THREADS + int(rng.integers(3, THREADS - 1)) for blocks in full_blocks]


@checks_an_exercise
def check_block_sum(block_sum: Any) -> None:
    """Check the kernel ``block_sum(x, partial)``: partial[b] = the sum of block b's 128 elements of x.

    Launched with ceil(n / 128) blocks of 128 threads on float32 x whose size is not a multiple of
    128; x is the start of a longer buffer, so reading past its end adds known values that show.
    """
    __tracebackhide__ = True
    xp = backend.xp
    with CheckRun("block_sum") as run:
        sizes = _block_sum_sizes(run.rng)
        for n in sizes:
            blocks = _blocks_for(n)
            run.case = f"n = {n}, {blocks} block{'s' if blocks > 1 else ''} of {THREADS} threads"
            buffer = run.rng.uniform(0.5, 2.0, n + THREADS).astype(np.float32)  # positive: no partial near 0
            partial = poison(blocks, np.float32)
            launch_learner_kernel(
                block_sum, blocks, THREADS, xp.asarray(buffer)[:n], partial,
                name="block_sum", expected_signature="block_sum(x, partial)", explain_error=_explain_block_sum_error,
            )
            assert_close(partial, _block_sums(buffer[:n], blocks), np.float32, what="partial",
                         mistakes=_block_sum_mistakes(block_sum), inputs=(buffer, n))
        run.passed(len(sizes), detail=f"n up to {max(sizes)}", show_mode=True)


# --- rms_norm: one block per row -----------------------------------------------------------------

ROW_THREADS = 64  # a Numba rms_norm: the notebook's 64-float shared array, one thread per value
SOURCE_ROW_THREADS = 128  # a CUDA C rms_norm: one block of 128 threads per row
SOURCE_ARCH = "sm_80"  # CUDA C is compiled for this architecture in both modes, to report errors early
SOURCE_SIGNATURE = (
    'extern "C" __global__ void rms_norm(const float* x, const float* weight, float* out, float eps, int hidden)'
)
ROW_LOOP = "for j in range(cuda.threadIdx.x, hidden, cuda.blockDim.x)"
MEAN_OF_SQUARES = (
    "a square root of a negative number, or the mean of x where the mean of x * x belongs: the mean of the "
    "squares is never negative, the mean of x can be; accumulate x[row, j] * x[row, j]"
)
NEAR_ZERO_RTOL = 1e-3  # mean(x) + eps can come close to 0, where float32 rounding moves 1 / sqrt(...) a lot

Launcher = Callable[[Any, Any, Any, float], None]  # launch(x, weight, out, eps) on device arrays, and wait


def _rms_norm_shapes(rng: np.random.Generator) -> list[tuple[int, int]]:
    """(rows, hidden): hidden never a multiple of 64 (so never of 128); the first rows are shorter than a block."""
    hidden = [size_past(rng, 33, 64, 64), size_past(rng, 65, 300, 64)]
    if backend.has_gpu():
        hidden += [size_past(rng, 300, 1_000, 64), size_past(rng, 1_000, 5_000, 64)]
    return [(64 if backend.has_gpu() else int(rng.integers(3, 6)), size) for size in hidden]


def _rms_norm_inputs(rng: np.random.Generator, rows: int, hidden: int) -> tuple[np.ndarray, np.ndarray, float]:
    """x with a small scale per row (0.02 to 0.1), so that eps (3e-4 to 3e-3) moves the result visibly.

    eps is a float32 value, so the kernel and the float64 reference add the very same number.
    """
    scale = 10 ** rng.uniform(np.log10(0.02), np.log10(0.1), size=(rows, 1))
    x = (nonzero_float32(rng, rows * hidden).reshape(rows, hidden) * scale).astype(np.float32)
    eps = float(np.float32(10 ** rng.uniform(np.log10(3e-4), np.log10(3e-3))))
    return x, nonzero_float32(rng, hidden), eps


def _mean(rows: np.ndarray) -> np.ndarray:
    return rows.mean(axis=-1, keepdims=True)


def _sum_of_squares(rows: np.ndarray) -> np.ndarray:
    return (rows * rows).sum(axis=-1, keepdims=True)


def _rms_norm_with(x: np.ndarray, weight: np.ndarray, eps: float, statistic: Callable[..., np.ndarray]) -> np.ndarray:
    """x / sqrt(statistic(rows) + eps) * weight in float64: RMSNorm with another statistic of each row."""
    x64 = x.astype(np.float64)
    with np.errstate(invalid="ignore"):  # a negative statistic gives NaN, as on the GPU
        return x64 / np.sqrt(statistic(x64) + eps) * weight


def _same_nans_and_values(wrong: np.ndarray, rtol: float) -> Symptom:
    """A symptom: out is NaN exactly where ``wrong`` is, and within ``rtol`` of it elsewhere."""

    def symptom(out: np.ndarray, ref: np.ndarray) -> bool:
        nan = np.isnan(wrong)
        if not np.array_equal(np.isnan(out), nan):
            return False
        return bool(nan.all()) or relative_error(out[~nan], wrong[~nan]) <= rtol

    return symptom


# Each wrong reference takes the case's (x, weight, eps).
RMS_NORM_MISTAKES = (
    Mistake(
        "eps left out",
        "this is RMSNorm without eps (or with another eps than the argument): add eps to the mean of the "
        "squares, inside the square root",
        wrong_reference=lambda x, weight, eps: rms_norm_reference(x, weight, 0.0),
    ),
    Mistake(
        "sum, not mean",
        "this divides by sqrt(sum of squares + eps): the mean of the squares is that sum divided by hidden",
        wrong_reference=lambda x, weight, eps: _rms_norm_with(x, weight, eps, _sum_of_squares),
    ),
    Mistake(
        "weight not applied",
        "this is x / rms without the weight: multiply each normalised element by weight[j]",
        wrong_reference=lambda x, weight, eps: rms_norm_reference(x, np.ones_like(weight), eps),
    ),
)


def _rms_norm_mistakes(threads: int, x: np.ndarray, weight: np.ndarray, eps: float) -> tuple[Mistake, ...]:
    """The known mistakes for one case run with ``threads`` threads per row.

    Elements never written show as patterns of poison. A row one longer than the block shows both
    patterns, so the missing loop is named first; an off-by-one already fails on the first case, whose
    rows are shorter than the block. The mean of x (not of x * x) gives NaN in the rows whose mean is
    negative, which a plain comparison with a wrong reference cannot match.
    """
    return (
        Mistake(
            "no loop over the row",
            f"only the first {threads} elements of each row were written, one per thread: a row is longer than "
            f"the block, so each thread must loop over it, {ROW_LOOP}",
            symptom=_written_only_before(threads),
        ),
        Mistake(
            "last column never written",
            f"the last element of each row was never written: the loop over j must run up to hidden - 1, {ROW_LOOP}",
            symptom=_written_only_before(-1),
        ),
        *RMS_NORM_MISTAKES,
        Mistake(
            "mean of x",
            MEAN_OF_SQUARES,
            symptom=_same_nans_and_values(_rms_norm_with(x, weight, eps, _mean), NEAR_ZERO_RTOL),
        ),
    )


def _explain_rms_norm_error(error: BaseException) -> str | None:
    """The simulator raises where a GPU would go on: IndexError past an array's end, ValueError for sqrt(-1)."""
    if isinstance(error, IndexError):
        return f"an index ran past the end of an array (the line above says which): j goes up to hidden - 1, {ROW_LOOP}"
    if isinstance(error, ValueError) and "math domain error" in str(error):
        return MEAN_OF_SQUARES
    return None


def _numba_launcher(kernel: Any) -> Launcher:
    def launch(x: Any, weight: Any, out: Any, eps: float) -> None:
        __tracebackhide__ = True
        launch_learner_kernel(
            kernel, x.shape[0], ROW_THREADS, x, weight, out, np.float32(eps),
            name="rms_norm", expected_signature="rms_norm(x, weight, out, eps)", explain_error=_explain_rms_norm_error,
        )

    return launch


def _source_launcher(function: Any) -> Launcher:
    """Launch a compiled CUDA C rms_norm as rms_norm(x, weight, out, eps, hidden), one block per row."""

    def launch(x: Any, weight: Any, out: Any, eps: float) -> None:
        __tracebackhide__ = True
        rows, hidden = x.shape
        args = (x, weight, out, np.float32(eps), np.int32(hidden))
        launch_learner_source_kernel(function, (rows,), (SOURCE_ROW_THREADS,), args, "rms_norm")

    return launch


def _check_rms_norm_cases(run: CheckRun, launch: Launcher, threads: int, language: str) -> None:
    """Run every case; out is the first rows of a poisoned buffer one row longer, to catch stray writes."""
    __tracebackhide__ = True
    xp = backend.xp
    shapes = _rms_norm_shapes(run.rng)
    for rows, hidden in shapes:
        x, weight, eps = _rms_norm_inputs(run.rng, rows, hidden)
        run.case = f"x of shape ({rows}, {hidden}), eps = {eps:.3g}, one block of {threads} threads per row"
        buffer = poison((rows + 1, hidden), np.float32)
        launch(xp.asarray(x), xp.asarray(weight), buffer[:rows], eps)
        written = backend.to_numpy(buffer)
        require_unwritten(written[rows], "out", f"column indices must stay below hidden, {ROW_LOOP}")
        assert_close(written[:rows], rms_norm_reference(x, weight, eps), np.float32, what="out",
                     mistakes=_rms_norm_mistakes(threads, x, weight, eps), inputs=(x, weight, eps))
    run.passed(len(shapes), detail=f"hidden up to {max(hidden for _, hidden in shapes)}, {language}", show_mode=True)


def _check_rms_norm_source(run: CheckRun, source: str) -> None:
    """CUDA C: compile it in both modes, then run it on the GPU or, in CPU mode, on the warp emulator."""
    __tracebackhide__ = True
    if cannot_compile_here("rms_norm"):
        return
    compiled = compile_learner_source(source, "rms_norm", SOURCE_ARCH, SOURCE_SIGNATURE)
    try:
        function = load_learner_kernel(source, "rms_norm")
    except CannotRunHere as why:
        report_compiled_only(compiled, "rms_norm", why=str(why),
                             next_step="Check it on a GPU, or check the Numba version of the kernel here.")
        return
    _check_rms_norm_cases(run, _source_launcher(function), SOURCE_ROW_THREADS, f"CUDA C{where_it_runs()}")


@checks_an_exercise
def check_rms_norm(rms_norm: Any) -> None:
    """Check an RMSNorm kernel, one block per row: out = x / sqrt(mean(x * x over the row) + eps) * weight.

    ``rms_norm`` is either a Numba kernel ``rms_norm(x, weight, out, eps)``, launched with 64 threads
    per row in both modes, or CUDA C source defining ``rms_norm(x, weight, out, eps, hidden)`` (a str, or
    a function of no arguments that returns it), compiled in both modes and run, 128 threads per row, on
    the GPU or, in CPU mode, on the warp emulator. x is float32 of shape [rows, hidden], hidden never a
    multiple of the block size.
    """
    __tracebackhide__ = True
    with CheckRun("rms_norm") as run:
        if builds_source(rms_norm):
            _check_rms_norm_source(run, learner_source(rms_norm, "rms_norm"))
        else:
            _check_rms_norm_cases(run, _numba_launcher(rms_norm), ROW_THREADS, "Numba kernel")
