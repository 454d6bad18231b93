"""CUDA graphs for the engine's decode step: capture it once per batch size, then replay it with new inputs.

A decode step of a small model is hundreds of short kernels, and Python takes longer to launch each one
than the GPU takes to run it: the GPU waits on the host. A CUDA graph records the whole step once (stream
capture) and replays it with one call, so the launch cost is paid per step instead of per kernel.

A graph replays exactly what it recorded: the same kernels, grids and *addresses*. So everything a step
reads lives in buffers allocated once: its token ids, positions, slots, block tables and context lengths
are views of one int32 buffer, and a replay first sends the new step's values into it, in one copy from
pinned host memory (a copy from ordinary memory would make the host wait for it). Three consequences
shape this module:

* **one graph per batch size**, captured for ``batch_sizes``; a batch is padded up to the next captured
  size. Padding rows decode token 0 at position 0 through block 0 and write nothing (slot -1), and
  their logits are dropped;
* **grids sized for the longest context**: the graph's paged-attention launch covers ``max_context_len``
  tokens (the partitions past a shorter context return early, and the merge reads the real lengths).
  Every index a replay copies in is checked on the host first, from the scheduler's own lists (no
  device-to-host copy);
* **memory**: inside the capture CuPy allocates the step's temporaries with the stream-ordered
  allocator (``cudaMallocAsync``, CuPy's ``malloc_async``), which turns each into an allocation node of
  the graph. They are freed inside the graph too, and all the graphs are captured and replayed on one
  stream, so CUDA can let the graphs of every batch size share the same physical memory instead of each
  keeping its own. (CuPy's default pool could not do this: it would hand a captured buffer to other code
  once the capture let go of it.) Buffers that outlive a replay, the attention kernels' scratch included,
  are allocated by the warm-up's first layer (``AttentionMetadata.decode_plan``), before the capture, and
  belong to the captured step.

The capture, instantiation and launch use cuda-python's runtime API (``cudaStreamBeginCapture``,
``cudaStreamEndCapture``, ``cudaGraphInstantiate``, ``cudaGraphLaunch``) on a CuPy stream.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from course_lib import backend
from course_lib.engine.batch import StepBatch
from course_lib.engine.model import AttentionMetadata, KVCache, LlamaModel
from course_lib.kernels.kv_blocks import blocks_for

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


INPUTS = ("token_ids", "positions", "slot_mapping", "block_tables", "context_lens")  # what a replay reads


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The captured sizes an engine of ``max_num_seqs`` needs: those of BATCH_SIZES below it, and itself."""
    return sorted({size for size in BATCH_SIZES if size < max_num_seqs} | {max_num_seqs})


def _runtime_call(result: tuple, what: str) -> Any:
    """cuda-python returns (error, value...): raise on an error, hand back the value."""
    from cuda.bindings import runtime

    error, *values = result
    if error != runtime.cudaError_t.cudaSuccess:
        raise RuntimeError(f"{what} failed: {runtime.cudaGetErrorString(error)[1].decode()}")
    return values[0] if values else None


@dataclass
class CapturedStep:
    """One batch size's graph and the buffers it reads and writes (their addresses are in the graph)."""

    batch_size: int
    inputs: Any  # int32: every input of a replay, in the order of INPUTS, in one buffer (one copy a step)
    staging: np.ndarray  # inputs' host twin in pinned memory, so that the copy does not block the host
    token_ids: Any  # [batch_size] int32, a view of inputs
    attention: AttentionMetadata  # its positions, slots, tables and lengths are views of inputs
    logits: Any  # [batch_size, vocab] float32, written by the graph
    graph: Any  # the cudaGraphExec_t
    stream: Any  # the CuPy stream it was captured on and is replayed on
    num_nodes: int  # the operations the capture recorded: kernels, copies, memsets, allocations and frees
    copied: Any = None  # an event after the last copy out of staging: refill it only once that has happened


class DecodeGraphs:
    """The decode step of ``model`` over ``kv_cache``, captured for each of ``batch_sizes``.

    ``run(token_ids, context_lens, block_tables)`` computes the same logits as an eager
    ``model.forward`` over a batch of decode steps: one new token per sequence, the last of its
    ``context_len``, its keys and values written through its block table.
    """

    def __init__(self, model: LlamaModel, kv_cache: KVCache, batch_sizes: Sequence[int] = BATCH_SIZES,
                 max_context_len: int | None = None) -> None:
        if not backend.has_gpu():
            raise RuntimeError(f"CUDA graphs record GPU work: {backend.mode_text()}")
        if not batch_sizes or min(batch_sizes) < 1:
            raise ValueError(f"batch_sizes must be positive integers, got {batch_sizes!r}")
        self.model, self.kv_cache = model, kv_cache
        capacity = kv_cache.num_blocks * kv_cache.block_size
        self.max_context_len = min(max_context_len or capacity, capacity)
        self.max_blocks = int(blocks_for(self.max_context_len, kv_cache.block_size))
        self.stream = backend.xp.cuda.Stream(non_blocking=True)  # one stream: the graphs can share their memory
        self.steps = {size: self._capture(size) for size in sorted(set(batch_sizes))}

    @property
    def batch_sizes(self) -> list[int]:
        return list(self.steps)

    def close(self) -> None:
        """Destroy the executable graphs now, once their last replay is done, rather than leave them to the
        process's exit (where an engine suite that also ran PyTorch aborted). They cannot be replayed afterwards."""
        self.stream.synchronize()
        runtime = _runtime()
        while self.steps:
            _, step = self.steps.popitem()
            _runtime_call(runtime.cudaGraphExecDestroy(step.graph), "cudaGraphExecDestroy")

    def run(self, batch: StepBatch, token_ids: Any = None) -> Any:
        """Logits ``[batch, vocab]`` of a decode-only step by graph replay, padded to the next captured size.

        ``batch`` was checked against the cache and the vocabulary (``StepBatch.check``). Its token ids travel
        with the other inputs, unless ``token_ids`` gives them on the device: the previous step's arg-max in a
        multi-step run.
        """
        if not self.steps:
            raise RuntimeError("these CUDA graphs were closed; capture new ones")
        rows = batch.num_sequences
        if not batch.is_decode or rows > self.batch_sizes[-1]:
            raise ValueError(f"a replay runs a decode step of 1 to {self.batch_sizes[-1]} sequences, one new token "
                             f"each; got {batch.num_tokens} tokens of {rows} sequences")
        if batch.context_lens.max() > self.max_context_len:
            row = int(batch.context_lens.argmax())
            raise ValueError(f"sequence {row}: context_len {batch.context_lens[row]} is over the graphs' capacity, "
                             f"{self.max_context_len} tokens")
        step = self.steps[self.batch_sizes[bisect_left(self.batch_sizes, rows)]]
        xp, runtime = backend.xp, _runtime()
        caller = xp.cuda.get_current_stream()
        step.stream.wait_event(caller.record())  # after whatever the caller queued (cache writes, copies)
        if step.copied is not None:
            step.copied.synchronize()  # the previous replay's inputs have left the staging buffer
        self._fill_staging(step, batch)
        with step.stream:
            step.inputs.set(step.staging)  # one copy, from pinned memory: the host goes on at once
            step.copied = step.stream.record()
            if token_ids is not None:
                step.token_ids[:rows] = token_ids
            _runtime_call(runtime.cudaGraphLaunch(step.graph, runtime.cudaStream_t(step.stream.ptr)),
                          "cudaGraphLaunch")
        caller.wait_event(step.stream.record())  # and the caller's next work after the replay
        return step.logits[:rows]

    def _fill_staging(self, step: CapturedStep, batch: StepBatch) -> None:
        """Write the replay's inputs (``INPUTS``) into its pinned staging buffer.

        Rows past the batch are padding: context length 1, slot -1, so they read block 0 and write nothing.
        """
        size, rows, width = step.batch_size, batch.num_sequences, self.max_blocks
        inputs = {"token_ids": np.zeros(size, np.int32), "positions": np.zeros(size, np.int32),
                  "slot_mapping": np.full(size, -1, np.int32), "block_tables": np.zeros((size, width), np.int32),
                  "context_lens": np.ones(size, np.int32)}
        if batch.token_ids is not None:
            inputs["token_ids"][:rows] = batch.token_ids
        inputs["positions"][:rows], inputs["slot_mapping"][:rows] = batch.positions, batch.slots
        inputs["context_lens"][:rows] = batch.context_lens
        tables = batch.block_tables[:, :width]
        inputs["block_tables"][:rows, :tables.shape[1]] = np.where(tables < 0, 0, tables)  # past the context: unread
        np.concatenate([inputs[name].ravel() for name in INPUTS], out=step.staging)

    def _capture(self, size: int) -> CapturedStep:
        """Warm up eagerly (compile, plan the attention, allocate its scratch), then record the step on a side
        stream."""
        xp, runtime = backend.xp, _runtime()
        full_table = [0] * self.max_blocks  # capture at full length: the attention grid covers any context
        attention = AttentionMetadata.build([(1, self.max_context_len, full_table)] * size, self.kv_cache.block_size)
        attention.slot_mapping[...] = -1  # the warm-up and padding rows write nothing into the cache
        inputs, views = _packed({"token_ids": xp.zeros(size, dtype=xp.int32),
                                 **{name: getattr(attention, name) for name in INPUTS[1:]}})
        token_ids = views.pop("token_ids")
        for name, view in views.items():  # before the warm-up: every layer reads these arrays
            setattr(attention, name, view)
        logits = xp.empty((size, self.model.config.vocab_size), dtype=xp.float32)
        stream = self.stream
        with stream:
            # the graphs' own indices (table of block 0, slots -1): nothing for StepBatch.check to check
            logits[...] = self.model.forward_unchecked(token_ids, attention.positions, self.kv_cache, attention)
            stream.synchronize()
            with xp.cuda.using_allocator(xp.cuda.malloc_async):  # allocations become graph nodes
                capture_mode = runtime.cudaStreamCaptureMode.cudaStreamCaptureModeRelaxed
                _runtime_call(runtime.cudaStreamBeginCapture(runtime.cudaStream_t(stream.ptr), capture_mode),
                              "cudaStreamBeginCapture")
                try:
                    logits[...] = self.model.forward_unchecked(token_ids, attention.positions, self.kv_cache,
                                                               attention)
                finally:
                    graph = _runtime_call(runtime.cudaStreamEndCapture(runtime.cudaStream_t(stream.ptr)),
                                          "cudaStreamEndCapture")
        executable = _runtime_call(runtime.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        error, _, num_nodes = runtime.cudaGraphGetNodes(graph, 0)  # nodes=NULL: only the count
        _runtime_call((error,), "cudaGraphGetNodes")
        _runtime_call(runtime.cudaGraphDestroy(graph), "cudaGraphDestroy")  # the executable keeps what it needs
        import cupyx

        staging = cupyx.empty_pinned(inputs.shape, dtype=np.int32)
        return CapturedStep(size, inputs, staging, token_ids, attention, logits, executable, stream, int(num_nodes))


def _packed(arrays: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """One int32 device buffer holding ``arrays`` back to back, and a view of it for each (with its values).

    A replay then sends its inputs to the GPU in one transfer instead of one per array.
    """
    xp = backend.xp
    buffer = xp.empty(sum(int(array.size) for array in arrays.values()), dtype=xp.int32)
    views, start = {}, 0
    for name, array in arrays.items():
        views[name] = buffer[start:start + array.size].reshape(array.shape)
        views[name][...] = array
        start += array.size
    return buffer, views


def _runtime() -> Any:
    from cuda.bindings import runtime

    return runtime
