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

Under tensor parallelism (``engine.tensor_parallel``) the runner of rank 0 also sends every step's record
to the other ranks before running it; theirs wait in :meth:`ModelRunner.run_worker` and run the same step on
their slices of the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from course_lib import backend
from course_lib.engine.batch import StepBatch
from course_lib.engine.block_pool import BlockCopy
from course_lib.engine.graphs import DecodeGraphs, graph_batch_sizes
from course_lib.engine.model import AttentionMetadata, KVCache, LlamaModel
from course_lib.engine.tensor_parallel import broadcast_message


class ModelRunner:
    """Runs ``model`` on ``kv_cache``, replaying CUDA graphs for decode-only steps when ``cuda_graphs`` is set."""

    def __init__(self, model: LlamaModel, kv_cache: KVCache, *, cuda_graphs: bool, max_num_seqs: int,
                 max_model_len: int) -> None:
        self.model, self.kv_cache, self.comm = model, kv_cache, model.comm
        if cuda_graphs and self.comm:
            raise ValueError("CUDA graphs with tensor parallelism are not built yet (the communicator waits on the "
                             "host, which a capture cannot record): run with cuda_graphs=False")
        self.graphs = (DecodeGraphs(model, kv_cache, graph_batch_sizes(max_num_seqs), max_model_len)
                       if cuda_graphs else None)

    def run(self, batch: StepBatch, rows: Sequence[int] | None = None, token_ids: Any = None) -> Any:
        """Logits (fp32) of the step's rows: each sequence's last new token, or the flat-batch ``rows`` asked for.

        ``token_ids``: the step's tokens already on the device, the arg-max of the previous step's logits (a
        decode run); by default the batch's own. A decode-only step has one row per sequence, so its rows are
        the last rows whatever is asked.
        """
        self._tell_workers("run", batch, rows, token_ids is not None)
        return self._run(batch, rows, token_ids)

    def copy_blocks(self, copies: Iterable[BlockCopy]) -> None:
        """The block pool's copy-on-writes, on this rank's KV cache and on every other rank's."""
        copies = tuple(copies)
        if copies:
            self._tell_workers("copy", copies)
            self.kv_cache.copy_blocks(copies)

    def close(self) -> None:
        """Release the CUDA graphs (if any), and let the other ranks' workers return; later steps run eagerly."""
        if self.graphs is not None:
            self.graphs.close()
            self.graphs = None
        self._tell_workers("stop")

    def run_worker(self) -> None:
        """On a rank other than 0: run the steps rank 0 sends, until rank 0 closes its engine.

        A step fed the arg-max of the previous one takes it from this rank's own logits: every rank holds the
        whole logits (they are gathered), so every rank finds the same tokens.
        """
        if not self.comm or self.comm.rank == 0:
            raise RuntimeError("run_worker is for ranks 1 and up of a tensor-parallel engine; rank 0 runs the "
                               "engine loop (generate, stream, step)")
        logits = None
        while (message := broadcast_message(self.comm))[0] != "stop":
            if message[0] == "copy":
                self.kv_cache.copy_blocks(message[1])
            else:
                _, batch, rows, fed_by_arg_max = message
                token_ids = backend.xp.argmax(logits, axis=1).astype(backend.xp.int32) if fed_by_arg_max else None
                logits = self._run(batch, rows, token_ids)

    def _run(self, batch: StepBatch, rows: Sequence[int] | None, token_ids: Any) -> Any:
        batch.check(self.kv_cache.num_blocks, self.model.config.vocab_size)
        if self.graphs and batch.is_decode:
            return self.graphs.run(batch, token_ids)  # host token ids travel with the graph's other inputs
        token_ids = backend.xp.asarray(batch.token_ids if token_ids is None else token_ids)
        attention = AttentionMetadata(batch)
        return self.model.forward_unchecked(token_ids, attention.positions, self.kv_cache, attention, rows)

    def _tell_workers(self, *message: Any) -> None:
        if self.comm and self.comm.rank == 0:
            broadcast_message(self.comm, message)
