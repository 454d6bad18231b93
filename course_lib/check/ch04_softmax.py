"""Checkers for chapter 04's softmax exercises: v2's log-sum-exp merge, and a single-pass online-softmax kernel.

Both rest on one identity. A softmax over tokens split into parts is rebuilt from each part's largest logit
``m_i``, its sum ``s_i = sum exp(logit - m_i)`` and its normalised output ``o_i``: with ``m = max m_i``, part i
weighs ``w_i = s_i exp(m_i - m)``, and ``out = sum w_i o_i / sum w_i``. The merge applies it across partitions;
the online kernel applies it tile after tile, rescaling its running sum and accumulator whenever the max grows.

The checkers draw partitions of random sizes, empty ones among them (a partition past the end of a sequence's
context has ``m_i = -inf``, ``s_i = 0``), contexts that span several key tiles, and cases whose logits are near
1000, where ``exp`` of a logit overflows unless the running max is subtracted first. References are float64:
``softmax_attention`` over the whole context, the definition the parts must rebuild.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from course_lib import backend
from course_lib.check.ch04 import (
    LARGE_LOGIT,
    DecodeCase,
    DecodeShape,
    _decode_mistakes,
    _explain_decode_error,
    run_decode_cases,
)
from course_lib.check.compare import assert_close
from course_lib.check.exercise import checks_an_exercise
from course_lib.check.inputs import nonzero_float32, size_past
from course_lib.check.learner import ErrorExplainer, call_learner
from course_lib.check.mistakes import Mistake
from course_lib.check.run import CheckRun
from course_lib.kernels.paged_attention_numba import THREADS
from course_lib.kernels.paged_attention_reference import (
    Partials,
    gather,
    partition_partials,
    softmax_attention,
)

RESCALE = "weight partition i by exp_sums[i] * exp(max_logits[i] - m), where m is the largest max_logit"

# --- merge_partials: paged attention v2's second kernel, in NumPy ------------------------------------

MERGE_SIGNATURE = "merge_partials(max_logits, exp_sums, outputs)"
PARTITION_SIZES = (4, 8, 16)


def merge_case(rng: np.random.Generator, shift: float = 0.0) -> tuple[Partials, np.ndarray, str]:
    """One sequence's partials in shuffled order, 1-3 empty partitions among them, and the full softmax's output.

    ``shift`` is added to every max logit: the softmax does not change, but exp(max_logit) overflows.
    """
    heads, head_dim, partition = int(rng.integers(2, 5)), int(rng.integers(3, 9)), int(rng.choice(PARTITION_SIZES))
    length = size_past(rng, partition + 1, 6 * partition, partition)
    query = nonzero_float32(rng, heads * head_dim).reshape(heads, head_dim).astype(np.float64)
    keys, values = (nonzero_float32(rng, length * heads * head_dim).reshape(length, heads, head_dim).astype(np.float64)
                    for _ in range(2))
    scale = 1.0 / math.sqrt(head_dim)
    full = partition_partials(query, keys, values, scale, partition)
    empty = int(rng.integers(1, 4))
    order = rng.permutation(full.max_logits.shape[0] + empty)
    partials = Partials(np.concatenate([full.max_logits + shift, np.full((empty, heads), -np.inf)])[order],
                        np.concatenate([full.exp_sums, np.zeros((empty, heads))])[order],
                        np.concatenate([full.outputs, np.zeros((empty, heads, head_dim))])[order])
    reference = softmax_attention(query[None], keys, values, scale)[2][0]
    shifted = f", logits near {shift:g}" if shift else ""
    described = (f"{length} tokens in partitions of {partition}, {empty} empty, {heads} heads, head_dim {head_dim}"
                 f"{shifted}")
    return partials, reference, described


def _merged_with(partials: Partials, weights: np.ndarray, divide: bool = True) -> np.ndarray:
    """sum_i weights_i o_i (divided by sum_i weights_i): the merge with other weights, as a mistake computes it."""
    total = np.einsum("ph,phd->hd", weights, partials.outputs)
    return total / weights.sum(axis=0)[:, None] if divide else total


def _not_finite(out: np.ndarray, ref: np.ndarray) -> bool:
    return not np.isfinite(out).all()


def _merge_mistakes(shifted: bool) -> tuple[Mistake, ...]:
    """Known mistakes; each wrong reference takes the case's Partials."""
    def rescale(p: Partials) -> np.ndarray:
        return np.exp(p.max_logits - p.max_logits.max(axis=0))

    overflow = (f"the output is not finite with logits near {LARGE_LOGIT:g}: exp(max_logit) overflows. Only "
                f"differences to the largest max_logit m go into exp: {RESCALE}")
    empty = ("the output is not finite: an empty partition (max_logit -inf, exp_sum 0, output 0) must weigh 0. "
             f"{RESCALE}; exp(-inf - m) is 0, but exp(m - (-inf)) is inf, and 0 * inf or a division by its "
             "exp_sum 0 gives NaN")
    return (
        Mistake("not finite", overflow if shifted else empty, symptom=_not_finite),
        Mistake("max not rescaled", "each partition's exp_sum counts exp(logit - its own max_logit), so the sums "
                f"are on different scales: {RESCALE}", wrong_reference=lambda p: _merged_with(p, p.exp_sums)),
        Mistake("exp_sums left out", "a partition with more (or larger) weights counts for more: the exp_sums "
                f"belong in the weights too; {RESCALE}", wrong_reference=lambda p: _merged_with(p, rescale(p))),
        Mistake("not divided", "the weighted sum of the outputs must be divided by the sum of the weights: "
                "out = sum w_i o_i / sum w_i", wrong_reference=lambda p: _merged_with(p, p.exp_sums * rescale(p),
                                                                                        divide=False)),
        Mistake("outputs summed", f"the outputs were added without weights; {RESCALE}, then divide by their sum",
                wrong_reference=lambda p: _merged_with(p, np.ones_like(p.exp_sums), divide=False)),
        Mistake("outputs averaged", f"the outputs were averaged, each partition counting the same; {RESCALE}",
                wrong_reference=lambda p: _merged_with(p, np.ones_like(p.exp_sums))),
    )


@checks_an_exercise
def check_merge_partials(merge: Callable[[np.ndarray, np.ndarray, np.ndarray], Any]) -> None:
    """Check ``merge_partials(max_logits, exp_sums, outputs)`` -> ``[num_heads, head_dim]`` in float64.

    The inputs are one sequence's partials, ``[P, H]``, ``[P, H]`` and ``[P, H, D]`` float64, from partitions of a
    random context in shuffled order with empty ones among them; the result must equal full softmax attention
    over the context (float64 tolerance). The last case shifts every max logit by 1000.
    """
    __tracebackhide__ = True
    with CheckRun("merge_partials") as run:
        shifts = (0.0, 0.0, 0.0, LARGE_LOGIT)
        for shift in shifts:
            partials, reference, run.case = merge_case(run.rng, shift)
            out = call_learner(merge, partials.max_logits.copy(), partials.exp_sums.copy(), partials.outputs.copy(),
                               name="merge_partials", expected_signature=MERGE_SIGNATURE)
            assert_close(out, reference, np.float64, what="out", mistakes=_merge_mistakes(bool(shift)),
                         inputs=(partials,))
        run.passed(len(shifts), detail="empty partitions and logits near 1000 included")


# --- online_decode: one pass over the keys, a running max, sum and accumulator -----------------------

ONLINE_TILE = THREADS  # the kernel reads the keys THREADS tokens at a time, one token per thread
ONLINE_MAX_HINT = ("exp(logit) overflows float32 once a logit passes 88: take the max of the logits first, "
                   "new_max = max(running_max, the tile's largest logit), and exponentiate exp(logit - new_max)")


def _logits_and_values(case: DecodeCase, seq: int, head: int) -> tuple[np.ndarray, np.ndarray]:
    """One (sequence, head)'s logits and values in float64, gathered through its block table."""
    query, key_cache, value_cache, tables, lengths = case.arrays()
    kv_head = head // (query.shape[1] // key_cache.shape[1])
    keys, values = (gather(cache, tables[seq], int(lengths[seq]))[:, kv_head].astype(np.float64)
                    for cache in (key_cache, value_cache))
    return keys @ query[seq, head].astype(np.float64) * case.scale, values


def online_as_computed(case: DecodeCase, *, rescale_acc: bool = True, rescale_sum: bool = True) -> np.ndarray:
    """The float64 output of a one-pass kernel that reads ONLINE_TILE keys at a time; the flags drop a rescale.

    With both rescales it equals the softmax: each tile's weights are exp(logit - new_max), and what was summed
    before, against the old max, is multiplied by exp(old_max - new_max).
    """
    out = np.empty(case.query.shape)
    for seq in range(case.query.shape[0]):
        for head in range(case.query.shape[1]):
            logits, values = _logits_and_values(case, seq, head)
            running_max, running_sum, acc = -np.inf, 0.0, np.zeros(values.shape[1])
            for start in range(0, logits.size, ONLINE_TILE):
                tile = slice(start, start + ONLINE_TILE)
                new_max = max(running_max, logits[tile].max())
                weights, factor = np.exp(logits[tile] - new_max), math.exp(running_max - new_max)
                running_sum = running_sum * (factor if rescale_sum else 1.0) + weights.sum()
                acc = acc * (factor if rescale_acc else 1.0) + weights @ values[tile]
                running_max = new_max
            out[seq, head] = acc / running_sum
    return out


def _online_mistakes(case: DecodeCase) -> tuple[Mistake, ...]:
    return (
        Mistake("accumulator not rescaled", "the accumulator was not rescaled when the max grew: what it summed "
                "against the old max must be multiplied by exp(old_max - new_max) before the new tile's weighted "
                "values are added, as the running sum is", wrong_reference=lambda: online_as_computed(
                    case, rescale_acc=False)),
        Mistake("sum not rescaled", "the running sum was not rescaled when the max grew: running_sum = running_sum "
                "* exp(old_max - new_max) + the tile's sum of exp(logit - new_max)",
                wrong_reference=lambda: online_as_computed(case, rescale_sum=False)),
        Mistake("neither rescaled", "neither the running sum nor the accumulator was rescaled when the max grew: "
                "multiply both by exp(old_max - new_max) before adding the new tile",
                wrong_reference=lambda: online_as_computed(case, rescale_acc=False, rescale_sum=False)),
        *_decode_mistakes(case),
    )


def _explain_online_error(shape: DecodeShape, max_blocks: int) -> ErrorExplainer:
    """The simulator's math.exp raises OverflowError past e^709: an exponent taken before the max."""
    explain = _explain_decode_error(shape, max_blocks)
    return lambda error: ONLINE_MAX_HINT if isinstance(error, OverflowError) else explain(error)


def _online_shapes(rng: np.random.Generator) -> list[DecodeShape]:
    """Contexts of two to three key tiles (and one shorter than a tile); grouped heads; logits near 1000."""
    tile = ONLINE_TILE
    shapes = [
        DecodeShape((size_past(rng, tile + 8, 3 * tile, 8), size_past(rng, 3, tile, 8)), 4, 2, 8, 8),
        DecodeShape((size_past(rng, tile + 1, 2 * tile + 16, 16),), 2, 2, 16, 16),
    ]
    if backend.has_gpu():
        shapes.append(DecodeShape(tuple(size_past(rng, 500, 3000, 16) for _ in range(4)), 8, 2, 128, 16))
    shapes.append(DecodeShape((size_past(rng, tile + 1, 2 * tile, 8),), 2, 1, 8, 8, logit_shift=LARGE_LOGIT))
    return shapes


@checks_an_exercise
def check_online_decode(online_decode: Any) -> None:
    """Check the kernel ``online_decode(out, query, key_cache, value_cache, block_tables, context_lens, scale)``.

    The arguments and launch are ``paged_decode``'s (``[(num_heads, num_seqs), THREADS]``); contexts span several
    tiles of THREADS keys, so a running max that grows shows, and the result is compared with the float64
    softmax. On a GPU, contexts go past the 1024 logits the two-pass kernel keeps in shared memory.
    """
    __tracebackhide__ = True
    with CheckRun("online_decode") as run:
        shapes = _online_shapes(run.rng)
        run_decode_cases(run, online_decode, "online_decode", shapes, _explain_online_error, _online_mistakes)
        longest = max(max(shape.context_lens) for shape in shapes)
        run.passed(len(shapes), detail=f"contexts up to {longest} tokens in tiles of {ONLINE_TILE}", show_mode=True)
