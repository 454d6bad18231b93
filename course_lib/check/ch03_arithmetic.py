"""Checkers for chapter 03's arithmetic: a block tile's intensity, and how many blocks of a kernel fit on an SM.

Both are numbers computed from a few whole numbers, so they are checked the same way on a laptop and on a GPU,
against ``course_lib.labs.gemm_steps`` (the functions chapter 03 itself reasons with). Each run draws its cases
at random until every known wrong formula gives an answer of its own on some case, different from the right one
and from every other wrong one, so that a wrong answer is always named by its own hint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from course_lib.check.compare import assert_close
from course_lib.check.exercise import checks_an_exercise
from course_lib.check.learner import call_learner
from course_lib.check.mistakes import Mistake
from course_lib.check.run import CheckRun
from course_lib.check.tolerance import tolerance_for
from course_lib.labs import gemm_steps

Case = tuple[Any, ...]
MAX_DRAWS = 10_000  # a mistake is told apart within a few dozen draws


def _distinguishing_case(draw: Callable[[], Case], right: Callable[..., float],
                         mistakes: tuple[Mistake, ...], target: Mistake) -> Case:
    """A case drawn by ``draw`` on which ``target`` differs from the right answer, and every mistake that goes
    wrong there gives an answer of its own: a learner with any one mistake who fails on it gets that mistake's hint."""
    for _ in range(MAX_DRAWS):
        case = draw()
        expected = right(*case)
        wrong = [answer for answer in (mistake.wrong_reference(*case) for mistake in mistakes)
                 if not math.isclose(answer, expected)]
        distinct = all(not math.isclose(one, other) for i, one in enumerate(wrong) for other in wrong[i + 1:])
        if distinct and not math.isclose(target.wrong_reference(*case), expected):
            return case
    raise RuntimeError(f"no case in {MAX_DRAWS} draws tells the mistake {target.name!r} apart")  # a checker bug


# --- tile_intensity: FLOPs per byte a block tile loads from global memory --------------------------

INTENSITY_SIGNATURE = "tile_intensity(bm, bn, bk, item_bytes)"


def intensity_as_computed(bm: int, bn: int, bk: int, item_bytes: int, *, flops_per_fma: int = 2,
                          with_c: bool = False, bytes_per_item: bool = True) -> float:
    """FLOPs of one step along K over the bytes it loads; the flags model the usual wrong versions."""
    loaded = bm * bk + bk * bn + (bm * bn if with_c else 0)
    return flops_per_fma * bm * bn * bk / (loaded * (item_bytes if bytes_per_item else 1))


INTENSITY_MISTAKES = (
    Mistake("factor 2 dropped", "this is half the intensity: a multiply-add is 2 FLOPs, so one step along K does "
            "2 * bm * bn * bk of them", wrong_reference=lambda *case: intensity_as_computed(*case, flops_per_fma=1)),
    Mistake("C counted", "C's bytes were counted: C stays in registers for the whole loop over K and is written "
            "once at the end, so a step loads only A's bm x bk and B's bk x bn tiles",
            wrong_reference=lambda *case: intensity_as_computed(*case, with_c=True)),
    Mistake("elements, not bytes", "this is FLOPs per element: intensity is per byte, so multiply the elements "
            "loaded by item_bytes", wrong_reference=lambda *case: intensity_as_computed(*case, bytes_per_item=False)),
    Mistake("integer division", "the answer was rounded down: use / (true division), not //",
            wrong_reference=lambda *case: float(math.floor(intensity_as_computed(*case)))),
)


def _intensity_draw(rng: np.random.Generator) -> Callable[[], Case]:
    def draw() -> Case:
        bm, bn = (int(side) for side in rng.choice([16, 32, 64, 128, 256], 2))
        return bm, bn, int(rng.choice([8, 16, 32, 64])), int(rng.choice([1, 2, 4]))
    return draw


@checks_an_exercise
def check_tile_intensity(tile_intensity: Callable[[int, int, int, int], Any]) -> None:
    """Check ``tile_intensity(bm, bn, bk, item_bytes)``: FLOPs per byte a bm x bn block tile loads per step of bk.

    The reference is ``gemm_steps.tile_intensity(bm, bn, item_bytes)``, in which bk cancels; the cases vary all
    four arguments, one case for each known mistake, within the float64 tolerance.
    """
    __tracebackhide__ = True
    with CheckRun("tile_intensity") as run:
        draw = _intensity_draw(run.rng)
        cases = [_distinguishing_case(draw, intensity_as_computed, INTENSITY_MISTAKES, mistake)
                 for mistake in INTENSITY_MISTAKES]
        for bm, bn, bk, item_bytes in cases:
            what = f"tile_intensity({bm}, {bn}, {bk}, {item_bytes})"
            run.case = f"a {bm} x {bn} tile of C, bk = {bk}, {item_bytes}-byte elements"
            out = call_learner(tile_intensity, bm, bn, bk, item_bytes, name="tile_intensity",
                               expected_signature=INTENSITY_SIGNATURE)
            assert_close(out, gemm_steps.tile_intensity(bm, bn, item_bytes), what=what,
                         rtol=tolerance_for(np.float64), mistakes=INTENSITY_MISTAKES, inputs=(bm, bn, bk, item_bytes))
        run.passed(len(cases), detail="tiles from 16 to 256, bk 8 to 64, 1-, 2- and 4-byte elements")


# --- blocks_per_sm: what limits how many blocks of a kernel an SM holds -----------------------------

OCCUPANCY_SIGNATURE = "blocks_per_sm(threads, registers_per_thread, shared_bytes, limits)"
WARPS = f"a block takes whole warps: round its threads up to a multiple of {gemm_steps.WARP}"
UNITS = (f"registers are handed to a warp {gemm_steps.REGISTER_UNIT} at a time: round registers_per_thread * "
         f"{gemm_steps.WARP} up to a multiple of {gemm_steps.REGISTER_UNIT}")


def blocks_as_computed(threads: int, registers: int, shared: int, limits: dict[str, int], *,
                       left_out: str | None = None, **rounding: int) -> int:
    """The minimum over ``gemm_steps.occupancy``'s resources, one of them ``left_out``, or without rounding."""
    fits = gemm_steps.occupancy(threads, registers, shared, limits, **rounding)
    return min(count for resource, count in fits.items() if resource != left_out)


def _left_out(resource: str, limit: str, key: str) -> Mistake:
    """``resource`` is occupancy's key, ``limit`` what the hint calls it, ``key`` its key in ``limits``."""
    return Mistake(f"{resource} left out", f"the SM's {limit} limit, limits[{key!r}], was left out: the answer is "
                   "the smallest of the four counts, by registers, shared memory, threads and the block limit",
                   wrong_reference=lambda *case: blocks_as_computed(*case, left_out=resource))


OCCUPANCY_MISTAKES = (
    Mistake("threads not rounded to warps", WARPS,
            wrong_reference=lambda *case: blocks_as_computed(*case, warp=1, register_unit=8)),
    Mistake("registers not rounded", UNITS, wrong_reference=lambda *case: blocks_as_computed(*case, register_unit=1)),
    Mistake("no rounding", f"{WARPS}, and {UNITS}",
            wrong_reference=lambda *case: blocks_as_computed(*case, warp=1, register_unit=1)),
    _left_out("registers", "register", "registers"),
    _left_out("shared memory", "shared-memory", "shared_bytes"),
    _left_out("threads", "thread", "threads"),
    _left_out("the block limit", "block", "blocks"),
)
NO_SHARED = ("a block with no shared memory (shared_bytes = 0) is not limited by it: leave that count out rather "
             "than divide by 0")


def _occupancy_draw(rng: np.random.Generator, shared: bool = True) -> Callable[[], Case]:
    """An SM from a range of real ones, and a kernel: threads 32 to 1024 (often not a whole number of warps),
    with shared memory or (``shared=False``) without."""
    def draw() -> Case:
        limits = {"registers": int(rng.choice([32768, 65536])),
                  "shared_bytes": int(rng.choice([48, 64, 100, 164, 228])) * 1024,
                  "threads": int(rng.choice([1024, 1536, 2048])), "blocks": int(rng.choice([16, 24, 32]))}
        threads, registers = int(rng.integers(32, 1025)), int(rng.integers(16, 129))
        return threads, registers, int(rng.integers(1, 65)) * 512 if shared else 0, limits
    return draw


@checks_an_exercise
def check_blocks_per_sm(blocks_per_sm: Callable[[int, int, int, dict[str, int]], Any]) -> None:
    """Check ``blocks_per_sm(threads, registers_per_thread, shared_bytes, limits)`` against random SMs.

    ``limits`` has ``gemm_steps.SM_LIMITS``' keys. The reference is the minimum of ``gemm_steps.occupancy``; one
    case for each known mistake, and one kernel without shared memory.
    """
    __tracebackhide__ = True
    with CheckRun("blocks_per_sm") as run:
        draw = _occupancy_draw(run.rng)
        cases = [_distinguishing_case(draw, blocks_as_computed, OCCUPANCY_MISTAKES, mistake)
                 for mistake in OCCUPANCY_MISTAKES]
        no_shared = _distinguishing_case(_occupancy_draw(run.rng, shared=False), blocks_as_computed,
                                         OCCUPANCY_MISTAKES, OCCUPANCY_MISTAKES[0])
        cases.insert(int(run.rng.integers(len(cases))), no_shared)
        for threads, registers, shared, limits in cases:
            what = f"blocks_per_sm({threads}, {registers}, {shared}, limits)"
            run.case = f"limits = {limits}"
            out = call_learner(blocks_per_sm, threads, registers, shared, dict(limits), name="blocks_per_sm",
                               expected_signature=OCCUPANCY_SIGNATURE, explain_error=_explain_occupancy_error)
            assert_close(out, blocks_as_computed(threads, registers, shared, limits), what=what,
                         rtol=0.0, mistakes=OCCUPANCY_MISTAKES, inputs=(threads, registers, shared, limits))
        run.passed(len(cases), detail="each of the four limits binding, threads not a whole number of warps")


def _explain_occupancy_error(error: BaseException) -> str | None:
    return NO_SHARED if isinstance(error, ZeroDivisionError) else None
