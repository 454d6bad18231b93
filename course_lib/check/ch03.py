"""Checker for chapter 03: a shared-memory tiled GEMM written in Numba.

The kernel is launched on shapes that are never a multiple of the tile in any dimension, so every
edge of the loops shows: tiles that hang over the end of A or B, a last partial tile along K, and
threads whose element of C lies outside it. M and N span different numbers of tiles, so a kernel
that takes rows from x and columns from y leaves part of C unwritten. C starts poisoned and is
followed by poisoned padding, and A and B are followed by a tile of known values, so that on a GPU
(which does not check indices) reads and writes past the edges still give a recognisable answer.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from course_lib import backend
from course_lib.check.compare import assert_close
from course_lib.check.exercise import checks_an_exercise
from course_lib.check.failure import learner_line
from course_lib.check.inputs import nonzero_float32, size_past
from course_lib.check.learner import launch_learner_kernel
from course_lib.check.mistakes import Mistake
from course_lib.check.poison import is_poison, poison, require_unwritten
from course_lib.check.run import CheckRun
from course_lib.kernels.gemm import gemm_reference

TILE = 16  # the notebook's TILE: blocks of TILE x TILE threads, one TILE x TILE tile of C each
SIGNATURE = "tiled_gemm(a, b, c)"
ZERO_FILL = "`a[row, k] if row < M and k < K else 0.0` (and likewise for b)"
STORE_GUARD = "`if row < M and col < N: c[row, col] = total`"
INDICES = "col = cuda.blockIdx.x * TILE + cuda.threadIdx.x, row = cuda.blockIdx.y * TILE + cuda.threadIdx.y"


def _tiles(size: int) -> int:
    return math.ceil(size / TILE)


def _gemm_shapes(rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """(M, N, K), none a multiple of TILE; in the first two, M and N span 2 and 3 tiles, one each way.

    The simulator runs TILE * TILE = 256 Python threads per block, so CPU shapes stay under 3 tiles.
    """
    two_tiles, three_tiles = (17, 32), (33, 41)
    shapes = [
        (size_past(rng, *two_tiles, TILE), size_past(rng, *three_tiles, TILE), size_past(rng, 17, 41, TILE)),
        (size_past(rng, *three_tiles, TILE), size_past(rng, *two_tiles, TILE), size_past(rng, 17, 41, TILE)),
    ]
    if backend.has_gpu():
        shapes += [tuple(size_past(rng, 100, 400, TILE) for _ in range(3)) for _ in range(2)]
    return shapes


# Each wrong reference takes (a_buffer, b_buffer, m): a is a_buffer[:m], b is b_buffer[:K], and each
# buffer goes on for one tile of rows past the end of its matrix.


def _truncated_k(a_buffer: np.ndarray, b_buffer: np.ndarray, m: int) -> np.ndarray:
    """a @ b with K cut down to a multiple of TILE: the last, partial tile along K left out."""
    whole = a_buffer.shape[1] // TILE * TILE
    return gemm_reference(a_buffer[:m, :whole], b_buffer[:whole])


def _read_past_edges(a_buffer: np.ndarray, b_buffer: np.ndarray, m: int) -> np.ndarray:
    """What a GPU computes without the zero-fill: a[row, k] for k >= K reads on into the next row.

    Row-major, a[row, k] is element row * K + k of the buffer and b[k, col] is element k * N + col,
    so the last tile along K multiplies values that belong to other rows.
    """
    k, n = a_buffer.shape[1], b_buffer.shape[1]
    k_padded = _tiles(k) * TILE
    a_read = a_buffer.ravel()[np.arange(m)[:, None] * k + np.arange(k_padded)]
    b_read = b_buffer.ravel()[np.arange(k_padded)[:, None] * n + np.arange(n)]
    return gemm_reference(a_read, b_read)


def _covered_with_x_and_y_swapped(m: int, n: int) -> np.ndarray:
    """Where C is written when rows come from x and columns from y: x spans N's tiles, y spans M's."""
    rows = np.arange(m)[:, None] < _tiles(n) * TILE
    columns = np.arange(n)[None, :] < _tiles(m) * TILE
    return rows & columns


def _gemm_mistakes(m: int, n: int) -> tuple[Mistake, ...]:
    covered = _covered_with_x_and_y_swapped(m, n)
    return (
        Mistake(
            "last partial tile along K skipped",
            f"this is a @ b with K cut down to a multiple of {TILE}: the loop over K must also run over the last, "
            f"partial tile, `for k0 in range(0, K, TILE)` (that is ceil(K / TILE) tiles, not K // TILE)",
            wrong_reference=_truncated_k,
        ),
        Mistake(
            "x and y swapped",
            f"C was written only in a {min(m, _tiles(n) * TILE)} x {min(n, _tiles(m) * TILE)} corner: the grid's "
            f"x covers the columns of C and y its rows, so {INDICES}",
            symptom=lambda out, ref: not covered.all() and np.array_equal(is_poison(out), ~covered),
        ),
        Mistake(
            "no zero-fill",
            f"the last tile along K multiplied values read past the end of the rows of a and b: loads outside "
            f"a matrix must put 0 in the shared tile, {ZERO_FILL}",
            wrong_reference=_read_past_edges,
        ),
    )


def _explain_error(error: BaseException) -> str | None:
    """The simulator bounds-checks every access; the learner's line tells a load from the store."""
    if not isinstance(error, IndexError):
        return None
    if re.search(r":\s*c\[", learner_line(error) or ""):
        return f"a thread whose element lies outside C stored it anyway: guard the store, {STORE_GUARD}"
    return f"a tile reached past the edge of a or b: loads outside a matrix must put 0 in the shared tile, {ZERO_FILL}"


def _check_case(kernel: Any, run: CheckRun, m: int, n: int, k: int) -> None:
    """c is the first M rows of a poisoned buffer one tile longer, so a store past its end shows."""
    __tracebackhide__ = True
    xp = backend.xp
    a_buffer = nonzero_float32(run.rng, (m + TILE) * k).reshape(m + TILE, k)
    b_buffer = nonzero_float32(run.rng, (k + TILE) * n).reshape(k + TILE, n)
    c_buffer = poison((m + TILE, n), np.float32)
    launch_learner_kernel(
        kernel, (_tiles(n), _tiles(m)), (TILE, TILE), xp.asarray(a_buffer)[:m], xp.asarray(b_buffer)[:k], c_buffer[:m],
        name="tiled_gemm", expected_signature=SIGNATURE, explain_error=_explain_error,
    )
    written = backend.to_numpy(c_buffer)
    require_unwritten(written[m:], "c", f"threads whose element lies outside C must not store it, {STORE_GUARD}")
    assert_close(written[:m], gemm_reference(a_buffer[:m], b_buffer[:k]), np.float32, what="c",
                 mistakes=_gemm_mistakes(m, n), inputs=(a_buffer, b_buffer, m))


@checks_an_exercise
def check_tiled_gemm(tiled_gemm: Any) -> None:
    """Check the kernel ``tiled_gemm(a, b, c)``: c = a @ b in float32, one TILE x TILE tile of C per block.

    Launched as ``tiled_gemm[(ceil(N / TILE), ceil(M / TILE)), (TILE, TILE)]`` (x over the columns of
    C, y over its rows) and compared with a float64 product, within the float32 tolerance (1e-5 on
    the norm, far above the rounding of fp32 sums over a few hundred terms).
    """
    __tracebackhide__ = True
    with CheckRun("tiled_gemm") as run:
        shapes = _gemm_shapes(run.rng)
        for m, n, k in shapes:
            run.case = f"a is {m} x {k}, b is {k} x {n}, {_tiles(n)} x {_tiles(m)} blocks of {TILE} x {TILE} threads"
            _check_case(tiled_gemm, run, m, n, k)
        largest = max(max(shape) for shape in shapes)
        run.passed(len(shapes), detail=f"M, N, K up to {largest}, none a multiple of {TILE}", show_mode=True)
