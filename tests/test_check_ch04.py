"""Chapter 04 checkers: the right solutions pass, and each known mistake is rejected with its hint.

The decode kernels are real @cuda.jit kernels built from one template with one part changed; in CPU
mode they run in Numba's CUDA simulator, where an index past an array raises IndexError. On a GPU the
same kernels read on into the checker's padding, and the checker recognises them by their values.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from checker_testing import rejected_with, unwritten
from numba import float32

from course_lib import backend
from course_lib.check import check_block_hashes, check_paged_decode, check_slot_mapping
from course_lib.check.ch04 import DecodeShape, decode_as_read, decode_case
from course_lib.check.ch04_softmax import check_merge_partials, check_online_decode, merge_case, online_as_computed
from course_lib.engine.block_pool import hash_block_tokens
from course_lib.kernels.paged_attention import MAX_HEAD_DIM
from course_lib.kernels.paged_attention_numba import THREADS, block_reduce
from course_lib.kernels.paged_attention_reference import merge_partials

cuda = backend.numba_cuda()

needs_gpu = pytest.mark.gpu  # tests/conftest.py skips these, saying why, where there is no GPU
on_cpu_only = pytest.mark.skipif(backend.has_gpu(), reason="the simulator raises where a GPU reads on")

MAX_CONTEXT_LEN = 1024  # the notebook's: the logits of a whole context fit in shared memory


# --- slot_mapping ----------------------------------------------------------------------------------


def slot_mapping(block_table, positions, block_size):
    return block_table[positions // block_size] * block_size + positions % block_size


def test_slot_mapping_accepts_the_solution(capsys):
    assert check_slot_mapping(slot_mapping) is None
    assert capsys.readouterr().out.startswith("PASSED slot_mapping: 3 random cases (block sizes 8, 16, 32, seed ")


def test_slot_mapping_accepts_a_loop_returning_a_list():
    def one_at_a_time(block_table, positions, block_size):
        return [int(block_table[p // block_size]) * block_size + int(p) % block_size for p in positions]

    check_slot_mapping(one_at_a_time)


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (lambda table, p, size: table[p // size] * size + p, "not the position itself"),
        (lambda table, p, size: table[p] * size + p % size, "one entry per block, not per token"),
        (lambda table, p, size: table[-(-p // size)] * size + p % size, "floor division with no + 1"),
        (lambda table, p, size: table[p // size] + p % size, "block b starts at slot b * block_size"),
        (lambda table, p, size: table[p // size] * size + p % size + 1, "every slot is one off"),
        (lambda table, p, size: table[(p - 1) // size] * size + p % size, "an off-by-one at a block boundary"),
        (lambda table, p, size: table[(p + 1) // size] * size + p % size, "an off-by-one at a block boundary"),
        (lambda table, p, size: table[np.floor(p / size)] * size + p % size, "use // (floor division)"),
        (lambda table, p, size: table[p // size] * size + p % size + 0.0, "slots are whole numbers"),
    ],
    ids=["offset-is-position", "table-by-position", "ceil-block", "block-not-scaled", "plus-one", "block-of-p-minus-1",
         "block-of-p-plus-1", "float-index", "float-slots"],
)
def test_slot_mapping_rejects_known_mistakes(seed, wrong, hint):
    assert hint in rejected_with(check_slot_mapping, wrong)


def test_slot_mapping_missing_return():
    assert "forget to `return`" in rejected_with(check_slot_mapping, lambda table, p, size: None)


# --- paged_decode ----------------------------------------------------------------------------------


@cuda.jit(device=True)
def grouped(head, num_heads, num_kv_heads):
    return head // (num_heads // num_kv_heads)


@cuda.jit(device=True)
def round_robin(head, num_heads, num_kv_heads):
    return head % num_kv_heads


@cuda.jit(device=True)
def divided_by_kv_heads(head, num_heads, num_kv_heads):
    return head // num_kv_heads


@cuda.jit(device=True)
def same_as_query_head(head, num_heads, num_kv_heads):
    return head


def make_paged_decode(kv_head_of=grouped, offset_is_token=False, table_by_token=False, scale_power=1,
                      subtract_max=True, normalise=True):
    """The solution's decode kernel, or a known mistake when one of the arguments is changed."""

    @cuda.jit
    def paged_decode(out, query, key_cache, value_cache, block_tables, context_lens, scale):
        head, seq = cuda.blockIdx.x, cuda.blockIdx.y
        t = cuda.threadIdx.x
        num_heads, head_dim = query.shape[1], query.shape[2]
        num_kv_heads, block_size = key_cache.shape[1], key_cache.shape[2]
        kv_head = kv_head_of(head, num_heads, num_kv_heads)
        context_len = context_lens[seq]
        q = cuda.shared.array(MAX_HEAD_DIM, float32)
        partials = cuda.shared.array(THREADS, float32)
        logits = cuda.shared.array(MAX_CONTEXT_LEN, float32)

        for d in range(t, head_dim, THREADS):
            q[d] = query[seq, head, d] * scale**scale_power
        cuda.syncthreads()
        thread_max = float32(-math.inf)
        for token in range(t, context_len, THREADS):
            block = block_tables[seq, token if table_by_token else token // block_size]
            offset = token if offset_is_token else token % block_size
            dot = float32(0)
            for d in range(head_dim):
                dot += q[d] * key_cache[block, kv_head, offset, d]
            logits[token] = dot
            thread_max = max(thread_max, dot)
        max_logit = block_reduce(partials, thread_max, True) if subtract_max else float32(0)
        thread_sum = float32(0)
        for token in range(t, context_len, THREADS):
            weight = math.exp(logits[token] - max_logit)
            logits[token] = weight
            thread_sum += weight
        exp_sum = block_reduce(partials, thread_sum, False)
        for d in range(t, head_dim, THREADS):
            acc = float32(0)
            for token in range(context_len):
                block = block_tables[seq, token if table_by_token else token // block_size]
                offset = token if offset_is_token else token % block_size
                acc += logits[token] * value_cache[block, kv_head, offset, d]
            out[seq, head, d] = acc / exp_sum if normalise else acc

    return paged_decode


@cuda.jit
def paged_decode_stub(out, query, key_cache, value_cache, block_tables, context_lens, scale):
    raise NotImplementedError


def test_decode_model_with_the_right_indices_is_the_reference():
    case = decode_case(np.random.default_rng(4), DecodeShape((37, 5), 6, 2, 16, 8))
    np.testing.assert_allclose(decode_as_read(case), case.reference(), rtol=1e-12)


def test_paged_decode_accepts_the_solution(capsys):
    assert check_paged_decode(make_paged_decode()) is None
    line = capsys.readouterr().out
    assert line.startswith("PASSED paged_decode: ") and "grouped-query heads" in line and "mode" in line


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (make_paged_decode(kv_head_of=round_robin), "round-robin"),
        (make_paged_decode(scale_power=0), "not multiplied by scale"),
        (make_paged_decode(scale_power=2), "multiplied by scale twice"),
        (make_paged_decode(subtract_max=False), "subtract the largest logit first"),
        (make_paged_decode(normalise=False), "not divided by the sum of the weights"),
    ],
    ids=["kv-heads-round-robin", "scale-missing", "scale-twice", "softmax-without-max", "not-normalised"],
)
def test_paged_decode_rejects_known_mistakes(seed, wrong, hint):
    assert hint in rejected_with(check_paged_decode, wrong)


# Kernels whose wrong index reads past the end of an array: the simulator names the index, a GPU reads on.
READS_PAST_THE_END = {
    "offset-is-token": make_paged_decode(offset_is_token=True),
    "table-by-token": make_paged_decode(table_by_token=True),
    "kv-head-divided-by-kv-heads": make_paged_decode(kv_head_of=divided_by_kv_heads),
    "kv-head-is-query-head": make_paged_decode(kv_head_of=same_as_query_head),
}


def reads_past_the_end(hints: dict[str, str]) -> pytest.MarkDecorator:
    """Parametrize ``(wrong, hint)`` over READS_PAST_THE_END with the hint each mistake must get."""
    cases = [(READS_PAST_THE_END[name], hint) for name, hint in hints.items()]
    return pytest.mark.parametrize(("wrong", "hint"), cases, ids=list(hints))


@on_cpu_only
@reads_past_the_end({"offset-is-token": "a wrong block offset", "table-by-token": "one entry per block, not per token",
                     "kv-head-divided-by-kv-heads": "h // (num_heads // num_kv_heads)",
                     "kv-head-is-query-head": "h // (num_heads // num_kv_heads)"})
def test_paged_decode_simulator_names_an_index_past_the_end(wrong, hint):
    message = rejected_with(check_paged_decode, wrong)
    assert "IndexError" in message and hint in message


@needs_gpu
@reads_past_the_end({"offset-is-token": "a wrong block offset", "table-by-token": "one entry per block, not per token",
                     "kv-head-divided-by-kv-heads": "divides by the wrong number",
                     "kv-head-is-query-head": "each query head read its own kv head"})
def test_gpu_paged_decode_recognises_reads_past_the_end(seed, wrong, hint):
    assert hint in rejected_with(check_paged_decode, wrong)


def test_paged_decode_stub_is_not_written_yet():
    assert unwritten(check_paged_decode, paged_decode_stub).startswith("paged_decode is not")


# --- block_hashes ----------------------------------------------------------------------------------


def chain(token_blocks):
    hashes = []
    for block in token_blocks:
        hashes.append(hash_block_tokens(hashes[-1] if hashes else None, block))
    return hashes


def block_hashes(token_ids, block_size):
    full = len(token_ids) // block_size * block_size
    return chain(token_ids[start : start + block_size] for start in range(0, full, block_size))


def test_block_hashes_accepts_the_solution(capsys):
    assert check_block_hashes(block_hashes) is None
    assert capsys.readouterr().out.startswith("PASSED block_hashes: 9 random cases (block sizes 4, 8, 16, ")


def hashed_alone(token_ids, block_size):
    full = len(token_ids) // block_size * block_size
    return [hash_block_tokens(None, token_ids[start : start + block_size]) for start in range(0, full, block_size)]


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (hashed_alone, "hashed alone, with parent None"),
        (lambda tokens, size: chain(tokens[start : start + size] for start in range(0, len(tokens), size)),
         "a partial block"),
        (lambda tokens, size: chain(tokens[start : start + size] for start in range(0, len(tokens) - size, size)),
         "the last full block has no hash"),
        (lambda tokens, size: [hash_block_tokens(None, tokens[:end]) for end in range(size, len(tokens) + 1, size)],
         "each hash is of the whole prefix"),
        (lambda tokens, size: chain(tokens[start : start + size + 1]
                                    for start in range(0, len(tokens) - size + 1, size)), "off by one"),
        (lambda tokens, size: chain(tokens[start + 1 : start + size + 1]
                                    for start in range(0, len(tokens) - size + 1, size)), "off by one"),
    ],
    ids=["alone", "partial-included", "last-full-missing", "whole-prefix", "slice-too-long", "slice-shifted"],
)
def test_block_hashes_rejects_known_mistakes(seed, wrong, hint):
    assert hint in rejected_with(check_block_hashes, wrong)


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (lambda tokens, size: None, "forget to `return`"),
        (lambda tokens, size: "".join(block_hashes(tokens, size)), "should return a list of hashes"),
        (lambda tokens, size: [bytes.fromhex(h) for h in block_hashes(tokens, size)], "the hex string"),
    ],
    ids=["none", "one-string", "bytes"],
)
def test_block_hashes_rejects_what_is_not_a_list_of_hashes(wrong, message):
    assert message in rejected_with(check_block_hashes, wrong)


# --- merge_partials (ch04_softmax) -----------------------------------------------------------------


def merge(max_logits, exp_sums, outputs):
    weights = exp_sums * np.exp(max_logits - max_logits.max(axis=0))
    return np.einsum("ph,phd->hd", weights, outputs) / weights.sum(axis=0)[:, None]


def test_merge_case_partials_rebuild_the_full_softmax(rng):
    partials, reference, _ = merge_case(rng)
    assert np.isneginf(partials.max_logits).any() and (partials.exp_sums == 0).any()
    np.testing.assert_allclose(merge_partials(partials), reference, rtol=1e-12)


def test_merge_partials_accepts_the_solution(capsys):
    assert check_merge_partials(merge) is None
    assert capsys.readouterr().out.startswith("PASSED merge_partials: 4 random cases (empty partitions and logits")


def weighted(weights_of, divide=True):
    """A merge that weighs each partition by ``weights_of(max_logits, exp_sums)``."""
    def wrong(max_logits, exp_sums, outputs):
        weights = weights_of(max_logits, exp_sums)
        total = np.einsum("ph,phd->hd", weights, outputs)
        return total / weights.sum(axis=0)[:, None] if divide else total

    return wrong


def rescaled(max_logits, exp_sums):
    return np.exp(max_logits - max_logits.max(axis=0))


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (weighted(lambda m, s: s), "the sums are on different scales"),
        (weighted(rescaled), "the exp_sums belong in the weights too"),
        (weighted(lambda m, s: s * rescaled(m, s), divide=False), "must be divided by the sum of the weights"),
        (lambda m, s, o: o.sum(axis=0), "added without weights"),
        (lambda m, s, o: o.mean(axis=0), "averaged, each partition counting the same"),
        (weighted(lambda m, s: s * np.exp(m)), "exp(max_logit) overflows"),
        (weighted(lambda m, s: s * np.exp(m.max(axis=0) - m)), "an empty partition"),
        (lambda m, s, o: np.einsum("ph,phd->hd", s * rescaled(m, s), o / s[..., None]) / (s * rescaled(m, s)).sum(0)[
            :, None], "an empty partition"),
    ],
    ids=["not-rescaled", "no-exp-sums", "not-divided", "summed", "averaged", "exp-of-max", "rescaled-backwards",
         "divided-by-exp-sum"],
)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflows and NaNs of the mistakes themselves
def test_merge_partials_rejects_known_mistakes(seed, wrong, hint):
    assert hint in rejected_with(check_merge_partials, wrong)


def test_merge_partials_stub_is_not_written_yet():
    def merge_partials(max_logits, exp_sums, outputs):
        raise NotImplementedError

    assert unwritten(check_merge_partials, merge_partials).startswith("merge_partials is not written")


# --- online_decode (ch04_softmax) ------------------------------------------------------------------


def make_online_decode(rescale_acc=True, rescale_sum=True, exp_before_max=False):
    """The solution's one-pass kernel, or a known mistake when one of the arguments is changed."""

    @cuda.jit
    def online_decode(out, query, key_cache, value_cache, block_tables, context_lens, scale):
        head, seq = cuda.blockIdx.x, cuda.blockIdx.y
        t = cuda.threadIdx.x
        head_dim, block_size = query.shape[2], key_cache.shape[2]
        kv_head = grouped(head, query.shape[1], key_cache.shape[1])
        context_len = context_lens[seq]
        q = cuda.shared.array(MAX_HEAD_DIM, float32)
        acc = cuda.shared.array(MAX_HEAD_DIM, float32)
        weights = cuda.shared.array(THREADS, float32)
        partials = cuda.shared.array(THREADS, float32)
        for d in range(t, head_dim, THREADS):
            q[d] = query[seq, head, d] * scale
            acc[d] = 0
        cuda.syncthreads()
        running_max, running_sum = float32(-math.inf), float32(0)
        for start in range(0, context_len, THREADS):
            token = start + t
            logit = float32(-math.inf)
            if token < context_len:
                block = block_tables[seq, token // block_size]
                logit = float32(0)
                for d in range(head_dim):
                    logit += q[d] * key_cache[block, kv_head, token % block_size, d]
            if exp_before_max:  # exp of the raw logit; the "max" is then taken of the weights
                weights[t] = math.exp(logit)
                new_max = float32(0)
            else:
                new_max = max(running_max, block_reduce(partials, logit, True))
                weights[t] = math.exp(logit - new_max)
            rescale = math.exp(running_max - new_max) if not exp_before_max else float32(1)
            running_sum = running_sum * (rescale if rescale_sum else 1) + block_reduce(partials, weights[t], False)
            for d in range(t, head_dim, THREADS):
                total = acc[d] * (rescale if rescale_acc else 1)
                for j in range(min(THREADS, context_len - start)):
                    tile_token = start + j
                    block = block_tables[seq, tile_token // block_size]
                    total += weights[j] * value_cache[block, kv_head, tile_token % block_size, d]
                acc[d] = total
            running_max = new_max
            cuda.syncthreads()
        for d in range(t, head_dim, THREADS):
            out[seq, head, d] = acc[d] / running_sum

    return online_decode


def test_online_model_with_both_rescales_is_the_reference():
    case = decode_case(np.random.default_rng(5), DecodeShape((70, 9), 4, 2, 8, 8))
    np.testing.assert_allclose(online_as_computed(case), case.reference(), rtol=1e-12)
    assert not np.allclose(online_as_computed(case, rescale_acc=False), case.reference(), rtol=1e-5)


def test_online_decode_accepts_the_solution(capsys):
    assert check_online_decode(make_online_decode()) is None
    line = capsys.readouterr().out
    assert line.startswith("PASSED online_decode: ") and "tiles of 32" in line and "mode" in line


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (make_online_decode(rescale_acc=False), "the accumulator was not rescaled when the max grew"),
        (make_online_decode(rescale_sum=False), "the running sum was not rescaled when the max grew"),
        (make_online_decode(rescale_acc=False, rescale_sum=False), "neither the running sum nor the accumulator"),
    ],
    ids=["accumulator-not-rescaled", "sum-not-rescaled", "neither-rescaled"],
)
def test_online_decode_rejects_known_mistakes(seed, wrong, hint):
    assert hint in rejected_with(check_online_decode, wrong)


@on_cpu_only
def test_online_decode_simulator_names_an_exp_before_the_max():
    message = rejected_with(check_online_decode, make_online_decode(exp_before_max=True))
    assert "OverflowError" in message and "take the max of the logits first" in message


@needs_gpu
def test_gpu_online_decode_names_an_exp_before_the_max():
    assert "subtract the largest logit first" in rejected_with(check_online_decode, make_online_decode(
        exp_before_max=True))


def test_online_decode_stub_is_not_written_yet():
    @cuda.jit
    def online_decode(out, query, key_cache, value_cache, block_tables, context_lens, scale):
        raise NotImplementedError

    assert unwritten(check_online_decode, online_decode).startswith("online_decode is not written")
