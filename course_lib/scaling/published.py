"""Published serving results set beside the cost model's predictions: how far a roofline lands from a tuned engine.

The course's own calibration (``calibration``) checks the model against the course's engine on one H100. That
engine is small and simple; a reader also wants to know how the model fares against a production engine. NVIDIA
publishes the output throughput of its TensorRT-LLM engine on H100 and H200 for a grid of prompt and output
lengths (``TRTLLM_OVERVIEW``): an *offline* run, every request queued at once, the server at its largest batch.

Each published run is predicted with the datasheet figures (``Hardware.datasheet``) and the plain roofline,
with these assumptions, each a fact of the published set-up or a stated guess:

* **FP8 weights** (``weights="float8"``): the runs use NVIDIA's ModelOpt FP8 checkpoints, whose linear layers
  hold FP8 weights and run FP8 GEMMs.
* **FP8 keys and values** (``kv_cache="float8"``). The model cards speak of the linear layers only; the cache's
  type is set by the checkpoint's quantization config, and the published figures themselves rule out bf16: a
  decode step reads every sequence's whole cache, so its tokens a second can never exceed the HBM bandwidth
  over the bytes of one sequence's cache (``kv_bound_tokens_per_s``), whatever the batch. For Llama 3.1 8B with
  bf16 keys and values at the runs' mean context that bound is about 22,000 tokens a second, below the published
  22,714; with FP8 it is twice that.
* **The batch** is the most sequences of ``prompt + output`` tokens whose keys and values fit in 90 % of the
  GPU's memory beside the weights (``Memory.max_batch``): a scheduler that guarantees no request is ever
  evicted reserves a request's whole length up front. This is the weakest assumption: an engine that holds only
  the tokens a sequence has so far, or gives the cache 95 % of what is free (the document's setting "in many
  cases"), runs a larger batch.
* **Prefill** in steps of at most 8192 tokens (``PREFILL_TOKEN_BUDGET``, the engine's default token budget),
  the decode steps at the mean context, as ``cost.predict`` does.

The error is of the *time* to produce the same tokens, as in ``calibration``: published tokens/s over predicted
tokens/s, minus 1. Negative: the model is too optimistic (it predicts more tokens a second than were measured).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from course_lib.scaling.cost import Assumptions, Layout, mean_decode_context, memory, predict
from course_lib.scaling.hardware import Hardware, Source
from course_lib.scaling.shapes import shape

PREFILL_TOKEN_BUDGET = 8192
TRTLLM_OVERVIEW = Source(
    "NVIDIA TensorRT-LLM documentation, 'Overview' of performance (PyTorch backend): 'Total Output Throughput "
    "(tokens/sec)' of offline runs at maximum load, ModelOpt FP8 checkpoints, H100 SXM 80GB (DGX H100) and H200 "
    "SXM 141GB (DGX H200); tables 'Llama 3.1 8B', 'Llama 3.3 70B', 'Llama 3.1 405B'",
    "https://github.com/NVIDIA/TensorRT-LLM/blob/00f37686aa854010d68bcbd0f4ab000221541ca6/docs/source/performance/"
    "perf-overview.md", "2026-12-07",
    "Llama 3.3 70B has Llama 3.1 70B's shape, so the catalogue's llama-3.1-70b stands for it")


@dataclass(frozen=True)
class PublishedRun:
    """One published offline run: a model on ``tp`` GPUs of one kind, requests of ``prompt`` + ``output`` tokens,
    and the output tokens a second all ``tp`` GPUs made together."""

    model: str  # a name of shapes.MODELS
    gpu: str  # a datasheet key of the hardware catalogue
    tp: int
    prompt: int
    output: int
    output_tokens_per_s: float
    source: Source
    weights: str = "float8"
    kv_cache: str = "float8"

    @property
    def label(self) -> str:
        return f"{self.model} on {self.gpu} TP{self.tp}, {self.prompt} in / {self.output} out"


# Decode-heavy runs (128 prompt tokens, 2048 output) on each model, and one prefill-heavy run (2048 in, 128 out).
PUBLISHED_RUNS = (
    PublishedRun("llama-3.1-8b", "h100-sxm", 1, 128, 2048, 22_714, TRTLLM_OVERVIEW),
    PublishedRun("llama-3.1-8b", "h100-sxm", 1, 2048, 128, 3_450, TRTLLM_OVERVIEW),
    PublishedRun("llama-3.1-70b", "h100-sxm", 2, 128, 2048, 6_651, TRTLLM_OVERVIEW),
    PublishedRun("llama-3.1-70b", "h200", 1, 128, 2048, 4_336, TRTLLM_OVERVIEW),
    PublishedRun("llama-3.1-405b", "h100-sxm", 8, 128, 2048, 4_340, TRTLLM_OVERVIEW),
)


def kv_bound_tokens_per_s(run: PublishedRun, kv_cache: str) -> float:
    """The most output tokens a second ``run``'s GPUs could make if decode read nothing but keys and values of
    type ``kv_cache``: HBM bandwidth of all ``tp`` GPUs over one sequence's cache at the mean decode context."""
    model, hw = shape(run.model), Hardware.datasheet(run.gpu)
    cache_bytes = mean_decode_context(run.prompt, run.output) * model.kv_bytes_per_token(kv_cache)
    return run.tp * hw.require("hbm_bytes_per_s") / cache_bytes  # TP splits the kv heads, and so the cache


def predict_published(run: PublishedRun) -> dict[str, Any]:
    """The model's prediction of ``run`` (module docstring: the assumptions), its error, and the inputs it used."""
    model, hw = shape(run.model), Hardware.datasheet(run.gpu)
    layout, assumptions = Layout.split(run.tp, tp=run.tp), Assumptions(weights=run.weights, kv_cache=run.kv_cache)
    batch = memory(model, hw, layout, assumptions).max_batch(run.prompt + run.output)
    if batch < 1:
        raise ValueError(f"{run.label}: not one sequence fits beside the weights, so the model cannot predict it")
    prediction = predict(model, hw, layout, batch, run.prompt, run.output, assumptions,
                         token_budget=PREFILL_TOKEN_BUDGET)
    predicted = prediction.tokens_per_s_per_gpu * layout.gpus
    return {"label": run.label, "model": run.model, "gpu": run.gpu, "tp": run.tp, "prompt": run.prompt,
            "output": run.output, "weights": run.weights, "kv_cache": run.kv_cache, "batch": batch,
            "tpot_ms": prediction.tpot_s * 1e3, "published_tokens_per_s": run.output_tokens_per_s,
            "predicted_tokens_per_s": predicted, "error": run.output_tokens_per_s / predicted - 1,
            "bf16_kv_bound_tokens_per_s": kv_bound_tokens_per_s(run, "bfloat16"),
            "source": vars(run.source)}


def published_comparison(runs: tuple[PublishedRun, ...] = PUBLISHED_RUNS) -> list[dict[str, Any]]:
    """Every published run with its prediction and error (``predict_published``)."""
    return [predict_published(run) for run in runs]
