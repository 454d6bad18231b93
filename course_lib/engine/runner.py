"""The model runner: runs the model on one step's batch and hands back the logits the sampler needs.

The engine loop should not care how a step is executed, only that it gets logits. Two ways exist:

* **eager**: the host builds the step's attention metadata (positions, slots, block tables, context lengths)
  and launches the model's kernels one after another (``LlamaModel.forward``). Any batch works: prefill
  chunks, decode tokens, both mixed.
* **a CUDA graph replay** (``DecodeGraphs``), when the engine captured graphs and the step only decodes: one
  new token per sequence. The host copies the step's inputs into the graph's buffers and launches the whole
  recorded step at once, which saves most of the launch cost of hundreds of small kernels.

The runner chooses. A step is described, per sequence, by ``(num_new_tokens, context_len, block_table)``,
the scheduler's view, plus the flat batch of token ids (on the host, or on the GPU when a decode run feeds
each step's arg-max to the next without a round trip).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from course_lib import backend
from course_lib.engine.graphs import DecodeGraphs, graph_batch_sizes
from course_lib.engine.model import AttentionMetadata, KVCache, LlamaModel

StepBatch = Sequence[tuple[int, int, Sequence[int]]]  # per sequence: (num_new_tokens, context_len, block_table)


class ModelRunner:
    """Runs ``model`` on ``kv_cache``, replaying CUDA graphs for decode-only steps when ``cuda_graphs`` is set."""

    def __init__(self, model: LlamaModel, kv_cache: KVCache, *, cuda_graphs: bool, max_num_seqs: int,
                 max_model_len: int) -> None:
        self.model, self.kv_cache = model, kv_cache
        self.graphs = (DecodeGraphs(model, kv_cache, graph_batch_sizes(max_num_seqs), max_model_len)
                       if cuda_graphs else None)

    def run(self, token_ids: Any, batch: StepBatch, rows: Sequence[int] | None = None) -> Any:
        """Logits (fp32) of the step's rows: each sequence's last new token, or the flat-batch ``rows`` asked for.

        A decode-only step has one row per sequence, so its rows are the last rows whatever is asked.
        """
        if self.graphs and all(num_new == 1 for num_new, _, _ in batch):
            return self.graphs.run(token_ids, [context for _, context, _ in batch], [table for _, _, table in batch])
        attention = AttentionMetadata.build(batch, self.kv_cache.block_size)
        return self.model.forward(backend.xp.asarray(token_ids), attention.positions, self.kv_cache, attention, rows)

    def close(self) -> None:
        """Release the CUDA graphs (if any); later steps run eagerly."""
        if self.graphs is not None:
            self.graphs.close()
            self.graphs = None
