"""A step's batch (``StepBatch``) and the block arithmetic it shares with the pool and the kernels."""

import numpy as np
import pytest

from course_lib.engine.batch import StepBatch
from course_lib.kernels.kv_blocks import blocks_for, slots_of

BLOCK_SIZE = 8


def test_blocks_for_rounds_up():
    assert [blocks_for(n, BLOCK_SIZE) for n in (1, 8, 9, 16, 17)] == [1, 1, 2, 2, 3]
    assert blocks_for(np.array([0, 7, 8, 9]), BLOCK_SIZE).tolist() == [0, 1, 1, 2]


def test_slots_follow_the_block_table():
    assert slots_of([6], [0, 1], BLOCK_SIZE).tolist() == [48, 49]
    assert slots_of([4, 2], [7, 8, 9], BLOCK_SIZE).tolist() == [4 * 8 + 7, 2 * 8, 2 * 8 + 1]
    assert slots_of([[4, 2], [7, 5]], [9, 3], BLOCK_SIZE).tolist() == [2 * 8 + 1, 7 * 8 + 3]  # one row each


def test_a_batch_lays_out_tokens_and_sequences():
    batch = StepBatch.build([(3, 10, [4, 2]), (1, 9, [7, 5, 3])], BLOCK_SIZE, token_ids=[11, 12, 13, 14])
    assert (batch.num_sequences, batch.num_tokens, batch.is_decode) == (2, 4, False)
    assert batch.positions.tolist() == [7, 8, 9, 8]
    assert batch.slots.tolist() == [4 * 8 + 7, 2 * 8, 2 * 8 + 1, 5 * 8]
    assert batch.last_rows.tolist() == [2, 3]
    assert batch.block_tables.tolist() == [[4, 2, -1], [7, 5, 3]]
    batch.check(num_blocks=8, vocab_size=15)
    assert StepBatch.build([(1, 5, [0]), (1, 2, [1])], BLOCK_SIZE).is_decode


@pytest.mark.parametrize(("sequences", "message"), [
    ([(0, 4, [1])], "sequence 0: need 1 <= num_new_tokens <= context_len"),
    ([(1, 4, [1]), (5, 4, [1])], "sequence 1: need 1 <= num_new_tokens <= context_len"),
    ([(2, 9, [1])], "sequence 0: context_len=9 needs 2 blocks of 8, its block table has 1"),
    ([(1, 3, [2]), (1, 9, [1, 8])], r"sequence 1: block ids must lie in \[0, 8\), got \[1, 8\]"),
    ([(1, 9, [-1, 3])], "needs 2 blocks of 8, its block table has 1"),
    ([(2, 2, [5]), (1, 2, [5])], r"two new tokens of the step share a KV-cache slot .*slots \[40, 41, 41\]"),
])
def test_check_names_the_sequence_at_fault(sequences, message):
    with pytest.raises(ValueError, match=message):
        StepBatch.build(sequences, BLOCK_SIZE).check(num_blocks=8, vocab_size=100)


def test_check_reads_only_the_blocks_a_context_needs():
    """Entries past the context (a decode run grows tables ahead) are never read, so never checked."""
    StepBatch.build([(1, 8, [3, 99])], BLOCK_SIZE).check(num_blocks=8, vocab_size=100)


def test_check_rejects_token_ids_outside_the_vocabulary():
    batch = StepBatch.build([(2, 2, [0])], BLOCK_SIZE, token_ids=[3, 100])
    with pytest.raises(ValueError, match=r"token_ids must be 2 integers in \[0, 100\), got 2 from 3 to 100"):
        batch.check(num_blocks=8, vocab_size=100)


def test_a_batch_needs_a_sequence_and_a_block_size():
    with pytest.raises(ValueError, match="at least one sequence"):
        StepBatch.build([], BLOCK_SIZE)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        StepBatch.build([(1, 1, [0])], 0)


@pytest.mark.parametrize(("new_tokens", "leading"), [([1, 1, 5, 1], 2), ([1, 1], 2), ([3, 1], 0), ([1], 1)])
def test_the_leading_one_token_sequences_are_the_decode_kernels_rows(new_tokens, leading):
    batch = StepBatch.build([(n, n + 4, [0, 1, 2]) for n in new_tokens], block_size=4)
    assert batch.num_leading_decodes == leading
