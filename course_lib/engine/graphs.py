"""CUDA graphs for the engine's decode step: capture it once per batch size, then replay it with new inputs.

A decode step of a small model is hundreds of short kernels, and Python takes longer to launch each one
than the GPU takes to run it: the GPU waits on the host. A CUDA graph records the whole step once (stream
capture) and replays it with one call, so the launch cost is paid per step instead of per kernel.

A graph replays exactly what it recorded: the same kernels, grids and *addresses*. So everything a step
reads lives in buffers allocated once, and a replay first copies the new step's token ids, positions,
slots, block tables and context lengths into them. Three consequences shape this module:

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
  are allocated when the step is prepared, before the capture, and belong to the captured step.

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
from course_lib.engine.model import AttentionMetadata, KVCache, LlamaModel, ScheduledSequence
from course_lib.kernels.paged_attention import blocks_for

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


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
    token_ids: Any  # [batch_size] int32
    attention: AttentionMetadata  # its positions, slots, tables and lengths are overwritten before a replay
    logits: Any  # [batch_size, vocab] float32, written by the graph
    graph: Any  # the cudaGraphExec_t
    stream: Any  # the CuPy stream it was captured on and is replayed on
    num_nodes: int  # the operations the capture recorded: kernels, copies, memsets, allocations and frees


class DecodeGraphs:
    """The decode step of ``model`` over ``kv_cache``, captured for each of ``batch_sizes``.

    ``run(token_ids, context_lens, block_tables)`` computes the same logits as an eager
    ``model.forward`` over a batch of decode steps: one new token per sequence, the last of its
    ``context_len``, its keys and values written through its block table.
    """

    def __init__(self, model: LlamaModel, kv_cache: KVCache, batch_sizes: Sequence[int] = BATCH_SIZES,
                 max_context_len: int | None = None) -> None:
        if not backend.has_gpu():
            raise RuntimeError(f"CUDA graphs record GPU work: {backend.mode_line()}")
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

    def run(self, token_ids: Sequence[int], context_lens: Sequence[int],
            block_tables: Sequence[Sequence[int]]) -> Any:
        """Logits ``[batch, vocab]`` of a decode batch by graph replay, padded to the next captured size."""
        batch = len(token_ids)
        if not 1 <= batch <= self.batch_sizes[-1] or len(context_lens) != batch or len(block_tables) != batch:
            raise ValueError(f"a decode batch of 1 to {self.batch_sizes[-1]} sequences, with one token id, "
                             f"context length and block table each; got {batch}, {len(context_lens)} and "
                             f"{len(block_tables)}")
        step = self.steps[self.batch_sizes[bisect_left(self.batch_sizes, batch)]]
        inputs = self._host_inputs(step.batch_size, token_ids, context_lens, block_tables)
        xp, runtime = backend.xp, _runtime()
        caller = xp.cuda.get_current_stream()
        step.stream.wait_event(caller.record())  # after whatever the caller queued (cache writes, copies)
        with step.stream:
            for name, values in inputs.items():
                _target(step, name)[...] = xp.asarray(values)  # copies on the graph's stream, in order
            _runtime_call(runtime.cudaGraphLaunch(step.graph, runtime.cudaStream_t(step.stream.ptr)),
                          "cudaGraphLaunch")
        caller.wait_event(step.stream.record())  # and the caller's next work after the replay
        return step.logits[:batch]

    def _host_inputs(self, size: int, token_ids: Sequence[int], context_lens: Sequence[int],
                     block_tables: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """The replay's buffers on the host, checked: rows past the batch are padding that writes nothing."""
        block_size, vocab = self.kv_cache.block_size, self.model.config.vocab_size
        ids, lens = np.zeros(size, np.int32), np.ones(size, np.int32)
        tables = np.zeros((size, self.max_blocks), np.int32)
        slots = np.full(size, -1, np.int32)
        for row, (token, length, table) in enumerate(zip(token_ids, context_lens, block_tables, strict=True)):
            needed = int(blocks_for(length, block_size))
            if not 0 <= token < vocab:
                raise ValueError(f"sequence {row}: token id {token} outside the vocabulary [0, {vocab})")
            if not 1 <= length <= self.max_context_len or len(table) < needed:
                raise ValueError(f"sequence {row}: context_len {length} must be in [1, {self.max_context_len}] "
                                 f"(the graphs' capacity) with {needed} blocks in its table, got {len(table)}")
            used = np.asarray(table[:needed], dtype=np.int64)
            if used.min() < 0 or used.max() >= self.kv_cache.num_blocks:
                raise ValueError(f"sequence {row}: block ids must lie in [0, {self.kv_cache.num_blocks}), "
                                 f"got {table[:needed]}")
            ids[row], lens[row], tables[row, :needed] = token, length, used
            slots[row] = used[(length - 1) // block_size] * block_size + (length - 1) % block_size
        return {"token_ids": ids, "positions": lens - 1, "slot_mapping": slots, "decode_block_tables": tables,
                "decode_context_lens": lens}

    def _capture(self, size: int) -> CapturedStep:
        """Warm up eagerly (compile, check the step's indices once), then record the step on a side stream."""
        xp, runtime = backend.xp, _runtime()
        full_table = [0] * self.max_blocks  # capture at full length: the attention grid covers any context
        attention = AttentionMetadata([ScheduledSequence(1, self.max_context_len, full_table)] * size,
                                      self.kv_cache.block_size)
        attention.slot_mapping[...] = -1  # the warm-up and padding rows write nothing into the cache
        token_ids = xp.zeros(size, dtype=xp.int32)
        logits = xp.empty((size, self.model.config.vocab_size), dtype=xp.float32)
        stream = self.stream
        with stream:
            logits[...] = self.model.forward(token_ids, attention.positions, self.kv_cache, attention)
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
        return CapturedStep(size, token_ids, attention, logits, executable, stream, int(num_nodes))


def _target(step: CapturedStep, name: str) -> Any:
    return step.token_ids if name == "token_ids" else getattr(step.attention, name)


def _runtime() -> Any:
    from cuda.bindings import runtime

    return runtime
