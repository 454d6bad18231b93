"""A Llama forward pass over a flat batch of tokens from many sequences, reading and writing a paged KV cache.

An engine does not pad sequences into a rectangle. Each step it concatenates the new tokens of every
scheduled sequence (a whole prompt, a chunk of one, or the single next token of a sequence being
decoded) into one flat batch of ``T`` tokens, as vLLM does. Everything but attention treats the ``T``
rows alike: the norms, projections and MLP are per-token, so one matrix product serves all sequences.
Attention is where sequences differ, and ``AttentionMetadata`` tells it how:

* each sequence's slice of the flat batch, its context length after this step and its block table;
* the *slot* of every new token: where in the paged cache its key and value are written;
* for every new token, the block table and the context length it attends over. A decode token attends
  to its whole context. The i-th new token of a prompt chunk attends to the cached prefix and the chunk's
  first i + 1 tokens: causal masking is a shorter context.

Attention runs two kernels. A step of decodes alone (one new token per sequence, the step a CUDA graph
replays) is one launch of the decode kernel (``paged_attention.decode_unchecked``, a row per token). A step
with prompt tokens sends its leading one-token sequences (the scheduler lists decodes first) to the decode
kernel and every sequence after them to the prefill kernel (``paged_prefill``), which loads each key and
value tile once for a tile of 64 queries and multiplies on the tensor cores: a prompt token read as a decode
row would re-read its whole prefix. The prefill kernel takes fp16 and bf16 with head_dim 64 or 128; a step
it is not built for (float32, other head sizes) runs every token as a decode row, which computes the same.

All arrays live in ``course_lib.backend.xp``: CuPy and cuBLAS on a GPU, NumPy in CPU mode, one code path.
Element types: float32, float16 and bfloat16. CuPy has no bfloat16 arithmetic, so on a GPU bf16 tensors are uint16
bits that the kernels read as ``__nv_bfloat16``, and the elementwise steps (RoPE, SiLU, residual adds) widen to fp32,
compute, and round back once (``course_lib.dtypes.widen`` and ``narrow``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cached_property
from typing import Any

import numpy as np

from course_lib import backend, dtypes
from course_lib.checkpoint.config import ModelConfig
from course_lib.checkpoint.weights import check_weights
from course_lib.distributed import Communicator
from course_lib.engine import tensor_parallel
from course_lib.engine.batch import StepBatch
from course_lib.engine.block_pool import BlockCopy
from course_lib.engine.linear import linear
from course_lib.kernels import matvec, paged_attention, paged_prefill
from course_lib.kernels.fused import rope_write_kv_unchecked, silu_mul
from course_lib.kernels.matvec import add_matvec, normed_matvec
from course_lib.kernels.norm import add_rms_norm, rms_norm


class AttentionMetadata:
    """A step's batch on the device, as attention reads it: built once per step, shared by every layer.

    Per new token of the flat batch it holds ``positions``, ``slot_mapping`` (where its key and value go),
    ``block_tables`` (its sequence's table, padded with -1) and ``context_lens`` (its position + 1: a token
    attends up to itself, which is the causal mask of a prompt chunk and the whole context of a decode token).
    ``batch`` is the host record it was built from (``engine.batch.StepBatch``).
    """

    def __init__(self, batch: StepBatch) -> None:
        xp = backend.xp
        self.batch, self.block_size = batch, batch.block_size
        self.num_tokens, self.num_sequences = batch.num_tokens, batch.num_sequences
        self.last_token_rows = xp.asarray(batch.last_rows)  # the rows sampled from
        self.positions = xp.asarray(batch.positions)
        self.slot_mapping = xp.asarray(batch.slots)
        self.block_tables = xp.asarray(batch.block_tables[batch.token_rows])  # one row per token
        self.context_lens = xp.asarray(batch.positions + 1)
        # How the step's attention runs (v2's partition size and scratch), decided by its first layer (a CUDA
        # graph's warm-up) and kept for the others and for the graph's replays, which use the same scratch.
        self.decode_plan: paged_attention.DecodePlan | None = None
        # The prefill kernel's shape for a step with prompt tokens, decided by its first layer, like decode_plan.
        self.prefill_plan: paged_prefill.Prefill | None = None

    @cached_property
    def prefill_inputs(self) -> tuple[Any, Any, Any]:
        """The sequences after the step's leading one-token ones, as the prefill kernel reads them: block tables,
        where each sequence's rows start (``query_start_loc``) and context lengths; copied to the device once, by
        the first layer that needs them."""
        batch, xp = self.batch, backend.xp
        rest = slice(batch.num_leading_decodes, None)
        starts = np.concatenate([[0], np.cumsum(batch.query_lens[rest])]).astype(np.int32)
        return xp.asarray(batch.block_tables[rest]), xp.asarray(starts), xp.asarray(batch.context_lens[rest])

    @classmethod
    def build(cls, sequences: Iterable[tuple[int, int, Sequence[int]]], block_size: int) -> AttentionMetadata:
        """From ``(num_new_tokens, context_len, block_table)`` per sequence (``StepBatch.build``)."""
        return cls(StepBatch.build(sequences, block_size))


class KVCache:
    """Each layer's key and value cache, ``[num_blocks, num_kv_heads, block_size, head_dim]``, in one pool of blocks.

    A block id means the same block in every layer: the block pool's bookkeeping covers all layers at once.
    """

    def __init__(self, keys: list[Any], values: list[Any]) -> None:
        self.keys, self.values = keys, values

    @classmethod
    def allocate(cls, config: ModelConfig, num_blocks: int, block_size: int, dtype: str = "float32") -> KVCache:
        """Zeroed caches for every layer of ``config``."""
        shape = (num_blocks, config.num_kv_heads, block_size, config.head_dim)

        def zeros() -> Any:
            array = dtypes.empty(shape, dtype)
            array[...] = 0
            return array

        return cls([zeros() for _ in range(config.num_layers)], [zeros() for _ in range(config.num_layers)])

    @property
    def num_blocks(self) -> int:
        return int(self.keys[0].shape[0])

    @property
    def block_size(self) -> int:
        return int(self.keys[0].shape[2])

    def copy_blocks(self, copies: Iterable[BlockCopy]) -> None:
        """Carry out the block pool's copy-on-writes: block ``src`` into block ``dst``, in every layer."""
        for copy in copies:
            for cache in (*self.keys, *self.values):
                cache[copy.dst] = cache[copy.src]


class LlamaModel:
    """A Llama decoder on the current device: ``forward`` maps a step's flat batch of tokens to logits.

    ``weights`` use Hugging Face names (``course_lib.checkpoint.weights``); they are converted to ``dtype``
    (default: the embedding's) and moved to the device once, here. A step of one token (batch-1 decode) runs
    on matrix-vector products with the norms, activation and residual adds fused in (``_one_token_logits``)
    unless ``one_token_matvec=False`` or the model's rows do not fit those kernels (``matvec.supports``).
    """

    def __init__(self, config: ModelConfig, weights: dict[str, Any], dtype: str | None = None, *,
                 one_token_matvec: bool = True, comm: Communicator | None = None) -> None:
        self.config = config
        self.comm = comm if comm is not None and comm.size > 1 else None  # tensor parallelism over comm's ranks
        if self.comm:
            weights = tensor_parallel.shard_weights(config, weights, self.comm.rank, self.comm.size)
        self.shard_config = tensor_parallel.shard_config(config, self.comm.size) if self.comm else config
        check_weights(self.shard_config, weights)
        self.vocab_start = self.comm.rank * self.shard_config.vocab_size if self.comm else 0
        self.dtype = dtype or dtypes.element_type(weights["model.embed_tokens.weight"])
        local = self.shard_config
        row_lengths = (local.hidden_size, local.num_heads * local.head_dim, local.intermediate_size)
        # the fused matrix-vector path adds into the residual inside its kernels, before an all-reduce could
        self.one_token_matvec = (one_token_matvec and self.comm is None
                                 and all(matvec.supports(k, self.dtype) for k in row_lengths))
        host_type = dtypes.host_dtype(self.dtype)
        host = {name: np.ascontiguousarray(backend.to_numpy(w).astype(host_type)) for name, w in weights.items()}
        for i in range(config.num_layers):  # stack the projections that read the same input: one GEMM each
            for stacked, parts in (("self_attn.qkv_proj", ("q", "k", "v")), ("mlp.gate_up_proj", ("gate", "up"))):
                block = stacked.split(".")[0]
                host[f"model.layers.{i}.{stacked}.weight"] = np.concatenate(
                    [host.pop(f"model.layers.{i}.{block}.{part}_proj.weight") for part in parts])
        self.weights = {name: dtypes.to_device(array) for name, array in host.items()}
        self.lm_head = self.weights.get("lm_head.weight", self.weights["model.embed_tokens.weight"])
        self.frequencies = backend.xp.asarray(config.inverse_frequencies().astype(np.float32))

    def forward(self, token_ids: Any, positions: Any, kv_cache: KVCache, attention: AttentionMetadata,
                rows: Sequence[int] | None = None) -> Any:
        """Logits ``[num_sequences, vocab]`` (fp32) for the last new token of each sequence of the step.

        ``rows``: the logits of these rows of the flat batch instead, in this order (prompt log-probabilities
        need more than the last rows: row ``t`` scores the token after token ``t``).
        """
        self._check_step(token_ids, positions, kv_cache, attention)
        return self.forward_unchecked(token_ids, positions, kv_cache, attention, rows)

    def forward_unchecked(self, token_ids: Any, positions: Any, kv_cache: KVCache, attention: AttentionMetadata,
                          rows: Sequence[int] | None = None) -> Any:
        """:meth:`forward` without its check of the step's arrays, which reads the token ids back to the host.

        For a caller that checked them on the host already, and for CUDA graph capture, where no such read
        may happen (``course_lib.engine.graphs``).
        """
        if attention.num_tokens == 1 and self.one_token_matvec:
            return self._one_token_logits(token_ids, positions, kv_cache, attention)
        return self.compute_logits(self._hidden_states(token_ids, positions, kv_cache, attention), attention, rows)

    def _hidden_states(self, token_ids: Any, positions: Any, kv_cache: KVCache, attention: AttentionMetadata) -> Any:
        """The final-normed hidden state of every token of the flat batch: ``[T, hidden_size]``.

        The residual stream's additions ride on the norms that follow them (``add_rms_norm``): after
        attention, the post-attention norm; after the MLP, the next layer's input norm, or the final one.
        """
        w, eps, kind, layers = self.weights, self.config.rms_norm_eps, self.dtype, self.config.num_layers
        residual = self._embed(token_ids)
        hidden = rms_norm(residual, w["model.layers.0.input_layernorm.weight"], eps, dtype=kind)
        for i in range(layers):
            layer = f"model.layers.{i}."
            qkv = linear(hidden, w[layer + "self_attn.qkv_proj.weight"], kind)
            attended = self._sum_over_ranks(linear(self.attend(i, qkv, positions, kv_cache, attention),
                                                   w[layer + "self_attn.o_proj.weight"], kind))
            hidden = add_rms_norm(attended, residual, w[layer + "post_attention_layernorm.weight"], eps, dtype=kind)
            following = f"model.layers.{i + 1}.input_layernorm.weight" if i + 1 < layers else "model.norm.weight"
            hidden = add_rms_norm(self._sum_over_ranks(self.mlp(i, hidden)), residual, w[following], eps, dtype=kind)
        return hidden

    def _one_token_logits(self, token_ids: Any, positions: Any, kv_cache: KVCache, attention: AttentionMetadata) -> Any:
        """The logits of a step of one token, its norms, activations and residual adds fused into the projections.

        A decode step at batch 1 is all matrix-vector products, and the small kernels between them cost more
        than they compute (``course_lib.kernels.matvec``): here each norm rides on the product after it, the
        activation and each residual add on the product before it. Same function as ``_hidden_states`` and
        ``compute_logits``, up to the order of the sums.
        """
        w, eps, kind = self.weights, self.config.rms_norm_eps, self.dtype
        residual = w["model.embed_tokens.weight"][token_ids]
        for i in range(self.config.num_layers):
            layer = f"model.layers.{i}."
            qkv = normed_matvec(residual, w[layer + "input_layernorm.weight"], w[layer + "self_attn.qkv_proj.weight"],
                                eps, dtype=kind)
            add_matvec(residual, self.attend(i, qkv, positions, kv_cache, attention),
                       w[layer + "self_attn.o_proj.weight"], dtype=kind)
            gate_up = normed_matvec(residual, w[layer + "post_attention_layernorm.weight"],
                                    w[layer + "mlp.gate_up_proj.weight"], eps, dtype=kind)
            add_matvec(residual, gate_up, w[layer + "mlp.down_proj.weight"], activation="silu_mul", dtype=kind)
        return normed_matvec(residual, w["model.norm.weight"], self.lm_head, eps, dtype=kind, float32_out=True)

    def compute_logits(self, hidden: Any, attention: AttentionMetadata, rows: Sequence[int] | None = None) -> Any:
        """Project only the rows a token is sampled from: each sequence's last new token (every row, in decode),
        or the ``rows`` asked for."""
        if rows is not None:
            last = hidden[backend.xp.asarray(np.asarray(rows, dtype=np.int64))]
        else:
            last = hidden if attention.num_tokens == attention.num_sequences else hidden[attention.last_token_rows]
        logits = linear(last, self.lm_head, self.dtype, float32_out=True)
        if not self.comm:
            return logits
        slices = self.comm.all_gather(logits)  # [ranks * rows, vocab / ranks]: each rank's slice of the vocabulary
        return slices.reshape(self.comm.size, *logits.shape).transpose(1, 0, 2).reshape(logits.shape[0], -1)

    def _embed(self, token_ids: Any) -> Any:
        """The embedding rows of ``token_ids``; under tensor parallelism each comes from the one rank that holds
        it, the others adding zeros."""
        table = self.weights["model.embed_tokens.weight"]
        if not self.comm:
            return table[token_ids]
        xp = backend.xp
        local = token_ids - self.vocab_start
        mine = (local >= 0) & (local < table.shape[0])
        rows = xp.where(mine[:, None], table[xp.where(mine, local, 0)], xp.zeros((), table.dtype))
        return self._sum_over_ranks(rows)

    def _sum_over_ranks(self, partial: Any) -> Any:
        """The all-reduce of a row-parallel product: every rank's partial sums added, in float32 and rounded once
        (bf16 bits would not add; vLLM all-reduces in the model's type, half the bytes)."""
        if not self.comm:
            return partial
        return dtypes.narrow(self.comm.all_reduce(dtypes.widen(partial, self.dtype)), self.dtype)

    def attend(self, i: int, qkv: Any, positions: Any, kv_cache: KVCache, attention: AttentionMetadata) -> Any:
        """Grouped-query attention of layer ``i`` from its q/k/v projection: rotate, cache the new keys and values,
        attend. Returns ``[tokens, heads * head_dim]``, the input of the output projection.

        The step's slots and tables were checked on the host (``StepBatch.check``), so the kernels run unchecked:
        no layer reads an index back from the device."""
        keys, values, kind = kv_cache.keys[i], kv_cache.values[i], self.dtype
        query = rope_write_kv_unchecked(qkv, positions, self.frequencies, self.shard_config.num_heads, keys, values,
                                        attention.slot_mapping, kind)  # the new keys and values go into the cache
        if attention.batch.is_decode or not paged_prefill.supports(kind, self.config.head_dim):
            attended = self._attend_rows(query, keys, values, attention, attention.num_tokens)
        else:
            attended = self._attend_prompts(query, keys, values, attention)
        return attended.reshape(qkv.shape[0], -1)  # [tokens, heads * head_dim]

    def _attend_rows(self, query: Any, keys: Any, values: Any, attention: AttentionMetadata, rows: int,
                     out: Any = None) -> Any:
        """The decode kernel over the step's first ``rows`` tokens, a row each: every decode token, or every token
        of a step the prefill kernel is not built for (a prompt token is a row whose context ends at itself)."""
        if attention.decode_plan is None:
            problem = paged_attention.decode_problem(query[:rows], keys, values, attention.block_tables[:rows],
                                                     int(attention.batch.context_lens.max()), dtype=self.dtype)
            attention.decode_plan = paged_attention.plan_decode(problem, partition_size="auto")
        return paged_attention.decode_unchecked(attention.decode_plan, query[:rows], keys, values,
                                                attention.block_tables[:rows], attention.context_lens[:rows], out=out)

    def _attend_prompts(self, query: Any, keys: Any, values: Any, attention: AttentionMetadata) -> Any:
        """A step with prompt tokens: its leading decode rows through the decode kernel, the sequences after them
        through the prefill kernel, which reads each key tile once for a tile of queries (tensor cores)."""
        out = dtypes.empty(tuple(query.shape), self.dtype)
        decode_rows = attention.batch.num_leading_decodes  # one row each
        if decode_rows:
            self._attend_rows(query, keys, values, attention, decode_rows, out=out[:decode_rows])
        tables, starts, context_lens = attention.prefill_inputs
        if attention.prefill_plan is None:
            attention.prefill_plan = paged_prefill.prefill_problem(
                query[decode_rows:], keys, values, attention.batch.query_lens[decode_rows:], int(tables.shape[1]),
                dtype=self.dtype)
        paged_prefill.prefill_unchecked(attention.prefill_plan, out[decode_rows:], query[decode_rows:], keys, values,
                                        tables, starts, context_lens)
        return out

    def mlp(self, i: int, x: Any) -> Any:
        """SwiGLU: ``down(silu(gate(x)) * up(x))``, gate and up from one stacked projection."""
        prefix, kind = f"model.layers.{i}.mlp.", self.dtype
        gate_up = linear(x, self.weights[prefix + "gate_up_proj.weight"], kind)
        return linear(silu_mul(gate_up, kind), self.weights[prefix + "down_proj.weight"], kind)

    def _check_step(self, token_ids: Any, positions: Any, kv_cache: KVCache, attention: AttentionMetadata) -> None:
        """The step's arrays must agree with its metadata, and every token id must index the embedding."""
        dtypes.require_device_array("token_ids", token_ids)
        dtypes.require_device_array("positions", positions)
        expected = (attention.num_tokens,)
        if tuple(token_ids.shape) != expected or tuple(positions.shape) != expected:
            raise ValueError(
                f"token_ids and positions must both have shape {expected} (the step's new tokens), "
                f"got {tuple(token_ids.shape)} and {tuple(positions.shape)}"
            )
        ids = backend.to_numpy(token_ids)
        if ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(
                f"token_ids must be integers in [0, {self.config.vocab_size}), got {ids.dtype} values "
                f"from {ids.min()} to {ids.max()}"
            )
        attention.batch.check(kv_cache.num_blocks, self.config.vocab_size)  # counts and block ids of the step
        if kv_cache.block_size != attention.block_size or len(kv_cache.keys) != self.config.num_layers:
            raise ValueError(
                f"the KV cache (block_size {kv_cache.block_size}, {len(kv_cache.keys)} layers) does not "
                f"match the step (block_size {attention.block_size}) and model "
                f"({self.config.num_layers} layers)"
            )

