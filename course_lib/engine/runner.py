"""The model runner: runs the model on one step's batch and hands back the logits the sampler needs.

The engine loop should not care how a step is executed, only that it gets logits. Two ways exist:

* **eager**: the step's batch goes to the device as attention metadata (positions, slots, block tables,
  context lengths) and the model's kernels launch one after another (``LlamaModel.forward_unchecked``). Any
  batch works: prefill chunks, decode tokens, both mixed.
* **a CUDA graph replay** (``DecodeGraphs``), when the engine captured graphs and the step only decodes: one
  new token per sequence. The host copies the step's batch into the graph's input buffers and launches the
  whole recorded step at once, which saves most of the launch cost of hundreds of small kernels.

The runner chooses, and it is the boundary where a step's indices are checked: once, on the host
(``StepBatch.check``), so that no kernel of the step needs to read them back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from course_lib import backend
from course_lib.engine.batch import StepBatch
from course_lib.engine.graphs import DecodeGraphs, graph_batch_sizes
from course_lib.engine.model import AttentionMetadata, KVCache, LlamaModel


class ModelRunner:
    """Runs ``model`` on ``kv_cache``, replaying CUDA graphs for decode-only steps when ``cuda_graphs`` is set."""

    def __init__(self, model: LlamaModel, kv_cache: KVCache, *, cuda_graphs: bool, max_num_seqs: int,
                 max_model_len: int) -> None:
        self.model, self.kv_cache = model, kv_cache
        self.graphs = (DecodeGraphs(model, kv_cache, graph_batch_sizes(max_num_seqs), max_model_len)
                       if cuda_graphs else None)

    def run(self, batch: StepBatch, rows: Sequence[int] | None = None, token_ids: Any = None) -> Any:
        """Logits (fp32) of the step's rows: each sequence's last new token, or the flat-batch ``rows`` asked for.

        ``token_ids``: the step's tokens already on the device (a decode run feeds each step the arg-max of the
        one before); by default the batch's own. A decode-only step has one row per sequence, so its rows are
        the last rows whatever is asked.
        """
        batch.check(self.kv_cache.num_blocks, self.model.config.vocab_size)
        if self.graphs and batch.is_decode:
            return self.graphs.run(batch, token_ids)  # host token ids travel with the graph's other inputs
        token_ids = backend.xp.asarray(batch.token_ids if token_ids is None else token_ids)
        attention = AttentionMetadata(batch)
        return self.model.forward_unchecked(token_ids, attention.positions, self.kv_cache, attention, rows)

    def close(self) -> None:
        """Release the CUDA graphs (if any); later steps run eagerly."""
        if self.graphs is not None:
            self.graphs.close()
            self.graphs = None
