"""Checkers for chapter 04: slot mapping, a paged decode kernel in Numba, and the prefix-cache hash chain.

Each case is built so that its classic mistake shows. Block tables hold shuffled block ids (never
0, 1, 2, ...), so a block id mixed up with a position is wrong; contexts end in a partial block and
positions include the first and last token of blocks, so an off-by-one at a boundary is wrong; query
heads outnumber kv heads by a factor other than the number of kv heads, so each wrong grouped-query
mapping reads another head; and one decode case has logits near 1000, where exp overflows float32
unless the largest logit is subtracted first.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from course_lib import backend
from course_lib.check.compare import assert_close
from course_lib.check.exercise import checks_an_exercise
from course_lib.check.failure import CheckFailed
from course_lib.check.inputs import nonzero_float32, size_past
from course_lib.check.learner import ErrorExplainer, call_learner, launch_learner_kernel
from course_lib.check.mistakes import Mistake, hint_for
from course_lib.check.poison import poison
from course_lib.check.run import CheckRun
from course_lib.engine.block_pool import hash_block_tokens, hash_full_blocks
from course_lib.kernels.paged_attention import paged_decode_reference
from course_lib.kernels.paged_attention_numba import THREADS

OUT_OF_BOUNDS = re.compile(r"index (-?\d+) is out of bounds for axis (\d+) with size (\d+)")
Symptom = Callable[[np.ndarray, np.ndarray], bool]  # (out, ref) -> does the output show this mistake?
PLACE_OF_TOKEN = "token p lives in block block_table[p // block_size], at offset p % block_size"

# --- slot_mapping: where each token's key and value go ---------------------------------------------

SLOT_SIGNATURE = "slot_mapping(block_table, positions, block_size)"
SLOT_BLOCK_SIZES = (8, 16, 32)


def _slots(block_table: np.ndarray, positions: np.ndarray, block_size: int, *, offset: np.ndarray | None = None,
           block_stride: int | None = None) -> np.ndarray:
    """block * block_size + offset for each position; the keywords replace one part by a known mistake.

    (Indexing the table by position needs no model: the positions run past the table, so it raises.)
    """
    offset = positions % block_size if offset is None else offset
    block_stride = block_size if block_stride is None else block_stride
    return block_table[positions // block_size].astype(np.int64) * block_stride + offset


def _wrong_only_at(offsets: Sequence[int], positions: np.ndarray, block_size: int) -> Symptom:
    """A symptom: the only wrong slots are those of positions at one of these offsets in their block."""

    def symptom(out: np.ndarray, ref: np.ndarray) -> bool:
        wrong = out != ref
        return bool(wrong.any()) and not (wrong & ~np.isin(positions % block_size, offsets)).any()

    return symptom


def _slot_mistakes(positions: np.ndarray, block_size: int) -> tuple[Mistake, ...]:
    """The known mistakes; each wrong reference takes (block_table, positions, block_size)."""
    return (
        Mistake(
            "offset is the position",
            f"the offset inside the block is position % block_size, not the position itself: {PLACE_OF_TOKEN}",
            wrong_reference=lambda table, positions, size: _slots(table, positions, size, offset=positions),
        ),
        Mistake(
            "block id not scaled",
            "a slot counts tokens, so block b starts at slot b * block_size: slot = block * block_size + offset",
            wrong_reference=lambda table, positions, size: _slots(table, positions, size, block_stride=1),
        ),
        Mistake(
            "one off everywhere",
            "every slot is one off: positions, table entries and offsets all count from 0, and slot = "
            "block * block_size + offset with no + 1 or - 1",
            symptom=lambda out, ref: bool(np.all(np.abs(out.astype(np.int64) - ref) == 1)),
        ),
        Mistake(
            "off by one at block edges",
            f"only the first or last token of a block came out wrong: an off-by-one at a block boundary. "
            f"Positions count from 0, and {PLACE_OF_TOKEN} (floor division, no + 1 or - 1)",
            symptom=_wrong_only_at((0, block_size - 1), positions, block_size),
        ),
        Mistake(
            "ceil for the block",
            f"every token but the first of each block came out wrong: the block index rounds down, "
            f"position // block_size, not up; {PLACE_OF_TOKEN}",
            symptom=_wrong_only_at(range(1, block_size), positions, block_size),
        ),
    )


def _explain_slot_error(error: BaseException) -> str | None:
    """NumPy raises IndexError for a float index and for an index past the table's end."""
    if not isinstance(error, IndexError):
        return None
    if "integer" in str(error):
        return "the block index must be an integer: use // (floor division), not /, for position // block_size"
    return (f"block_table has one entry per block, not per token: {PLACE_OF_TOKEN}, floor division with no + 1, "
            "so the last position lies in the table's last entry")


def _block_table(rng: np.random.Generator, num_tokens: int, block_size: int) -> np.ndarray:
    """A sequence's table: distinct block ids drawn from a pool four times larger, in shuffled order."""
    blocks = -(-num_tokens // block_size)
    return rng.permutation(4 * blocks)[:blocks].astype(np.int32)


def _slot_positions(rng: np.random.Generator, num_tokens: int, block_size: int, prompt: bool) -> np.ndarray:
    """Every position of a prompt in order, or a shuffled draw that includes the edges of blocks."""
    if prompt:
        return np.arange(num_tokens, dtype=np.int64)
    edges = [0, block_size - 1, block_size, num_tokens - 1]
    drawn = rng.integers(0, num_tokens, size=12)
    return rng.permutation(np.concatenate([edges, drawn])).astype(np.int64)


def _require_whole_numbers(slots: Any) -> None:
    """Floats mean a / where // belongs; anything else that is not numbers, assert_close describes."""
    __tracebackhide__ = True
    dtype = np.asarray(backend.to_numpy(slots)).dtype if slots is not None else None
    if dtype is not None and dtype.kind == "f":
        raise CheckFailed(f"slots came back as {dtype} numbers: slots are whole numbers, so use // (floor "
                          "division) and %, not /")


@checks_an_exercise
def check_slot_mapping(slot_mapping: Callable[[np.ndarray, np.ndarray, int], Any]) -> None:
    """Check ``slot_mapping(block_table, positions, block_size)``: one slot per position, exactly.

    The slot of position p is ``block_table[p // block_size] * block_size + p % block_size``. Each
    block size is tried once, with every position of a prompt and with shuffled positions.
    """
    __tracebackhide__ = True
    with CheckRun("slot_mapping") as run:
        for case, block_size in enumerate(SLOT_BLOCK_SIZES):
            num_tokens = int(run.rng.integers(2 * block_size + 1, 5 * block_size)) | 1  # odd: a partial last block
            table = _block_table(run.rng, num_tokens, block_size)
            positions = _slot_positions(run.rng, num_tokens, block_size, prompt=case % 2 == 0)
            run.case = f"block_size = {block_size}, block_table = {table.tolist()}, {positions.size} positions"
            slots = call_learner(slot_mapping, table.copy(), positions.copy(), block_size, name="slot_mapping",
                                 expected_signature=SLOT_SIGNATURE, explain_error=_explain_slot_error)
            _require_whole_numbers(slots)
            assert_close(slots, _slots(table, positions, block_size), what="slots",
                         mistakes=_slot_mistakes(positions, block_size), inputs=(table, positions, block_size))
        run.passed(len(SLOT_BLOCK_SIZES), detail=f"block sizes {', '.join(map(str, SLOT_BLOCK_SIZES))}")


# --- paged_decode: one thread block per (sequence, query head) --------------------------------------

DECODE_SIGNATURE = "paged_decode(out, query, key_cache, value_cache, block_tables, context_lens, scale)"
LARGE_LOGIT = 1000.0  # exp(1000) overflows float32 (and Python's math.exp, in the simulator)
LARGE_LOGIT_RTOL = 2e-4  # float32 keeps a logit near 1000 to ~6e-5 (its ulp); measured output errors reach 2e-5
OFFSET_HINT = ("a wrong block offset: token t lives in block block_tables[seq, t // block_size] at offset "
               "t % block_size; index the cache with the offset, not the token")
TABLE_HINT = ("block_tables[seq] has one entry per block, not per token: the block of token t is "
              "block_tables[seq, t // block_size]")
GQA_HINT = ("query head h reads kv head h // (num_heads // num_kv_heads): consecutive query heads share a kv head "
            "(num_heads = query.shape[1], num_kv_heads = key_cache.shape[1])")
MAX_HINT = ("exp(logit) overflows float32 once a logit passes 88: subtract the largest logit first, "
            "exp(logit - max_logit), which leaves the softmax unchanged and every weight <= 1")


@dataclass(frozen=True)
class DecodeShape:
    """The sizes of one decode case; ``logit_shift`` is added to every logit (the softmax ignores it)."""

    context_lens: tuple[int, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    logit_shift: float = 0.0

    def describe(self) -> str:
        shifted = f", logits near {self.logit_shift:g}" if self.logit_shift else ""
        kv_heads = f"{self.num_kv_heads} kv head{'s' if self.num_kv_heads > 1 else ''}"
        return (f"context_lens {list(self.context_lens)}, {self.num_heads} query heads on {kv_heads}, "
                f"head_dim {self.head_dim}, block_size {self.block_size}{shifted}")


@dataclass(frozen=True)
class DecodeCase:
    """One decode problem. The caches and the block tables are the start of longer buffers.

    A kernel that follows a wrong index reads on into the spare blocks and table rows (all valid
    block ids), so on a GPU a mistake gives an answer the models below recompute, never a crash.
    """

    query: np.ndarray  # [num_seqs, num_heads, head_dim] float32
    key_buffer: np.ndarray  # [num_blocks + spare, num_kv_heads, block_size, head_dim] float32
    value_buffer: np.ndarray
    table_buffer: np.ndarray  # [num_seqs + spare, max_blocks_per_seq] int32
    context_lens: np.ndarray  # [num_seqs] int32
    num_blocks: int
    scale: float

    def arrays(self) -> tuple[np.ndarray, ...]:
        """query, key_cache, value_cache, block_tables, context_lens: the views the kernel is given."""
        num_seqs = self.query.shape[0]
        return (self.query, self.key_buffer[: self.num_blocks], self.value_buffer[: self.num_blocks],
                self.table_buffer[:num_seqs], self.context_lens)

    def device_arrays(self) -> tuple[Any, ...]:
        """The same views on the device, cut from whole buffers copied there: copying a view alone would
        leave nothing after it, and a wrong index on a GPU would then read outside the allocation."""
        xp = backend.xp
        keys, values, tables = (xp.asarray(buffer) for buffer in (self.key_buffer, self.value_buffer,
                                                                     self.table_buffer))
        return (xp.asarray(self.query), keys[: self.num_blocks], values[: self.num_blocks],
                tables[: self.query.shape[0]], xp.asarray(self.context_lens))

    def reference(self) -> np.ndarray:
        return paged_decode_reference(*self.arrays(), scale=self.scale)


def decode_case(rng: np.random.Generator, shape: DecodeShape) -> DecodeCase:
    """Shuffled block tables over a pool with free blocks; every table entry, used or not, a valid id.

    With a ``logit_shift`` the last element of every key is 1 and the query's is shift / scale, so every
    logit is its usual value plus the shift.
    """
    num_seqs, size = len(shape.context_lens), shape.block_size
    longest = max(shape.context_lens)
    blocks_needed = [-(-length // size) for length in shape.context_lens]
    max_blocks = max(blocks_needed) + 1
    if max_blocks == shape.num_kv_heads:  # sizes apart, so an IndexError on an axis 1 says which array it was
        max_blocks += 1
    num_blocks = sum(blocks_needed) + 2
    spare_blocks = -(-(longest + shape.num_heads * size) // (shape.num_kv_heads * size)) + 1
    spare_rows = -(-longest // max_blocks) + 1
    order = rng.permutation(num_blocks)
    tables = rng.integers(0, num_blocks, size=(num_seqs + spare_rows, max_blocks)).astype(np.int32)
    start = 0
    for seq, used in enumerate(blocks_needed):
        tables[seq, :used] = order[start : start + used]
        start += used
    cache_shape = (num_blocks + spare_blocks, shape.num_kv_heads, size, shape.head_dim)
    keys, values = (nonzero_float32(rng, math.prod(cache_shape)).reshape(cache_shape) for _ in range(2))
    query = nonzero_float32(rng, num_seqs * shape.num_heads * shape.head_dim).reshape(num_seqs, shape.num_heads, -1)
    scale = 1.0 / math.sqrt(shape.head_dim)
    if shape.logit_shift:
        keys[..., -1] = 1.0
        query[..., -1] = shape.logit_shift / scale
    return DecodeCase(query, keys, values, tables, np.array(shape.context_lens, dtype=np.int32), num_blocks, scale)


def _grouped(head: int, num_heads: int, num_kv_heads: int) -> int:
    return head // (num_heads // num_kv_heads)


def _block_index(tokens: np.ndarray, block_size: int) -> np.ndarray:
    return tokens // block_size


def _offset_in_block(tokens: np.ndarray, block_size: int) -> np.ndarray:
    return tokens % block_size


def decode_as_read(case: DecodeCase, *, kv_head_of: Callable[[int, int, int], int] = _grouped,
                   table_index_of: Callable[[np.ndarray, int], np.ndarray] = _block_index,
                   offset_of: Callable[[np.ndarray, int], np.ndarray] = _offset_in_block,
                   scale: float | None = None, normalise: bool = True) -> np.ndarray:
    """The float64 output of a kernel that finds token t of query head h where these functions say.

    Reads go through the flat buffers, as a GPU's do: an index past the end of a row of the table or
    of a cache tile reads the next one. With the defaults it equals ``paged_decode_reference``.
    """
    num_seqs, num_heads, head_dim = case.query.shape
    _, num_kv_heads, size, _ = case.key_buffer.shape
    keys, values = (buffer.reshape(-1, head_dim).astype(np.float64) for buffer in (case.key_buffer, case.value_buffer))
    tables, max_blocks = case.table_buffer.ravel(), case.table_buffer.shape[1]
    scale = case.scale if scale is None else scale
    out = np.empty((num_seqs, num_heads, head_dim))
    for seq, length in enumerate(case.context_lens):
        tokens = np.arange(length)
        blocks = tables[seq * max_blocks + table_index_of(tokens, size)].astype(np.int64)
        for head in range(num_heads):
            rows = (blocks * num_kv_heads + kv_head_of(head, num_heads, num_kv_heads)) * size + offset_of(tokens, size)
            logits = keys[rows] @ case.query[seq, head].astype(np.float64) * scale
            weights = np.exp(logits - logits.max())
            out[seq, head] = weights @ values[rows] / (weights.sum() if normalise else 1.0)
    return out


def _decode_mistakes(case: DecodeCase) -> tuple[Mistake, ...]:
    """The known mistakes, as models of what the kernel computed (on a GPU, also those reading out of range)."""
    return (
        Mistake("offset is the token", OFFSET_HINT, wrong_reference=lambda: decode_as_read(
            case, offset_of=lambda tokens, size: tokens)),
        Mistake("table indexed by token", TABLE_HINT, wrong_reference=lambda: decode_as_read(
            case, table_index_of=lambda tokens, size: tokens)),
        Mistake("kv heads round-robin", f"kv head h % num_kv_heads is a round-robin mapping; {GQA_HINT}",
                wrong_reference=lambda: decode_as_read(case, kv_head_of=lambda head, heads, kv: head % kv)),
        Mistake("divided by num_kv_heads", f"kv head h // num_kv_heads divides by the wrong number; {GQA_HINT}",
                wrong_reference=lambda: decode_as_read(case, kv_head_of=lambda head, heads, kv: head // kv)),
        Mistake("kv head = query head", f"each query head read its own kv head; {GQA_HINT}",
                wrong_reference=lambda: decode_as_read(case, kv_head_of=lambda head, heads, kv: head)),
        Mistake("scale missing", "the logits were not multiplied by scale (1 / sqrt(head_dim)): "
                "logit = scale * (q . k)", wrong_reference=lambda: decode_as_read(case, scale=1.0)),
        Mistake("scale twice", "the logits were multiplied by scale twice: scale already is 1 / sqrt(head_dim)",
                wrong_reference=lambda: decode_as_read(case, scale=case.scale**2)),
        Mistake("not normalised", "the output was not divided by the sum of the weights: "
                "out = sum(exp(logit - max) * v) / sum(exp(logit - max))",
                wrong_reference=lambda: decode_as_read(case, normalise=False)),
    )


def _explain_decode_error(shape: DecodeShape, max_blocks: int) -> ErrorExplainer:
    """The simulator bounds-checks every index; the axis and its size tell which index ran out."""

    def explain(error: BaseException) -> str | None:
        if isinstance(error, OverflowError):
            return MAX_HINT
        found = OUT_OF_BOUNDS.search(str(error)) if isinstance(error, IndexError) else None
        if not found:
            return None
        axis, size = int(found[2]), int(found[3])
        if axis == 2 and size == shape.block_size:
            return OFFSET_HINT
        if axis == 1 and size == max_blocks:
            return TABLE_HINT
        if axis == 1 and size == shape.num_kv_heads:
            return GQA_HINT
        return None

    return explain


def _decode_shapes(rng: np.random.Generator) -> list[DecodeShape]:
    """Grouped queries (3 per kv head, 2 kv heads), then multi-head attention, then logits near 1000.

    Contexts span several blocks and end in a partial one (one is shorter than a block). The simulator
    runs THREADS Python threads per (sequence, head), so CPU cases stay at a dozen thread blocks.
    """
    shapes = [
        DecodeShape((size_past(rng, 17, 40, 8),), 6, 2, 8, 8),
        DecodeShape((size_past(rng, 20, 48, 16), size_past(rng, 2, 8, 16)), 2, 2, 16, 16),
    ]
    if backend.has_gpu():
        shapes.append(DecodeShape(tuple(size_past(rng, 100, 512, 16) for _ in range(4)), 8, 2, 128, 16))
    shapes.append(DecodeShape((size_past(rng, 9, 30, 8),), 2, 1, 8, 8, logit_shift=LARGE_LOGIT))
    return shapes


def _run_decode(
    kernel: Any, name: str, shape: DecodeShape, case: DecodeCase, explain_error: ErrorExplainer
) -> np.ndarray:
    """Launch on a (num_heads, num_seqs) grid of THREADS threads into a poisoned out; return out on the host."""
    __tracebackhide__ = True
    out = poison(case.query.shape, np.float32)
    query, key_cache, value_cache, block_tables, context_lens = case.device_arrays()
    launch_learner_kernel(
        kernel, (shape.num_heads, len(shape.context_lens)), THREADS,
        out, query, key_cache, value_cache, block_tables, context_lens, np.float32(case.scale),
        name=name, expected_signature=DECODE_SIGNATURE.replace("paged_decode", name), explain_error=explain_error,
    )
    return backend.to_numpy(out)


def run_decode_cases(
    run: CheckRun,
    kernel: Any,
    name: str,
    shapes: list[DecodeShape],
    explain: Callable[[DecodeShape, int], ErrorExplainer],
    mistakes: Callable[[DecodeCase], Sequence[Mistake]],
) -> None:
    """Launch a learner's decode kernel (``paged_decode``'s arguments and grid) on a fresh case of each shape and
    compare it with the float64 reference; ``explain`` and ``mistakes`` name what this exercise's errors mean."""
    __tracebackhide__ = True
    for shape in shapes:
        run.case = shape.describe()
        case = decode_case(run.rng, shape)
        out = _run_decode(kernel, name, shape, case, explain(shape, case.table_buffer.shape[1]))
        if shape.logit_shift:
            _require_finite_with_large_logits(out)
        rtol = LARGE_LOGIT_RTOL if shape.logit_shift else None
        assert_close(out, case.reference(), np.float32, what="out", rtol=rtol, mistakes=mistakes(case))


def _require_finite_with_large_logits(out: np.ndarray) -> None:
    """With logits near 1000, exp without the max subtracted gives inf, then inf / inf = NaN."""
    __tracebackhide__ = True
    bad = np.argwhere(~np.isfinite(out))
    if bad.size:
        index = ", ".join(str(int(i)) for i in bad[0])
        raise CheckFailed(f"with logits near {LARGE_LOGIT:g}, out[{index}] = {out[tuple(bad[0])]}\nHint: {MAX_HINT}")


@checks_an_exercise
def check_paged_decode(paged_decode: Any) -> None:
    """Check the kernel ``paged_decode(out, query, key_cache, value_cache, block_tables, context_lens, scale)``.

    Launched as ``paged_decode[(num_heads, num_seqs), THREADS]`` on float32 caches in the layout
    ``[num_blocks, num_kv_heads, block_size, head_dim]``, and compared with the float64
    ``paged_decode_reference`` within the float32 tolerance; the case with logits near 1000 allows
    LARGE_LOGIT_RTOL, since float32 keeps such a logit only to about 6e-5.
    """
    __tracebackhide__ = True
    with CheckRun("paged_decode") as run:
        shapes = _decode_shapes(run.rng)
        run_decode_cases(run, paged_decode, "paged_decode", shapes, _explain_decode_error, _decode_mistakes)
        longest = max(max(shape.context_lens) for shape in shapes)
        run.passed(len(shapes), detail=f"contexts up to {longest} tokens, grouped-query heads", show_mode=True)


# --- block_hashes: the prefix cache's chained keys ----------------------------------------------------

HASH_SIGNATURE = "block_hashes(token_ids, block_size)"
HASH_BLOCK_SIZES = (4, 8, 16)
SHOWN_HASH_CHARS = 12


def _short(block_hash: Any) -> str:
    return f"'{block_hash[:SHOWN_HASH_CHARS]}...'" if isinstance(block_hash, str) else repr(block_hash)


def _tokens_phrase(count: int) -> str:
    return "the last token makes" if count == 1 else f"the last {count} tokens make"


def _hash_mistakes(tokens: list[int], block_size: int) -> tuple[Mistake, ...]:
    """Known mistakes, as symptoms comparing the learner's list of hashes with what each mistake gives."""
    full = len(tokens) // block_size
    blocks = [tokens[start : start + block_size] for start in range(0, full * block_size, block_size)]
    partial = tokens[full * block_size :]

    def chained(token_blocks: Sequence[Sequence[int]]) -> list[str]:
        hashes: list[str] = []
        for block in token_blocks:
            hashes.append(hash_block_tokens(hashes[-1] if hashes else None, block))
        return hashes

    def gives(wrong: list[str]) -> Callable[[list, list], bool]:
        return lambda out, ref: out == wrong and wrong != ref

    misplaced_first_blocks = [hash_block_tokens(None, tokens[start : start + block_size + extra])
                              for start, extra in ((0, 1), (0, -1), (1, 0))]
    return (
        Mistake("partial block hashed", f"{_tokens_phrase(len(partial))} a partial block, and a block gets a "
                "hash only once it is full (a partial block may still grow, so the prefix cache cannot share it)",
                symptom=gives(chained([*blocks, partial]))),
        Mistake("blocks hashed alone", "every block was hashed alone, with parent None: pass the previous block's "
                "hash as the parent, so that a block's hash stands for the whole prefix up to it",
                symptom=gives([hash_block_tokens(None, block) for block in blocks])),
        Mistake("prefix hashed whole", "each hash is of the whole prefix with parent None: chain instead, "
                "hash_block_tokens(previous_hash, this block's tokens), one block of work per hash",
                symptom=gives([hash_block_tokens(None, tokens[: (i + 1) * block_size]) for i in range(full)])),
        Mistake("last full block missing", f"the last full block has no hash: {len(tokens)} tokens make "
                f"{full} full blocks of {block_size}; range(0, len(token_ids) - block_size + 1, block_size) "
                "includes the last one", symptom=gives(chained(blocks[:-1]))),
        Mistake("block boundaries off by one", "block i holds token_ids[i * block_size : (i + 1) * block_size], "
                "exactly block_size tokens: the slices are off by one",
                symptom=lambda out, ref: bool(out) and out[0] in misplaced_first_blocks),
    )


def _as_hash_list(hashes: Any) -> list[str]:
    __tracebackhide__ = True
    if hashes is None:
        raise CheckFailed("block_hashes returned None: did you forget to `return` the list of hashes?")
    if isinstance(hashes, (str, bytes)) or not isinstance(hashes, Sequence):
        raise CheckFailed(f"block_hashes should return a list of hashes, one per full block; got {_short(hashes)}")
    strange = [value for value in hashes if not isinstance(value, str)]
    if strange:
        raise CheckFailed(f"each hash is the hex string hash_block_tokens returns; got {_short(strange[0])} "
                          f"(a {type(strange[0]).__name__})")
    return list(hashes)


def _compare_hashes(out: list[str], expected: list[str], tokens: list[int], block_size: int) -> None:
    __tracebackhide__ = True
    if out == expected:
        return
    if len(out) != len(expected):
        message = (f"block_hashes returned {len(out)} hashes for {len(tokens)} tokens in blocks of {block_size}, "
                   f"expected {len(expected)}: one per full block")
    else:
        first = next(i for i, (got, want) in enumerate(zip(out, expected, strict=True)) if got != want)
        message = f"the hash of block {first} is {_short(out[first])}, expected {_short(expected[first])}"
    hint = hint_for(out, expected, _hash_mistakes(tokens, block_size), (), 0.0)
    raise CheckFailed(f"{message}\nHint: {hint}" if hint else message)


def _hash_token_counts(rng: np.random.Generator, block_size: int) -> list[int]:
    """A whole number of blocks, then a partial last block, then fewer tokens than one block."""
    blocks = int(rng.integers(2, 5))
    return [blocks * block_size, blocks * block_size + int(rng.integers(1, block_size)),
            int(rng.integers(1, block_size))]


@checks_an_exercise
def check_block_hashes(block_hashes: Callable[[list[int], int], Any]) -> None:
    """Check ``block_hashes(token_ids, block_size)``: the chained hash of each full block, as ``hash_full_blocks``.

    Token counts are a whole number of blocks, one with a partial last block, and one below a block.
    """
    __tracebackhide__ = True
    with CheckRun("block_hashes") as run:
        cases = 0
        for block_size in HASH_BLOCK_SIZES:
            for num_tokens in _hash_token_counts(run.rng, block_size):
                tokens = [int(token) for token in run.rng.integers(0, 32_000, size=num_tokens)]
                run.case = f"{num_tokens} tokens, block_size {block_size}"
                out = call_learner(block_hashes, list(tokens), block_size, name="block_hashes",
                                   expected_signature=HASH_SIGNATURE)
                _compare_hashes(_as_hash_list(out), hash_full_blocks(tokens, block_size), tokens,
                                block_size)
                cases += 1
        run.passed(cases, detail=f"block sizes {', '.join(map(str, HASH_BLOCK_SIZES))}, partial blocks included")
