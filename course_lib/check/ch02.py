"""Checker for chapter 02: a GEMM on the tensor cores, written with WMMA in CUDA C.

The learner's ``wmma_gemm`` gives each warp one 16 x 16 tile of C and steps along K 16 at a time:
load a tile of A and one of B into fragments, ``mma_sync`` them into an fp32 accumulator, and store
the accumulator once at the end. CUDA C compiles on any machine, so in both modes the checker
compiles the source with NVRTC, reads the PTX to see that the tensor cores do the multiplying, and
looks for the zeroed accumulator (an accumulator that is never zeroed can come out right by luck,
so only the source tells). Only a GPU can run the kernel. There it gets fp16 matrices whose sizes
are multiples of 16 and all different, so that a wrong leading dimension or a tile read in the
wrong layout gives an answer of its own; C starts poisoned, and every buffer goes on past the end of
its matrix, so that reads past an edge give known values and writes past C's end show.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np

from course_lib import backend
from course_lib.check.compare import assert_close
from course_lib.check.cuda_source import (
    CannotRunHere,
    cannot_compile_here,
    code_without_comments,
    compile_learner_source,
    launch_learner_source_kernel,
    learner_source,
    load_learner_kernel,
    report_compiled_only,
    where_it_runs,
)
from course_lib.check.exercise import checks_an_exercise
from course_lib.check.failure import CheckFailed
from course_lib.check.inputs import nonzero_float32
from course_lib.check.mistakes import Mistake
from course_lib.check.poison import is_poison, poison, require_unwritten
from course_lib.check.run import CheckRun
from course_lib.check.tolerance import tolerance_for
from course_lib.compile import CompiledSource
from course_lib.kernels.gemm import gemm_reference

KERNEL = "wmma_gemm"
SIGNATURE = 'extern "C" __global__ void wmma_gemm(const half* a, const half* b, float* c, int M, int N, int K)'
ARCH = "sm_75"  # the oldest card the course supports has fp16 tensor cores: what compiles here runs on all
FRAGMENT = 16  # WMMA's m16n16k16 shape: 16 x 16 tiles of A, B and C
WARP = 32  # one block of one warp per tile of C
TENSOR_CORE_INSTRUCTION = re.compile(r"\b(?:wmma\.mma|mma)\.sync\b")  # WMMA's, or mma.sync in inline PTX
ZEROES_ACCUMULATOR = re.compile(r"\bfill_fragment\s*\(")

NO_TENSOR_CORES = (
    "this kernel does not use the tensor cores: its PTX has no mma.sync instruction. Multiply the tiles with "
    "wmma::mma_sync(acc, a_tile, b_tile, acc), and store acc at the end (the compiler removes a product whose "
    "result is never stored, mma_sync included)"
)
NEVER_ZEROED = (
    "your kernel never calls wmma::fill_fragment, so its accumulator starts with whatever its registers last "
    "held: on a GPU the sums come out as garbage, or right by luck. Zero it before the loop over K: "
    "wmma::fill_fragment(acc, 0.0f)"
)
TILE_PLACE = (
    "the block at (blockIdx.x, blockIdx.y) owns the tile of C at row 16 * blockIdx.y and column 16 * blockIdx.x "
    "(the grid's x covers the columns of C, y its rows)"
)
STORE = (
    "wmma::store_matrix_sync(c + tile_row * N + tile_col, acc, N, wmma::mem_row_major), called by all 32 threads "
    "of the warp, stores the whole tile; its ldm is N, the length of a row of C"
)
PAST_THE_END = f"{TILE_PLACE}; and ldm for C is N, the length of its rows"

Shape = tuple[int, int, int]  # (M, N, K)


def _tiles(size: int) -> int:
    return size // FRAGMENT


def case_shapes(rng: np.random.Generator) -> list[Shape]:
    """(M, N, K), multiples of 16 and all different, so that a leading dimension mixed up with another shows.

    In the first, M < N: a grid whose x and y are swapped puts tiles past the last row of C.
    """
    m, n = sorted(int(tiles) * FRAGMENT for tiles in rng.choice(np.arange(2, 9), 2, replace=False))
    k = int(rng.choice([tiles for tiles in range(2, 9) if tiles * FRAGMENT not in (m, n)])) * FRAGMENT
    large = tuple(int(tiles) * FRAGMENT for tiles in rng.choice(np.arange(8, 33), 3, replace=False))
    return [(m, n, k), large]


def padding(shape: Shape) -> int:
    """Elements each buffer holds past the end of its matrix: more than any known mistake reaches.

    A swapped grid, a wrong ldm or one step too many along K then reads known values and writes into
    poison on a GPU, instead of touching memory the checker does not own.
    """
    largest = max(shape)
    return largest * (largest + FRAGMENT)


def _fp16_buffer(rng: np.random.Generator, size: int) -> np.ndarray:
    """fp16 values in ±[0.5, 2), never zero; the float64 reference multiplies these very (rounded) values."""
    return nonzero_float32(rng, size).astype(np.float16)


# --- what a one-warp-per-tile WMMA kernel computes when it loads its tiles another way ------------


def product_as_loaded(
    a_buffer: np.ndarray,
    b_buffer: np.ndarray,
    shape: Shape,
    *,
    lda: int | None = None,
    ldb: int | None = None,
    a_col_major: bool = False,
    b_col_major: bool = False,
    k_extent: int | None = None,
) -> np.ndarray:
    """C in float64 as the kernel computes it when its loads use these leading dimensions and layouts.

    For each step k0 the kernel points at a + tile_row * K + k0 and b + k0 * N + tile_col; a row-major
    fragment takes element (r, s) from pointer[r * ldm + s], a column-major one from pointer[r + s * ldm].
    Defaults are the right ones (lda = K, ldb = N, row-major, K columns); the indices go on into each
    buffer's padding, as the kernel's reads go on into memory past a matrix.
    """
    m, n, k = shape
    lda, ldb = lda or k, ldb or n
    ks = np.arange(k if k_extent is None else k_extent)  # k0 + kk, the columns of A the steps cover
    rows, cols = np.arange(m), np.arange(n)
    k0, kk = ks - ks % FRAGMENT, ks % FRAGMENT
    tile_row, r = rows - rows % FRAGMENT, rows % FRAGMENT
    tile_col, s = cols - cols % FRAGMENT, cols % FRAGMENT
    a_start = tile_row[:, None] * k + k0[None, :]
    a_offset = r[:, None] + kk[None, :] * lda if a_col_major else r[:, None] * lda + kk[None, :]
    b_start = k0[:, None] * n + tile_col[None, :]
    b_offset = kk[:, None] + s[None, :] * ldb if b_col_major else kk[:, None] * ldb + s[None, :]
    a_read = a_buffer[a_start + a_offset].astype(np.float64)
    return a_read @ b_buffer[b_start + b_offset].astype(np.float64)


def _whole_tiles_unwritten(out: np.ndarray, ref: np.ndarray) -> bool:
    """A symptom: some 16 x 16 tiles of C were never written at all, and the others completely."""
    rows, cols = out.shape
    never = is_poison(out).reshape(_tiles(rows), FRAGMENT, _tiles(cols), FRAGMENT)
    every, some = never.all(axis=(1, 3)), never.any(axis=(1, 3))
    return bool(some.any()) and bool(np.array_equal(every, some))


def _parts_of_tiles_unwritten(out: np.ndarray, ref: np.ndarray) -> bool:
    """A symptom: elements never written, but not in whole tiles."""
    return bool(is_poison(out).any()) and not _whole_tiles_unwritten(out, ref)


def _ldm_hint(matrix: str, rows: str, right: str) -> str:
    return (f"the tiles of {matrix} were loaded with the wrong ldm: load_matrix_sync's ldm is the number of elements "
            f"from one row of {matrix} in memory to the next, {right} for the row-major [{rows}, {right}] {matrix} "
            "(not the tile's 16)")


def _layout_hint(matrix: str, fragment: str) -> str:
    return (f"each 16 x 16 tile of {matrix} was used transposed: {matrix} is row-major, so declare its fragment as "
            f"wmma::fragment<wmma::{fragment}, 16, 16, 16, half, wmma::row_major> (col_major reads a tile column "
            "by column)")


def _mistakes(shape: Shape) -> tuple[Mistake, ...]:
    """The known mistakes for one case; each wrong reference takes the case's (a_buffer, b_buffer)."""
    m, n, k = shape

    def loaded(**how: Any) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        return lambda a_buffer, b_buffer: product_as_loaded(a_buffer, b_buffer, shape, **how)

    def b_column_major(a_buffer: np.ndarray, b_buffer: np.ndarray) -> np.ndarray:
        """B's K * N values read as a column-major [K, N] matrix, i.e. as the rows of an [N, K] one."""
        a, b_columns = a_buffer[: m * k].reshape(m, k), b_buffer[: k * n].reshape(n, k)
        return a.astype(np.float64) @ b_columns.T.astype(np.float64)

    return (
        Mistake("whole tiles never written", f"whole 16 x 16 tiles of C were never written: {TILE_PLACE}",
                symptom=_whole_tiles_unwritten),
        Mistake("parts of tiles never written", f"parts of the 16 x 16 tiles of C were never written: {STORE}",
                symptom=_parts_of_tiles_unwritten),
        Mistake("B fragment column-major", _layout_hint("B", "matrix_b"), wrong_reference=loaded(b_col_major=True)),
        Mistake("A fragment column-major", _layout_hint("A", "matrix_a"), wrong_reference=loaded(a_col_major=True)),
        Mistake(
            "B read as a column-major matrix",
            "this is A @ B with B read as a column-major matrix, the layout of cuBLAS and of NVIDIA's WMMA sample: "
            "here B is row-major [K, N], so the tile for step k0 starts at b + k0 * N + tile_col, with ldm N and a "
            "wmma::row_major fragment",
            wrong_reference=b_column_major,
        ),
        Mistake("ldm of A and B swapped", "the ldm of A and B are swapped: a row of A is K elements long, one of B N",
                wrong_reference=loaded(lda=n, ldb=k)),
        *(Mistake("ldm of A", _ldm_hint("A", "M", "K"), wrong_reference=loaded(lda=wrong)) for wrong in (FRAGMENT, n)),
        *(Mistake("ldm of B", _ldm_hint("B", "K", "N"), wrong_reference=loaded(ldb=wrong)) for wrong in (FRAGMENT, k)),
        Mistake(
            "K loop one step short",
            "this is A @ B without the last 16 columns of A (and rows of B): the loop over K stops one step early; "
            "run it while k0 < K",
            wrong_reference=loaded(k_extent=k - FRAGMENT),
        ),
        Mistake(
            "K loop one step too far",
            "the loop over K ran one step too far, into the 16 values past the end of each row of A (and the 16 rows "
            "past the end of B): run it while k0 < K, not k0 <= K",
            wrong_reference=loaded(k_extent=k + FRAGMENT),
        ),
    )


def judge_case(c_buffer: np.ndarray, a_buffer: np.ndarray, b_buffer: np.ndarray, shape: Shape) -> None:
    """Judge what the kernel left in ``c_buffer`` (host copy): nothing past C's end, and C = A @ B.

    Separate from the launch so that the tests can hand it the outputs of known mistakes without a GPU.
    """
    __tracebackhide__ = True
    m, n, k = shape
    require_unwritten(c_buffer[m * n :], "c", PAST_THE_END)
    a, b = a_buffer[: m * k].reshape(m, k), b_buffer[: k * n].reshape(k, n)
    assert_close(c_buffer[: m * n].reshape(m, n), gemm_reference(a, b), np.float32, what="c",
                 rtol=tolerance_for("float16"), mistakes=_mistakes(shape), inputs=(a_buffer, b_buffer))


def _run_case(function: Any, run: CheckRun, shape: Shape) -> None:
    """Launch one warp per tile of C, ``(N / 16, M / 16)`` blocks of 32 threads, on fresh buffers."""
    __tracebackhide__ = True
    xp = backend.xp
    m, n, k = shape
    pad = padding(shape)
    a_buffer, b_buffer = _fp16_buffer(run.rng, m * k + pad), _fp16_buffer(run.rng, k * n + pad)
    c_buffer = poison(m * n + pad, np.float32)
    args = (xp.asarray(a_buffer), xp.asarray(b_buffer), c_buffer, np.int32(m), np.int32(n), np.int32(k))
    launch_learner_source_kernel(function, (_tiles(n), _tiles(m)), (WARP,), args, KERNEL)
    judge_case(backend.to_numpy(c_buffer), a_buffer, b_buffer, shape)


def _require_tensor_cores_and_zeroing(compiled: CompiledSource, source: str) -> None:
    """What the compiled PTX and the source show without running anything."""
    __tracebackhide__ = True
    if not TENSOR_CORE_INSTRUCTION.search(compiled.ptx):
        raise CheckFailed(f"{KERNEL} compiles, but {NO_TENSOR_CORES}")
    if not ZEROES_ACCUMULATOR.search(code_without_comments(source)):
        raise CheckFailed(NEVER_ZEROED)


@checks_an_exercise
def check_wmma_gemm(source: str | Callable[[], str]) -> None:
    """Check CUDA C ``source`` defining ``wmma_gemm(a, b, c, M, N, K)``: c = a @ b on the tensor cores.

    ``source`` is the str, or the learner's function of no arguments that returns it.

    a [M, K] and b [K, N] are row-major fp16, c [M, N] row-major fp32, and M, N, K are multiples of 16.
    In both modes the source is compiled for sm_75 and must issue mma.sync and zero its accumulator;
    then it is launched with (N / 16, M / 16) blocks of 32 threads, one warp per 16 x 16 tile of c (on
    the GPU, or in CPU mode on the warp emulator), and compared with a float64 product within the fp16
    tolerance. Where neither can run it, it prints what compiling showed and that the numerical check
    did not run, and returns without claiming a pass.
    """
    __tracebackhide__ = True
    with CheckRun(KERNEL) as run:
        source = learner_source(source, KERNEL)
        if cannot_compile_here(KERNEL):
            return
        compiled = compile_learner_source(source, KERNEL, ARCH, SIGNATURE)
        _require_tensor_cores_and_zeroing(compiled, source)
        try:
            function = load_learner_kernel(source, KERNEL)
        except CannotRunHere as why:
            report_compiled_only(compiled, KERNEL, "its PTX multiplies on the tensor cores (mma.sync)", why=str(why))
            return
        shapes = case_shapes(run.rng)
        for shape in shapes:
            m, n, k = shape
            run.case = f"a is {m} x {k}, b is {k} x {n}, {_tiles(n)} x {_tiles(m)} blocks of one warp"
            _run_case(function, run, shape)
        largest = max(max(shape) for shape in shapes)
        run.passed(len(shapes), detail=f"M, N, K multiples of 16 up to {largest}, fp16 in, fp32 out{where_it_runs()}",
                   show_mode=True)
