"""Checker for chapter 03's register-blocked GEMM: each thread computes a TM x TN micro-tile from shared memory.

A block of (BN / TN) x (BM / TM) = 4 x 4 threads computes a BM x BN = 16 x 16 tile of C, walking along K in steps
of BK = 8: the block stages a BM x BK tile of A and a BK x BN tile of B in shared memory, and each thread keeps
TM x TN = 16 accumulators in registers. The shapes are whole multiples of the tiles (the kernel needs no edge
guards), but M, N and K all differ and M and N span different numbers of tiles, so rows and columns taken from
the wrong grid axis, a K loop one tile short and a thread that writes one element instead of its micro-tile all
show. C starts poisoned; on a GPU every matrix is followed by padding so that a misplaced tile lands in it.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from typing import Any

import numpy as np

from course_lib import backend
from course_lib.check.compare import assert_close
from course_lib.check.exercise import checks_an_exercise
from course_lib.check.inputs import nonzero_float32
from course_lib.check.learner import _python_function, launch_learner_kernel
from course_lib.check.mistakes import Mistake
from course_lib.check.poison import is_poison, poison, require_unwritten
from course_lib.check.run import CheckRun
from course_lib.kernels.gemm import gemm_reference

BM = BN = 16  # the block's tile of C
BK = 8  # the K of one step: A's shared tile is BM x BK, B's BK x BN
TM = TN = 4  # the thread's micro-tile of C, held in registers
THREADS = (BN // TN, BM // TM)  # (x, y): 4 x 4 threads per block
SIGNATURE = "register_blocked_gemm(a, b, c)"
GRID = ("the grid's x covers the columns of C and y its rows: the block's tile starts at row "
        "cuda.blockIdx.y * BM and column cuda.blockIdx.x * BN")
MICRO_TILE = (f"each of the {THREADS[0]} x {THREADS[1]} threads computes a {TM} x {TN} micro-tile, rows "
              "cuda.threadIdx.y * TM + i and columns cuda.threadIdx.x * TN + j of the block's tile, i < TM, j < TN")


def _shapes(rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """(M, N, K): M and N 2-4 tiles and different, the first M < N and the second M > N; K never equals a tile
    side (16) or M or N, so an index error's array size tells a shared tile from a global matrix."""
    tiles = [int(t) for t in rng.choice([2, 3, 4], 2, replace=False)]
    low, high = sorted(tiles)
    shapes = [(low * BM, high * BN), (high * BM, low * BN)]
    if backend.has_gpu():
        shapes.append((int(rng.integers(8, 17)) * BM, int(rng.integers(4, 8)) * BN))
    return [(m, n, _k_steps(rng, m, n) * BK) for m, n in shapes]


def _k_steps(rng: np.random.Generator, m: int, n: int) -> int:
    """3 to 7 steps of BK along K (at least three, so one left out is plain), K different from M and N."""
    return int(rng.choice([s for s in range(3, 8) if s * BK not in (m, n)]))


def _k_loop_short(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b with the last BK of K left out: ``range(0, K - BK, BK)`` or one step too few."""
    k = a.shape[1] - BK
    return gemm_reference(a[:, :k], b[:k])


def _one_element_per_thread(out: np.ndarray, ref: np.ndarray) -> bool:
    """One element in TM * TN written, wherever it lies: each thread stored a single element."""
    return int((~is_poison(out)).sum()) == out.size // (TM * TN)


def _barriers(kernel: Any) -> int | None:
    """How many ``syncthreads()`` calls the kernel's source holds; None when its source cannot be read."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(_python_function(kernel))))
    except (OSError, TypeError, SyntaxError):
        return None
    return sum(isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) ==
               "syncthreads" for node in ast.walk(tree))


def _mistakes(kernel: Any) -> tuple[Mistake, ...]:
    barriers = _barriers(kernel)
    return (
        Mistake("K loop short", f"this is a @ b with the last {BK} of K left out: the loop over K runs K / BK steps, "
                "`for k0 in range(0, K, BK)`", wrong_reference=_k_loop_short),
        Mistake("one element per thread", f"only one element in {TM * TN} of C was written: {MICRO_TILE}, each "
                f"from its own accumulator (a cuda.local.array((TM, TN), numba.float32))",
                symptom=_one_element_per_thread),
        Mistake("barrier missing", f"your kernel calls cuda.syncthreads() {barriers} "
                f"time{'' if barriers == 1 else 's'}; it needs two barriers in each step along K: one after the loads "
                "(every thread reads what others stored) and one after the multiply-adds (the next step's loads "
                "overwrite the tiles)", symptom=lambda out, ref: barriers is not None and barriers < 2),
    )


def _explain_error(error: BaseException) -> str | None:
    """The simulator bounds-checks every access; the array's size tells a tile from a matrix."""
    if not isinstance(error, IndexError):
        return None
    size = re.search(r"with size (\d+)", str(error))
    if size and int(size.group(1)) in (BM, BN, BK, TM, TN):
        return (f"an index went past a shared tile or the micro-tile: A's tile is BM x BK = {BM} x {BK}, B's "
                f"BK x BN = {BK} x {BN}, the accumulators TM x TN = {TM} x {TN}")
    return f"an index went past the edge of a, b or c. The shapes are whole multiples of the tiles, so {GRID}"


def _check_case(kernel: Any, run: CheckRun, m: int, n: int, k: int) -> None:
    """a, b and c are the first rows of buffers padded by max(M, N) + BM rows; c's buffer is all poison."""
    __tracebackhide__ = True
    xp = backend.xp
    pad = max(m, n) + BM
    a_buffer = nonzero_float32(run.rng, (m + pad) * k).reshape(m + pad, k)
    b_buffer = nonzero_float32(run.rng, (k + pad) * n).reshape(k + pad, n)
    c_buffer = poison((m + pad, n), np.float32)
    a, b = a_buffer[:m], b_buffer[:k]
    launch_learner_kernel(kernel, (n // BN, m // BM), THREADS, xp.asarray(a_buffer)[:m], xp.asarray(b_buffer)[:k],
                          c_buffer[:m], name="register_blocked_gemm", expected_signature=SIGNATURE,
                          explain_error=_explain_error)
    written = backend.to_numpy(c_buffer)
    require_unwritten(written[m:], "c", f"the shapes are whole multiples of the tiles, so {GRID}")
    assert_close(written[:m], gemm_reference(a, b), np.float32, what="c", mistakes=_mistakes(kernel), inputs=(a, b))


@checks_an_exercise
def check_register_blocked_gemm(register_blocked_gemm: Any) -> None:
    """Check the kernel ``register_blocked_gemm(a, b, c)``: c = a @ b in float32, a TM x TN micro-tile per thread.

    Launched as ``register_blocked_gemm[(N // BN, M // BM), (BN // TN, BM // TM)]`` on shapes that are whole
    multiples of the tiles and compared with a float64 product within the float32 tolerance.
    """
    __tracebackhide__ = True
    with CheckRun("register_blocked_gemm") as run:
        shapes = _shapes(run.rng)
        for m, n, k in shapes:
            run.case = (f"a is {m} x {k}, b is {k} x {n}, {n // BN} x {m // BM} blocks of "
                        f"{THREADS[0]} x {THREADS[1]} threads")
            _check_case(register_blocked_gemm, run, m, n, k)
        run.passed(len(shapes), detail=", ".join(f"{m} x {n} x {k}" for m, n, k in shapes), show_mode=True)
