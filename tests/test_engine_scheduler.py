"""The scheduler, driven by a fake model whose KV cache holds the tokens themselves.

The fake model writes each new token into its KV slot, then reads every sequence's whole context back
through its block table and checks it against the sequence's real tokens: a wrong slot mapping, block
table, prefix-cache hit or recompute after preemption fails there, at the step it happens. Its next
token is ``(last * 7 + 3) % VOCAB``, so the expected outputs of any request are known in advance.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from course_lib.engine.block_pool import BlockPool
from course_lib.engine.sampling import SamplingParams, sample
from course_lib.engine.scheduler import DecodeRun, Scheduler, SchedulerOutput
from course_lib.engine.sequence import Sequence, SequenceStatus

VOCAB = 101


def next_token(token: int) -> int:
    return (token * 7 + 3) % VOCAB


def expected_outputs(prompt: list[int], num_tokens: int) -> list[int]:
    outputs = [next_token(prompt[-1])]
    while len(outputs) < num_tokens:
        outputs.append(next_token(outputs[-1]))
    return outputs


class FakeModel:
    """A KV cache of token ids, one slot per token, and a next token computed from the context read back."""

    def __init__(self, pool: BlockPool) -> None:
        self.block_size = pool.block_size
        self.kv_cache = np.full(pool.num_blocks * pool.block_size, -1)

    def run(self, output: SchedulerOutput) -> list[int]:
        for copy in output.block_copies:
            self.kv_cache[self._block_slots(copy.dst)] = self.kv_cache[self._block_slots(copy.src)]
        batch = output.batch
        one_token = batch.query_lens == 1
        assert batch.num_leading_decodes == int(one_token.sum()), f"one-token sequences come first: {batch.query_lens}"
        self.kv_cache[batch.slots] = batch.token_ids
        sampled = []
        for step, table in zip(output.scheduled, batch.block_tables, strict=True):
            context = self._read_context(table, step.context_len)
            assert context == step.sequence.all_token_ids[: step.context_len], f"sequence {step.seq_id} reads bad KV"
            if step.samples:
                sampled.append(next_token(context[-1]))
        return sampled

    def run_decode(self, run: DecodeRun, before: np.ndarray | None = None) -> np.ndarray:
        """A run of decode steps as the engine runs it: each step fed what the step before sampled. ``before``: what
        the run it follows sampled, not yet recorded on the host (its last row feeds this run's first step)."""
        for copy in run.block_copies:
            self.kv_cache[self._block_slots(copy.dst)] = self.kv_cache[self._block_slots(copy.src)]
        contexts = [list(seq.all_token_ids) for seq in run.sequences]  # what each sequence holds at the start
        if before is not None:
            contexts = [context + before[:, row].tolist() for row, context in enumerate(contexts)]
        fed, sampled = list(run.first_token_ids) if before is None else before[-1].tolist(), []
        for step in range(run.num_steps):
            for row, table in enumerate(run.block_tables):
                position = run.first_positions[row] + step
                self.kv_cache[table[position // self.block_size] * self.block_size + position % self.block_size] = \
                    fed[row]
                assert self._read_context(table, position + 1) == contexts[row], f"row {row} reads bad KV"
            fed = [next_token(context[-1]) for context in contexts]
            for context, token in zip(contexts, fed, strict=True):
                context.append(token)
            sampled.append(fed)
        return np.array(sampled)

    def _block_slots(self, block: int) -> slice:
        return slice(block * self.block_size, (block + 1) * self.block_size)

    def _read_context(self, block_table: tuple[int, ...], context_len: int) -> list[int]:
        slots = [block_table[p // self.block_size] * self.block_size + p % self.block_size for p in range(context_len)]
        return self.kv_cache[slots].tolist()


def check_step(scheduler: Scheduler, output: SchedulerOutput) -> None:
    """What must hold for every step: budgets, and slots that stay inside each sequence's own blocks."""
    assert output.num_batched_tokens <= scheduler.max_num_batched_tokens
    assert len(output.scheduled) <= scheduler.max_num_seqs
    assert len(scheduler.running) <= scheduler.max_num_seqs
    assert len({step.seq_id for step in output.scheduled}) == len(output.scheduled)
    block_size = scheduler.block_pool.block_size
    batch, start = output.batch, 0
    for step, table in zip(output.scheduled, batch.block_tables, strict=True):
        assert step.num_new_tokens >= 1
        assert step.sequence.status is SequenceStatus.RUNNING
        assert step.first_position == step.sequence.num_computed_tokens
        assert step.samples == (step.context_len == step.sequence.num_tokens)
        assert step.context_len <= scheduler.max_model_len
        assert table.tolist()[:len(step.sequence.block_table)] == step.sequence.block_table
        new = slice(start, start + step.num_new_tokens)
        positions, slots = batch.positions[new], batch.slots[new]
        assert positions.tolist() == list(range(step.first_position, step.context_len))
        for position, slot in zip(positions, slots, strict=True):
            assert slot // block_size == table[position // block_size]
            assert slot % block_size == position % block_size
        start += step.num_new_tokens


def run_to_completion(scheduler: Scheduler, model: FakeModel | None = None) -> list[SchedulerOutput]:
    """Drive the scheduler with the fake model until every request is finished; returns every step."""
    model = model or FakeModel(scheduler.block_pool)
    steps = []
    while scheduler.has_unfinished():
        output = scheduler.schedule()
        assert output.scheduled, "a step with work waiting scheduled nothing"
        check_step(scheduler, output)
        scheduler.update(output, model.run(output))
        steps.append(output)
    assert scheduler.block_pool.stats().used_blocks == 0
    return steps


def run_with_decode_runs(scheduler: Scheduler, max_steps: int, model: FakeModel | None = None) -> list:
    """run_to_completion, taking a run of up to ``max_steps`` decode steps whenever the scheduler offers one."""
    model = model or FakeModel(scheduler.block_pool)
    steps = []
    while scheduler.has_unfinished():
        run = scheduler.schedule_decode_run(max_steps)
        if run is not None:
            scheduler.finish_decode_run(run, model.run_decode(run))
        else:
            output = scheduler.schedule()
            check_step(scheduler, output)
            scheduler.update(output, model.run(output))
        steps.append(run or output)
    assert scheduler.block_pool.stats().used_blocks == 0
    return steps


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_batched_tokens: int = 64,
    max_num_seqs: int = 8,
    max_model_len: int = 256,
    **kwargs,
) -> Scheduler:
    pool = BlockPool(num_blocks, block_size, watermark=0.0)
    return Scheduler(pool, max_num_batched_tokens, max_num_seqs, max_model_len, **kwargs)


def generate(prompts: list[list[int]], max_tokens: list[int], **scheduler_kwargs) -> tuple[list[Sequence], Scheduler]:
    scheduler = make_scheduler(**scheduler_kwargs)
    sequences = [
        scheduler.add_request(prompt, SamplingParams(max_tokens=n))
        for prompt, n in zip(prompts, max_tokens, strict=True)
    ]
    run_to_completion(scheduler)
    return sequences, scheduler


def some_prompts(count: int, seed: int = 0, longest: int = 30) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, size=rng.integers(1, longest)).tolist() for _ in range(count)]


def assert_expected_outputs(sequences: list[Sequence]) -> None:
    for sequence in sequences:
        assert sequence.finish_reason == "length"
        assert sequence.output_token_ids == expected_outputs(
            list(sequence.prompt_token_ids), sequence.sampling_params.max_tokens
        )


# --- every request gets exactly its tokens ----------------------------------------------------------


@given(st.integers(1, 6), st.integers(0, 5), st.data())
def test_token_ids_between_slices_prompt_and_outputs_as_one(prompt_length, outputs, data):
    sequence = Sequence(0, tuple(range(100, 100 + prompt_length)))
    sequence.output_token_ids.extend(range(200, 200 + outputs))
    stop = data.draw(st.integers(0, sequence.num_tokens))
    start = data.draw(st.integers(0, stop))
    assert sequence.token_ids_between(start, stop) == tuple(sequence.all_token_ids[start:stop])


def test_every_request_generates_exactly_max_tokens():
    prompts = some_prompts(12)
    sequences, _ = generate(prompts, max_tokens=[1 + i % 7 for i in range(12)])
    assert [len(s.output_token_ids) for s in sequences] == [1 + i % 7 for i in range(12)]
    assert all(s.status is SequenceStatus.FINISHED for s in sequences)
    assert_expected_outputs(sequences)


def test_batched_results_equal_one_at_a_time_results():
    prompts, max_tokens = some_prompts(10, seed=1), [5, 9, 2, 7, 1, 12, 3, 8, 6, 4]
    batched, _ = generate(prompts, max_tokens)
    one_at_a_time = [generate([p], [n])[0][0].output_token_ids for p, n in zip(prompts, max_tokens, strict=True)]
    assert [s.output_token_ids for s in batched] == one_at_a_time


def test_decode_steps_batch_all_running_sequences():
    scheduler = make_scheduler(max_num_batched_tokens=100)  # room for every prompt in the first step
    for prompt in some_prompts(3, seed=2):
        scheduler.add_request(prompt, SamplingParams(max_tokens=5))
    steps = run_to_completion(scheduler)
    assert [len(step.scheduled) for step in steps] == [3, 3, 3, 3, 3]  # one prefill step, then four decodes
    assert all(step.num_new_tokens == 1 for output in steps[1:] for step in output.scheduled)


def test_a_seeded_request_samples_the_same_tokens_alone_or_batched():
    """Through ``sample`` with each sequence's own generator, across chunking and preemption."""

    def sample_step(output: SchedulerOutput) -> np.ndarray:
        last = [step.sequence.all_token_ids[step.context_len - 1] for step in output.scheduled if step.samples]
        rows = [np.sin(np.arange(VOCAB) * (token + 1)) * 3 for token in last]
        sequences = output.sampling_sequences
        return sample(
            np.array(rows).reshape(-1, VOCAB), [s.sampling_params for s in sequences], [s.generator for s in sequences]
        )

    def outputs(prompts: list[list[int]], **scheduler_kwargs) -> list[list[int]]:
        scheduler = make_scheduler(**scheduler_kwargs)
        sequences = [
            scheduler.add_request(p, SamplingParams(max_tokens=12, seed=100 + p[0], top_p=0.9)) for p in prompts
        ]
        while scheduler.has_unfinished():
            output = scheduler.schedule()
            scheduler.update(output, sample_step(output))
        return [s.output_token_ids for s in sequences]

    prompts = some_prompts(6, seed=9, longest=10)
    alone = [outputs([p])[0] for p in prompts]
    assert outputs(prompts) == alone
    assert outputs(prompts, num_blocks=12, block_size=2, max_num_batched_tokens=3) == alone


# --- chunked prefill ---------------------------------------------------------------------------------


def test_chunked_prefill_gives_the_same_outputs():
    prompts, max_tokens = some_prompts(6, seed=3, longest=40), [6, 3, 8, 1, 5, 7]
    sequences, scheduler = generate(prompts, max_tokens, max_num_batched_tokens=5)
    assert_expected_outputs(sequences)
    unchunked, _ = generate(prompts, max_tokens)
    assert [s.output_token_ids for s in sequences] == [s.output_token_ids for s in unchunked]


def test_a_chunk_short_of_the_prompt_end_samples_nothing():
    scheduler = make_scheduler(max_num_batched_tokens=4)
    sequence = scheduler.add_request(list(range(10)), SamplingParams(max_tokens=2))
    steps = run_to_completion(scheduler)
    chunks = [
        (step.scheduled[0].first_position, step.scheduled[0].num_new_tokens, step.scheduled[0].samples)
        for step in steps
    ]
    assert chunks == [(0, 4, False), (4, 4, False), (8, 2, True), (10, 1, True)]
    assert sequence.output_token_ids == expected_outputs(list(range(10)), 2)


def test_a_step_lists_its_decodes_before_its_prompt_chunks():
    """A sequence decoding and a new request's first chunk: the decode row leads, for the model's decode kernel
    (``FakeModel.run`` checks the same order on every step of every other test)."""
    scheduler = make_scheduler(max_num_batched_tokens=8)
    first = scheduler.add_request(list(range(6)), SamplingParams(max_tokens=4))
    prompt_step = scheduler.schedule()
    scheduler.update(prompt_step, FakeModel(scheduler.block_pool).run(prompt_step))  # first's whole prompt
    second = scheduler.add_request(list(range(30, 50)), SamplingParams(max_tokens=2))
    output = scheduler.schedule()
    assert [step.sequence for step in output.scheduled] == [first, second]  # admission order: decode, then chunk
    assert output.batch.query_lens.tolist() == [1, 7] and output.batch.num_leading_decodes == 1


# --- preemption ------------------------------------------------------------------------------------


def test_a_small_pool_forces_preemptions_and_outputs_are_unchanged():
    prompts, max_tokens = some_prompts(8, seed=4, longest=12), [12, 9, 14, 10, 6, 13, 11, 8]
    sequences, _ = generate(prompts, max_tokens, num_blocks=14, block_size=2)
    assert sum(s.num_preemptions for s in sequences) > 0
    assert_expected_outputs(sequences)


def test_the_most_recently_admitted_sequence_is_preempted_and_waits_at_the_front():
    scheduler = make_scheduler(num_blocks=4, block_size=2, max_num_batched_tokens=8)
    first = scheduler.add_request([1, 2], SamplingParams(max_tokens=5))
    second = scheduler.add_request([3, 4], SamplingParams(max_tokens=5))
    model = FakeModel(scheduler.block_pool)
    for step in range(3):  # prefill both (2 blocks), then each takes a second block: none is left free
        output = scheduler.schedule()
        scheduler.update(output, model.run(output))
        if step == 0:
            third = scheduler.add_request([5], SamplingParams(max_tokens=2))
    output = scheduler.schedule()  # both need a third block: the second one goes
    assert output.preempted == (second,)
    assert [step.sequence for step in output.scheduled] == [first]
    assert scheduler.waiting == (second, third)
    assert (second.status, second.num_computed_tokens, len(second.output_token_ids)) == (SequenceStatus.PREEMPTED, 0, 3)
    scheduler.update(output, model.run(output))
    run_to_completion(scheduler, model)
    assert_expected_outputs([first, second, third])


def test_a_sequence_preempted_mid_prefill_recomputes_the_blocks_it_never_wrote():
    """The pool registers a prompt's full blocks when it allocates them; only those written count as hits."""
    scheduler = make_scheduler(num_blocks=8, block_size=2, max_num_batched_tokens=3)
    decoding = scheduler.add_request([1, 2], SamplingParams(max_tokens=7))
    long_prompt = list(range(10, 22))
    prefilling = scheduler.add_request(long_prompt, SamplingParams(max_tokens=2))
    model = FakeModel(scheduler.block_pool)
    while not prefilling.num_preemptions:
        computed_before = prefilling.num_computed_tokens
        output = scheduler.schedule()
        scheduler.update(output, model.run(output))
    assert computed_before == 5  # blocks 0 and 1 written (and cached), block 2 half, blocks 3 to 5 empty
    run_to_completion(scheduler, model)
    assert prefilling.num_cached_tokens == 4
    assert scheduler.block_pool.stats().hit_tokens == 4  # the pool shared only the blocks whose KV was written
    assert_expected_outputs([decoding, prefilling])


# --- prefix caching ---------------------------------------------------------------------------------


def test_a_shared_system_prompt_hits_the_prefix_cache():
    system_prompt = list(range(40, 60))  # five blocks of four
    scheduler = make_scheduler()
    model = FakeModel(scheduler.block_pool)
    first = scheduler.add_request([*system_prompt, 1, 2, 3], SamplingParams(max_tokens=4))
    run_to_completion(scheduler, model)
    others = [
        scheduler.add_request([*system_prompt, *question], SamplingParams(max_tokens=4)) for question in ([7], [8, 9])
    ]
    steps = run_to_completion(scheduler, model)
    assert [s.num_cached_tokens for s in others] == [20, 20]
    assert steps[0].scheduled[0].first_position == 20
    assert scheduler.block_pool.stats().hit_rate > 0
    assert_expected_outputs([first, *others])


def test_a_prefix_hit_on_blocks_not_yet_written_is_recomputed():
    scheduler = make_scheduler()
    twins = [scheduler.add_request(list(range(13)), SamplingParams(max_tokens=3)) for _ in range(2)]
    steps = run_to_completion(scheduler)
    assert steps[0].scheduled[1].first_position == 0  # the twin's blocks were being written, not yet cached
    first, second = steps[0].batch.block_tables.tolist()
    assert not set(first) & set(second)  # so it computes them in blocks of its own: no slot written twice
    assert_expected_outputs(twins)


# --- stopping ---------------------------------------------------------------------------------------


def test_eos_and_stop_tokens_finish_a_sequence_and_stay_in_its_outputs():
    outputs = expected_outputs([5], 10)
    scheduler = make_scheduler(eos_token_ids=[outputs[3]])
    by_eos = scheduler.add_request([5], SamplingParams(max_tokens=10))
    by_stop = scheduler.add_request([5], SamplingParams(max_tokens=10, ignore_eos=True, stop_token_ids=(outputs[6],)))
    ignoring = scheduler.add_request([5], SamplingParams(max_tokens=10, ignore_eos=True))
    run_to_completion(scheduler)
    assert (by_eos.finish_reason, by_eos.output_token_ids) == ("stop", outputs[:4])
    assert (by_stop.finish_reason, by_stop.output_token_ids) == ("stop", outputs[:7])
    assert (ignoring.finish_reason, ignoring.output_token_ids) == ("length", outputs)


def test_a_sequence_stops_when_it_fills_max_model_len():
    scheduler = make_scheduler(max_model_len=12)
    sequence = scheduler.add_request(list(range(8)), SamplingParams(max_tokens=100))
    run_to_completion(scheduler)
    assert (sequence.num_tokens, sequence.finish_reason) == (12, "length")
    assert sequence.output_token_ids == expected_outputs(list(range(8)), 4)


# --- requests that can never run --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "reason"),
    [
        ([], 4, "the prompt is empty"),
        ([1, -2, 3], 4, "token ids are >= 0"),
        (list(range(64)), 4, "max_model_len=64 leaves no room"),
        (list(range(20)), 30, "need up to 13 KV-cache blocks of 4 tokens, and the pool admits at most 12"),
    ],
)
def test_a_request_that_can_never_run_is_rejected_alone(prompt, max_tokens, reason):
    scheduler = make_scheduler(num_blocks=12, max_model_len=64)
    good_before = scheduler.add_request([1, 2, 3], SamplingParams(max_tokens=5))
    bad = scheduler.add_request(prompt, SamplingParams(max_tokens=max_tokens))
    good_after = scheduler.add_request(list(range(20)), SamplingParams(max_tokens=29))  # 48 slots need all 12 blocks
    assert bad.is_finished and bad.finish_reason.startswith("error: ")
    assert reason in bad.finish_reason
    assert scheduler.waiting == (good_before, good_after)
    run_to_completion(scheduler)
    assert_expected_outputs([good_before, good_after])


def test_the_watermark_counts_against_what_a_request_may_ever_need():
    scheduler = Scheduler(BlockPool(10, 4, watermark=0.2), 64, 8, 256)
    assert scheduler.add_request(list(range(30)), SamplingParams(max_tokens=3)).finish_reason is None
    assert "admits at most 8" in scheduler.add_request(list(range(30)), SamplingParams(max_tokens=4)).finish_reason


# --- using the scheduler wrongly ---------------------------------------------------------------------


def test_update_wants_one_token_per_sampling_sequence():
    scheduler = make_scheduler()
    scheduler.add_request([1, 2, 3])
    output = scheduler.schedule()
    with pytest.raises(ValueError, match="1 sequences sample this step, got 2"):
        scheduler.update(output, [4, 5])


def test_each_step_is_scheduled_once_and_updated_once():
    scheduler = make_scheduler()
    scheduler.add_request([1, 2, 3])
    output = scheduler.schedule()
    with pytest.raises(RuntimeError, match="still in flight"):
        scheduler.schedule()
    scheduler.update(output, [4])
    with pytest.raises(ValueError, match="output of the last schedule"):
        scheduler.update(output, [4])


@pytest.mark.parametrize("name", ["max_num_batched_tokens", "max_num_seqs", "max_model_len"])
def test_limits_must_be_positive(name):
    limits = {"max_num_batched_tokens": 8, "max_num_seqs": 8, "max_model_len": 8} | {name: 0}
    with pytest.raises(ValueError, match=f"{name} must be >= 1"):
        Scheduler(BlockPool(8, 4), **limits)


# --- any workload -----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    num_requests=st.integers(1, 10),
    block_size=st.sampled_from([1, 2, 4]),
    num_blocks=st.integers(12, 40),
    max_num_batched_tokens=st.integers(1, 24),
    max_num_seqs=st.integers(1, 6),
    shared_prefix=st.integers(0, 10),
)
def test_any_workload_gives_the_expected_outputs_within_the_limits(
    seed, num_requests, block_size, num_blocks, max_num_batched_tokens, max_num_seqs, shared_prefix
):
    rng = np.random.default_rng(seed)
    scheduler = make_scheduler(num_blocks, block_size, max_num_batched_tokens, max_num_seqs, max_model_len=40)
    prefix = rng.integers(0, VOCAB, size=shared_prefix).tolist()
    sequences = [
        scheduler.add_request(
            [*prefix, *rng.integers(0, VOCAB, size=rng.integers(1, 12)).tolist()],
            SamplingParams(max_tokens=int(rng.integers(1, 16))),
        )
        for _ in range(num_requests)
    ]
    run_to_completion(scheduler)
    for sequence in sequences:
        if sequence.finish_reason.startswith("error"):
            continue
        budget = min(sequence.sampling_params.max_tokens, 40 - len(sequence.prompt_token_ids))
        assert sequence.output_token_ids == expected_outputs(list(sequence.prompt_token_ids), budget)


# --- multi-step decoding: runs of decode steps planned at once ----------------------------------------------


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_decode_runs_give_the_outputs_of_single_steps(block_size):
    scheduler = make_scheduler(block_size=block_size, num_blocks=256 // block_size + 8)
    sequences = [scheduler.add_request(prompt, SamplingParams(max_tokens=n))
                 for prompt, n in zip(some_prompts(6, seed=3), [1, 2, 5, 9, 13, 20], strict=True)]
    steps = run_with_decode_runs(scheduler, max_steps=4)
    assert any(isinstance(step, DecodeRun) and step.num_steps == 4 for step in steps)
    assert_expected_outputs(sequences)


def test_a_stop_token_or_max_model_len_inside_a_run_finishes_the_sequence_there():
    outputs = expected_outputs([5], 12)
    scheduler = make_scheduler(eos_token_ids=[outputs[5]], max_model_len=9)
    stopped = scheduler.add_request([5], SamplingParams(max_tokens=12))
    capped = scheduler.add_request([5, 6, 5], SamplingParams(max_tokens=12, ignore_eos=True))
    run_with_decode_runs(scheduler, max_steps=4)
    assert (stopped.finish_reason, stopped.output_token_ids) == ("stop", outputs[:6])
    assert (capped.finish_reason, capped.num_tokens) == ("length", 9)


def test_blocks_filled_in_a_run_serve_later_prefix_hits():
    scheduler = make_scheduler(block_size=2)
    model = FakeModel(scheduler.block_pool)
    first = scheduler.add_request([1, 2, 3], SamplingParams(max_tokens=9))
    run_with_decode_runs(scheduler, 4, model)
    again = scheduler.add_request([1, 2, 3, *first.output_token_ids[:6]], SamplingParams(max_tokens=3))
    run_with_decode_runs(scheduler, 4, model)  # the fake model checks every context it reads back
    assert again.num_cached_tokens == 8  # tokens 3 to 7 were written through slots reserved by the runs
    assert again.output_token_ids == first.output_token_ids[6:]


def test_a_run_planned_while_another_is_in_flight_continues_it():
    """Asynchronous scheduling: run 2 is planned and computed before run 1 is recorded; the outputs are those of
    single steps, runs are recorded oldest first, and nothing else is scheduled while a run is in flight."""
    prompts, max_tokens = some_prompts(3, seed=11), [9, 9, 9]
    expected, _ = generate(prompts, max_tokens)
    scheduler = make_scheduler()
    sequences = [scheduler.add_request(p, SamplingParams(max_tokens=n)) for p, n in zip(prompts, max_tokens,
                                                                                       strict=True)]
    model = FakeModel(scheduler.block_pool)
    first = scheduler.schedule()
    scheduler.update(first, model.run(first))  # the prompts, and each request's first token
    run = scheduler.schedule_decode_run(3)
    following = scheduler.schedule_decode_run(3, after=run)
    assert following.first_token_ids is None
    assert following.first_positions == tuple(p + 3 for p in run.first_positions)
    with pytest.raises(RuntimeError, match="still in flight"):
        scheduler.schedule()
    with pytest.raises(ValueError, match="only the one run in flight"):
        scheduler.schedule_decode_run(3, after=following)
    sampled = model.run_decode(run)
    sampled_after = model.run_decode(following, before=sampled)
    with pytest.raises(ValueError, match="oldest run"):
        scheduler.finish_decode_run(following, sampled_after)
    scheduler.finish_decode_run(run, sampled)
    scheduler.finish_decode_run(following, sampled_after)
    run_to_completion(scheduler, model)
    assert [s.output_token_ids for s in sequences] == [s.output_token_ids for s in expected]


def test_a_sequence_stopped_in_the_run_in_flight_drops_what_the_following_run_computed():
    scheduler = make_scheduler()
    prompt = [5, 6, 7]
    stop = expected_outputs(prompt, 3)[2]  # the third token ends the request, inside the first run
    sequence = scheduler.add_request(prompt, SamplingParams(max_tokens=12, stop_token_ids=(stop,)))
    other = scheduler.add_request([8, 9], SamplingParams(max_tokens=12))
    model = FakeModel(scheduler.block_pool)
    first = scheduler.schedule()
    scheduler.update(first, model.run(first))
    run = scheduler.schedule_decode_run(4)
    following = scheduler.schedule_decode_run(4, after=run)
    sampled = model.run_decode(run)
    sampled_after = model.run_decode(following, before=sampled)
    assert scheduler.finish_decode_run(run, sampled) == [sequence]
    assert scheduler.has_unfinished()  # the following run is still to be recorded
    scheduler.finish_decode_run(following, sampled_after)
    assert sequence.output_token_ids == expected_outputs(prompt, 3)
    assert scheduler.schedule_decode_run(4) is not None  # the other request goes on alone
    assert other.status is SequenceStatus.RUNNING


def test_runs_give_way_when_blocks_are_short_or_a_step_is_pending():
    scheduler = make_scheduler(num_blocks=4, block_size=2)
    model = FakeModel(scheduler.block_pool)
    sequences = [scheduler.add_request([token], SamplingParams(max_tokens=6)) for token in (1, 2)]
    assert scheduler.schedule_decode_run(4) is None  # requests wait to be admitted
    output = scheduler.schedule()
    with pytest.raises(RuntimeError, match="still in flight"):
        scheduler.schedule_decode_run(4)
    scheduler.update(output, model.run(output))
    free = scheduler.block_pool.num_free_blocks
    assert scheduler.schedule_decode_run(4) is None  # each needs 2 more blocks of 2 for 4 steps; 2 are free
    assert scheduler.block_pool.num_free_blocks == free
    run_with_decode_runs(scheduler, 4, model)
    assert_expected_outputs(sequences)


def test_a_run_is_recorded_once_with_one_token_per_step_and_sequence():
    scheduler = make_scheduler()
    model = FakeModel(scheduler.block_pool)
    sequences = [scheduler.add_request(prompt, SamplingParams(max_tokens=6)) for prompt in some_prompts(2, seed=5)]
    output = scheduler.schedule()
    scheduler.update(output, model.run(output))
    assert scheduler.schedule_decode_run(1) is None  # a run of one step is just a step
    run = scheduler.schedule_decode_run(3)
    with pytest.raises(RuntimeError, match="still in flight"):
        scheduler.schedule()
    with pytest.raises(ValueError, match=r"samples \[3, 2\] tokens"):
        scheduler.finish_decode_run(run, np.zeros((2, 2), dtype=int))
    scheduler.finish_decode_run(run, model.run_decode(run))
    with pytest.raises(ValueError, match="once"):
        scheduler.finish_decode_run(run, np.zeros((3, 2), dtype=int))
    run_with_decode_runs(scheduler, 3, model)
    assert_expected_outputs(sequences)


def test_runs_go_on_while_requests_wait_for_a_seat():
    scheduler = make_scheduler(max_num_seqs=2)
    sequences = [scheduler.add_request(prompt, SamplingParams(max_tokens=8)) for prompt in some_prompts(4, seed=6)]
    steps = run_with_decode_runs(scheduler, max_steps=4)
    waiting_runs = [step for step in steps if isinstance(step, DecodeRun) and step.sequences[0] is sequences[0]]
    assert waiting_runs  # the first two decoded in runs while the last two waited for their seats
    assert_expected_outputs(sequences)
