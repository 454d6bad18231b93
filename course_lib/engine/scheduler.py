"""Continuous batching: each step, decide which sequences run, how many tokens each computes, and where their KV goes.

This is vLLM v1's scheduler, small. There is no separate "prefill phase": every sequence simply has
``num_tokens`` tokens of which ``num_computed_tokens`` have KV in the cache, and a step computes some
of the rest under a budget of ``max_num_batched_tokens``:

1. Running sequences first, in the order they were admitted. One in decode computes 1 token; one still
   in prefill computes the next chunk of its prompt that fits the budget (chunked prefill).
2. Then waiting sequences, first come first served, while the budget, ``max_num_seqs`` and the free
   blocks allow. Admitting one gives it the blocks for all its tokens; those the prefix cache already
   holds count as computed from the start.
3. A running sequence that needs a block when none is free preempts the most recently admitted running
   sequence: its blocks go back to the pool, its KV is forgotten, and it waits at the front of the
   queue to recompute prompt + outputs when readmitted. A step that preempts admits no one.

The model runs the step, the sampler picks a token for each sequence whose step reached its last token,
and ``update`` records them, finishing sequences and freeing their blocks. When every running sequence
decodes and no waiting request could join, ``schedule_decode_run`` can plan several decode steps at once, and
``finish_decode_run`` records them (multi-step scheduling: one round trip to the host for the run).

The block pool registers a full block in the prefix cache as soon as it is allocated, before the model
has written its KV. So the scheduler keeps its own set of blocks whose KV has been written, and a new
sequence shares cached blocks only up to the first block not in it; it gets fresh blocks for the rest and
computes them itself. Without this, a request arriving in the same step as its twin, while its twin is
mid-prefill, or after its twin was preempted before running, would attend to garbage, or two sequences
would write the same cache slots in one step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import numpy as np

from course_lib.engine.block_pool import BlockCopy, BlockPool, OutOfBlocks, blocks_for
from course_lib.engine.sampling import SamplingParams
from course_lib.engine.sequence import FINISHED_BY_LENGTH, Sequence, SequenceStatus


@dataclass(frozen=True)
class SequenceStep:
    """What one sequence computes this step: which tokens, at which positions, into which KV slots."""

    sequence: Sequence
    token_ids: tuple[int, ...]  # the tokens fed to the model this step
    first_position: int  # the position of token_ids[0]: how many tokens had KV before the step
    block_table: tuple[int, ...]  # every block of the sequence, in token order
    slot_mapping: tuple[int, ...]  # where each new token's KV goes: block * block_size + offset in the block
    samples: bool  # the step reaches the sequence's last token, so its last logits give the next token

    @property
    def seq_id(self) -> int:
        return self.sequence.seq_id

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def positions(self) -> range:
        return range(self.first_position, self.first_position + self.num_new_tokens)

    @property
    def context_len(self) -> int:
        """How many tokens attention reads from the cache once this step's KV is written."""
        return self.first_position + self.num_new_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    """One step's plan: do ``block_copies`` on the KV cache, then run the model on ``scheduled``."""

    scheduled: tuple[SequenceStep, ...]
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
    to the slot of that position, and it attends over ``first_positions[row] + j + 1`` tokens.
    """

    sequences: tuple[Sequence, ...]
    num_steps: int
    first_token_ids: tuple[int, ...]
    first_positions: tuple[int, ...]
    block_tables: tuple[tuple[int, ...], ...]  # cover every step's slot
    block_copies: tuple[BlockCopy, ...]  # copy-on-write, to do before the first step

    def context_lens(self, step: int) -> list[int]:
        """Each sequence's context length at step ``step`` of the run, once the step's KV is written."""
        return [first + step + 1 for first in self.first_positions]


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
        self._num_slotted_tokens: dict[int, int] = {}  # per running sequence: its tokens that have a KV slot
        self._blocks_with_kv: set[int] = set()  # full blocks whose KV the model has written
        self._next_seq_id = 0
        self._step_in_flight: SchedulerOutput | DecodeRun | None = None

    @property
    def waiting(self) -> tuple[Sequence, ...]:
        return tuple(self._waiting)

    @property
    def running(self) -> tuple[Sequence, ...]:
        return tuple(self._running)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

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
        if self._step_in_flight is not None:
            raise RuntimeError("the last step is still in flight: pass its output to update() before scheduling again")
        plan = _StepPlan(token_budget=self.max_num_batched_tokens)
        index = 0
        while index < len(self._running) and plan.token_budget:
            sequence = self._running[index]
            num_new = plan.chunk_for(sequence)
            if not self._reserve_slots(sequence, sequence.num_computed_tokens + num_new, plan):
                break  # it preempted itself, the last running sequence
            self._add_to_plan(sequence, num_new, plan)
            index += 1
        while not plan.preempted and self._waiting and plan.token_budget and len(self._running) < self.max_num_seqs:
            if not self._admit(self._waiting[0]):
                break  # first come, first served: no one overtakes the head of the queue
            sequence = self._running[-1]
            self._add_to_plan(sequence, plan.chunk_for(sequence), plan)
        self._step_in_flight = SchedulerOutput(tuple(plan.scheduled), tuple(plan.block_copies), tuple(plan.preempted))
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
        finished = []
        for step in scheduler_output.scheduled:
            token = next(sampled) if step.samples else None
            if self._record(step.sequence, step.num_new_tokens, step.block_table, token):
                finished.append(step.sequence)
        return finished

    def _record(self, sequence: Sequence, num_new_tokens: int, table: tuple[int, ...], token: int | None) -> bool:
        """The model computed ``num_new_tokens`` more tokens of the sequence (their KV is in ``table``) and
        sampled ``token`` (None: a prefill chunk short of the prompt's end). True if that finished it."""
        sequence.num_computed_tokens += num_new_tokens
        self._blocks_with_kv.update(table[: sequence.num_computed_tokens // self.block_pool.block_size])
        if token is None:
            return False
        sequence.append_token(token)
        if not sequence.is_finished and sequence.num_tokens >= self.max_model_len:
            sequence.finish(FINISHED_BY_LENGTH)
        if sequence.is_finished:
            self._release(sequence)
        return sequence.is_finished

    # --- multi-step decoding ----------------------------------------------------------------------------

    def schedule_decode_run(self, max_steps: int) -> DecodeRun | None:
        """Plan up to ``max_steps`` decode steps at once; None when single steps must be taken instead.

        An engine spends host time on every step: it plans the step, waits for the sampled tokens, records
        them. When every running sequence is decoding and no waiting request has a free seat to take
        (``max_num_seqs``; a run admits no one until it ends), the coming steps are known in
        advance except for their token ids, which the GPU can sample and feed back itself (greedy sampling:
        the caller checks). So the run reserves a KV slot for every sequence and step now, the engine
        launches the steps back to back and reads the tokens once (``finish_decode_run``): one round trip
        to the host for several steps, as vLLM's multi-step scheduling did. A run never goes past any
        sequence's ``max_tokens`` or ``max_model_len``; a stop token ends a sequence early and the tokens
        computed for it after that are dropped.
        """
        if self._step_in_flight is not None:
            raise RuntimeError("the last step is still in flight: pass its output to update() before scheduling again")
        running = tuple(self._running)
        could_admit = self._waiting and len(running) < self.max_num_seqs
        if could_admit or not running or any(seq.num_tokens - seq.num_computed_tokens != 1 for seq in running):
            return None  # someone waiting could join the batch, or a prefill is unfinished: single steps
        steps = min(max_steps, *(seq.sampling_params.max_tokens - len(seq.output_token_ids) for seq in running),
                    *(self.max_model_len - seq.num_tokens for seq in running))
        pool = self.block_pool
        # A decoding sequence's pool holds all its tokens but the last sampled one, and the run slots num_steps
        # more (a prompt with one token left to prefill holds all of them: the count is then one too many).
        if steps < 2 or sum(pool.blocks_to_grow(seq.seq_id, steps) for seq in running) > pool.num_free_blocks:
            return None
        plan = _StepPlan(token_budget=len(running))
        for sequence in running:
            self._reserve_slots(sequence, sequence.num_tokens, plan)  # the known token: its slot, copy-on-write
            pool.reserve(sequence.seq_id, steps - 1)
            self._forget_kv_of_unwritten_blocks(sequence)  # reserved blocks are fresh: whatever KV they held is gone
        run = DecodeRun(running, steps, tuple(seq.token_ids_between(seq.num_tokens - 1, seq.num_tokens)[0]
                                              for seq in running),
                        tuple(seq.num_tokens - 1 for seq in running),
                        tuple(tuple(pool.block_table(seq.seq_id)) for seq in running), tuple(plan.block_copies))
        self._step_in_flight = run
        return run

    def finish_decode_run(self, run: DecodeRun, sampled_token_ids: np.ndarray) -> list[Sequence]:
        """Record a run: ``sampled_token_ids[j, row]`` is what step ``j`` sampled for ``run.sequences[row]``.

        Each step is recorded as ``update`` records one; a sequence that finishes keeps none of the tokens
        sampled after. Returns the sequences the run finished (their blocks, reserved ones included, are freed).
        """
        if run is not self._step_in_flight:
            raise ValueError("finish_decode_run() takes the last run schedule_decode_run() returned, once")
        if np.shape(sampled_token_ids) != (run.num_steps, len(run.sequences)):
            raise ValueError(f"a run of {run.num_steps} steps over {len(run.sequences)} sequences samples "
                             f"[{run.num_steps}, {len(run.sequences)}] tokens, got {np.shape(sampled_token_ids)}")
        self._step_in_flight = None
        finished = []
        for step in range(run.num_steps):
            for sequence, table, token in zip(run.sequences, run.block_tables, sampled_token_ids[step], strict=True):
                if sequence.is_finished:
                    continue  # it stopped earlier in the run
                if self._record(sequence, 1, table, int(token)):
                    finished.append(sequence)
                elif step + 1 < run.num_steps:  # the next step fed this token: it fills a reserved slot
                    self.block_pool.append(sequence.seq_id, int(token))
                    self._num_slotted_tokens[sequence.seq_id] += 1
        return finished

    # --- admitting, growing and evicting sequences ----------------------------------------------------

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
        """Give the head of the queue blocks for all its tokens, if the pool has them; False if not."""
        # A request that wants its prompt scored must compute every prompt token's logits: no prefix hits for it.
        written = (lambda block: False) if sequence.sampling_params.prompt_logprobs is not None else \
            self._blocks_with_kv.__contains__
        try:
            num_cached = self.block_pool.allocate(sequence.seq_id, sequence.all_token_ids, written=written)
        except OutOfBlocks:
            return False
        self._waiting.popleft()
        sequence.num_computed_tokens = sequence.num_cached_tokens = num_cached
        sequence.status = SequenceStatus.RUNNING
        self._running.append(sequence)
        self._num_slotted_tokens[sequence.seq_id] = sequence.num_tokens
        self._forget_kv_of_unwritten_blocks(sequence)
        return True

    def _forget_kv_of_unwritten_blocks(self, sequence: Sequence) -> None:
        """Blocks past what the sequence has computed are fresh: whatever KV they held before is gone."""
        table = self.block_pool.block_table(sequence.seq_id)
        self._blocks_with_kv.difference_update(table[sequence.num_computed_tokens // self.block_pool.block_size :])

    def _reserve_slots(self, sequence: Sequence, num_tokens: int, plan: _StepPlan) -> bool:
        """Give the sequence's first ``num_tokens`` tokens a KV slot, preempting when no block is free.

        Admission gave slots to every token the sequence had then; each sampled token gets its slot
        here, the step it is fed to the model (in a decode run, the later ones get reserved slots instead).
        Returns False if the sequence had to preempt itself.
        """
        while self._num_slotted_tokens[sequence.seq_id] < num_tokens:
            while not self.block_pool.can_append(sequence.seq_id):
                victim = self._running[-1]
                self._preempt(victim)
                plan.preempted.append(victim)
                if victim is sequence:
                    return False
            slotted = self._num_slotted_tokens[sequence.seq_id]
            (next_token,) = sequence.token_ids_between(slotted, slotted + 1)
            copy = self.block_pool.append(sequence.seq_id, next_token)
            if copy is not None:
                plan.block_copies.append(copy)
            self._num_slotted_tokens[sequence.seq_id] = slotted + 1
            if copy is not None or slotted % self.block_pool.block_size == 0:
                self._forget_kv_of_unwritten_blocks(sequence)  # the slot sits in a fresh block
        return True

    def _add_to_plan(self, sequence: Sequence, num_new: int, plan: _StepPlan) -> None:
        start = sequence.num_computed_tokens
        table = self.block_pool.block_table(sequence.seq_id)
        block_size = self.block_pool.block_size
        slots = tuple(
            table[position // block_size] * block_size + position % block_size
            for position in range(start, start + num_new)
        )
        plan.scheduled.append(
            SequenceStep(
                sequence=sequence,
                token_ids=sequence.token_ids_between(start, start + num_new),
                first_position=start,
                block_table=tuple(table),
                slot_mapping=slots,
                samples=start + num_new == sequence.num_tokens,
            )
        )
        plan.token_budget -= num_new

    def _preempt(self, sequence: Sequence) -> None:
        """Evict by recompute: free the blocks, forget the KV, wait at the front of the queue."""
        self._release(sequence)
        sequence.status = SequenceStatus.PREEMPTED
        sequence.num_computed_tokens = 0
        sequence.num_preemptions += 1
        self._waiting.appendleft(sequence)

    def _release(self, sequence: Sequence) -> None:
        self._running.remove(sequence)
        self.block_pool.free(sequence.seq_id)
        del self._num_slotted_tokens[sequence.seq_id]
