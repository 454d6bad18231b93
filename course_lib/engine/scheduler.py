"""Continuous batching: each step, decide which sequences run, how many tokens each computes, and where their KV goes.

This is vLLM v1's scheduler, small. There is no separate "prefill phase": every sequence simply has
``num_tokens`` tokens of which ``num_computed_tokens`` have KV in the cache, and a step computes some
of the rest under a budget of ``max_num_batched_tokens``:

1. Running sequences first, in the order they were admitted. One in decode computes 1 token; one still
   in prefill computes the next chunk of its prompt that fits the budget (chunked prefill). (The step's
   record then lists its one-token sequences first, for the model's two attention kernels.)
2. Then waiting sequences, first come first served, while the budget, ``max_num_seqs`` and the free
   blocks allow. Admitting one gives it the blocks for all its tokens; those the prefix cache already
   holds count as computed from the start.
3. A running sequence that needs a block when none is free preempts the most recently admitted running
   sequence: its blocks go back to the pool, its KV is forgotten, and it waits at the front of the
   queue to recompute prompt + outputs when readmitted. A step that preempts admits no one.

The model runs the step, the sampler picks a token for each sequence whose step reached its last token,
and ``update`` records them, finishing sequences and freeing their blocks. When every running sequence
decodes and no waiting request could join, ``schedule_decode_run`` can plan several decode steps at once, and
``finish_decode_run`` records them (multi-step scheduling: one round trip to the host for the run). It can plan
the next run before the last one is recorded (``after=``), so the GPU computes one run while the host records
the one before (asynchronous scheduling).

A sequence's block table lives on the sequence; the block pool only hands blocks out and takes them back.
After each step the scheduler tells the pool which blocks now hold keys and values
(``BlockPool.cache_full_blocks``), and only those enter the prefix cache.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import numpy as np

from course_lib.engine.batch import StepBatch
from course_lib.engine.block_pool import BlockCopy, BlockPool, OutOfBlocks
from course_lib.engine.sampling import SamplingParams
from course_lib.engine.sequence import FINISHED_BY_LENGTH, Sequence, SequenceStatus
from course_lib.kernels.kv_blocks import blocks_for


@dataclass(frozen=True)
class SequenceStep:
    """One sequence's share of a step: ``num_new_tokens`` tokens from ``first_position`` on (whose KV is not in
    the cache yet), and whether the step reaches its last token, so that its logits give the next one."""

    sequence: Sequence
    first_position: int
    num_new_tokens: int
    samples: bool

    @property
    def seq_id(self) -> int:
        return self.sequence.seq_id

    @property
    def context_len(self) -> int:
        """How many tokens attention reads from the cache once this step's KV is written."""
        return self.first_position + self.num_new_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    """One step's plan: do ``block_copies`` on the KV cache, then run the model on ``batch``."""

    scheduled: tuple[SequenceStep, ...]
    batch: StepBatch  # the arrays the model runs on: tokens, positions, slots, context lengths, block tables
    block_copies: tuple[BlockCopy, ...]  # copy-on-write, to do before the model writes any KV
    preempted: tuple[Sequence, ...]  # evicted this step, back in the waiting queue

    @property
    def num_batched_tokens(self) -> int:
        return sum(step.num_new_tokens for step in self.scheduled)

    @property
    def sampling_sequences(self) -> tuple[Sequence, ...]:
        """The sequences that sample this step, in the order of the logits rows ``update`` expects."""
        return tuple(step.sequence for step in self.scheduled if step.samples)


@dataclass(frozen=True)
class DecodeRun:
    """``num_steps`` decode steps of every running sequence, planned at once (multi-step scheduling).

    Step ``j`` feeds each sequence the token at position ``first_positions[row] + j``: at step 0 the last token
    it sampled (``first_token_ids``), later the one the step before sampled on the GPU. Its key and value go
    to the slot of that position, and it attends over ``first_positions[row] + j + 1`` tokens. A run that
    follows a run still in flight has no ``first_token_ids``: its first tokens are that run's last, on the GPU.
    """

    sequences: tuple[Sequence, ...]
    num_steps: int
    first_token_ids: tuple[int, ...] | None  # None: fed by the run before it, on the GPU
    first_positions: tuple[int, ...]
    block_tables: tuple[tuple[int, ...], ...]  # cover every step's slot
    block_copies: tuple[BlockCopy, ...]  # copy-on-write, to do before the first step
    block_size: int

    def batch(self, step: int) -> StepBatch:
        """Step ``step`` of the run: one new token per sequence, known to the host at step 0 only; the GPU feeds
        the later steps' tokens."""
        return StepBatch.build(((1, first + step + 1, table) for first, table in
                                zip(self.first_positions, self.block_tables, strict=True)), self.block_size,
                               self.first_token_ids if step == 0 else None)


@dataclass
class _StepPlan:
    """The step being built: what is left of the token budget and what has been decided so far."""

    token_budget: int
    scheduled: list[SequenceStep] = field(default_factory=list)
    block_copies: list[BlockCopy] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def chunk_for(self, sequence: Sequence) -> int:
        """How many of the sequence's tokens without KV fit in what is left of the budget."""
        return min(sequence.num_tokens - sequence.num_computed_tokens, self.token_budget)

    def add(self, sequence: Sequence, num_new: int) -> None:
        start = sequence.num_computed_tokens
        self.scheduled.append(SequenceStep(sequence, start, num_new, samples=start + num_new == sequence.num_tokens))
        self.token_budget -= num_new

    def output(self, block_size: int) -> SchedulerOutput:
        """The plan as the step record the engine runs, its one-token sequences first: the model hands those rows to
        the decode kernel and the prompt chunks after them to the prefill kernel (the order is otherwise free)."""
        scheduled = sorted(self.scheduled, key=lambda step: step.num_new_tokens > 1)  # stable: admission order kept
        batch = StepBatch.build(((step.num_new_tokens, step.context_len, step.sequence.block_table)
                                 for step in scheduled), block_size,
                                [token for step in scheduled
                                 for token in step.sequence.token_ids_between(step.first_position, step.context_len)])
        return SchedulerOutput(tuple(scheduled), batch, tuple(self.block_copies), tuple(self.preempted))


class Scheduler:
    """Continuous batching with chunked prefill, prefix caching and preemption by recompute.

    A request that can never run (empty prompt, prompt of ``max_model_len`` tokens or more, or more KV
    blocks than the pool can ever admit) is not queued: ``add_request`` returns it already finished with
    ``finish_reason`` ``"error: <why>"``, so one bad request in a batch gets its answer and the others run.
    """

    def __init__(
        self,
        block_pool: BlockPool,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        eos_token_ids: Iterable[int] = (),
    ) -> None:
        for name, value in [
            ("max_num_batched_tokens", max_num_batched_tokens),
            ("max_num_seqs", max_num_seqs),
            ("max_model_len", max_model_len),
        ]:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.block_pool = block_pool
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.eos_token_ids = tuple(eos_token_ids)  # the model's end-of-sequence tokens: each one stops a request
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # in admission order: the last one is preempted first
        self._next_seq_id = 0
        self._step_in_flight: SchedulerOutput | None = None
        self._runs_in_flight: deque[DecodeRun] = deque()  # planned, not yet recorded: at most two, oldest first

    @property
    def waiting(self) -> tuple[Sequence, ...]:
        return tuple(self._waiting)

    @property
    def running(self) -> tuple[Sequence, ...]:
        return tuple(self._running)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running or self._runs_in_flight)

    def add_request(self, prompt_token_ids: Iterable[int], sampling_params: SamplingParams | None = None) -> Sequence:
        """Queue a request; returns its sequence, already finished with an error if it can never run."""
        sequence = Sequence(
            seq_id=self._next_seq_id,
            prompt_token_ids=tuple(prompt_token_ids),
            sampling_params=sampling_params or SamplingParams(),
            eos_token_ids=self.eos_token_ids,
        )
        self._next_seq_id += 1
        reason = self._why_it_can_never_run(sequence)
        if reason is None:
            self._waiting.append(sequence)
        else:
            sequence.finish(f"error: {reason}")
        return sequence

    def schedule(self) -> SchedulerOutput:
        """Plan the next step: running sequences first, then waiting ones, under the token budget."""
        self._require_no_step_in_flight()
        plan = _StepPlan(token_budget=self.max_num_batched_tokens)
        index = 0
        while index < len(self._running) and plan.token_budget:
            sequence = self._running[index]
            num_new = plan.chunk_for(sequence)
            if not self._grow(sequence, sequence.num_computed_tokens + num_new, plan):
                break  # it preempted itself, the last running sequence
            plan.add(sequence, num_new)
            index += 1
        while not plan.preempted and self._waiting and plan.token_budget and len(self._running) < self.max_num_seqs:
            if not self._admit(self._waiting[0]):
                break  # first come, first served: no one overtakes the head of the queue
            sequence = self._running[-1]
            plan.add(sequence, plan.chunk_for(sequence))
        self._step_in_flight = plan.output(self.block_pool.block_size)
        return self._step_in_flight

    def update(self, scheduler_output: SchedulerOutput, sampled_token_ids: Collection[int]) -> list[Sequence]:
        """Record a step the model has run; returns the sequences it finished (their blocks are freed).

        ``sampled_token_ids`` holds one token per sequence of ``scheduler_output.sampling_sequences``, in
        that order. A sequence finishes on a stop token, at ``max_tokens`` outputs, or when it holds
        ``max_model_len`` tokens.
        """
        if scheduler_output is not self._step_in_flight:
            raise ValueError("update() takes the output of the last schedule() call, once")
        if len(sampled_token_ids) != len(scheduler_output.sampling_sequences):
            raise ValueError(
                f"{len(scheduler_output.sampling_sequences)} sequences sample this step, "
                f"got {len(sampled_token_ids)} sampled tokens"
            )
        self._step_in_flight = None
        sampled = iter(sampled_token_ids)
        return [step.sequence for step in scheduler_output.scheduled
                if self._record(step.sequence, step.num_new_tokens, next(sampled) if step.samples else None)]

    def _record(self, sequence: Sequence, num_new_tokens: int, token: int | None) -> bool:
        """The model wrote the KV of ``num_new_tokens`` more tokens of the sequence and sampled ``token`` (None: a
        prefill chunk short of the prompt's end). True if that finished it."""
        sequence.num_computed_tokens += num_new_tokens
        self.block_pool.cache_full_blocks(sequence)  # blocks now full of keys and values may be shared
        if token is None:
            return False
        sequence.append_token(token)
        if not sequence.is_finished and sequence.num_tokens >= self.max_model_len:
            sequence.finish(FINISHED_BY_LENGTH)
        if sequence.is_finished:
            self._release(sequence)
        return sequence.is_finished

    # --- multi-step decoding ----------------------------------------------------------------------------

    def schedule_decode_run(self, max_steps: int, after: DecodeRun | None = None) -> DecodeRun | None:
        """Plan up to ``max_steps`` decode steps at once; None when single steps must be taken instead.

        An engine spends host time on every step: it plans the step, waits for the sampled tokens, records
        them. When every running sequence is decoding and no waiting request has a free seat to take
        (``max_num_seqs``; a run admits no one until it ends), the coming steps are known in
        advance except for their token ids, which the GPU can sample and feed back itself (greedy sampling:
        the caller checks). So the run gives every sequence a KV slot for every step now, the engine
        launches the steps back to back and reads the tokens once (``finish_decode_run``): one round trip
        to the host for several steps, as vLLM's multi-step scheduling did. A run never goes past any
        sequence's ``max_tokens`` or ``max_model_len``; a stop token ends a sequence early and the tokens
        computed for it after that are dropped.

        ``after``: the run in flight, not yet recorded. The new run continues it (its first tokens are that run's
        last, sampled on the GPU), so the engine can launch it before it reads that run's tokens, and the GPU
        computes while the host records (asynchronous scheduling, as in vLLM). The plan cannot know the stop
        tokens that run will sample: a sequence they end computes one run too many, and its tokens are dropped.
        None as above, and also when a sequence of ``after`` has finished since it was planned.
        """
        if after is None:
            self._require_no_step_in_flight()
            running, pending = tuple(self._running), 0
            if any(seq.num_tokens - seq.num_computed_tokens != 1 for seq in running):
                return None  # a prefill is unfinished: single steps
        else:
            if list(self._runs_in_flight) != [after]:
                raise ValueError("a run can follow only the one run in flight, before it is recorded")
            running, pending = after.sequences, after.num_steps  # each has `pending` tokens on the GPU only
            if running != tuple(self._running):
                return None  # someone finished (or the run ended a sequence): the next step is planned afresh
        could_admit = self._waiting and len(running) < self.max_num_seqs
        if could_admit or not running:
            return None  # someone waiting could join the batch: single steps
        steps = min(max_steps, *(seq.sampling_params.max_tokens - len(seq.output_token_ids) - pending
                                 for seq in running),
                    *(self.max_model_len - seq.num_tokens - pending for seq in running))
        pool = self.block_pool
        # slots for the token each sequence sampled last, and for the steps - 1 tokens the GPU will sample
        last = [seq.num_tokens + pending + steps - 1 for seq in running]
        if steps < 2 or sum(pool.blocks_to_grow(seq, n) for seq, n in zip(running, last, strict=True)) > \
                pool.num_free_blocks:
            return None
        copies = [copy for seq, n in zip(running, last, strict=True) for copy in pool.grow(seq, n)]
        first_tokens = None if after else tuple(seq.token_ids_between(seq.num_tokens - 1, seq.num_tokens)[0]
                                                for seq in running)
        run = DecodeRun(running, steps, first_tokens, tuple(seq.num_tokens - 1 + pending for seq in running),
                        tuple(tuple(seq.block_table) for seq in running), tuple(copies), pool.block_size)
        self._runs_in_flight.append(run)
        return run

    def finish_decode_run(self, run: DecodeRun, sampled_token_ids: np.ndarray) -> list[Sequence]:
        """Record a run: ``sampled_token_ids[j, row]`` is what step ``j`` sampled for ``run.sequences[row]``.

        Runs are recorded in the order they were planned. Each step is recorded as ``update`` records one; a
        sequence that finishes keeps none of the tokens sampled after. Returns the sequences the run finished
        (their blocks, those grown for later steps included, are freed: a run still in flight writes into them
        before any later step can, in the GPU's stream order).
        """
        if not self._runs_in_flight or run is not self._runs_in_flight[0]:
            raise ValueError("finish_decode_run() takes the oldest run schedule_decode_run() returned, once")
        if np.shape(sampled_token_ids) != (run.num_steps, len(run.sequences)):
            raise ValueError(f"a run of {run.num_steps} steps over {len(run.sequences)} sequences samples "
                             f"[{run.num_steps}, {len(run.sequences)}] tokens, got {np.shape(sampled_token_ids)}")
        self._runs_in_flight.popleft()
        return [sequence for step in range(run.num_steps)
                for sequence, token in zip(run.sequences, sampled_token_ids[step], strict=True)
                if not sequence.is_finished and self._record(sequence, 1, int(token))]

    # --- admitting, growing and evicting sequences ----------------------------------------------------

    def _require_no_step_in_flight(self) -> None:
        if self._step_in_flight is not None or self._runs_in_flight:
            raise RuntimeError("the last step is still in flight: pass its output to update() (a run's to "
                               "finish_decode_run()) before scheduling again")

    def _why_it_can_never_run(self, sequence: Sequence) -> str | None:
        prompt = sequence.prompt_token_ids
        if not prompt:
            return "the prompt is empty: a sequence needs at least one token"
        if min(prompt) < 0:
            return f"token ids are >= 0, the prompt holds {min(prompt)}"
        if len(prompt) >= self.max_model_len:
            return f"the prompt has {len(prompt)} tokens: max_model_len={self.max_model_len} leaves no room for output"
        # The last token is sampled but never computed, so it never needs a KV slot.
        most_slots = min(len(prompt) + sequence.sampling_params.max_tokens, self.max_model_len) - 1
        most_blocks = blocks_for(most_slots, self.block_pool.block_size)
        admissible = self.block_pool.num_blocks - self.block_pool.watermark_blocks
        if most_blocks > admissible:
            return (
                f"prompt + max_tokens need up to {most_blocks} KV-cache blocks of {self.block_pool.block_size} "
                f"tokens, and the pool admits at most {admissible}"
            )
        return None

    def _admit(self, sequence: Sequence) -> bool:
        """Give the head of the queue blocks for all its tokens, if the pool has them; False if not.

        A request that wants its prompt scored must compute every prompt token's logits: no prefix hits for it.
        """
        try:
            num_cached = self.block_pool.allocate(
                sequence, use_prefix_cache=sequence.sampling_params.prompt_logprobs is None)
        except OutOfBlocks:
            return False
        self._waiting.popleft()
        sequence.num_computed_tokens = sequence.num_cached_tokens = num_cached
        sequence.status = SequenceStatus.RUNNING
        self._running.append(sequence)
        return True

    def _grow(self, sequence: Sequence, num_slots: int, plan: _StepPlan) -> bool:
        """Give the sequence KV slots for its first ``num_slots`` tokens, preempting the youngest running
        sequences while the pool is short. Admission gave slots to every token the sequence had then; each
        sampled token gets its slot the step it is fed to the model. False if it had to preempt itself."""
        while self.block_pool.blocks_to_grow(sequence, num_slots) > self.block_pool.num_free_blocks:
            victim = self._running[-1]
            self._preempt(victim)
            plan.preempted.append(victim)
            if victim is sequence:
                return False
        plan.block_copies.extend(self.block_pool.grow(sequence, num_slots))
        return True

    def _preempt(self, sequence: Sequence) -> None:
        """Evict by recompute: free the blocks, forget the KV, wait at the front of the queue."""
        self._release(sequence)
        sequence.status = SequenceStatus.PREEMPTED
        sequence.num_computed_tokens = 0
        sequence.num_preemptions += 1
        self._waiting.appendleft(sequence)

    def _release(self, sequence: Sequence) -> None:
        self._running.remove(sequence)
        self.block_pool.free(sequence)
