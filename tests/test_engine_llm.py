"""The LLM front door: continuous batching, chunked prefill and preemption never change what is generated."""

import numpy as np
import pytest

from course_lib.check.llama_reference import dense_forward
from course_lib.checkpoint.config import TINY
from course_lib.checkpoint.weights import random_weights, save_checkpoint
from course_lib.engine.llm import LLM, TokenEvent
from course_lib.engine.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6)


def prompts(count, seed=0, low=3, high=40):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(0, TINY.vocab_size, size=int(rng.integers(low, high)))) for _ in range(count)]


def tokens_of(outputs):
    return [out.output_token_ids for out in outputs]


def test_greedy_generation_follows_the_dense_reference():
    weights = random_weights(TINY, seed=3)
    prompt = prompts(1, seed=1)[0]
    generated = LLM(TINY, weights, block_size=8).generate([prompt], GREEDY)[0].output_token_ids
    tokens = list(prompt)
    for _ in range(GREEDY.max_tokens):
        tokens.append(int(np.argmax(dense_forward(TINY, weights, np.array(tokens))[-1])))
    assert list(generated) == tokens[len(prompt):]


def test_batched_results_equal_one_request_at_a_time():
    batch = prompts(6)
    together = tokens_of(LLM(TINY, seed=5).generate(batch, GREEDY))
    alone = [tokens_of(LLM(TINY, seed=5).generate([p], GREEDY))[0] for p in batch]
    assert together == alone


def test_preemption_and_chunked_prefill_do_not_change_the_outputs():
    batch, longer = prompts(5, seed=2), SamplingParams(temperature=0.0, max_tokens=12)
    roomy = tokens_of(LLM(TINY, seed=1, num_blocks=256, block_size=8).generate(batch, longer))
    squeezed = LLM(TINY, seed=1, num_blocks=10, block_size=8, max_num_batched_tokens=24).generate(batch, longer)
    assert tokens_of(squeezed) == roomy
    assert sum(out.num_preemptions for out in squeezed) > 0


def test_requests_sharing_a_prompt_prefix_in_one_step_compute_it_apart():
    """Their prefix blocks are registered in the prefix cache but not yet written when the step is planned."""
    shared = prompts(1, seed=9, low=20, high=21)[0]
    batch = [shared + p for p in prompts(4, seed=10)]
    together = tokens_of(LLM(TINY, seed=8, block_size=8).generate(batch, GREEDY))
    assert together == [tokens_of(LLM(TINY, seed=8, block_size=8).generate([p], GREEDY))[0] for p in batch]


def test_seeded_sampling_is_reproducible_in_any_batch():
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, max_tokens=5, seed=11)
    batch = prompts(3, seed=4)
    first = tokens_of(LLM(TINY, seed=2).generate(batch, params))
    assert tokens_of(LLM(TINY, seed=2).generate(batch[1:2], params))[0] == first[1]


def test_the_stream_hands_out_the_generated_tokens_in_order():
    batch = prompts(3, seed=6)
    expected = tokens_of(LLM(TINY, seed=4).generate(batch, GREEDY))
    streamed = [[] for _ in batch]
    events = list(LLM(TINY, seed=4).stream(batch, GREEDY))
    for event in events:
        assert isinstance(event, TokenEvent)
        streamed[event.request_id].append(event.token_id)
    assert [tuple(s) for s in streamed] == expected
    assert sum(event.finished for event in events) == len(batch)


def test_a_bad_request_is_rejected_alone():
    good = prompts(2, seed=7)
    outputs = LLM(TINY, seed=3, num_blocks=64, block_size=8).generate(
        [good[0], [], list(range(TINY.max_position_embeddings + 1)), good[1]], GREEDY)
    assert outputs[1].finish_reason.startswith("error") and outputs[2].finish_reason.startswith("error")
    assert outputs[1].output_token_ids == outputs[2].output_token_ids == ()
    assert tokens_of([outputs[0], outputs[3]]) == tokens_of(LLM(TINY, seed=3).generate(good, GREEDY))
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_params_are_one_for_all_or_one_per_prompt():
    with pytest.raises(ValueError, match="one per prompt"):
        LLM(TINY).generate(prompts(2), [GREEDY])


def test_a_checkpoint_directory_serves_the_same_tokens(tmp_path):
    weights = random_weights(TINY, seed=9)
    save_checkpoint(tmp_path, TINY, weights)
    batch = prompts(2, seed=8)
    assert tokens_of(LLM.from_checkpoint(tmp_path).generate(batch, GREEDY)) == \
        tokens_of(LLM(TINY, weights).generate(batch, GREEDY))


# ---- multi-step decoding: several decode steps per round trip to the host -----------------------------------


def record_runs(engine: LLM) -> list:
    """The runs the engine's scheduler plans from now on (None where it falls back to a single step)."""
    runs, schedule_run = [], engine.scheduler.schedule_decode_run

    def recording(max_steps, after=None):
        runs.append(schedule_run(max_steps, after=after))
        return runs[-1]

    engine.scheduler.schedule_decode_run = recording
    return runs


def test_multi_step_decoding_generates_the_same_tokens():
    batch = prompts(5, seed=7)
    params = [SamplingParams(temperature=0.0, max_tokens=n) for n in (3, 9, 16, 1, 12)]  # runs end mid-way
    single = LLM(TINY, seed=6, block_size=8)
    multi = LLM(TINY, seed=6, block_size=8, decode_steps=4)
    runs = record_runs(multi)
    assert tokens_of(multi.generate(batch, params)) == tokens_of(single.generate(batch, params))
    assert any(run is not None and run.num_steps == 4 for run in runs)  # the runs did happen
    assert any(run is not None and run.first_token_ids is None for run in runs)  # one followed a run in flight
    assert multi.block_pool.num_free_blocks == multi.block_pool.num_blocks  # reserved blocks came back


def test_a_stop_token_inside_a_run_ends_the_sequence_there():
    batch = prompts(3, seed=8)
    plain = tokens_of(LLM(TINY, seed=7).generate(batch, SamplingParams(temperature=0.0, max_tokens=12)))
    stop = plain[1][5]  # the sixth token of the second request: inside a run of 4 after the first token
    params = SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=(stop,))
    expected = tokens_of(LLM(TINY, seed=7).generate(batch, params))
    assert expected[1][-1] == stop and len(expected[1]) <= 6
    assert tokens_of(LLM(TINY, seed=7, decode_steps=4).generate(batch, params)) == expected
    events = list(LLM(TINY, seed=7, decode_steps=4).stream(batch, params))
    for request in range(len(batch)):  # a run hands out several tokens a request: only the last says finished
        assert [event.finished for event in events if event.request_id == request] == \
            [False] * (len(expected[request]) - 1) + [True]


def test_multi_step_runs_give_way_to_sampling_preemption_and_prefix_hits():
    shared = prompts(1, seed=9, low=20, high=21)[0]
    batch = [shared + p for p in prompts(4, seed=10)]
    sampled = SamplingParams(temperature=0.8, top_k=20, max_tokens=10, seed=3)
    greedy = SamplingParams(temperature=0.0, max_tokens=14)
    for params in (greedy, [sampled, greedy, greedy, greedy]):
        expected = tokens_of(LLM(TINY, seed=8, block_size=8).generate(batch, params))
        for options in ({"num_blocks": 256}, {"num_blocks": 14, "max_num_batched_tokens": 24}):
            engine = LLM(TINY, seed=8, block_size=8, decode_steps=3, **options)
            engine.generate([shared + [1]], greedy)  # puts the shared prefix in the prefix cache
            runs = record_runs(engine)
            outputs = engine.generate(batch, params)
            assert tokens_of(outputs) == expected
            assert engine.block_pool.stats().hit_tokens >= 4 * 16  # two shared blocks of 8 for each request
            assert any(runs)  # while a sampling request runs, steps are single: runs hold greedy sequences only
            assert all(seq.sampling_params.is_greedy for run in runs if run for seq in run.sequences)
            if params is greedy and options["num_blocks"] == 14:
                assert sum(out.num_preemptions for out in outputs) > 0


def test_decode_steps_must_be_positive():
    with pytest.raises(ValueError, match="decode_steps must be >= 1"):
        LLM(TINY, decode_steps=0)
