"""What the engine did, counted as it works: steps, prompt and decode tokens, the most KV blocks in use at once.

The counts say in a few numbers what a serving engine spends its time on. A prompt of 37 tokens costs one
prefill step that computes 37 tokens in parallel (or a few chunks, under the step's token budget); each
generated token after the first costs a decode step of one token per sequence; the KV cache grows by a block
every ``block_size`` tokens. ``EngineStats.summary()`` says it in a sentence for a notebook.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from course_lib.engine.scheduler import SchedulerOutput


@dataclass
class EngineStats:
    """Counters an ``LLM`` keeps up to date; ``reset()`` counts from zero again."""

    steps: int = 0  # model forward passes: a decode run of n steps counts n
    prefill_steps: int = 0  # steps that computed at least one prompt token
    prompt_tokens: int = 0  # prompt tokens whose KV the model computed (prefix-cache hits and re-computes excluded)
    decode_tokens: int = 0  # tokens computed one at a time after their sequence's prompt
    recomputed_tokens: int = 0  # tokens whose KV a preemption threw away, computed again (prompt and outputs)
    generated_tokens: int = 0  # tokens sampled
    peak_blocks_used: int = 0  # the most KV-cache blocks held at once
    block_size: int = 0
    # per sequence still in its first prefill: prompt tokens computed so far (a preemption may restart it)
    _prefill_progress: dict[int, int] = field(default_factory=dict, repr=False)

    def record_plan(self, plan: SchedulerOutput, generated: int, blocks_used: int) -> None:
        """One engine step of ``plan``: split its tokens into first-time prompt tokens, first-time decode tokens
        (a sampled token fed back) and recomputed ones, which redo what a preemption threw away.

        A sequence that has sampled had every token but its last one computed, so only that one is new. One
        still in its first prefill may be preempted halfway: ``_prefill_progress`` remembers how far it got, so
        its first chunks are not counted twice. Prefix-cache hits are never computed, so never counted.
        """
        prompt_tokens = decode_tokens = 0
        for step in plan.scheduled:
            if step.sequence.output_token_ids:
                decode_tokens += step.samples  # a step that reaches the last sampled token feeds it to the model
                continue
            done = max(self._prefill_progress.pop(step.seq_id, 0), step.first_position)
            prompt_tokens += max(0, step.context_len - done)
            if not step.samples:  # the prompt's end is still ahead
                self._prefill_progress[step.seq_id] = max(done, step.context_len)
        self.record_step(prompt_tokens, decode_tokens, generated, blocks_used,
                         recomputed=plan.num_batched_tokens - prompt_tokens - decode_tokens)

    def record_run(self, num_steps: int, num_sequences: int, generated: int, blocks_used: int) -> None:
        """A decode run: ``num_steps`` steps of one token per sequence (a sequence that stops inside the run still
        has its row computed to the end of the run), ``generated`` tokens kept."""
        self.steps += num_steps
        self.decode_tokens += num_steps * num_sequences
        self.generated_tokens += generated
        self.peak_blocks_used = max(self.peak_blocks_used, blocks_used)

    def reset(self) -> None:
        """Count from zero again (the block size stays)."""
        vars(self).update(vars(EngineStats(block_size=self.block_size)))

    def record_step(self, prompt_tokens: int, decode_tokens: int, generated: int, blocks_used: int,
                    recomputed: int = 0) -> None:
        """One forward pass that computed these tokens and sampled ``generated``, with ``blocks_used`` held."""
        self.steps += 1
        self.prefill_steps += prompt_tokens > 0
        self.prompt_tokens += prompt_tokens
        self.decode_tokens += decode_tokens
        self.recomputed_tokens += recomputed
        self.generated_tokens += generated
        self.peak_blocks_used = max(self.peak_blocks_used, blocks_used)

    def summary(self) -> str:
        return (f"{self.steps} engine steps: {self.prefill_steps} prefill step(s) computing {self.prompt_tokens} "
                f"prompt tokens, {self.steps - self.prefill_steps} decode steps computing {self.decode_tokens} tokens; "
                f"{self.generated_tokens} tokens generated; at most {self.peak_blocks_used} KV-cache blocks of "
                f"{self.block_size} tokens in use"
                + (f"; {self.recomputed_tokens} tokens recomputed after preemptions" if self.recomputed_tokens else ""))
