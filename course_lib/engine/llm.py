"""The engine's front door, in the manner of vLLM: ``LLM(...).generate(prompts, params)`` and a token stream.

One engine step, the loop every serving engine runs:

1. the scheduler picks the sequences that run and how many tokens each computes (decode: one; prefill:
   a chunk of the prompt, under a budget of tokens a step);
2. the KV cache performs the copy-on-write copies the block pool asked for;
3. the model runs every scheduled token in one flat batch and returns, per sequence, the logits of its
   last new token;
4. the sampler draws a token for each sequence that reached its last token (a prefill chunk that stops
   short of the prompt's end samples nothing);
5. the scheduler appends the tokens, finishes what is done and frees its blocks.

Prompts are lists of token ids (the course's models have random weights and no tokenizer). A request that
can never run (an empty prompt, one longer than the model's context, one that could never fit the KV
pool) comes back finished with ``finish_reason`` ``"error: ..."``; the other requests are unaffected.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from course_lib import backend
from course_lib.engine import sequence as sequences
from course_lib.engine.block_pool import BlockPool
from course_lib.engine.config import TINY, ModelConfig
from course_lib.engine.graphs import DecodeGraphs, graph_batch_sizes
from course_lib.engine.model import AttentionMetadata, KVCache, LlamaModel
from course_lib.engine.sampling import SamplingParams, greedy_tokens, sample
from course_lib.engine.scheduler import DecodeRun, Scheduler
from course_lib.engine.weights import load_checkpoint, random_weights


@dataclass(frozen=True)
class RequestOutput:
    """A finished request: its prompt, the tokens generated, and why it stopped."""

    request_id: int
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    finish_reason: str  # "length", "stop", or "error: <why>" for a request that could not run
    num_preemptions: int  # times the scheduler evicted it and recomputed its KV (the outputs do not change)


@dataclass(frozen=True)
class TokenEvent:
    """One generated token, as the stream hands it out."""

    request_id: int
    token_id: int
    finished: bool


class LLM:
    """A small paged-attention engine: a Llama model, a KV-cache block pool, a scheduler and a sampler.

    ``weights`` default to random ones drawn from ``seed``; ``LLM.from_checkpoint`` loads a Hugging Face-style
    directory. ``num_blocks`` x ``block_size`` is the KV cache in tokens; ``max_num_batched_tokens`` the
    token budget of a step; ``max_num_seqs`` how many sequences run at once. With ``cuda_graphs`` (GPU
    only) steps that only decode replay a CUDA graph captured for their batch size (``engine.graphs``).
    With ``decode_steps`` > 1, while every running request decodes greedily and no waiting one could join, it runs
    up to that many decode steps at a time, the GPU feeding each step's arg-max to the next
    (``Scheduler.schedule_decode_run``); the tokens are the same. With CUDA graphs the host then waits for the
    GPU once a run; eager steps still read their indices back to check them, so they wait every step.
    """

    def __init__(self, config: ModelConfig = TINY, weights: dict | None = None, *, seed: int = 0,
                 dtype: str = "float32", num_blocks: int = 256, block_size: int = 16,
                 max_num_batched_tokens: int = 512, max_num_seqs: int = 64, max_model_len: int | None = None,
                 eos_token_id: int | None = None, cuda_graphs: bool = False, decode_steps: int = 1) -> None:
        if decode_steps < 1:
            raise ValueError(f"decode_steps must be >= 1 (1: a round trip to the host every step), got {decode_steps}")
        self.decode_steps = decode_steps
        weights = random_weights(config, seed, dtype) if weights is None else weights
        self.config = config
        self.model = LlamaModel(config, weights, dtype)
        self.kv_cache = KVCache.allocate(config, num_blocks, block_size, dtype)
        self.block_pool = BlockPool(num_blocks, block_size)
        self.scheduler = Scheduler(self.block_pool, max_num_batched_tokens, max_num_seqs,
                                   max_model_len or config.max_position_embeddings, eos_token_id)
        self.graphs = DecodeGraphs(self.model, self.kv_cache, graph_batch_sizes(max_num_seqs),
                                   self.scheduler.max_model_len) if cuda_graphs else None

    @classmethod
    def from_checkpoint(cls, directory: str | Path, **options: object) -> LLM:
        """An engine on the weights of a ``config.json`` + ``*.safetensors`` directory."""
        config, weights = load_checkpoint(directory)
        return cls(config, weights, **options)

    def close(self) -> None:
        """Release the CUDA graphs (if any) now; the engine then runs eager steps only."""
        if self.graphs is not None:
            self.graphs.close()
            self.graphs = None

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion, batched continuously; outputs in the order of ``prompts``."""
        requests = self._add_requests(prompts, params)
        while self.scheduler.has_unfinished():
            self.step()
        return [_output(index, seq) for index, seq in enumerate(requests)]

    def stream(self, prompts: Sequence[Sequence[int]],
               params: SamplingParams | Sequence[SamplingParams] | None = None) -> Iterator[TokenEvent]:
        """The same work as :meth:`generate`, handing out each token as soon as a step samples it."""
        requests = self._add_requests(prompts, params)
        request_of = {seq.seq_id: index for index, seq in enumerate(requests)}
        while self.scheduler.has_unfinished():
            sampled = self.step()
            last = {seq.seq_id: index for index, (seq, _) in enumerate(sampled)}  # a run samples several each
            for index, (seq, token) in enumerate(sampled):
                yield TokenEvent(request_of[seq.seq_id], token, seq.is_finished and last[seq.seq_id] == index)

    def step(self) -> list[tuple[sequences.Sequence, int]]:
        """One engine step, or a run of decode steps; returns the (sequence, token) pairs sampled, in order."""
        if self.decode_steps > 1 and all(seq.sampling_params.is_greedy for seq in self.scheduler.running):
            run = self.scheduler.schedule_decode_run(self.decode_steps)
            if run is not None:
                return self._decode_run(run)
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            raise RuntimeError("the scheduler found nothing it could run: the KV pool is too small for the "
                               "waiting requests even after preempting every running one")
        self.kv_cache.copy_blocks(plan.block_copies)
        token_ids = np.concatenate([step.token_ids for step in plan.scheduled]).astype(np.int32)
        if self.graphs and all(step.num_new_tokens == 1 for step in plan.scheduled):  # decode only: replay
            logits = self.graphs.run(token_ids, [step.context_len for step in plan.scheduled],
                                     [step.block_table for step in plan.scheduled])
        else:
            attention = AttentionMetadata.build(
                ((step.num_new_tokens, step.context_len, step.block_table) for step in plan.scheduled),
                self.block_pool.block_size)
            logits = self.model.forward(backend.xp.asarray(token_ids), attention.positions, self.kv_cache,
                                        attention)
        rows = [row for row, step in enumerate(plan.scheduled) if step.samples]
        sampling = plan.sampling_sequences
        params = [seq.sampling_params for seq in sampling]
        if not rows:
            tokens = np.empty(0, dtype=np.int64)
        elif all(p.is_greedy for p in params):  # only the arg-maxes cross to the host
            tokens = greedy_tokens(logits if len(rows) == len(plan.scheduled) else logits[rows])
        else:
            tokens = sample(backend.to_numpy(logits[rows]), params, [seq.generator for seq in sampling])
        self.scheduler.update(plan, tokens)
        return [(seq, int(token)) for seq, token in zip(sampling, tokens, strict=True)]

    def _decode_run(self, run: DecodeRun) -> list[tuple[sequences.Sequence, int]]:
        """Launch the run's steps back to back, each fed the previous step's arg-max on the GPU; read the
        tokens to the host once, at the end."""
        xp = backend.xp
        self.kv_cache.copy_blocks(run.block_copies)
        token_ids, sampled, finite = xp.asarray(np.array(run.first_token_ids, dtype=np.int32)), [], []
        for step in range(run.num_steps):
            context_lens = run.context_lens(step)
            if self.graphs:
                logits = self.graphs.run(token_ids, context_lens, run.block_tables)
            else:
                attention = AttentionMetadata.build(((1, length, table) for length, table in
                                                     zip(context_lens, run.block_tables, strict=True)),
                                                    self.block_pool.block_size)
                logits = self.model.forward(token_ids, attention.positions, self.kv_cache, attention)
            token_ids = xp.argmax(logits, axis=1).astype(xp.int32)  # ties: the lower id, as greedy_tokens
            sampled.append(token_ids)
            finite.append(xp.isfinite(logits.max(axis=1)).all())
        if not bool(xp.stack(finite).all()):
            raise ValueError("logits must be finite or -inf (a masked token), with at least one finite value per row")
        tokens = backend.to_numpy(xp.stack(sampled))  # [steps, sequences]: the run's one wait for the GPU
        kept = [(seq, len(seq.output_token_ids)) for seq in run.sequences]
        self.scheduler.finish_decode_run(run, tokens)
        return [(seq, token) for step in range(run.num_steps) for (seq, before) in kept
                for token in seq.output_token_ids[before + step:before + step + 1]]

    def _add_requests(self, prompts: Sequence[Sequence[int]],
                      params: SamplingParams | Sequence[SamplingParams] | None) -> list[sequences.Sequence]:
        if isinstance(params, SamplingParams) or params is None:
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"give one SamplingParams or one per prompt: {len(prompts)} prompts, "
                             f"{len(params)} SamplingParams")
        return [self.scheduler.add_request(prompt, param) for prompt, param in zip(prompts, params, strict=True)]


def _output(request_id: int, seq: sequences.Sequence) -> RequestOutput:
    return RequestOutput(request_id, tuple(seq.prompt_token_ids), tuple(seq.output_token_ids),
                         seq.finish_reason or "", seq.num_preemptions)
