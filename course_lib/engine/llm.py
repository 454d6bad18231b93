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

A prompt is text or a list of token ids. Text needs a tokenizer: a real model brings its own
(``LLM.from_pretrained("smollm2")``, ``from_gguf``, ``from_checkpoint``), the random-weight models of the
tests have none. ``chat`` lays a conversation out in the model's chat template first. Outputs carry the
decoded text, and log-probabilities when ``SamplingParams`` asks for them. A request that can never run
(an empty prompt, one longer than the model's context, one that could never fit the KV pool) comes back
finished with ``finish_reason`` ``"error: ..."``; the other requests are unaffected.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from course_lib import backend
from course_lib.checkpoint.config import TINY, ModelConfig
from course_lib.checkpoint.gguf import load_gguf
from course_lib.checkpoint.tokenizer import TOKENIZER_FILE, Tokenizer
from course_lib.checkpoint.weights import load_checkpoint, random_weights
from course_lib.distributed import Communicator
from course_lib.engine import sequence as sequences
from course_lib.engine.block_pool import BlockPool
from course_lib.engine.logprobs import top_logprobs
from course_lib.engine.model import KVCache, LlamaModel
from course_lib.engine.runner import ModelRunner
from course_lib.engine.sampling import SamplingParams, greedy_tokens, sample
from course_lib.engine.scheduler import DecodeRun, Scheduler, SchedulerOutput
from course_lib.engine.stats import EngineStats

Prompt = str | Sequence[int]  # text (encoded by the model's tokenizer) or token ids
Messages = Sequence[dict[str, str]]  # a conversation: [{"role": "user", "content": "..."}, ...]
TokenLogprobs = dict[int, float]  # token id -> log-probability: the k likeliest and the chosen one


@dataclass(frozen=True)
class RequestOutput:
    """A finished request: its prompt, the tokens generated, and why it stopped.

    ``text`` is the output decoded without special tokens (``None`` for a model without a tokenizer).
    ``logprobs`` has one dict per output token and ``prompt_logprobs`` one per prompt token, ``None`` for the
    first, which nothing predicts; each is ``None`` unless the request's ``SamplingParams`` asked for it.
    """

    request_id: int
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    finish_reason: str  # "length", "stop", or "error: <why>" for a request that could not run
    num_preemptions: int  # times the scheduler evicted it and recomputed its KV (the outputs do not change)
    text: str | None = None
    logprobs: tuple[TokenLogprobs, ...] | None = None
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None


@dataclass(frozen=True)
class TokenEvent:
    """One generated token, as the stream hands it out, with the text it completes ("" if none yet)."""

    request_id: int
    token_id: int
    finished: bool
    text: str = ""
    logprobs: TokenLogprobs | None = None  # when the request's SamplingParams ask for them


@dataclass(frozen=True)
class _LaunchedRun:
    """A decode run whose steps are launched: per step, the sampled tokens and whether every logit row was finite,
    on the device, not yet read."""

    run: DecodeRun
    sampled: list[Any]
    finite: list[Any]


class LLM:
    """A small paged-attention engine: a Llama model, a KV-cache block pool, a scheduler and a sampler.

    ``weights`` default to random ones drawn from ``seed``; ``LLM.from_checkpoint`` loads a Hugging Face-style
    directory. ``num_blocks`` x ``block_size`` is the KV cache in tokens; ``max_num_batched_tokens`` the
    token budget of a step; ``max_num_seqs`` how many sequences run at once. With ``cuda_graphs`` (GPU
    only) steps that only decode replay a CUDA graph captured for their batch size (``engine.graphs``).
    With ``decode_steps`` > 1, while every running request decodes greedily and no waiting one could join, it runs
    up to that many decode steps at a time, the GPU feeding each step's arg-max to the next
    (``Scheduler.schedule_decode_run``); the tokens are the same, and the host waits for the GPU once a run.
    While such runs follow one another, the next is launched before the host reads the last one's tokens, so the
    GPU computes while the host records (asynchronous scheduling).

    With ``comm`` (``course_lib.distributed``) of several ranks the model is split over them (tensor
    parallelism, ``engine.tensor_parallel``): every rank builds the same ``LLM``; rank 0 runs the engine loop
    (``generate``, ``stream``, ``step``) and ``close``, the others call ``run_worker``.
    """

    def __init__(self, config: ModelConfig = TINY, weights: dict | None = None, *, seed: int = 0,
                 dtype: str = "float32", num_blocks: int = 256, block_size: int = 16,
                 max_num_batched_tokens: int = 512, max_num_seqs: int = 64, max_model_len: int | None = None,
                 tokenizer: Tokenizer | None = None, eos_token_ids: Iterable[int] | None = None,
                 cuda_graphs: bool = False, decode_steps: int = 1, comm: Communicator | None = None) -> None:
        if decode_steps < 1:
            raise ValueError(f"decode_steps must be >= 1 (1: a round trip to the host every step), got {decode_steps}")
        if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model's embedding only "
                             f"{config.vocab_size}: they are not from the same model")
        self.decode_steps = decode_steps
        self.tokenizer = tokenizer
        if eos_token_ids is None:  # the model's own end-of-sequence tokens, when its tokenizer names them
            eos_token_ids = tokenizer.eos_token_ids if tokenizer else ()
        weights = random_weights(config, seed, dtype) if weights is None else weights
        self.config = config
        self.model = LlamaModel(config, weights, dtype, comm=comm)
        self.kv_cache = KVCache.allocate(self.model.shard_config, num_blocks, block_size, dtype)  # this rank's heads
        self.block_pool = BlockPool(num_blocks, block_size)
        self.stats = EngineStats(block_size=block_size)
        self.scheduler = Scheduler(self.block_pool, max_num_batched_tokens, max_num_seqs,
                                   max_model_len or config.max_position_embeddings, eos_token_ids)
        self.runner = ModelRunner(self.model, self.kv_cache, cuda_graphs=cuda_graphs, max_num_seqs=max_num_seqs,
                                  max_model_len=self.scheduler.max_model_len)
        self._run_in_flight: _LaunchedRun | None = None  # a decode run launched and not yet recorded

    @classmethod
    def from_checkpoint(cls, directory: str | Path, **options: object) -> LLM:
        """An engine on the weights of a ``config.json`` + ``*.safetensors`` directory (and its tokenizer, if it
        has a ``tokenizer.json``)."""
        config, weights = load_checkpoint(directory)
        if "tokenizer" not in options and (Path(directory) / TOKENIZER_FILE).is_file():
            options["tokenizer"] = Tokenizer.from_pretrained_dir(directory)
        return cls(config, weights, **options)

    @classmethod
    def from_gguf(cls, path: str | Path, **options: object) -> LLM:
        """An engine on a GGUF file: config, dequantized weights and tokenizer all come from the one file."""
        checkpoint = load_gguf(path)
        if "tokenizer" not in options:
            options["tokenizer"] = Tokenizer.from_gguf_metadata(checkpoint.metadata, source=str(path))
        return cls(checkpoint.config, checkpoint.weights, **options)

    @classmethod
    def from_pretrained(cls, model: str | Path, **options: object) -> LLM:
        """An engine on a course model by name (``"smollm2"``, fetched once), a ``.gguf`` file or a checkpoint
        folder."""
        from course_lib import models  # the registry of downloadable models; only this entry point needs it

        if str(model) in models.MODELS:
            return cls.from_gguf(models.fetch(str(model)), **options)
        path = Path(model)
        if path.is_dir():
            return cls.from_checkpoint(path, **options)
        if path.suffix == ".gguf":
            return cls.from_gguf(path, **options)
        raise ValueError(f"{model!r} is neither a course model ({', '.join(models.MODELS)}), a .gguf file nor a "
                         f"checkpoint folder")

    def close(self) -> None:
        """Release the CUDA graphs (if any) now, and under tensor parallelism let the other ranks' workers return;
        the engine then runs eager steps only."""
        self.runner.close()

    def run_worker(self) -> None:
        """On ranks 1 and up of a tensor-parallel engine: run the steps rank 0 sends until rank 0 calls ``close``."""
        self.runner.run_worker()

    def generate(self, prompts: str | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run every prompt (one text, or a list of prompts, each text or token ids) to completion, batched
        continuously; outputs in the order of ``prompts``."""
        requests = self._add_requests(prompts, params)
        while self.scheduler.has_unfinished():
            self.step()
        return [self._output(index, seq) for index, seq in enumerate(requests)]

    def stream(self, prompts: str | Sequence[Prompt],
               params: SamplingParams | Sequence[SamplingParams] | None = None) -> Iterator[TokenEvent]:
        """The same work as :meth:`generate`, handing out each token as soon as a step samples it.

        With a tokenizer each event carries the text its token completes: a character split over two tokens
        arrives whole with the second (``IncrementalDetokenizer``); special tokens such as ``<|im_end|>`` add
        no text.
        """
        requests = self._add_requests(prompts, params)
        request_of = {seq.seq_id: index for index, seq in enumerate(requests)}
        detokenizers = {seq.seq_id: self.tokenizer.detokenizer() for seq in requests} if self.tokenizer else {}
        emitted = dict.fromkeys(request_of, 0)  # tokens handed out so far, per request
        while self.scheduler.has_unfinished():
            sampled = self.step()
            last = {seq.seq_id: index for index, (seq, _) in enumerate(sampled)}  # a run samples several each
            for index, (seq, token) in enumerate(sampled):
                finished = seq.is_finished and last[seq.seq_id] == index
                detokenizer = detokenizers.get(seq.seq_id)
                text = detokenizer.push(token) + (detokenizer.flush() if finished else "") if detokenizer else ""
                logprobs = seq.logprobs[emitted[seq.seq_id]] if seq.sampling_params.logprobs is not None else None
                emitted[seq.seq_id] += 1
                yield TokenEvent(request_of[seq.seq_id], token, finished, text, logprobs)

    def chat(self, conversations: Messages | Sequence[Messages],
             params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Answer one conversation or several: each is laid out by the model's chat template, then generated."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self.generate([self.chat_prompt(messages) for messages in conversations], params)

    def chat_prompt(self, messages: Messages) -> list[int]:
        """A conversation as the token ids the model was fine-tuned on, ending where the assistant's reply begins.

        The template writes any special tokens itself, so the tokenizer adds none.
        """
        text = self.require_tokenizer("chat prompts").apply_chat_template(list(messages), add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def step(self) -> list[tuple[sequences.Sequence, int]]:
        """One engine step, or a run of decode steps; returns the (sequence, token) pairs sampled, in order."""
        if self._run_in_flight is not None:
            return self._record_run_in_flight()
        if self.decode_steps > 1 and all(_only_arg_max(seq.sampling_params) for seq in self.scheduler.running):
            run = self.scheduler.schedule_decode_run(self.decode_steps)
            if run is not None:
                self._run_in_flight = self._launch_run(run)
                return self._record_run_in_flight()
        plan = self.scheduler.schedule()                                      # 1. schedule
        if not plan.scheduled:
            raise RuntimeError("the scheduler found nothing it could run: the KV pool is too small for the "
                               "waiting requests even after preempting every running one")
        self.runner.copy_blocks(plan.block_copies)                            # 2. copy-on-write
        logits = self._run_model(plan)                                        # 3. run the model
        sampling, rows = plan.sampling_sequences, [row for row, step in enumerate(plan.scheduled) if step.samples]
        tokens = self._sample(sampling, logits, rows)                         # 4. sample
        self.stats.record_plan(plan, len(tokens), self._blocks_in_use())
        self.scheduler.update(plan, tokens)                                   # 5. update
        return [(seq, int(token)) for seq, token in zip(sampling, tokens, strict=True)]

    def _run_model(self, plan: SchedulerOutput) -> Any:
        """The logits of each scheduled sequence's last new token; prompt tokens that asked to be scored get their
        log-probabilities recorded on the way (their rows are projected too, then dropped)."""
        scored = _prompt_rows(plan)
        if not scored:
            return self.runner.run(plan.batch)
        last_rows = plan.batch.last_rows.tolist()
        rows = sorted(set(last_rows) | set(scored))
        logits = self.runner.run(plan.batch, rows)
        at = {row: index for index, row in enumerate(rows)}
        _record_prompt_logprobs(scored, backend.to_numpy(logits[[at[row] for row in scored]]))
        return logits[[at[row] for row in last_rows]]

    def _sample(self, sampling: Sequence[sequences.Sequence], logits: Any, rows: list[int]) -> np.ndarray:
        """The next token of each sampling sequence, from its row of ``logits`` (and its log-probabilities)."""
        params = [seq.sampling_params for seq in sampling]
        if not rows:
            tokens = np.empty(0, dtype=np.int64)
        elif all(p.is_greedy for p in params):  # only the arg-maxes cross to the host
            tokens = greedy_tokens(logits if len(rows) == logits.shape[0] else logits[rows])
        else:
            tokens = sample(backend.to_numpy(logits[rows]), params, [seq.generator for seq in sampling])
        _record_logprobs(sampling, logits, rows, tokens)
        return tokens

    def _blocks_in_use(self) -> int:
        return self.block_pool.num_blocks - self.block_pool.num_free_blocks

    def _launch_run(self, run: DecodeRun, fed: Any = None) -> _LaunchedRun:
        """Launch the run's steps back to back, each fed the arg-max of the step before on the GPU (step 0: ``fed``,
        the last tokens of the run before, or the host's tokens when None); nothing waits for the GPU."""
        xp = backend.xp
        self.runner.copy_blocks(run.block_copies)
        token_ids, sampled, finite = fed, [], []
        for step in range(run.num_steps):
            logits = self.runner.run(run.batch(step), token_ids=token_ids)
            token_ids = xp.argmax(logits, axis=1).astype(xp.int32)  # ties: the lower id, as greedy_tokens
            sampled.append(token_ids)
            finite.append(xp.isfinite(logits.max(axis=1)).all())
        return _LaunchedRun(run, sampled, finite)

    def _record_run_in_flight(self) -> list[tuple[sequences.Sequence, int]]:
        """Launch the run that follows the one in flight, if the scheduler plans one; then read and record the
        run in flight: the host's one wait for the GPU, while the GPU already computes the following run."""
        launched, self._run_in_flight = self._run_in_flight, None
        following = self.scheduler.schedule_decode_run(self.decode_steps, after=launched.run)
        if following is not None:
            self._run_in_flight = self._launch_run(following, fed=launched.sampled[-1])
        return self._record_run(launched)

    def _record_run(self, launched: _LaunchedRun) -> list[tuple[sequences.Sequence, int]]:
        """Read a launched run's tokens to the host (waiting for its GPU work) and record them."""
        xp, run = backend.xp, launched.run
        if not bool(xp.stack(launched.finite).all()):
            raise ValueError("logits must be finite or -inf (a masked token), with at least one finite value per row")
        tokens = backend.to_numpy(xp.stack(launched.sampled))  # [steps, sequences]
        kept = [(seq, len(seq.output_token_ids)) for seq in run.sequences]
        used_blocks = self._blocks_in_use()  # before finished sequences give theirs back
        self.scheduler.finish_decode_run(run, tokens)
        self.stats.record_run(run.num_steps, len(run.sequences),
                              sum(len(seq.output_token_ids) - before for seq, before in kept), used_blocks)
        return [(seq, token) for step in range(run.num_steps) for (seq, before) in kept
                for token in seq.output_token_ids[before + step:before + step + 1]]

    def _add_requests(self, prompts: str | Sequence[Prompt],
                      params: SamplingParams | Sequence[SamplingParams] | None) -> list[sequences.Sequence]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if prompts and not isinstance(prompts[0], str) and not isinstance(prompts[0], Sequence):
            raise TypeError(f"give a list of prompts, each text or a list of token ids: to generate from the token "
                            f"ids {list(prompts)[:4]}..., pass [[...]]")
        token_lists = [self.require_tokenizer("text prompts").encode(prompt) if isinstance(prompt, str) else prompt
                       for prompt in prompts]
        if isinstance(params, SamplingParams) or params is None:
            params = [params or SamplingParams()] * len(token_lists)
        if len(params) != len(token_lists):
            raise ValueError(f"give one SamplingParams or one per prompt: {len(token_lists)} prompts, "
                             f"{len(params)} SamplingParams")
        return [self.scheduler.add_request(prompt, param) for prompt, param in zip(token_lists, params, strict=True)]

    def require_tokenizer(self, what: str) -> Tokenizer:
        """The model's tokenizer; a ``ValueError`` saying why ``what`` needs one if the model has none."""
        if self.tokenizer is None:
            raise ValueError(f"{what} need a tokenizer, and this model has none (random weights, or a checkpoint "
                             f"without tokenizer.json): give token ids, or load a real model with "
                             f"LLM.from_pretrained")
        return self.tokenizer

    def _output(self, request_id: int, seq: sequences.Sequence) -> RequestOutput:
        params = seq.sampling_params
        return RequestOutput(
            request_id, tuple(seq.prompt_token_ids), tuple(seq.output_token_ids), seq.finish_reason or "",
            seq.num_preemptions,
            text=self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True) if self.tokenizer else None,
            logprobs=tuple(seq.logprobs) if params.logprobs is not None else None,
            prompt_logprobs=tuple(seq.prompt_logprobs) if params.prompt_logprobs is not None else None)


def _only_arg_max(params: SamplingParams) -> bool:
    """A request that needs nothing of its logits but their arg-max (so the GPU may feed it to the next step)."""
    return params.is_greedy and params.logprobs is None


def _prompt_rows(plan: SchedulerOutput) -> dict[int, tuple[sequences.Sequence, int]]:
    """The rows of the step's flat batch whose logits score a prompt token: ``{row: (sequence, position)}``.

    Row ``t`` holds the logits after token ``t``, which score the prompt token at ``t + 1``. Only positions not
    scored yet count: a sequence recomputing its prompt after a preemption already has them.
    """
    scored, offset = {}, 0
    for step in plan.scheduled:
        sequence = step.sequence
        if sequence.sampling_params.prompt_logprobs is not None:
            last = len(sequence.prompt_token_ids) - 1  # the last prompt token scores an output, not the prompt
            for position in range(max(step.first_position, len(sequence.prompt_logprobs) - 1),
                                  min(step.context_len, last)):
                scored[offset + position - step.first_position] = (sequence, position)
        offset += step.num_new_tokens
    return scored


def _record_prompt_logprobs(scored: dict[int, tuple[sequences.Sequence, int]], logits: np.ndarray) -> None:
    """Append each scored prompt token's log-probabilities; ``logits`` has a row per entry of ``scored``."""
    for (sequence, position), row in zip(scored.values(), logits, strict=True):
        chosen = np.array([sequence.prompt_token_ids[position + 1]])
        sequence.prompt_logprobs.extend(top_logprobs(row[None], chosen, sequence.sampling_params.prompt_logprobs))


def _record_logprobs(sampling: Sequence[sequences.Sequence], logits: Any, rows: list[int],
                     tokens: np.ndarray) -> None:
    """Append each sampled token's log-probabilities to the sequences that asked for them (their logits rows
    cross to the host in one copy)."""
    wanted = [index for index, sequence in enumerate(sampling) if sequence.sampling_params.logprobs is not None]
    if not wanted:
        return
    host = backend.to_numpy(logits[[rows[index] for index in wanted]])
    for index, row in zip(wanted, host, strict=True):
        sequence = sampling[index]
        sequence.logprobs.extend(top_logprobs(row[None], tokens[index:index + 1], sequence.sampling_params.logprobs))
