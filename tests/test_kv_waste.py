"""The KV-cache waste model: the two formulas on hand-made lengths, the bound paging promises, the mix."""

import numpy as np
import pytest

from course_lib.labs import kv_waste


def test_contiguous_waste_counts_every_slot_past_the_context():
    # two slabs of 4096 slots hold 1000 and 3000 tokens: 3096 + 1096 of 8192 slots are empty
    assert kv_waste.contiguous_waste(np.array([1000, 3000]), 4096) == pytest.approx((3096 + 1096) / 8192)
    assert kv_waste.contiguous_waste(np.array([4096, 4096]), 4096) == 0.0


def test_paged_waste_counts_only_the_tail_of_each_last_block():
    # 16 tokens fill one block; 17 take two blocks (15 empty slots); 1 token takes a block (15 empty)
    lengths = np.array([16, 17, 1])
    assert list(kv_waste.paged_slots(lengths, 16)) == [16, 32, 16]
    assert kv_waste.paged_waste(lengths, 16) == pytest.approx(30 / 64)
    assert kv_waste.paged_waste(lengths, 1) == 0.0


@pytest.mark.parametrize("block_size", [1, 8, 16, 32, 128])
def test_paging_wastes_less_than_one_block_a_request(block_size):
    lengths = kv_waste.request_mix(2000, seed=7).context_lens
    unused = kv_waste.paged_slots(lengths, block_size) - lengths
    assert unused.min() >= 0
    assert unused.max() < block_size
    assert unused.sum() < lengths.size * block_size


def test_the_mix_is_fixed_by_its_seed():
    first, again, other = (kv_waste.request_mix(500, seed) for seed in (3, 3, 4))
    assert np.array_equal(first.prompt_lens, again.prompt_lens)
    assert np.array_equal(first.output_lens, again.output_lens)
    assert not np.array_equal(first.context_lens, other.context_lens)


def test_the_mix_fits_the_context_and_keeps_its_means():
    mix = kv_waste.request_mix(20_000, seed=11, max_context=4096)
    assert mix.prompt_lens.min() >= 1 and mix.output_lens.min() >= 1
    assert mix.context_lens.max() <= 4096
    # the cap trims the long tail a little, so the means land just under the requested ones
    assert mix.prompt_lens.mean() == pytest.approx(kv_waste.MEAN_PROMPT, rel=0.05)
    assert mix.output_lens.mean() == pytest.approx(kv_waste.MEAN_OUTPUT, rel=0.05)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: kv_waste.contiguous_waste(np.array([5000]), 4096), "does not fit"),
    (lambda: kv_waste.paged_waste(np.array([0, 3]), 16), "at least one token"),
    (lambda: kv_waste.paged_waste(np.array([3.5]), 16), "integers"),
    (lambda: kv_waste.paged_slots(np.array([3]), 0), "block_size"),
    (lambda: kv_waste.request_mix(0, seed=1), "at least one request"),
])
def test_wrong_inputs_say_what_was_expected(call, message):
    with pytest.raises(ValueError, match=message):
        call()
