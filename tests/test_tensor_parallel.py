"""Tensor parallelism over in-process ranks: the split is refused when it cannot be even, each rank holds the
slice it should, and 2 or 4 ranks generate exactly what one rank generates (the logits agree to fp32 rounding)."""

import dataclasses

import numpy as np
import pytest

from course_lib import backend
from course_lib.checkpoint.config import TINY
from course_lib.checkpoint.weights import random_weights
from course_lib.distributed import run_ranks
from course_lib.engine.llm import LLM
from course_lib.engine.sampling import SamplingParams
from course_lib.engine.tensor_parallel import broadcast_message, check_layout, shard_config, shard_weights

OPTIONS = {"num_blocks": 64, "block_size": 8, "max_num_batched_tokens": 24, "max_num_seqs": 4}


def test_a_layout_that_does_not_split_evenly_is_refused_with_what_would_fit():
    smollm2_shaped = dataclasses.replace(TINY, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536,
                                         vocab_size=49152)
    with pytest.raises(ValueError, match=r"the number of attention heads \(9\) is not a multiple of 2.*Sizes that "
                                         r"fit: \[3\]"):
        check_layout(smollm2_shaped, 2)
    check_layout(smollm2_shaped, 3)
    with pytest.raises(ValueError, match="the 2 KV heads can neither be split over 3 ranks nor replicated"):
        check_layout(dataclasses.replace(TINY, num_heads=6, head_dim=64, intermediate_size=510, vocab_size=510), 3)


@pytest.mark.parametrize("size", [2, 4])
def test_each_rank_holds_its_slice(size):
    weights = random_weights(TINY, seed=1)
    local = shard_config(TINY, size)
    assert (local.num_heads, local.intermediate_size, local.vocab_size) == (4 // size, 512 // size, 512 // size)
    assert local.num_kv_heads == max(2 // size, 1) and local.head_dim == TINY.head_dim
    slices = [shard_weights(TINY, weights, rank, size) for rank in range(size)]
    q = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(np.concatenate([s[q] for s in slices]), weights[q])  # heads, in rank order
    down = "model.layers.1.mlp.down_proj.weight"
    np.testing.assert_array_equal(np.concatenate([s[down] for s in slices], axis=1), weights[down])
    k = "model.layers.0.self_attn.k_proj.weight"
    if size == 4:  # 2 KV heads over 4 ranks: ranks 0 and 1 share KV head 0, ranks 2 and 3 KV head 1
        head = TINY.head_dim
        assert [np.array_equal(s[k], weights[k][head * (r // 2):head * (r // 2 + 1)]) for r, s in enumerate(slices)] \
            == [True] * 4
    norm = "model.norm.weight"
    assert all(s[norm] is weights[norm] for s in slices)


def test_a_message_reaches_every_rank():
    sent = {"step": 3, "tables": [[1, 2], [5]]}
    assert run_ranks(lambda comm: broadcast_message(comm, sent if comm.rank == 0 else None), 3) == [sent] * 3


def generate_on(size: int, prompts: list[list[int]], params: SamplingParams, weights: dict, **options) -> list:
    """Every rank builds the engine; rank 0 generates and closes it, the others serve until then."""

    def rank_main(comm):
        llm = LLM(TINY, weights, comm=comm, **OPTIONS, **options)
        if comm.rank:
            llm.run_worker()
            return None
        try:
            return [out.output_token_ids for out in llm.generate(prompts, params)]
        finally:
            llm.close()

    return run_ranks(rank_main, size, timeout=60, xp=backend.xp)[0]


@pytest.mark.parametrize("size", [2, 4])
def test_tensor_parallel_ranks_generate_what_one_rank_generates(rng, size):
    weights = random_weights(TINY, seed=int(rng.integers(1 << 30)))
    prompts = [rng.integers(0, TINY.vocab_size, int(n)).tolist() for n in rng.integers(3, 30, 5)]
    params = SamplingParams(max_tokens=10, temperature=0.0)
    one = [out.output_token_ids for out in LLM(TINY, weights, **OPTIONS).generate(prompts, params)]
    assert generate_on(size, prompts, params, weights) == one  # chunked prefill: 24-token steps
    assert generate_on(size, prompts, params, weights, decode_steps=4) == one  # runs fed by each rank's arg-max


def test_tensor_parallel_logits_match_one_rank(rng):
    weights = random_weights(TINY, seed=3)
    prompt = rng.integers(0, TINY.vocab_size, 17).tolist()
    params = SamplingParams(max_tokens=3, temperature=0.0, logprobs=5, prompt_logprobs=5)

    def logprobs_on(size: int) -> tuple:
        def rank_main(comm):
            llm = LLM(TINY, weights, comm=comm, **OPTIONS)
            if comm.rank:
                return llm.run_worker()
            (out,) = llm.generate([prompt], params)
            llm.close()
            return out.logprobs, out.prompt_logprobs

        return run_ranks(rank_main, size, timeout=60, xp=backend.xp)[0]

    one, two = logprobs_on(1), logprobs_on(2)
    for expected, got in zip([*one[0], *one[1][1:]], [*two[0], *two[1][1:]], strict=True):
        assert expected.keys() == got.keys()
        np.testing.assert_allclose(list(got.values()), list(expected.values()), rtol=1e-5, atol=1e-5)


def test_cuda_graphs_with_tensor_parallelism_are_refused():
    def rank_main(comm):
        with pytest.raises(ValueError, match="CUDA graphs with tensor parallelism are not built yet"):
            LLM(TINY, random_weights(TINY, seed=0), comm=comm, cuda_graphs=True)

    run_ranks(rank_main, 2, xp=backend.xp)


def test_run_worker_is_for_the_other_ranks():
    with pytest.raises(RuntimeError, match="run_worker is for ranks 1 and up"):
        LLM(TINY, random_weights(TINY, seed=0)).run_worker()
