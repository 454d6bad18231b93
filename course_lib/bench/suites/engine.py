"""The engine on a 1B-parameter Llama-shaped model (random weights): batch-1 decode against the HBM roofline,
CUDA graphs against eager launches, and serving throughput against Hugging Face transformers (chapter 06, lab 20).

* **decode, batch 1**: the wall time of one decode step (context 512), eager (every kernel launched from
  Python) and replayed from a CUDA graph (``course_lib.engine.graphs``). At batch 1 a step reads every
  weight once, except the embedding table, of which it reads one row: the **roofline** is those bytes
  over the copy bandwidth measured in the same run, of a COPY_BYTES copy (about the bytes a step streams).
  The graphed step also records where its GPU time goes, kernel group by kernel group
  (``kernel_breakdown``), and is timed once more without the one-token matrix-vector products that carry
  the norms, activation and residual adds (``one_token_matvec=False``: cuBLAS and separate kernels, as a
  larger batch runs), which is what that fusion saves.
* **throughput, 64 requests**: 64 prompts of 512 random tokens, each generating 256 tokens (greedy, no
  early stop). The course's engine (continuous batching, CUDA graphs for decode) against transformers'
  ``LlamaForCausalLM.generate`` on the same weights loaded from the same checkpoint (the engine runs up to
  SERVING_DECODE_STEPS decode steps per round trip to the host: multi-step scheduling); output tokens per second
  of wall time, both in the same run: the median of SERVING_RUNS runs after a warm-up run (which compiles
  and fills caches). The engine gets fresh random prompts each run, so its prefix cache has nothing to reuse.

* **time to first token, 4096 tokens**: one prompt of TTFT_PROMPT random tokens through ``LLM.generate`` with one
  output token (the whole prompt in one step: a token budget of TTFT_BUDGET), wall time; the median of
  SERVING_RUNS after a warm-up. Its **compute roofline** is the step's FLOPs (2 x the projections' parameters per
  token, the output projection of the sampled row, causal attention's products) over the bf16 cuBLAS rate
  (``torch.matmul`` at MATMUL_SIZE^3) measured in the same run.
* **serving roofline, 64 requests**: ``course_lib.bench.serving_roofline``: for every step the workload needs
  (the prompts in steps of SERVING_TOKEN_BUDGET tokens, then one decode step per further output token), the
  larger of its bytes over the copy bandwidth and its FLOPs over the cuBLAS rate, summed. The engine's time
  is measured against that sum. One more run of the workload records where its time goes
  (``course_lib.bench.phase_timer``): scheduling, the model on prefill steps, decode runs (their launches, up to
  the end of their GPU work, and their recording on the host), sampling and the scheduler's update, each call
  ended by a device synchronisation (which also stops the next run from starting while one is recorded).

* **SmolLM2-135M-Instruct**, the course's real model (its GGUF, dequantized to bf16): the batch-1 decode step
  replayed from a CUDA graph, and end to end, 64 chat requests through ``LLM.chat`` (chat template,
  tokenizer, continuous batching, stopping at the model's end-of-sequence token, detokenized text), output
  tokens per second of wall time; the median of SERVING_RUNS runs after a warm-up, every question numbered
  (``chat_question``) so that only the shared system prompt can come from the prefix cache.

The model runs in bfloat16 (the transformers baseline too). In CPU mode the suite times the tiny model's
steps: a smoke test, never shown as GPU figures.
"""

from __future__ import annotations

import functools
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from course_lib import backend
from course_lib.bench.baselines import copy_bandwidth, require_torch
from course_lib.bench.phase_timer import PhaseTimer
from course_lib.bench.runner import Step, measurement
from course_lib.bench.serving_roofline import roofline_seconds, step_cost, workload_steps
from course_lib.bench.suites.env import torch_bf16_matmul_rate
from course_lib.bench.timing import Timing
from course_lib.checkpoint.config import LLAMA_1B_SHAPED, TINY, ModelConfig
from course_lib.checkpoint.gguf import GGUFCheckpoint, load_gguf
from course_lib.checkpoint.tokenizer import Tokenizer
from course_lib.checkpoint.weights import random_weights, save_checkpoint
from course_lib.engine.batch import StepBatch
from course_lib.engine.graphs import DecodeGraphs
from course_lib.engine.llm import LLM
from course_lib.engine.model import AttentionMetadata, KVCache, LlamaModel
from course_lib.engine.sampling import SamplingParams
from course_lib.kernels.kv_blocks import blocks_for

DESCRIPTION = "engine: batch-1 decode vs the HBM roofline, CUDA graph speedup, throughput vs transformers"
DTYPE = "bfloat16"
BLOCK_SIZE = 16
DECODE_CONTEXT, DECODE_REPEATS = 512, 50  # the batch-1 step's context, and the steps timed in a row
REQUESTS, PROMPT, OUTPUT = 64, 512, 256
# The roofline's copy: 1 GiB each way, about the bytes a decode step streams (an H100 copies smaller buffers
# faster, so the suite also records a 256 MiB copy, for comparison only).
COPY_BYTES, REFERENCE_COPY_BYTES = 1 << 30, 256 << 20
LAUNCHES, REPEATS = 1000, 10  # empty-kernel launches per timed call, and timed calls
ROUNDS = 7  # a wall-clock figure is the median of this many rounds of calls in a row (the host is noisy)
# Kernel-name fragments of each part of a decode step (kernel_breakdown); anything else counts as "other".
KERNEL_GROUPS = (("projections", ("nvjet", "gemm", "cublas", "matvec")), ("attention", ("paged_attention",)),
                 ("norms", ("rms_norm",)), ("rotary_cache_write", ("rope_write_kv",)), ("activation", ("silu_mul",)))
SERVING_DECODE_STEPS = 16  # the engine's decode steps per round trip to the host while every request decodes
SERVING_TOKEN_BUDGET = 16384  # max_num_batched_tokens: 32 prompts of 512 tokens prefilled per step
TTFT_PROMPT, TTFT_BUDGET = 4096, 8192  # the time-to-first-token prompt, and a budget that takes it in one step
MATMUL_SIZE = 8192  # the cuBLAS rate of the compute rooflines: a bf16 MATMUL_SIZE^3 product
# Where a serving run's time goes: (the part of the LLM, "" for the LLM itself; its method; the phase it counts to)
SERVING_PHASES = (("scheduler", "schedule", "scheduling"), ("scheduler", "schedule_decode_run", "scheduling"),
                  ("", "_run_model", "model_prefill_steps"), ("", "_launch_run", "decode_runs_gpu"),
                  ("", "_record_run", "decode_runs_recording"), ("", "_sample", "sampling"),
                  ("scheduler", "update", "scheduler_update"))
SERVING_RUNS = 3  # timed runs of each server after its warm-up: the figure is their median (the host is noisy)
CHAT_REQUESTS, CHAT_MAX_TOKENS = 64, 256  # SmolLM2 serving: chat requests, and the most tokens an answer may take
CHAT_TOPICS = ("the moon", "volcanoes", "honey bees", "the printing press", "photosynthesis", "the Roman empire",
               "black holes", "coffee", "the internet", "glaciers", "chess", "vaccines", "the violin", "tides",
               "penguins", "electricity")
CHAT_ASKS = ("Tell me three facts about {}.", "Explain {} to a ten-year-old.", "Write a short poem about {}.",
             "What is the most surprising thing about {}?")
PARAMETERS = {"model": "LLAMA_1B_SHAPED (random weights); SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)",
              "dtype": DTYPE, "block_size": BLOCK_SIZE,
              "decode_context": DECODE_CONTEXT, "requests": REQUESTS, "prompt": PROMPT, "output": OUTPUT,
              "ttft_prompt": TTFT_PROMPT, "ttft_budget": TTFT_BUDGET, "serving_token_budget": SERVING_TOKEN_BUDGET,
              "serving_roofline": "sum over the workload's steps of max(bytes / copy GB/s, FLOPs / cuBLAS bf16 rate)",
              "timing": "wall clock, device synchronised at the end"}


def steps(quick: bool) -> list[Step]:
    if not backend.has_gpu():
        return [Step("tiny model decode step (NumPy)", functools.partial(measure_decode, TINY, "eager", 5)),
                Step("tiny model serving 4 requests (NumPy)", functools.partial(measure_engine, TINY, 4, 16, 8))]
    require_torch("the engine suite's transformers baseline")
    requests, output = (8, 32) if quick else (REQUESTS, OUTPUT)
    return [Step("copy bandwidth", measure_copy),
            Step(f"copy bandwidth, {REFERENCE_COPY_BYTES >> 20} MiB", functools.partial(measure_copy,
                                                                                  REFERENCE_COPY_BYTES)),
            Step("empty kernel launches, eager", functools.partial(measure_launch, "eager")),
            Step("empty kernel launches, CUDA graph", functools.partial(measure_launch, "graph")),
            Step("decode batch 1, eager", functools.partial(measure_decode, LLAMA_1B_SHAPED, "eager", DECODE_REPEATS)),
            Step("decode batch 1, CUDA graph", functools.partial(measure_decode, LLAMA_1B_SHAPED, "graph",
                                                                 DECODE_REPEATS)),
            Step("decode batch 1, CUDA graph, unfused", functools.partial(
                measure_decode, LLAMA_1B_SHAPED, "graph", DECODE_REPEATS, one_token_matvec=False)),
            Step(f"matmul bf16 {MATMUL_SIZE}^3 (cuBLAS)", measure_matmul),
            Step(f"time to first token, {TTFT_PROMPT} tokens", functools.partial(measure_ttft, LLAMA_1B_SHAPED,
                                                                                   TTFT_PROMPT)),
            Step(f"engine serving {requests} requests", functools.partial(measure_engine, LLAMA_1B_SHAPED, requests,
                                                                           PROMPT, output)),
            Step(f"engine serving {requests} requests, where the time goes", functools.partial(
                measure_engine, LLAMA_1B_SHAPED, requests, PROMPT, output, breakdown=True)),
            Step(f"transformers generate, {requests} requests", functools.partial(measure_transformers, requests,
                                                                                   output)),
            Step("SmolLM2 decode batch 1, CUDA graph", functools.partial(measure_decode, "smollm2", "graph",
                                                                         DECODE_REPEATS)),
            Step(f"SmolLM2 serving {CHAT_REQUESTS} chat requests", functools.partial(
                measure_chat, 8 if quick else CHAT_REQUESTS, 32 if quick else CHAT_MAX_TOKENS))]


@functools.cache
def host_weights(config: ModelConfig) -> dict[str, np.ndarray]:
    return random_weights(config, seed=0, dtype=DTYPE)


@functools.cache
def smollm2() -> GGUFCheckpoint:
    """SmolLM2's GGUF (fetched once into the model cache), read and dequantized to DTYPE once a run."""
    from course_lib import models

    return load_gguf(models.fetch("smollm2", progress=False), dtype=DTYPE)


def model_weights(model: ModelConfig | str) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """A config's random weights, or ``"smollm2"``'s real ones."""
    if model == "smollm2":
        return smollm2().config, smollm2().weights
    return model, host_weights(model)


def decode_bytes(weights: dict[str, Any], config: ModelConfig, context: int) -> int:
    """Bytes one batch-1 decode step must read: every weight and the keys and values of its context in every
    layer. Of an untied embedding table it reads one row; a tied one is read whole, as the output projection."""
    item = weights["model.embed_tokens.weight"].itemsize
    embedding = 0 if config.tie_word_embeddings else int(weights["model.embed_tokens.weight"].nbytes)
    kv = 2 * context * config.num_layers * config.num_kv_heads * config.head_dim * item
    return sum(int(w.nbytes) for w in weights.values()) - embedding + config.hidden_size * item + kv


def measure_copy(nbytes: int = COPY_BYTES) -> dict[str, Any]:
    """The copy bandwidth; any size but COPY_BYTES is recorded as a reference, not as the roofline's copy."""
    result = copy_bandwidth(nbytes)
    if nbytes != COPY_BYTES:
        result["label"], result["parameters"]["role"] = f"copy {nbytes >> 20} MiB", "copy reference"
    return result


def measure_launch(how: str, launches: int = LAUNCHES) -> dict[str, Any]:
    """Wall time per launch of a kernel that does nothing: the host's cost of a launch, eager or in a graph."""
    cupy = backend.xp
    kernel = cupy.RawKernel('extern "C" __global__ void empty() {}', "empty")
    if how == "graph":
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            kernel((1,), (1,), ())
            stream.begin_capture()
            for _ in range(launches):
                kernel((1,), (1,), ())
            graph = stream.end_capture()
            timing = _wall(lambda: graph.launch(stream), REPEATS)  # in the block: synchronize() waits for stream
    else:
        def eager() -> None:
            for _ in range(launches):
                kernel((1,), (1,), ())
        timing = _wall(eager, REPEATS)
    per_launch = timing.median_s / launches
    return measurement(f"empty kernel launches, {how}", timing, {"role": f"launch {how}", "launches": launches},
                       us_per_launch=per_launch * 1e6)


def _wall(run: Callable[[], Any], repeats: int, rounds: int = ROUNDS) -> Timing:
    """Seconds per call of ``run``: ``rounds`` rounds of ``repeats`` calls in a row, each timed with the device
    synchronised at its end; the Timing's samples are the rounds' means."""
    run()
    backend.synchronize()
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        backend.synchronize()
        seconds.append((time.perf_counter() - start) / repeats)
    return Timing.from_samples(np.array(seconds), "perf_counter")


def measure_decode(source: ModelConfig | str, how: str, repeats: int, one_token_matvec: bool = True) -> dict[str, Any]:
    """One decode step at batch 1 over a context of DECODE_CONTEXT tokens, eager or replayed from a graph.

    ``source``: a config (random weights) or ``"smollm2"``. ``one_token_matvec=False`` runs the step as a batch of
    any size would (cuBLAS products, separate norm and activation kernels) instead of the fused matrix-vector
    products: what the fusion saves.
    """
    config, weights = model_weights(source)
    model = LlamaModel(config, weights, DTYPE if backend.has_gpu() else "float32", one_token_matvec=one_token_matvec)
    blocks = blocks_for(DECODE_CONTEXT + 1, BLOCK_SIZE)
    cache = KVCache.allocate(config, blocks, BLOCK_SIZE, model.dtype)
    table, context = list(range(blocks)), DECODE_CONTEXT
    breakdown = {}
    if how == "graph":
        graphs = DecodeGraphs(model, cache, batch_sizes=(1,), max_context_len=blocks * BLOCK_SIZE)
        def replay() -> Any:  # what an engine step does on the host too: build the step's record, check it
            step = StepBatch.build([(1, context, table)], BLOCK_SIZE, [1])
            step.check(cache.num_blocks, config.vocab_size)
            return graphs.run(step)
        try:
            timing = _wall(replay, repeats)
            nodes = {"graph_nodes": graphs.steps[1].num_nodes}
            breakdown = kernel_breakdown(replay, repeats)
        finally:
            graphs.close()
    else:
        def eager() -> Any:
            attention = AttentionMetadata.build([(1, context, table)], BLOCK_SIZE)
            return model.forward(backend.xp.asarray(np.array([1], np.int32)), attention.positions, cache, attention)
        timing = _wall(eager, repeats)
        nodes = {}
    role = (how if model.one_token_matvec else f"{how} unfused") + (" smollm2" if source == "smollm2" else "")
    params = {"role": role, "batch": 1, "context": context, "dtype": model.dtype, "steps_timed": repeats,
              "rounds": timing.repeats, "one_token_matvec": model.one_token_matvec,
              "bytes_read": decode_bytes(weights, config, context), **nodes}
    return measurement(f"decode batch 1, {role}", timing, params, tokens_per_s=1.0 / timing.median_s, **breakdown)


def kernel_breakdown(run: Callable[[], Any], calls: int) -> dict[str, float]:
    """Microseconds of GPU time per call of ``run`` in each group of KERNEL_GROUPS (``us_<group>``).

    torch's profiler reads CUPTI, which records every kernel of the process, CuPy's and cuBLAS's included,
    and each kernel of a replayed graph. Their sum is less than the step's wall time by the gaps between
    kernels: a kernel starts only after the one before it has drained.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        for _ in range(calls):
            run()
        backend.synchronize()
    totals = dict.fromkeys([group for group, _ in KERNEL_GROUPS] + ["other"], 0.0)
    for event in profiler.events():
        if event.device_type.name == "CUDA":
            group = next((group for group, keys in KERNEL_GROUPS if any(key in event.name for key in keys)), "other")
            totals[group] += event.device_time / calls
    return {f"us_{group}": micros for group, micros in totals.items()}


def serving_llm(config: ModelConfig, requests: int, context: int, budget: int) -> LLM:
    """The engine as the serving measurements run it: bf16 on a GPU, CUDA graphs and multi-step decode."""
    gpu = backend.has_gpu()
    return LLM(config, host_weights(config), dtype=DTYPE if gpu else "float32",
               num_blocks=requests * blocks_for(context, BLOCK_SIZE) + 64, block_size=BLOCK_SIZE,
               max_num_seqs=requests, max_num_batched_tokens=budget, max_model_len=context + 1, cuda_graphs=gpu,
               decode_steps=SERVING_DECODE_STEPS)


def _timed_generations(llm: LLM, config: ModelConfig, requests: int, prompt: int, output: int,
                       runs: int = SERVING_RUNS, warmup: bool = True, first_seed: int = 0) -> Timing:
    """Wall seconds of ``llm.generate`` after a warm-up run (as transformers gets one), each run on prompts of its own
    seed from ``first_seed`` on: fresh random tokens, so the prefix cache has nothing from an earlier run to reuse."""
    params = SamplingParams(temperature=0.0, max_tokens=output, ignore_eos=True)
    seconds = []
    for seed in range(first_seed, first_seed + int(warmup) + runs):
        prompts = _prompts(config, requests, prompt, seed)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        seconds.append(time.perf_counter() - start)
        generated = sum(len(out.output_token_ids) for out in outputs)
        if generated != requests * output:
            raise RuntimeError(f"the engine generated {generated} tokens, expected {requests * output}")
    return Timing.from_samples(np.array(seconds[int(warmup):]), "perf_counter")


def measure_engine(config: ModelConfig, requests: int, prompt: int, output: int,
                   breakdown: bool = False) -> dict[str, Any]:
    """The engine serving ``requests`` prompts at once: output tokens per second of wall time. With ``breakdown``,
    one timed run, then one more with every phase timed to its end on the device (``PhaseTimer``): seconds per
    phase, ``s_other`` the rest of that run (the generate loop itself, detokenizing, copy-on-writes)."""
    budget = max(prompt, SERVING_TOKEN_BUDGET)  # a whole prompt fits in one step
    llm = serving_llm(config, requests, prompt + output, budget)
    phases: dict[str, float] = {}
    try:
        timing = _timed_generations(llm, config, requests, prompt, output, runs=1 if breakdown else SERVING_RUNS)
        if breakdown:
            with PhaseTimer() as timer:
                for part, method, phase in SERVING_PHASES:
                    timer.wrap(getattr(llm, part) if part else llm, method, phase)
                phased = _timed_generations(llm, config, requests, prompt, output, runs=1, warmup=False,
                                            first_seed=2)  # seeds 0 and 1 ran above
            phases = {f"s_{phase}": seconds for phase, seconds in timer.seconds.items()}
            phases["s_other"] = phased.median_s - sum(phases.values())
            phases["s_phased_run"] = phased.median_s
    finally:
        llm.close()
    params = {"role": "engine breakdown" if breakdown else "engine", "requests": requests, "prompt": prompt,
              "output": output, "cuda_graphs": backend.has_gpu(), "decode_steps": SERVING_DECODE_STEPS,
              "max_num_batched_tokens": budget}
    label = f"engine {requests} requests" + (", phases timed" if breakdown else "")
    return measurement(label, timing, params, tokens_per_s=requests * output / timing.median_s, **phases)


def measure_ttft(config: ModelConfig, prompt: int) -> dict[str, Any]:
    """Time to first token of one ``prompt``-token prompt, taken in one step; with the step's FLOPs for the roofline."""
    llm = serving_llm(config, 1, prompt + 1, max(prompt, TTFT_BUDGET))
    try:
        timing = _timed_generations(llm, config, 1, prompt, 1)
    finally:
        llm.close()
    flops = step_cost(config, 2, [(prompt, prompt)]).flops
    params = {"role": "ttft", "prompt": prompt, "max_num_batched_tokens": max(prompt, TTFT_BUDGET), "flops": flops}
    return measurement(f"time to first token, {prompt} tokens", timing, params, ms=timing.median_s * 1e3)


def measure_matmul() -> dict[str, Any]:
    """The bf16 cuBLAS rate of the compute rooflines (``torch.matmul``), measured in this run."""
    result = torch_bf16_matmul_rate(MATMUL_SIZE)
    result["parameters"]["role"] = "cublas"
    return result


def measure_chat(requests: int, max_tokens: int) -> dict[str, Any]:
    """SmolLM2 answering ``requests`` chat questions at once, end to end: text in, text out, greedy, stopping at
    its end-of-sequence token (or ``max_tokens``); output tokens per second of wall time."""
    checkpoint = smollm2()
    llm = LLM(checkpoint.config, checkpoint.weights, tokenizer=Tokenizer.from_gguf_metadata(checkpoint.metadata),
              dtype=DTYPE, num_blocks=requests * blocks_for(128 + max_tokens, BLOCK_SIZE) + 64, block_size=BLOCK_SIZE,
              max_num_seqs=requests, max_num_batched_tokens=SERVING_TOKEN_BUDGET, cuda_graphs=backend.has_gpu(),
              decode_steps=SERVING_DECODE_STEPS)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    seconds, generated, stopped = [], [], []
    try:
        for run in range(SERVING_RUNS + 1):  # run 0 is the warm-up
            conversations = [[{"role": "user", "content": chat_question(run, i)}] for i in range(requests)]
            start = time.perf_counter()
            outputs = llm.chat(conversations, params)
            seconds.append(time.perf_counter() - start)
            generated.append(sum(len(out.output_token_ids) for out in outputs))
            stopped.append(sum(out.finish_reason == "stop" for out in outputs))
    finally:
        llm.close()
    timing = Timing.from_samples(np.array(seconds[1:]), "perf_counter")
    tokens = float(np.median(generated[1:]))
    params = {"role": "smollm2 chat", "requests": requests, "max_tokens": max_tokens, "dtype": DTYPE,
              "cuda_graphs": backend.has_gpu(), "decode_steps": SERVING_DECODE_STEPS,
              "generated_tokens_per_run": generated[1:],
              "answers_ended_by_eos_per_run": stopped[1:], "sample_question": conversations[0][0]["content"],
              "sample_answer": outputs[0].text}
    return measurement(f"SmolLM2 {requests} chat requests", timing, params, tokens_per_s=tokens / timing.median_s)


def chat_question(run: int, request: int) -> str:
    """Request ``request``'s question in run ``run``: numbered, so that no two requests of the suite share more of
    their prompt than the chat template's system message (the prefix cache can reuse only that)."""
    ask = CHAT_ASKS[request % len(CHAT_ASKS)].format(CHAT_TOPICS[request // len(CHAT_ASKS) % len(CHAT_TOPICS)])
    return f"Question {run * 1000 + request}. {ask}"


def _prompts(config: ModelConfig, requests: int, prompt: int, seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(rng.integers(0, config.vocab_size, prompt)) for _ in range(requests)]


def measure_transformers(requests: int, output: int) -> dict[str, Any]:
    """transformers' ``generate`` on the same checkpoint: the same prompts, greedy, exactly ``output`` new tokens."""
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(folder, LLAMA_1B_SHAPED, host_weights(LLAMA_1B_SHAPED))
        model = transformers.LlamaForCausalLM.from_pretrained(folder).to("cuda", torch.bfloat16).eval()
    prompts = torch.tensor(_prompts(LLAMA_1B_SHAPED, requests, PROMPT), device="cuda")
    mask = torch.ones_like(prompts)

    def generate() -> Any:
        with torch.no_grad():
            return model.generate(prompts, attention_mask=mask, max_new_tokens=output, min_new_tokens=output,
                                  do_sample=False, pad_token_id=0)

    seconds = []
    for _ in range(SERVING_RUNS + 1):  # run 0 is the warm-up: kernels load, the allocator fills
        torch.cuda.synchronize()
        start = time.perf_counter()
        tokens = generate()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    timing = Timing.from_samples(np.array(seconds[1:]), "perf_counter")
    generated = (tokens.shape[1] - PROMPT) * requests
    params = {"role": "transformers", "requests": requests, "prompt": PROMPT, "output": output,
              "library": f"transformers {transformers.__version__}, torch {torch.__version__}"}
    return measurement(f"transformers {requests} requests", timing, params, tokens_per_s=generated / timing.median_s)


def headline(measurements: list[dict[str, Any]]) -> dict[str, float]:
    """The figures issue 6 names, and what the one-token fusion saves, from whichever measurements the run holds."""
    found = {"copy" if m["label"] == "copy" else m["parameters"].get("role"): m for m in measurements}
    figures = {}
    copy, eager, graph = found.get("copy"), found.get("eager"), found.get("graph")
    if graph and copy:
        roofline_s = graph["parameters"]["bytes_read"] / (copy["derived"]["gbps"] * 1e9)
        figures["decode_b1_vs_roofline"] = roofline_s / graph["timing"]["median_s"]
    if graph and eager:
        figures["graph_speedup_b1"] = eager["timing"]["median_s"] / graph["timing"]["median_s"]
    if graph and (unfused := found.get("graph unfused")):
        figures["matvec_fusion_speedup_b1"] = unfused["timing"]["median_s"] / graph["timing"]["median_s"]
    engine, baseline, cublas = found.get("engine"), found.get("transformers"), found.get("cublas")
    if engine and baseline:
        figures[f"throughput_vs_transformers_b{engine['parameters']['requests']}"] = (
            engine["derived"]["tokens_per_s"] / baseline["derived"]["tokens_per_s"])
    if (ttft := found.get("ttft")) and cublas:
        roofline_s = ttft["parameters"]["flops"] / (cublas["derived"]["tflops"] * 1e12)
        figures[f"ttft_{ttft['parameters']['prompt']}_vs_roofline"] = roofline_s / ttft["timing"]["median_s"]
    if engine and cublas and copy:
        p = engine["parameters"]
        steps = workload_steps(LLAMA_1B_SHAPED, 2, p["requests"], p["prompt"], p["output"], p["max_num_batched_tokens"])
        roofline_s = roofline_seconds(steps, copy["derived"]["gbps"], cublas["derived"]["tflops"])
        figures[f"serving_vs_roofline_b{p['requests']}"] = roofline_s / engine["timing"]["median_s"]
    if small := found.get("graph smollm2"):
        figures["smollm2_decode_b1_tokens_per_s"] = small["derived"]["tokens_per_s"]
    if chat := found.get("smollm2 chat"):
        figures[f"smollm2_chat_b{chat['parameters']['requests']}_tokens_per_s"] = chat["derived"]["tokens_per_s"]
    return figures
