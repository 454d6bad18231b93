"""The tile-level prefill model against the float64 full softmax: ragged batches, chunks that cut blocks, prefixes of
zero and several blocks, grouped heads, head_dim 64 and 128; and the tile schedule a kernel would follow."""

from __future__ import annotations

import numpy as np
import pytest

from course_lib.check.tolerance import relative_error
from course_lib.kernels.paged_attention_reference import softmax_attention
from course_lib.kernels.paged_prefill_reference import (
    KeyTile,
    causal_mask,
    check_prefill_inputs,
    key_tiles_for,
    online_softmax_step,
    prefill_reference,
    query_tiles,
    random_prefill_batch,
    tiled_prefill,
)

BATCHES = {  # (new tokens, cached prefix) per sequence; block size 16
    "whole prompts, ragged": ([37, 5, 64, 1], [0, 0, 0, 0]),
    "chunks cutting blocks": ([24, 40, 13], [40, 9, 16 * 3]),  # prefixes end mid-block and on a boundary
    "prefix-cache hits of several blocks": ([3, 1, 70], [16 * 5, 16 * 2, 16 * 4]),
}


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", BATCHES)
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(8, 2), (4, 4)])
def test_tiled_prefill_matches_the_full_softmax(rng, case, head_dim, num_heads, num_kv_heads):
    new_lens, prefix_lens = BATCHES[case]
    batch = random_prefill_batch(rng, new_lens, prefix_lens, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                 head_dim=head_dim, block_size=16, dtype=np.float64)
    reference = prefill_reference(*batch.arrays())
    for query_tile, key_tile in ((16, 16), (32, 24), (7, 64)):  # tiles that do and do not match the blocks
        out = tiled_prefill(*batch.arrays(), query_tile=query_tile, key_tile=key_tile)
        assert relative_error(out, reference) < 1e-12, (query_tile, key_tile)


def test_float32_tiles_stay_within_the_fp32_tolerance(rng):
    batch = random_prefill_batch(rng, [100, 33], [20, 0], num_heads=4, num_kv_heads=1, head_dim=64, block_size=8)
    out = tiled_prefill(*batch.arrays())
    assert out.dtype == np.float32
    assert relative_error(out, prefill_reference(*batch.arrays())) < 1e-5


def test_the_reference_is_decode_for_a_single_new_token(rng):
    """One new token after a prefix is a decode row: the chapter-04 softmax over the whole context."""
    batch = random_prefill_batch(rng, [1], [45], num_heads=4, num_kv_heads=2, head_dim=16, block_size=16,
                                 dtype=np.float64)
    keys = batch.key_cache[batch.block_tables[0]].transpose(0, 2, 1, 3).reshape(-1, 2, 16)[:46]
    values = batch.value_cache[batch.block_tables[0]].transpose(0, 2, 1, 3).reshape(-1, 2, 16)[:46]
    expected = softmax_attention(batch.query, keys, values, 0.25)[2]
    np.testing.assert_allclose(prefill_reference(*batch.arrays()), expected, rtol=1e-12)


def test_the_first_query_of_a_prompt_sees_only_itself(rng):
    batch = random_prefill_batch(rng, [20], [0], num_heads=2, num_kv_heads=1, head_dim=8, block_size=4,
                                 dtype=np.float64)
    first_value = batch.value_cache[batch.block_tables[0, 0], 0, 0]
    np.testing.assert_allclose(tiled_prefill(*batch.arrays(), query_tile=8, key_tile=8)[0], [first_value] * 2)


def test_key_tiles_stop_at_the_last_query_and_mask_only_the_diagonal():
    tiles = key_tiles_for(query_start=70, query_stop=80, key_tile=32)
    assert tiles == [KeyTile(0, 32, False), KeyTile(32, 64, False), KeyTile(64, 80, True)]
    straddling = key_tiles_for(query_start=60, query_stop=92, key_tile=32)  # queries cross a key-tile edge
    assert [tile.masked for tile in straddling] == [False, True, True]
    assert key_tiles_for(0, 1, 16) == [KeyTile(0, 1, False)]  # one query, one key: nothing to mask


def test_query_tiles_start_at_the_chunk():
    assert list(query_tiles(first_position=40, context_len=100, query_tile=32)) == [(40, 72), (72, 100)]


def test_causal_mask_keeps_keys_up_to_each_query():
    mask = causal_mask(np.array([5, 6]), 4, 8)
    assert mask.tolist() == [[True, True, False, False], [True, True, True, False]]


def test_trace_counts_block_lookups_per_tile(rng):
    batch = random_prefill_batch(rng, [48], [16], num_heads=2, num_kv_heads=1, head_dim=8, block_size=16)
    trace = []
    tiled_prefill(*batch.arrays(), query_tile=32, key_tile=32, trace=trace)
    table = batch.block_tables[0].tolist()
    assert [(v.query_start, v.key_tile.start, v.key_tile.masked, v.blocks) for v in trace] == [
        (16, 0, True, tuple(table[0:2])), (16, 32, True, tuple(table[2:3])),  # queries 16..47 cross both tiles
        (48, 0, False, tuple(table[0:2])), (48, 32, True, tuple(table[2:4]))]


def test_online_step_survives_rows_with_only_masked_keys():
    state = (np.full(2, -np.inf), np.zeros(2), np.zeros((2, 3)))
    logits = np.array([[-np.inf, -np.inf], [1.0, 2.0]])
    running_max, running_sum, acc = online_softmax_step(*state, logits, np.ones((2, 3)))
    assert running_max[0] == -np.inf and running_sum[0] == 0 and np.all(acc[0] == 0)
    assert np.isfinite(acc).all() and running_sum[1] == pytest.approx(1 + np.exp(-1.0))


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda b: b.block_tables.__setitem__((0, 0), 999), "needs"),
        (lambda b: b.query_start_loc.__setitem__(1, 0), "query_start_loc"),
        (lambda b: b.context_lens.__setitem__(0, 1), "context_lens"),
    ],
    ids=["block-out-of-pool", "empty-sequence", "context-shorter-than-chunk"],
)
def test_bad_inputs_are_refused(rng, change, words):
    batch = random_prefill_batch(rng, [5, 7], [3, 0], num_heads=2, num_kv_heads=1, head_dim=8, block_size=4)
    change(batch)
    with pytest.raises(ValueError, match=words):
        check_prefill_inputs(*batch.arrays())
