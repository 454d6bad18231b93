"""Kernel timelines of the batch-1 decode step, eager and replayed from a CUDA graph (chapter 06).

The step is the engine suite's: the 1B-parameter Llama shape (random weights, bfloat16), context 512.
``course_lib.bench.timeline.record_timeline`` records TIMELINE_CALLS steps of each kind under CUPTI: the host's
launch calls and the GPU's kernels. Each measurement keeps its records (``records``) for the chapter's figure,
and the time each lane was busy. GPU only: in CPU mode there are no kernels to record.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from course_lib import backend
from course_lib.bench.runner import Step, measurement
from course_lib.bench.suites.engine import BLOCK_SIZE, DECODE_CONTEXT, DTYPE, model_weights
from course_lib.bench.timeline import record_timeline, summary
from course_lib.bench.timing import Timing
from course_lib.checkpoint.config import LLAMA_1B_SHAPED
from course_lib.engine.batch import StepBatch
from course_lib.engine.graphs import DecodeGraphs
from course_lib.engine.model import AttentionMetadata, KVCache, LlamaModel
from course_lib.kernels.kv_blocks import blocks_for

DESCRIPTION = "timeline: CUPTI host-launch and GPU-kernel lanes of the batch-1 decode step, eager and graphed"
TIMELINE_CALLS = 3  # decode steps recorded in a row, after a warm-up step
PARAMETERS = {"model": "LLAMA_1B_SHAPED (random weights)", "dtype": DTYPE, "block_size": BLOCK_SIZE,
              "decode_context": DECODE_CONTEXT, "calls": TIMELINE_CALLS}


def steps(quick: bool) -> list[Step]:
    if not backend.has_gpu():
        raise RuntimeError(f"the timeline suite records GPU kernels with CUPTI: {backend.mode_text()}")
    return [Step(f"decode batch 1 timeline, {how}", functools.partial(measure_timeline, how))
            for how in ("eager", "graph")]


def measure_timeline(how: str) -> dict[str, Any]:
    """Record TIMELINE_CALLS decode steps, launched kernel by kernel (``eager``) or replayed (``graph``)."""
    config, weights = model_weights(LLAMA_1B_SHAPED)
    model = LlamaModel(config, weights, DTYPE)
    blocks = blocks_for(DECODE_CONTEXT + 1, BLOCK_SIZE)
    cache = KVCache.allocate(config, blocks, BLOCK_SIZE, model.dtype)
    table = list(range(blocks))
    graphs = DecodeGraphs(model, cache, batch_sizes=(1,), max_context_len=blocks * BLOCK_SIZE) if how == "graph" \
        else None
    try:
        records = record_timeline(_decode_step(model, cache, table, graphs), calls=TIMELINE_CALLS)
    finally:
        if graphs:
            graphs.close()
    figures = summary(records)
    timing = Timing.from_samples(np.array([figures["span_us"] * 1e-6 / TIMELINE_CALLS]), "cupti")
    result = measurement(f"decode batch 1 timeline, {how}", timing,
                         {"role": f"timeline {how}", "batch": 1, "context": DECODE_CONTEXT, "calls": TIMELINE_CALLS},
                         **figures)
    result["records"] = records
    return result


def _decode_step(model: LlamaModel, cache: KVCache, table: list[int], graphs: DecodeGraphs | None) -> Callable[[], Any]:
    """One decode step as the engine suite times it: eager (metadata built, forward checked) or a graph replay."""
    if graphs is None:
        def eager() -> Any:
            attention = AttentionMetadata.build([(1, DECODE_CONTEXT, table)], BLOCK_SIZE)
            return model.forward(backend.xp.asarray(np.array([1], np.int32)), attention.positions, cache, attention)
        return eager

    def replay() -> Any:
        step = StepBatch.build([(1, DECODE_CONTEXT, table)], BLOCK_SIZE, [1])
        step.check(cache.num_blocks, model.config.vocab_size)
        return graphs.run(step)
    return replay


def headline(measurements: list[dict[str, Any]]) -> dict[str, float]:
    """How busy the GPU was over each recorded step: its kernels' time over the span of the records."""
    return {f"gpu_busy_fraction_{m['parameters']['role'].split()[-1]}": m["derived"]["gpu_busy_us"]
            / m["derived"]["span_us"] for m in measurements if m["derived"]["span_us"] > 0}
