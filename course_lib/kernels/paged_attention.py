"""Paged attention: the KV cache in fixed-size blocks, its input checks, float64 references and launchers.

An engine cannot know how long each answer will grow, so it does not give a sequence one contiguous
slab of KV cache. It hands out *blocks* of ``block_size`` tokens from a shared pool, and a *block
table* per sequence lists, in order, which blocks hold its tokens (vLLM's PagedAttention). Token
``t`` of a sequence lives in block ``block_tables[seq, t // block_size]`` at offset ``t % block_size``;
its *slot* is ``block * block_size + offset``.

Layout, one choice for the whole course:

* ``key_cache`` and ``value_cache``: ``[num_blocks, num_kv_heads, block_size, head_dim]``. Each
  (block, kv head) pair is one contiguous ``block_size x head_dim`` tile, so the threads reading a
  block read neighbouring addresses (coalesced). Element types float16 or bfloat16 (float32 for
  references and tests); ``block_size`` is 8, 16 or 32; ``head_dim`` any multiple of 8 up to 256
  (a row is whole 16-byte loads of fp16/bf16; 64, 128 and 256 are the usual ones).
* decode: ``query`` ``[num_seqs, num_heads, head_dim]``, ``block_tables`` int32
  ``[num_seqs, max_blocks_per_seq]``, ``context_lens`` int32 ``[num_seqs]``; the output is
  ``[num_seqs, num_heads, head_dim]``. Only the first ``ceil(context_len / block_size)`` entries of a
  table row are read; the rest may hold -1 or anything.
* grouped-query attention: ``num_heads % num_kv_heads == 0`` and query head ``h`` reads kv head
  ``h // (num_heads // num_kv_heads)``.
* ``scale`` multiplies the logits; the default is ``1 / sqrt(head_dim)``.

Decode comes in two versions. ``v1`` lets one thread block handle a whole (sequence, head).
``v2`` (flash-decoding) splits the context into partitions of ``partition_size`` tokens, each giving
its max logit, its sum of exponentials and its normalised partial output, and merges them with a
log-sum-exp rescaling: the same result, with many more blocks at work on a long context.
``partition_size="auto"`` (what the engine uses) shortens the partitions of a small step, such as one
sequence of 512 tokens, until the grid has enough blocks to keep the GPU busy (``auto_partition_size``).

On a GPU the public functions launch the CUDA kernels; in CPU mode they compute the same thing with
NumPy (fp32 accumulation, outputs rounded to the input's type). Every index a kernel will follow is
checked here on the host first: a block table entry outside the pool is a ``ValueError``, never an
out-of-bounds read.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from course_lib import backend, dtypes
from course_lib.kernels.prepared import PreparedStep

BLOCK_SIZES = (8, 16, 32)
HEAD_DIM_MULTIPLE = 8  # 16 bytes of fp16/bf16: a row is whole vector loads
MAX_HEAD_DIM = 256
VERSIONS = ("v1", "v2")
DEFAULT_PARTITION_SIZE = 512
# Shorter partitions give the merge kernel more to do than they save: on an H100, the 1B model's decode step
# at batch 1 over 512 tokens was faster with this floor than with 32 or 128 (a one-off probe, about 1%).
MIN_PARTITION_SIZE = 64
BUSY_GRID = 256  # thread blocks that keep an H100's 132 SMs busy (about two each)
MAX_INT32 = 2**31 - 1


# ---- what the kernels need to know about validated inputs ------------------------------------------------


@dataclass(frozen=True)
class Cache:
    """The shape and element type of a validated key/value cache pair."""

    dtype: str  # "float32", "float16" or "bfloat16"
    num_blocks: int
    num_kv_heads: int
    block_size: int
    head_dim: int


@dataclass(frozen=True)
class Attention:
    """A validated decode or prefill problem.

    ``rows`` counts sequences (decode) or new tokens (prefill). For prefill, ``max_context_len`` is
    the one sequence's context length. ``partition_size`` is set for v2 decode only.
    """

    cache: Cache
    num_heads: int
    rows: int
    max_blocks_per_seq: int
    max_context_len: int
    scale: float
    partition_size: int | None = None

    @property
    def queries_per_kv(self) -> int:
        """How many query heads share one kv head (1 for multi-head attention)."""
        return self.num_heads // self.cache.num_kv_heads


# ---- input checks: every index is checked here, before anything could launch -------------------------------


def check_cache(key_cache: Any, value_cache: Any, dtype: str | None = None) -> Cache:
    """Validate the cache pair: same type, shape ``[num_blocks, num_kv_heads, block_size, head_dim]``."""
    kind = dtypes.element_type(key_cache, dtype)
    if dtypes.element_type(value_cache, dtype) != kind:
        raise TypeError(f"key_cache and value_cache must hold the same element type, got {key_cache.dtype} "
                        f"and {value_cache.dtype}")
    if key_cache.ndim != 4:
        raise ValueError("key_cache must have shape [num_blocks, num_kv_heads, block_size, head_dim], got "
                         f"{tuple(key_cache.shape)}")
    if tuple(value_cache.shape) != tuple(key_cache.shape):
        raise ValueError(f"value_cache must have key_cache's shape {tuple(key_cache.shape)}, "
                         f"got {tuple(value_cache.shape)}")
    num_blocks, num_kv_heads, block_size, head_dim = (int(n) for n in key_cache.shape)
    if num_blocks < 1 or num_kv_heads < 1:
        raise ValueError(f"the cache needs at least one block and one kv head, got shape {tuple(key_cache.shape)}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size (the cache's axis 2) must be one of {BLOCK_SIZES}, got {block_size}")
    if head_dim % HEAD_DIM_MULTIPLE or not 0 < head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim (the cache's last axis) must be a multiple of {HEAD_DIM_MULTIPLE} up to "
                         f"{MAX_HEAD_DIM} (e.g. 64, 128, 256), got {head_dim}")
    if num_blocks * block_size > MAX_INT32:
        raise ValueError(f"num_blocks * block_size must fit an int32 slot number, got {num_blocks * block_size}")
    return Cache(kind, num_blocks, num_kv_heads, block_size, head_dim)


def check_heads(name: str, array: Any, cache: Cache, dtype: str | None = None) -> int:
    """Validate ``array`` as ``[rows, heads, head_dim]`` in the cache's type; return its number of heads.

    Grouped-query attention needs the query heads to split evenly over the kv heads.
    """
    if dtypes.element_type(array, dtype) != cache.dtype:
        raise TypeError(f"{name} must hold {cache.dtype} like the cache, got {array.dtype}")
    if array.ndim != 3 or array.shape[0] < 1 or array.shape[2] != cache.head_dim:
        raise ValueError(f"{name} must have shape [rows >= 1, heads, head_dim={cache.head_dim}], "
                         f"got {tuple(array.shape)}")
    heads = int(array.shape[1])
    if heads < 1 or heads % cache.num_kv_heads:
        raise ValueError(f"{name} has {heads} heads, which must be a positive multiple of the cache's "
                         f"{cache.num_kv_heads} kv heads (query head h reads kv head h // (heads // kv_heads))")
    return heads


def validate_block_tables(block_tables: Any, context_lens: Any, num_blocks: int, block_size: int) -> int:
    """Check every table entry a kernel will follow; return the longest context.

    ``block_tables`` int32 ``[num_seqs, max_blocks_per_seq]``, ``context_lens`` int32 ``[num_seqs]``.
    Each context needs ``1 <= context_len <= max_blocks_per_seq * block_size`` and its first
    ``ceil(context_len / block_size)`` entries in ``[0, num_blocks)``; later entries are never read.
    The values are read on the host (a device-to-host copy on a GPU): that is the price of never
    handing a kernel an index outside its buffers.
    """
    if num_blocks < 1 or block_size < 1:
        raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
    for name, array, ndim in (("block_tables", block_tables, 2), ("context_lens", context_lens, 1)):
        _require_int32(name, array)
        if array.ndim != ndim:
            raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(array.shape)}")
    num_seqs, max_blocks = (int(n) for n in block_tables.shape)
    if context_lens.shape != (num_seqs,) or num_seqs < 1 or max_blocks < 1:
        raise ValueError(f"block_tables [num_seqs >= 1, max_blocks_per_seq >= 1] and context_lens [num_seqs] must "
                         f"agree, got {tuple(block_tables.shape)} and {tuple(context_lens.shape)}")
    lens = backend.to_numpy(context_lens).astype(np.int64)
    capacity = max_blocks * block_size
    wrong = np.flatnonzero((lens < 1) | (lens > capacity))
    if wrong.size:
        raise ValueError(f"context_lens[{wrong[0]}] is {lens[wrong[0]]}; it must be between 1 and max_blocks_per_seq * "
                         f"block_size = {max_blocks} * {block_size} = {capacity}")
    tables = backend.to_numpy(block_tables)
    read = np.arange(max_blocks) < blocks_for(lens, block_size)[:, None]  # the entries a kernel will follow
    outside = read & ((tables < 0) | (tables >= num_blocks))
    if outside.any():
        seq, index = (int(i) for i in np.argwhere(outside)[0])
        raise ValueError(f"block_tables[{seq}, {index}] is {tables[seq, index]}, outside the pool [0, {num_blocks}): "
                         f"sequence {seq} has {lens[seq]} tokens, so its first {blocks_for(lens[seq], block_size)} "
                         f"entries are read")
    return int(lens.max())


def _require_int32(name: str, array: Any) -> None:
    """Tables and slots are int32 on both sides: the kernels read them as ``int``."""
    if str(getattr(array, "dtype", None)) != "int32":
        raise TypeError(f"{name} must be an int32 array, got {getattr(array, 'dtype', type(array).__name__)}")


def blocks_for(context_len: Any, block_size: int) -> Any:
    """How many blocks hold ``context_len`` tokens: ``ceil(context_len / block_size)`` (elementwise)."""
    return -(-context_len // block_size)


def check_scale(scale: float | None, head_dim: int) -> float:
    """The logit scale: ``1 / sqrt(head_dim)`` by default, else a finite number > 0."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not (isinstance(scale, numbers.Real) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0 (default 1/sqrt(head_dim)), got {scale!r}")
    return float(scale)


def check_decode_inputs(
    query: Any, key_cache: Any, value_cache: Any, block_tables: Any, context_lens: Any,
    scale: float | None = None, dtype: str | None = None,
) -> Attention:
    """Validate a decode step: one new query token per sequence against its paged context."""
    cache = check_cache(key_cache, value_cache, dtype)
    num_heads = check_heads("query", query, cache, dtype)
    max_context_len = validate_block_tables(block_tables, context_lens, cache.num_blocks, cache.block_size)
    if block_tables.shape[0] != query.shape[0]:
        raise ValueError(f"query has {query.shape[0]} sequences but block_tables has {block_tables.shape[0]} rows")
    return Attention(cache, num_heads, int(query.shape[0]), int(block_tables.shape[1]), max_context_len,
                     check_scale(scale, cache.head_dim))


def auto_partition_size(problem: Attention) -> int:
    """v2's partition length for ``problem``: 512 tokens, halved while the grid has fewer than BUSY_GRID blocks.

    v2 runs one thread block per (sequence, partition, group of query heads). A batch of 64 long contexts
    gives thousands of blocks; one sequence of 512 tokens with 8 KV heads gives 8, on a GPU of 132 SMs, and
    each of them walks all 512 tokens alone. Shorter partitions give more blocks with less to read each; the
    merge kernel pays a little for the extra partitions. The length stays a multiple of the block size and
    at least MIN_PARTITION_SIZE.
    """
    from course_lib.kernels.paged_attention_cuda import decode_grids

    def blocks(size: int) -> int:
        return math.prod(decode_grids("v2", problem.rows, problem.num_heads, problem.cache.num_kv_heads,
                                      problem.max_context_len, size)["decode"])

    size, floor = DEFAULT_PARTITION_SIZE, max(MIN_PARTITION_SIZE, problem.cache.block_size)
    while size // 2 >= floor and blocks(size) < BUSY_GRID:
        size //= 2
    return size


def check_partition_size(partition_size: int, block_size: int) -> int:
    """v2's partition length: a positive multiple of ``block_size``, so no block straddles two partitions."""
    if isinstance(partition_size, bool) or not isinstance(partition_size, numbers.Integral) or partition_size < 1:
        raise ValueError(f"partition_size must be a positive integer, got {partition_size!r}")
    if partition_size % block_size:
        raise ValueError(f"partition_size must be a multiple of block_size={block_size} so that no block straddles "
                         f"two partitions, got {partition_size}")
    return int(partition_size)


def check_sequence(block_table: Any, context_len: int, cache: Cache) -> None:
    """Validate one sequence's int32 ``block_table`` ``[max_blocks_per_seq]`` for ``context_len`` tokens."""
    _require_count("context_len", context_len)
    if getattr(block_table, "ndim", None) != 1:
        raise ValueError(f"block_table must be a 1-D int32 array, got shape {getattr(block_table, 'shape', None)}")
    validate_block_tables(block_table[None, :], np.array([context_len], dtype=np.int32), cache.num_blocks,
                          cache.block_size)


def _require_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= MAX_INT32:
        raise ValueError(f"{name} must be an integer between 1 and {MAX_INT32}, got {value!r}")


def check_prefill_inputs(
    query: Any, key_cache: Any, value_cache: Any, block_table: Any, context_len: int, num_new_tokens: int,
    scale: float | None = None, dtype: str | None = None,
) -> Attention:
    """Validate a prefill of one sequence: ``query`` ``[num_new_tokens, num_heads, head_dim]`` holds its last
    ``num_new_tokens`` positions, ``block_table`` int32 ``[max_blocks_per_seq]`` covers all ``context_len``."""
    cache = check_cache(key_cache, value_cache, dtype)
    check_sequence(block_table, context_len, cache)
    _require_count("num_new_tokens", num_new_tokens)
    num_heads = check_heads("query", query, cache, dtype)
    if num_new_tokens > context_len or query.shape[0] != num_new_tokens:
        raise ValueError(f"query must hold num_new_tokens={num_new_tokens} rows, at most context_len={context_len}: "
                         f"got {query.shape[0]} rows")
    return Attention(cache, num_heads, int(num_new_tokens), int(block_table.shape[0]), int(context_len),
                     check_scale(scale, cache.head_dim))


def check_write_inputs(key: Any, value: Any, key_cache: Any, value_cache: Any, slot_mapping: Any,
                       dtype: str | None = None) -> Cache:
    """Validate a cache write: ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` in the cache's type,
    ``slot_mapping`` int32 ``[num_tokens]`` with slots in ``[0, num_blocks * block_size)`` or -1 (skip)."""
    cache = check_cache(key_cache, value_cache, dtype)
    for name, array in (("key", key), ("value", value)):
        if check_heads(name, array, cache, dtype) != cache.num_kv_heads:
            raise ValueError(f"{name} must have the cache's {cache.num_kv_heads} kv heads, got {array.shape[1]}")
    if value.shape != key.shape:
        raise ValueError(f"value must have key's shape {tuple(key.shape)}, got {tuple(value.shape)}")
    check_slots(slot_mapping, key.shape[0], cache)
    return cache


def check_slots(slot_mapping: Any, num_tokens: int, cache: Cache) -> None:
    """``slot_mapping`` int32 ``[num_tokens]``: each slot in ``[0, num_blocks * block_size)`` or -1 (skip),
    no slot twice. Reads the slots on the host (a copy that waits for the GPU)."""
    _require_int32("slot_mapping", slot_mapping)
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping must have one slot per token, shape ({num_tokens},), "
                         f"got {tuple(slot_mapping.shape)}")
    slots = backend.to_numpy(slot_mapping)
    num_slots = cache.num_blocks * cache.block_size
    bad = np.flatnonzero((slots < -1) | (slots >= num_slots))
    if bad.size:
        raise ValueError(f"slot_mapping[{bad[0]}] is {slots[bad[0]]}: slots must lie in [0, {num_slots}) "
                         f"(num_blocks * block_size), or be -1 for a padding token that is skipped")
    written = slots[slots >= 0]
    if np.unique(written).size != written.size:
        raise ValueError("slot_mapping names one slot twice: two tokens would race to write it")


def require_device_arrays(arrays: dict[str, Any]) -> None:
    """Kernels take arrays of the current mode, C-contiguous (they index by computed offsets)."""
    for name, array in arrays.items():
        dtypes.require_device_array(name, array)
        if not array.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous; use xp.ascontiguousarray({name})")


def output_buffer(out: Any, shape: tuple[int, ...], kind: str, dtype: str | None = None) -> Any:
    """``out`` checked to be a C-contiguous ``shape`` array of element type ``kind``, or a new one."""
    if out is None:
        return dtypes.empty(shape, kind)
    require_device_arrays({"out": out})
    if dtypes.element_type(out, dtype) != kind:
        raise TypeError(f"out must hold {kind} like the inputs, got {out.dtype}")
    if tuple(out.shape) != shape:
        raise ValueError(f"out must have shape {shape}, got {tuple(out.shape)}")
    return out


# ---- the computation, in whatever float precision it is given (float64 references, float32 CPU mode) -------


def _gather(cache: np.ndarray, block_table: np.ndarray, context_len: int) -> np.ndarray:
    """One sequence's keys or values, contiguous: ``[context_len, num_kv_heads, head_dim]``."""
    _, num_kv_heads, block_size, head_dim = cache.shape
    tiles = cache[block_table[: blocks_for(context_len, block_size)]]  # [blocks, kv heads, block_size, head_dim]
    return tiles.transpose(0, 2, 1, 3).reshape(-1, num_kv_heads, head_dim)[:context_len]


def _softmax_attention(
    query: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float, first_position: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Attention of ``query`` [tokens, heads, d] over ``keys``/``values`` [length, kv heads, d].

    Returns the max logit and the sum of ``exp(logit - max)`` per (token, head), and the normalised
    output [tokens, heads, d]. With ``first_position`` the query tokens sit at positions
    ``first_position, first_position + 1, ...`` and see only keys at or before their own (causal).
    """
    group = query.shape[1] // keys.shape[1]
    keys, values = np.repeat(keys, group, axis=1), np.repeat(values, group, axis=1)  # kv head h // group
    logits = np.einsum("thd,lhd->thl", query, keys) * scale
    if first_position is not None:
        visible = np.arange(keys.shape[0]) <= first_position + np.arange(query.shape[0])[:, None]
        logits = np.where(visible[:, None, :], logits, -np.inf)
    max_logits = logits.max(axis=-1)
    weights = np.exp(logits - max_logits[..., None])  # max subtraction: exp never overflows
    exp_sums = weights.sum(axis=-1)
    return max_logits, exp_sums, np.einsum("thl,lhd->thd", weights, values) / exp_sums[..., None]


@dataclass(frozen=True)
class Partials:
    """What v2's partitions of one sequence hand to the merge (vLLM's layout, one row per partition)."""

    max_logits: np.ndarray  # [num_partitions, num_heads]
    exp_sums: np.ndarray  # [num_partitions, num_heads]: sum of exp(logit - the partition's max logit)
    outputs: np.ndarray  # [num_partitions, num_heads, head_dim]: each normalised by its own exp_sum


def partition_partials(query: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float,
                       partition_size: int) -> Partials:
    """Attention of one query row [heads, d] over each ``partition_size`` tokens of ``keys``/``values`` apart."""
    parts = [_softmax_attention(query[None], keys[start:start + partition_size], values[start:start + partition_size],
                                scale) for start in range(0, keys.shape[0], partition_size)]
    max_logits, exp_sums, outputs = (np.concatenate(column) for column in zip(*parts, strict=True))
    return Partials(max_logits, exp_sums, outputs)


def merge_partials(partials: Partials) -> np.ndarray:
    """Combine partitions into the full softmax: rescale each to the global max logit (log-sum-exp)."""
    global_max = partials.max_logits.max(axis=0)
    weights = partials.exp_sums * np.exp(partials.max_logits - global_max)  # each partition's share of the sum
    return np.einsum("ph,phd->hd", weights, partials.outputs) / weights.sum(axis=0)[:, None]


def _decode(query: np.ndarray, key_cache: np.ndarray, value_cache: np.ndarray, block_tables: np.ndarray,
            context_lens: np.ndarray, scale: float, partition_size: int | None) -> np.ndarray:
    """Decode on host arrays: v1 when ``partition_size`` is None, else v2's partitions and merge."""
    rows = []
    for seq, query_row in enumerate(query):
        keys, values = (_gather(cache, block_tables[seq], int(context_lens[seq])) for cache in (key_cache, value_cache))
        if partition_size is None:
            rows.append(_softmax_attention(query_row[None], keys, values, scale)[2][0])
        else:
            rows.append(merge_partials(partition_partials(query_row, keys, values, scale, partition_size)))
    return np.stack(rows)


def _prefill(query: np.ndarray, key_cache: np.ndarray, value_cache: np.ndarray, block_table: np.ndarray,
             context_len: int, scale: float) -> np.ndarray:
    """Causal attention of the last ``len(query)`` positions over the whole cached sequence."""
    keys, values = (_gather(cache, block_table, context_len) for cache in (key_cache, value_cache))
    return _softmax_attention(query, keys, values, scale, first_position=context_len - query.shape[0])[2]


def scatter(cache: np.ndarray, tokens: np.ndarray, slots: np.ndarray) -> None:
    """``cache[slot // block_size, :, slot % block_size, :] = token`` for every slot that is not -1."""
    block_size = cache.shape[2]
    kept = slots >= 0
    cache[slots[kept] // block_size, :, slots[kept] % block_size, :] = tokens[kept]


# ---- references: float64 NumPy, the ground truth every kernel is compared with ---------------------------


def _float64(array: Any, dtype: str | None) -> np.ndarray:
    return dtypes.to_float32(array, dtype).astype(np.float64)


def _host(array: Any) -> np.ndarray:
    return np.asarray(backend.to_numpy(array))


def gather_kv(key_cache: Any, value_cache: Any, block_table: Any, context_len: int,
              dtype: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One sequence's keys and values read through its table, contiguous, in float64:
    ``[context_len, num_kv_heads, head_dim]`` each (the dense view of a paged sequence)."""
    check_sequence(block_table, context_len, check_cache(key_cache, value_cache, dtype))
    table = _host(block_table)
    return (_gather(_float64(key_cache, dtype), table, int(context_len)),
            _gather(_float64(value_cache, dtype), table, int(context_len)))


def paged_decode_reference(query: Any, key_cache: Any, value_cache: Any, block_tables: Any, context_lens: Any,
                           scale: float | None = None, dtype: str | None = None) -> np.ndarray:
    """Decode attention (v1: one softmax over the whole context) in float64: ``[num_seqs, num_heads, head_dim]``."""
    problem = check_decode_inputs(query, key_cache, value_cache, block_tables, context_lens, scale, dtype)
    return _decode(_float64(query, dtype), _float64(key_cache, dtype), _float64(value_cache, dtype),
                   _host(block_tables), _host(context_lens), problem.scale, None)


def split_partitions_reference(query: Any, key_cache: Any, value_cache: Any, block_tables: Any, context_lens: Any,
                               scale: float | None = None, partition_size: int = DEFAULT_PARTITION_SIZE,
                               dtype: str | None = None) -> np.ndarray:
    """Decode attention the v2 way (flash-decoding) in float64: equal to :func:`paged_decode_reference`.

    Each partition of ``partition_size`` tokens yields (max logit, sum of exp, partial output) on its
    own; :func:`merge_partials` rescales them to one max and combines them.
    """
    problem = check_decode_inputs(query, key_cache, value_cache, block_tables, context_lens, scale, dtype)
    partition_size = check_partition_size(partition_size, problem.cache.block_size)
    return _decode(_float64(query, dtype), _float64(key_cache, dtype), _float64(value_cache, dtype),
                   _host(block_tables), _host(context_lens), problem.scale, partition_size)


def write_kv_reference(key: Any, value: Any, key_cache: Any, value_cache: Any, slot_mapping: Any,
                       dtype: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The caches after writing token ``i`` at ``slot_mapping[i]`` (skipping -1), as float64 copies."""
    check_write_inputs(key, value, key_cache, value_cache, slot_mapping, dtype)
    slots = _host(slot_mapping)
    keys, values = _float64(key_cache, dtype), _float64(value_cache, dtype)
    scatter(keys, _float64(key, dtype), slots)
    scatter(values, _float64(value, dtype), slots)
    return keys, values


def paged_prefill_reference(query: Any, key_cache: Any, value_cache: Any, block_table: Any, context_len: int,
                            num_new_tokens: int, scale: float | None = None, dtype: str | None = None) -> np.ndarray:
    """Causal attention of a sequence's last ``num_new_tokens`` positions in float64:
    ``[num_new_tokens, num_heads, head_dim]``. Their keys and values must already be in the cache (write_kv)."""
    problem = check_prefill_inputs(query, key_cache, value_cache, block_table, context_len, num_new_tokens, scale,
                                   dtype)
    return _prefill(_float64(query, dtype), _float64(key_cache, dtype), _float64(value_cache, dtype),
                    _host(block_table), int(context_len), problem.scale)


# ---- the GPU launch: the one place the CUDA kernels plug in ------------------------------------------------


def launch_kernel(op: str, problem: Cache | Attention, arrays: list[Any], scratch: Any = None) -> None:
    """Launch ``op`` on validated device arrays, outputs first (the kernels: ``paged_attention_cuda``).

    * ``"decode_v1"``, ``"decode_v2"``: ``[out, query, key_cache, value_cache, block_tables, context_lens]``
      with an :class:`Attention` problem (v2's has ``partition_size``);
    * ``"write_kv"``: ``[key_cache, value_cache, key, value, slot_mapping]`` with a :class:`Cache`;
    * ``"prefill"``: ``[out, query, key_cache, value_cache, block_table]`` with an :class:`Attention`
      whose ``max_context_len`` is the sequence's context length and ``rows`` its new tokens.
    """
    from course_lib.kernels import paged_attention_cuda

    paged_attention_cuda.launch(op, problem, arrays, scratch)


def step_workspace(op: str, problem: Attention) -> Any:
    """The scratch a prepared step of ``op`` owns on a GPU (v2's partial results), None otherwise."""
    if not backend.has_gpu():
        return None
    from course_lib.kernels import paged_attention_cuda

    return paged_attention_cuda.workspace(op, problem)


# ---- the public functions ------------------------------------------------------------------------------


def paged_attention_decode(
    query: Any, key_cache: Any, value_cache: Any, block_tables: Any, context_lens: Any, *,
    scale: float | None = None, version: str = "v2", partition_size: int | str = DEFAULT_PARTITION_SIZE,
    out: Any = None, dtype: str | None = None,
) -> Any:
    """Decode attention over paged KV caches: ``[num_seqs, num_heads, head_dim]`` in the query's type.

    ``version="v1"`` is one softmax per (sequence, head); ``"v2"`` splits the context into partitions
    of ``partition_size`` tokens (or ``"auto"``: see :func:`auto_partition_size`) and merges them. Both give
    the same result.
    """
    return decode_step(query, key_cache, value_cache, block_tables, context_lens, scale=scale, version=version,
                       partition_size=partition_size, out=out, dtype=dtype)()


def decode_step(
    query: Any, key_cache: Any, value_cache: Any, block_tables: Any, context_lens: Any, *,
    scale: float | None = None, version: str = "v2", partition_size: int | str = DEFAULT_PARTITION_SIZE,
    out: Any = None, dtype: str | None = None,
) -> PreparedStep:
    """Validate a decode step once; the returned step runs it and returns ``out``.

    Checking the block tables costs a copy to the host; an engine (or a benchmark, or a CUDA graph
    capture, which forbids such copies) checks once and then launches many times: ``step()`` again,
    or ``step(query=..., key_cache=..., value_cache=...)`` with another layer's arrays of the same
    layouts (the tables and context lengths stay the ones checked).
    """
    require_device_arrays({"query": query, "key_cache": key_cache, "value_cache": value_cache,
                           "block_tables": block_tables, "context_lens": context_lens})
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    problem = check_decode_inputs(query, key_cache, value_cache, block_tables, context_lens, scale, dtype)
    if version == "v2":
        if partition_size == "auto":
            partition_size = auto_partition_size(problem)
        problem = replace(problem, partition_size=check_partition_size(partition_size, problem.cache.block_size))
    out = output_buffer(out, tuple(query.shape), problem.cache.dtype, dtype)
    scratch = step_workspace(f"decode_{version}", problem)

    def run(a: dict[str, Any]) -> Any:
        if backend.has_gpu():
            launch_kernel(f"decode_{version}", problem, [a["out"], a["query"], a["key_cache"], a["value_cache"],
                                                         a["block_tables"], a["context_lens"]], scratch)
        else:
            a["out"][...] = _decode(_float32(a["query"], dtype), _float32(a["key_cache"], dtype),
                                    _float32(a["value_cache"], dtype), a["block_tables"], a["context_lens"],
                                    problem.scale, problem.partition_size).astype(a["out"].dtype)
        return a["out"]

    arrays = {"out": out, "query": query, "key_cache": key_cache, "value_cache": value_cache,
              "block_tables": block_tables, "context_lens": context_lens}
    return PreparedStep(arrays, ("out", "query", "key_cache", "value_cache"), run)


def write_kv(key: Any, value: Any, key_cache: Any, value_cache: Any, slot_mapping: Any, *,
             dtype: str | None = None) -> None:
    """Store each new token's key and value in the caches, in place, at ``slot_mapping[i]`` (-1: skip).

    The slot is ``block * block_size + offset``; -1 marks a padding token, as in vLLM.
    """
    write_kv_step(key, value, key_cache, value_cache, slot_mapping, dtype=dtype)()


def write_kv_step(key: Any, value: Any, key_cache: Any, value_cache: Any, slot_mapping: Any, *,
                  dtype: str | None = None) -> PreparedStep:
    """:func:`write_kv` with the slots checked once; call the step again with another layer's arrays."""
    require_device_arrays({"key": key, "value": value, "key_cache": key_cache, "value_cache": value_cache,
                            "slot_mapping": slot_mapping})
    cache = check_write_inputs(key, value, key_cache, value_cache, slot_mapping, dtype)

    def run(a: dict[str, Any]) -> None:
        if backend.has_gpu():
            launch_kernel("write_kv", cache, [a["key_cache"], a["value_cache"], a["key"], a["value"],
                                              a["slot_mapping"]])
        else:
            scatter(a["key_cache"], a["key"], a["slot_mapping"])
            scatter(a["value_cache"], a["value"], a["slot_mapping"])

    arrays = {"key": key, "value": value, "key_cache": key_cache, "value_cache": value_cache,
              "slot_mapping": slot_mapping}
    return PreparedStep(arrays, ("key", "value", "key_cache", "value_cache"), run)


def paged_prefill(
    query: Any, key_cache: Any, value_cache: Any, block_table: Any, context_len: int, num_new_tokens: int, *,
    scale: float | None = None, out: Any = None, dtype: str | None = None,
) -> Any:
    """Causal attention for the last ``num_new_tokens`` positions of one sequence, reading the cached prefix
    and the new tokens (written by :func:`write_kv` first) through ``block_table``.

    Returns ``[num_new_tokens, num_heads, head_dim]`` in the query's type.
    """
    return prefill_step(query, key_cache, value_cache, block_table, context_len, num_new_tokens, scale=scale,
                        out=out, dtype=dtype)()


def prefill_step(
    query: Any, key_cache: Any, value_cache: Any, block_table: Any, context_len: int, num_new_tokens: int, *,
    scale: float | None = None, out: Any = None, dtype: str | None = None,
) -> PreparedStep:
    """:func:`paged_prefill` with the block table checked once; call the step again with another layer's arrays."""
    require_device_arrays({"query": query, "key_cache": key_cache, "value_cache": value_cache,
                            "block_table": block_table})
    problem = check_prefill_inputs(query, key_cache, value_cache, block_table, context_len, num_new_tokens, scale,
                                   dtype)
    out = output_buffer(out, tuple(query.shape), problem.cache.dtype, dtype)
    scratch = step_workspace("prefill", problem)

    def run(a: dict[str, Any]) -> Any:
        if backend.has_gpu():
            launch_kernel("prefill", problem, [a["out"], a["query"], a["key_cache"], a["value_cache"],
                                               a["block_table"]], scratch)
        else:
            a["out"][...] = _prefill(_float32(a["query"], dtype), _float32(a["key_cache"], dtype),
                                     _float32(a["value_cache"], dtype), a["block_table"], int(context_len),
                                     problem.scale).astype(a["out"].dtype)
        return a["out"]

    arrays = {"out": out, "query": query, "key_cache": key_cache, "value_cache": value_cache,
              "block_table": block_table}
    return PreparedStep(arrays, ("out", "query", "key_cache", "value_cache"), run)


def _float32(array: Any, dtype: str | None) -> np.ndarray:
    """The NumPy path's float32 values of an array: a float32 cache is read in place, not copied every layer."""
    return dtypes.widen(array, dtype)
