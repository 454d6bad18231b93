"""One request as the scheduler sees it: its tokens, where its KV lives, how far the KV has caught up, its state.

A sequence's tokens are its prompt followed by the tokens generated so far. ``num_computed_tokens``
counts how many of them already have their keys and values in the KV cache; the scheduler's whole job
is to bring that number up to ``num_tokens``, one chunk of prefill or one decode token per step. Its
``block_table`` lists the KV-cache blocks that hold them, in order: the block pool fills and empties it,
and each step's batch copies it for the attention kernels. Nothing else keeps a copy.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from course_lib.engine.sampling import SamplingParams

FINISHED_BY_LENGTH = "length"  # max_tokens generated, or the model's context (max_model_len) is full
FINISHED_BY_STOP = "stop"  # a stop token or the end-of-sequence token was sampled


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no KV-cache blocks
    RUNNING = "running"  # admitted, holds blocks, scheduled every step until it finishes
    PREEMPTED = "preempted"  # evicted to free blocks; waits again and recomputes its KV when readmitted
    FINISHED = "finished"  # done, ``finish_reason`` says why; its blocks are back in the pool


@dataclass(eq=False)
class Sequence:
    """A request's tokens and progress; ``generator`` is its own random stream (seeded by its params)."""

    seq_id: int
    prompt_token_ids: tuple[int, ...]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    eos_token_ids: tuple[int, ...] = ()  # the model's end-of-sequence tokens (a chat model may have several)
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0  # of those, found in the prefix cache when last admitted
    num_preemptions: int = 0
    block_table: list[int] = field(default_factory=list)  # KV-cache blocks holding its tokens, in order
    block_hashes: list[str] = field(default_factory=list)  # prefix-cache keys of its full blocks with KV written
    finish_reason: str | None = None  # FINISHED_BY_LENGTH, FINISHED_BY_STOP, or "error: ..." for a rejection
    logprobs: list[dict[int, float]] = field(default_factory=list)  # per output token, if its params ask
    prompt_logprobs: list[dict[int, float] | None] = field(default_factory=list)  # per prompt token, if asked
    generator: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = tuple(self.prompt_token_ids)
        self.generator = np.random.default_rng(self.sampling_params.seed)
        if self.sampling_params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]  # nothing predicts the first prompt token

    @property
    def all_token_ids(self) -> list[int]:
        """The prompt, then the outputs: what a recompute after preemption prefills."""
        return [*self.prompt_token_ids, *self.output_token_ids]

    def token_ids_between(self, start: int, stop: int) -> tuple[int, ...]:
        """Tokens ``start`` to ``stop`` of prompt + outputs, without building the whole list: a decode step
        reads one token of a sequence hundreds of tokens long, every step."""
        prompt = len(self.prompt_token_ids)
        if stop <= prompt:
            return self.prompt_token_ids[start:stop]
        outputs = tuple(self.output_token_ids[max(start - prompt, 0):stop - prompt])
        return outputs if start >= prompt else self.prompt_token_ids[start:] + outputs

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        """Add a sampled token, and finish if it is a stop token or the last one ``max_tokens`` allows.

        A stop token is kept in the outputs, as vLLM keeps it in its token ids.
        """
        token_id = int(token_id)
        self.output_token_ids.append(token_id)
        params = self.sampling_params
        if token_id in params.stop_token_ids or (token_id in self.eos_token_ids and not params.ignore_eos):
            self.finish(FINISHED_BY_STOP)
        elif len(self.output_token_ids) >= params.max_tokens:
            self.finish(FINISHED_BY_LENGTH)

    def finish(self, reason: str) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
