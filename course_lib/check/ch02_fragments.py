"""Checkers for chapter 02's exercises below WMMA: mma.sync's fragments, ldmatrix, the swizzle, fp8 block scaling.

Everything here is arithmetic on lane numbers, addresses and numbers, so it is checked the same way on a laptop
and on a GPU. The references are the PTX ISA's layouts as ``course_lib.labs.tensor_core_fragments`` writes them
(and its NumPy model of ``ldmatrix``); the swizzle is judged by what it must achieve, not against one formula:
a permutation of the tile that keeps 16-byte chunks whole and in their row, and that lets ``ldmatrix`` read
every chunk column of 8 rows from 32 different banks. Fp8 is judged by the e4m3 rounding bound.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

from course_lib.check.exercise import checks_an_exercise
from course_lib.check.failure import CheckFailed
from course_lib.check.learner import call_learner
from course_lib.check.mistakes import Mistake, hint_for
from course_lib.check.run import CheckRun
from course_lib.labs.tensor_core_fragments import FRAGMENTS, a_element, b_element, c_element, ldmatrix

WARP = 32
ElementOf = Callable[[int, int], tuple[int, int]]

# --- fragment_element: which (row, col) a lane's register i holds ----------------------------------

FRAGMENT_SIGNATURE = "fragment_element(operand, lane, i)"
OPERANDS = {"A": "A", "B": "B", "C": "C, D"}  # the exercise's names -> FRAGMENTS' keys
GROUPS = "groupID = lane >> 2 (lanes 0-3 are group 0) and threadID_in_group = lane % 4"


def fragment_map(element: ElementOf, per_lane: int) -> np.ndarray:
    """``[32, per_lane, 2]``: the (row, col) of every register of every lane."""
    return np.array([[element(lane, i) for i in range(per_lane)] for lane in range(WARP)], dtype=np.int64)


def _swapped_groups(element: ElementOf) -> ElementOf:
    """The layout with groupID and threadID_in_group exchanged: lane % 4 taken as the group."""
    return lambda lane, i: element((lane % 4) * 8 + (lane >> 2), i)


def _fragment_mistakes(operand: str) -> tuple[Mistake, ...]:
    """Known wrong layouts of one operand, as maps; each wrong reference takes nothing (the map is the answer)."""
    _, _, per_lane = FRAGMENTS[OPERANDS[operand]]
    element = {"A": a_element, "B": b_element, "C": c_element}[operand]
    wrong: dict[str, tuple[ElementOf, str]] = {
        "groups swapped": (_swapped_groups(element), f"the lane's group and place were swapped: {GROUPS}"),
    }
    if operand == "A":
        wrong["a2-a5 order"] = (
            lambda lane, i: a_element(lane, [0, 1, 4, 5, 2, 3, 6, 7][i]),
            "A's registers go a0 a1 (row g), a2 a3 (row g + 8), a4 a5 (row g, columns + 8), a6 a7 (row g + 8, "
            "columns + 8): the row moves before the column, row = g + 8 * ((i // 2) % 2), col = 2t + (i % 2) + "
            "8 * (i // 4)")
    if operand == "B":
        wrong["transposed"] = (lambda lane, i: b_element(lane, i)[::-1],
                               "B is K x N = 16 x 8, so its row is k: (row, col) = (2t + (i % 2) + 8 * (i // 2), g)")
    if operand == "C":
        wrong["row from i % 2"] = (
            lambda lane, i: (c_element(lane, i)[0] - 8 * (i // 2) + 8 * (i % 2), c_element(lane, i)[1] - (i % 2)
                             + i // 2),
            "C's registers c0 c1 are neighbours in a row (columns 2t and 2t + 1), c2 c3 the same 8 rows lower: "
            "row = g + 8 * (i // 2), col = 2t + (i % 2)")
    return tuple(Mistake(name, hint, wrong_reference=lambda e=e: fragment_map(e, per_lane))
                 for name, (e, hint) in wrong.items())


def _learner_map(fragment_element: Callable[..., Any], operand: str, per_lane: int,
                 rng: np.random.Generator) -> np.ndarray:
    """Ask for every (lane, i) of ``operand`` in random order; each answer must be two whole numbers."""
    __tracebackhide__ = True
    out = np.empty((WARP, per_lane, 2), dtype=np.int64)
    for flat in rng.permutation(WARP * per_lane):
        lane, i = divmod(int(flat), per_lane)
        got = call_learner(fragment_element, operand, lane, i, name="fragment_element",
                           expected_signature=FRAGMENT_SIGNATURE)
        if got is None:
            raise CheckFailed(f"fragment_element({operand!r}, {lane}, {i}) returned None: did you forget to `return` "
                              "(row, col)?")
        try:
            row, col = (int(value) for value in got)
        except (TypeError, ValueError):
            raise CheckFailed(f"fragment_element({operand!r}, {lane}, {i}) returned {got!r}: return the pair "
                              "(row, col) of whole numbers") from None
        out[lane, i] = row, col
    return out


def _coverage_problem(out: np.ndarray, shape: tuple[int, int], operand: str) -> str | None:
    """None when every element of the tile is held by exactly one (lane, register), else what is wrong."""
    rows, cols = shape
    inside = (out[..., 0] >= 0) & (out[..., 0] < rows) & (out[..., 1] >= 0) & (out[..., 1] < cols)
    if not inside.all():
        lane, i = np.argwhere(~inside)[0]
        place = tuple(out[lane, i].tolist())
        return f"lane {lane}'s register {i} is at {place}, outside the {rows} x {cols} tile of {operand}"
    counts = np.zeros(shape, dtype=np.int64)
    np.add.at(counts, (out[..., 0], out[..., 1]), 1)
    if (counts == 1).all():
        return None
    row, col = np.argwhere(counts != 1)[0]
    return (f"element ({row}, {col}) of {operand} is held by {counts[row, col]} registers of the warp: each element "
            "lives in exactly one register of one lane")


@checks_an_exercise
def check_fragment_element(fragment_element: Callable[[str, int, int], Any]) -> None:
    """Check ``fragment_element(operand, lane, i)`` -> (row, col) for mma.sync.m16n8k16, fp16/bf16 A and B, fp32 C.

    Every (lane, i) of A (16 x 16, 8 registers), B (16 x 8, 4) and C (16 x 8, 4) is asked, in random order, and
    compared with the PTX ISA's layout; a map that holds some element twice is named as such.
    """
    __tracebackhide__ = True
    with CheckRun("fragment_element") as run:
        for operand in (str(name) for name in run.rng.permutation(list(OPERANDS))):
            element, shape, per_lane = FRAGMENTS[OPERANDS[operand]]
            run.case = f"operand {operand!r}, a {shape[0]} x {shape[1]} tile, {per_lane} registers per lane"
            out, ref = _learner_map(fragment_element, operand, per_lane, run.rng), fragment_map(element, per_lane)
            if np.array_equal(out, ref):
                continue
            lane, i = (int(index) for index in np.argwhere((out != ref).any(axis=-1))[0])
            wrong = int((out != ref).any(axis=-1).sum())
            message = (f"fragment_element({operand!r}, {lane}, {i}) = {tuple(out[lane, i].tolist())}, expected "
                       f"{tuple(ref[lane, i].tolist())} ({wrong} of {WARP * per_lane} wrong)")
            coverage = _coverage_problem(out, shape, operand)
            hint = hint_for(out, ref, _fragment_mistakes(operand), (), 0.0) or coverage
            raise CheckFailed(f"{message}\nHint: {hint}" if hint else message)
        run.passed(3, detail="A, B and C, every lane and register")


# --- ldmatrix_x4_row: the row address each lane gives ldmatrix.x4 ----------------------------------

LDMATRIX_SIGNATURE = "ldmatrix_x4_row(lane)"
A_TILE = (16, 16)


def ldmatrix_received(row_of: Callable[[int], tuple[int, int]]) -> np.ndarray:
    """``[32, 8]``: the elements of the 16 x 16 tile (numbered row * 16 + col) each lane's r0..r3 receive."""
    tile = np.arange(A_TILE[0] * A_TILE[1]).reshape(A_TILE)
    return ldmatrix(tile, [row_of(lane) for lane in range(WARP)])


def _a_fragment_elements() -> np.ndarray:
    """``[32, 8]``: the element of the A tile each lane's a0..a7 must hold, in the same numbering."""
    return np.array([[row * A_TILE[1] + col for row, col in (a_element(lane, i) for i in range(8))]
                     for lane in range(WARP)])


LDMATRIX_MISTAKES = (
    Mistake("matrices in reading order", "the four 8 x 8 matrices must come in the order of the registers: a0 a1 "
            "are rows 0-7 and a2 a3 rows 8-15 of columns 0-7, then a4-a7 columns 8-15. So lanes 8-15 point at rows "
            "8-15 (not at columns 8-15): row = lane % 16, col = 8 * (lane // 16)",
            wrong_reference=lambda: ldmatrix_received(lambda lane: (lane % 8 + 8 * (lane // 16), 8 * (lane // 8 % 2)))),
    Mistake("columns 8-15 never read", "lanes 16-31 supply matrices 2 and 3, columns 8-15 of the tile: col = "
            "8 * (lane // 16)", wrong_reference=lambda: ldmatrix_received(lambda lane: (lane % 16, 0))),
)


def _learner_rows(ldmatrix_x4_row: Callable[[int], Any], rng: np.random.Generator) -> list[tuple[int, int]]:
    __tracebackhide__ = True
    rows: dict[int, tuple[int, int]] = {}
    for lane in (int(lane) for lane in rng.permutation(WARP)):
        got = call_learner(ldmatrix_x4_row, lane, name="ldmatrix_x4_row", expected_signature=LDMATRIX_SIGNATURE)
        try:
            row, col = (int(value) for value in got)
        except (TypeError, ValueError):
            raise CheckFailed(f"ldmatrix_x4_row({lane}) returned {got!r}: return (row, col), the start of the "
                              "8-element row this lane points at") from None
        if not (0 <= row < A_TILE[0] and col in (0, 8)):
            raise CheckFailed(f"ldmatrix_x4_row({lane}) = ({row}, {col}): a row address is the start of 8 elements "
                              "inside the 16 x 16 tile, so row is 0-15 and col is 0 or 8")
        rows[lane] = row, col
    return [rows[lane] for lane in range(WARP)]


@checks_an_exercise
def check_ldmatrix_x4_row(ldmatrix_x4_row: Callable[[int], Any]) -> None:
    """Check ``ldmatrix_x4_row(lane)`` -> (row, col): with these row addresses ``ldmatrix.x4`` delivers mma's A.

    The checker runs a NumPy model of ldmatrix on the addresses of all 32 lanes (asked in random order) and
    compares what each lane's r0..r3 receive with a0..a7 of mma.sync.m16n8k16's A fragment.
    """
    __tracebackhide__ = True
    with CheckRun("ldmatrix_x4_row") as run:
        run.case = "a 16 x 16 fp16 tile of A, row-major in shared memory"
        received, expected = ldmatrix(np.arange(256).reshape(A_TILE), _learner_rows(ldmatrix_x4_row, run.rng)), \
            _a_fragment_elements()
        if not np.array_equal(received, expected):
            lane, i = np.argwhere(received != expected)[0]
            got, want = divmod(int(received[lane, i]), 16), divmod(int(expected[lane, i]), 16)
            message = (f"lane {lane}'s register r{i // 2} received A{list(got)} as its a{i}, but mma.sync's a{i} of "
                       f"lane {lane} is A{list(want)}")
            hint = hint_for(received, expected, LDMATRIX_MISTAKES, (), 0.0)
            raise CheckFailed(f"{message}\nHint: {hint}" if hint else message)
        run.passed(1, detail="all 32 lanes' addresses, all four registers")


# --- swizzle: spreading an ldmatrix's 8 rows over the 32 banks -------------------------------------

SWIZZLE_SIGNATURE = "swizzle(offsets)"
ROW_BYTES = 128  # a row of 64 fp16 values: 8 chunks of 16 bytes
CHUNK_BYTES = 16  # what one lane's row address delivers to ldmatrix
BANKS, BANK_BYTES = 32, 4


def ldmatrix_wavefronts(addresses: np.ndarray) -> int:
    """How many passes shared memory needs for 8 lanes' 16-byte reads at ``addresses``: the most distinct
    4-byte words that fall into one of the 32 banks (1 is conflict-free, 8 an 8-way conflict)."""
    words = np.unique((np.asarray(addresses)[:, None] + np.arange(0, CHUNK_BYTES, BANK_BYTES)[None, :]) // BANK_BYTES)
    return int(np.bincount(words % BANKS, minlength=BANKS).max())


def worst_wavefronts(swizzle: Callable[[np.ndarray], np.ndarray], rows: int) -> tuple[int, int, int]:
    """(passes, first row, chunk) of the worst ldmatrix read: 8 rows from a multiple of 8, one logical chunk."""
    worst = (0, 0, 0)
    for first in range(0, rows, 8):
        for chunk in range(ROW_BYTES // CHUNK_BYTES):
            logical = (first + np.arange(8)) * ROW_BYTES + chunk * CHUNK_BYTES
            worst = max(worst, (ldmatrix_wavefronts(np.asarray(swizzle(logical))), first, chunk))
    return worst


def _require_permutation_of_whole_chunks(out: np.ndarray, offsets: np.ndarray) -> None:
    """The swizzle moves 16-byte chunks whole, within their row, and never two to one place."""
    __tracebackhide__ = True
    moved_row = np.flatnonzero(out // ROW_BYTES != offsets // ROW_BYTES)
    if moved_row.size:
        o = offsets[moved_row[0]]
        raise CheckFailed(f"swizzle({o}) = {out[moved_row[0]]} moves a byte of row {o // ROW_BYTES} into row "
                          f"{out[moved_row[0]] // ROW_BYTES}: the XOR must change only the chunk's place in its "
                          "row (bits 4-6 of the offset), with the row's index modulo 8")
    split = np.flatnonzero(out % CHUNK_BYTES != offsets % CHUNK_BYTES)
    if split.size:
        o = offsets[split[0]]
        raise CheckFailed(f"swizzle({o}) = {out[split[0]]} splits a 16-byte chunk: ldmatrix reads each lane's row "
                          "as 16 contiguous bytes, so the low 4 bits of the offset must stay; XOR the chunk index "
                          "(offset >> 4) & 7, not the byte offset")
    if np.unique(out).size != out.size:
        raise CheckFailed("swizzle sends two offsets to the same place: it must be a permutation of the tile")


@checks_an_exercise
def check_swizzle(swizzle: Callable[[np.ndarray], Any]) -> None:
    """Check ``swizzle(offsets)``: byte offsets in a row-major tile of 128-byte rows -> where they are stored.

    Called once with every byte offset of a tile of a random number of rows (16 to 64); it must permute
    whole 16-byte chunks within their rows and make every ldmatrix read (8 consecutive rows from a multiple of 8,
    one chunk column) conflict-free: 32 different banks of 4 bytes, one pass.
    """
    __tracebackhide__ = True
    with CheckRun("swizzle") as run:
        rows = int(run.rng.choice([16, 32, 64]))  # past 8 rows, so a row index not taken % 8 shows
        run.case = f"a tile of {rows} rows of 128 bytes (64 fp16)"
        offsets = np.arange(rows * ROW_BYTES, dtype=np.int64)
        got = call_learner(swizzle, offsets.copy(), name="swizzle", expected_signature=SWIZZLE_SIGNATURE)
        out = np.asarray(got)
        if out.shape != offsets.shape or out.dtype.kind not in "iu":
            raise CheckFailed(f"swizzle returned {out.dtype} of shape {out.shape} for {offsets.size} int64 offsets: "
                              "return whole numbers, one per offset (^, >> and & work on NumPy arrays elementwise)")
        _require_permutation_of_whole_chunks(out, offsets)
        passes, first, chunk = worst_wavefronts(lambda logical: out[logical], rows)
        if passes > 1:
            plain = worst_wavefronts(lambda logical: logical, rows)[0]
            raise CheckFailed(
                f"ldmatrix reading chunk {chunk} of rows {first}-{first + 7} needs {passes} passes ({passes}-way "
                f"bank conflicts; {plain} without any swizzle, where chunk c of every row sits in banks 4c-4c+3)\n"
                "Hint: XOR the chunk index with the row's index modulo 8, all 3 bits of it: offset ^ (((offset >> 7) "
                "& 7) << 4), so the 8 rows' chunks land in 8 different groups of 4 banks")
        run.passed(1, detail=f"{rows} rows; every ldmatrix read in one pass, 8 without a swizzle")


# --- fp8_block_quantize: per-block scales for e4m3 ---------------------------------------------------

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_MAX = float(ml_dtypes.finfo(FP8).max)  # 448
FP8_UNIT_ROUNDOFF = float(ml_dtypes.finfo(FP8).eps) / 2  # 3 mantissa bits: 2^-4
FP8_SUBNORMAL_HALF_GAP = float(ml_dtypes.finfo(FP8).smallest_subnormal) / 2  # 2^-10
QUANTIZE_SIGNATURE = "fp8_block_quantize(x, block)"
FP8_BLOCKS = (16, 32, 128)


def fp8_input(rng: np.random.Generator, rows: int, cols: int, block: int) -> np.ndarray:
    """float32 values whose size varies by 2^±12 from block to block (never 0), one block all negative."""
    magnitudes = rng.uniform(0.01, 1.0, (rows, cols)) * np.repeat(2.0 ** rng.uniform(-12, 12, (rows, cols // block)),
                                                                   block, axis=1)
    signs = rng.choice([-1.0, 1.0], (rows, cols))
    signs[0, :block] = -1.0  # a block whose largest value is negative: amax is of |x|
    return (signs * magnitudes).astype(np.float32)


def _scale_mistakes(x: np.ndarray, block: int) -> tuple[Mistake, ...]:
    blocks = np.abs(x).reshape(x.shape[0], -1, block)

    def scales(amax: np.ndarray, top: float) -> np.ndarray:
        return (amax / top).astype(np.float32)

    return (
        Mistake("one scale", "one scale for the whole tensor: each block of `block` values along a row gets its own, "
                "amax of that block / 448", wrong_reference=lambda: np.broadcast_to(scales(blocks.max(), FP8_MAX),
                                                                                    blocks.shape[:2])),
        Mistake("max, not amax", "the scale comes from the largest |x| of the block (np.abs first), not the largest x",
                wrong_reference=lambda: scales(x.reshape(blocks.shape).max(axis=-1), FP8_MAX)),
        Mistake("inverted", "the scale is amax / 448 (what a stored value is multiplied by to dequantise), not "
                "448 / amax", wrong_reference=lambda: (FP8_MAX / blocks.max(axis=-1)).astype(np.float32)),
        *(Mistake(f"largest {top:g}", f"{top:g} is the largest value of {name}; e4m3 (float8_e4m3fn) reaches 448",
                  wrong_reference=lambda top=top: scales(blocks.max(axis=-1), top))
          for top, name in ((127.0, "int8"), (57344.0, "e5m2"), (240.0, "e4m3fnuz"))),
    )


def _judge_fp8(x: np.ndarray, block: int, result: Any) -> None:
    __tracebackhide__ = True
    if not isinstance(result, tuple) or len(result) != 2:
        raise CheckFailed(f"fp8_block_quantize should return the pair (q, scales), got {type(result).__name__}")
    q, scales = (np.asarray(value) for value in result)
    rows, cols = x.shape
    if q.dtype != FP8 or q.shape != x.shape:
        raise CheckFailed(f"q is {q.dtype} of shape {q.shape}, expected float8_e4m3fn of shape {x.shape}: "
                          "(x / scale).astype(ml_dtypes.float8_e4m3fn)")
    if scales.shape != (rows, cols // block) or scales.dtype != np.float32:
        raise CheckFailed(f"scales is {scales.dtype} of shape {scales.shape}, expected float32 of shape "
                          f"{(rows, cols // block)}: one scale per block of {block} values along a row")
    amax = np.abs(x).reshape(rows, -1, block).max(axis=-1).astype(np.float64)
    wrong = np.abs(scales.astype(np.float64) - amax / FP8_MAX) > 1e-6 * amax / FP8_MAX
    if wrong.any():
        r, b = np.argwhere(wrong)[0]
        hint = hint_for(scales, amax / FP8_MAX, _scale_mistakes(x, block), (), 1e-6)
        raise CheckFailed(f"scales[{r}, {b}] = {scales[r, b]:.6g}, expected amax / 448 = {amax[r, b] / FP8_MAX:.6g} "
                          f"(the block's largest |x| is {amax[r, b]:.6g})" + (f"\nHint: {hint}" if hint else ""))
    stored = q.astype(np.float64)
    if not np.isfinite(stored).all():
        r, c = np.argwhere(~np.isfinite(stored))[0]
        raise CheckFailed(f"q[{r}, {c}] is {q[r, c]}: e4m3 has no inf, so a value past 448 becomes NaN; divide by "
                          "the scale (x / scale), so that the block's amax lands on 448 exactly")
    dequantised = stored * np.repeat(scales.astype(np.float64), block, axis=1)
    bound = FP8_UNIT_ROUNDOFF * np.abs(x) + FP8_SUBNORMAL_HALF_GAP * np.repeat(scales, block, axis=1)
    over = np.abs(dequantised - x) > bound * (1 + 1e-6)
    if over.any():
        r, c = np.argwhere(over)[0]
        raise CheckFailed(f"x[{r}, {c}] = {x[r, c]:.6g} comes back as q * scale = {dequantised[r, c]:.6g}, further "
                          f"than e4m3's rounding allows ({bound[r, c]:.3g}: 2^-4 of |x|, or half the gap between "
                          "subnormals times the scale)\nHint: q = (x / scale) for each block, rounded once by "
                          ".astype(float8_e4m3fn); multiplying by the scale instead gives other numbers")


@checks_an_exercise
def check_fp8_block_quantize(fp8_block_quantize: Callable[[np.ndarray, int], Any]) -> None:
    """Check ``fp8_block_quantize(x, block)`` -> (q, scales): e4m3 values and one float32 scale per block.

    x is float32 [rows, cols] with cols a multiple of ``block``; blocks run along rows, and their sizes differ by
    up to 2^24. scales must be amax / 448 per block; q * scale must be within e4m3's rounding of x.
    """
    __tracebackhide__ = True
    with CheckRun("fp8_block_quantize") as run:
        for block in FP8_BLOCKS:
            rows, cols = int(run.rng.integers(2, 6)), block * int(run.rng.integers(2, 5))
            run.case = f"x is {rows} x {cols}, blocks of {block}"
            x = fp8_input(run.rng, rows, cols, block)
            result = call_learner(fp8_block_quantize, x.copy(), block, name="fp8_block_quantize",
                                  expected_signature=QUANTIZE_SIGNATURE)
            _judge_fp8(x, block, result)
        run.passed(len(FP8_BLOCKS), detail=f"blocks of {', '.join(map(str, FP8_BLOCKS))}, sizes 2^-12 to 2^12")
