"""Paged attention: the KV cache in fixed-size blocks; input checks, launch configuration and launchers.

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
  (the CUDA kernels are built for 64 and 128).
* decode: ``query`` ``[num_seqs, num_heads, head_dim]``, ``block_tables`` int32
  ``[num_seqs, max_blocks_per_seq]``, ``context_lens`` int32 ``[num_seqs]``; the output is
  ``[num_seqs, num_heads, head_dim]``. Only the first ``ceil(context_len / block_size)`` entries of a
  table row are read; the rest may hold -1 or anything.
* grouped-query attention: ``num_heads % num_kv_heads == 0`` and query head ``h`` reads kv head
  ``h // (num_heads // num_kv_heads)``.
* ``scale`` multiplies the logits; the default is ``1 / sqrt(head_dim)``.

Decode comes in two versions (``paged_attention.cu``). ``v1`` runs one thread block of THREADS threads per
(sequence, query head) over the whole context. ``v2`` (flash-decoding) splits the context into partitions of
``partition_size`` tokens, one block per (sequence, partition, group of query heads sharing a kv head), each
giving its max logit, its sum of exponentials and its normalised partial output; a merge kernel combines
them with a log-sum-exp rescaling: the same result, with many more blocks at work on a long context.

Two ways in. The public functions (``paged_attention_decode``, ``write_kv``) check every input, block tables
and slots included, on the host before anything launches: an entry outside the pool is a ``ValueError``,
never an out-of-bounds read. ``decode_unchecked`` only runs: it is for a caller that checked the indices
already, once for many launches (an engine step's layers, a benchmark's timed loop, a CUDA graph capture,
which cannot copy the tables to the host). On a GPU the kernels run; in CPU mode the same computation runs
in NumPy (``paged_attention_reference``; fp32 accumulation, outputs rounded to the input's type).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from course_lib import backend, dtypes, emulator
from course_lib import compile as cuda_compile
from course_lib.kernels import paged_attention_reference as reference
from course_lib.kernels.kv_blocks import blocks_for

SOURCE = "paged_attention.cu"
BLOCK_SIZES = (8, 16, 32)
HEAD_DIM_MULTIPLE = 8  # 16 bytes of fp16/bf16: a row is whole vector loads
MAX_HEAD_DIM = 256
HEAD_DIMS = (64, 128)  # the head sizes paged_attention.cu is instantiated for
MAX_INT32 = 2**31 - 1
VERSIONS = ("v1", "v2")
DEFAULT_PARTITION_SIZE = 512
# Shorter partitions give the merge kernel more to do than they save: on an H100, the 1B model's decode step
# at batch 1 over 512 tokens was faster with this floor than with 32 or 128 (a one-off probe, about 1%).
MIN_PARTITION_SIZE = 64
BUSY_GRID = 256  # thread blocks that keep an H100's 132 SMs busy (about two each)
THREADS = 128
# Each warp of a decode block streams the cache through a ring of STAGES tiles of TILE_TOKENS K rows and
# as many V rows, in dynamic shared memory; these mirror paged::TILE and paged::STAGES in the .cu file.
TILE_TOKENS, STAGES = 8, 2
GROUPED_HEADS = 4  # v2 reads a K/V tile once for 4 query heads when heads come in groups of 4 per KV head
PACK = 8  # values per thread and load in write_kv


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
    """A validated decode problem: ``rows`` query rows (one per sequence, or one per token in an engine step),
    each reading up to ``max_context_len`` tokens through its row of the block tables."""

    cache: Cache
    num_heads: int
    rows: int
    max_blocks_per_seq: int
    max_context_len: int
    scale: float

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
    """Validate a decode step, every index included: one query row per sequence against its paged context.

    The arrays may live on the host or the device (the references take both); the launchers also require
    device arrays (``require_device_arrays``)."""
    cache = check_cache(key_cache, value_cache, dtype)
    max_context_len = validate_block_tables(block_tables, context_lens, cache.num_blocks, cache.block_size)
    return decode_problem(query, key_cache, value_cache, block_tables, max_context_len, scale, dtype)


def decode_problem(
    query: Any, key_cache: Any, value_cache: Any, block_tables: Any, max_context_len: int,
    scale: float | None = None, dtype: str | None = None,
) -> Attention:
    """The decode problem of arrays whose indices the caller has checked: types and shapes are checked here,
    without reading any array back to the host.

    ``max_context_len`` must be at least every context length: v2's grid and scratch are sized by it. An
    engine knows it from its own step record, as it knows the tables it checked there.
    """
    cache = check_cache(key_cache, value_cache, dtype)
    num_heads = check_heads("query", query, cache, dtype)
    _require_int32("block_tables", block_tables)
    if block_tables.ndim != 2:
        raise ValueError(f"block_tables must be 2-D [rows, max_blocks_per_seq], got shape {tuple(block_tables.shape)}")
    if block_tables.shape[0] != query.shape[0]:
        raise ValueError(f"query has {query.shape[0]} rows but block_tables has {block_tables.shape[0]} rows "
                         "(one table row per query row)")
    max_blocks = int(block_tables.shape[1])
    _require_count("max_context_len", max_context_len)
    if max_context_len > max_blocks * cache.block_size:
        raise ValueError(f"max_context_len={max_context_len} needs more than the tables' {max_blocks} blocks of "
                         f"{cache.block_size} tokens")
    return Attention(cache, num_heads, int(query.shape[0]), max_blocks, int(max_context_len),
                     check_scale(scale, cache.head_dim))


def check_partition_size(partition_size: int, block_size: int) -> int:
    """v2's partition length: a positive multiple of ``block_size``, so no block straddles two partitions."""
    if isinstance(partition_size, bool) or not isinstance(partition_size, numbers.Integral) or partition_size < 1:
        raise ValueError(f"partition_size must be a positive integer or 'auto', got {partition_size!r}")
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


def require_device_arrays(arrays: dict[str, Any], on_host: bool = False) -> None:
    """Kernels take arrays of the current mode (NumPy ones ``on_host``, for the warp emulator), C-contiguous
    (they index by computed offsets)."""
    for name, array in arrays.items():
        dtypes.require_device_array(name, array, on_host)
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


# ---- references: float64 NumPy (paged_attention_reference's arithmetic) on checked inputs ------------------


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
    return (reference.gather(_float64(key_cache, dtype), table, int(context_len)),
            reference.gather(_float64(value_cache, dtype), table, int(context_len)))


def paged_decode_reference(query: Any, key_cache: Any, value_cache: Any, block_tables: Any, context_lens: Any,
                           scale: float | None = None, dtype: str | None = None) -> np.ndarray:
    """Decode attention (v1: one softmax over the whole context) in float64: ``[num_seqs, num_heads, head_dim]``."""
    problem = check_decode_inputs(query, key_cache, value_cache, block_tables, context_lens, scale, dtype)
    return reference.decode(_float64(query, dtype), _float64(key_cache, dtype), _float64(value_cache, dtype),
                            _host(block_tables), _host(context_lens), problem.scale)


def split_partitions_reference(query: Any, key_cache: Any, value_cache: Any, block_tables: Any, context_lens: Any,
                               scale: float | None = None, partition_size: int = DEFAULT_PARTITION_SIZE,
                               dtype: str | None = None) -> np.ndarray:
    """Decode attention the v2 way (flash-decoding) in float64: equal to :func:`paged_decode_reference`.

    Each partition of ``partition_size`` tokens yields (max logit, sum of exp, partial output) on its
    own; ``paged_attention_reference.merge_partials`` rescales them to one max and combines them.
    """
    problem = check_decode_inputs(query, key_cache, value_cache, block_tables, context_lens, scale, dtype)
    partition_size = check_partition_size(partition_size, problem.cache.block_size)
    return reference.decode(_float64(query, dtype), _float64(key_cache, dtype), _float64(value_cache, dtype),
                            _host(block_tables), _host(context_lens), problem.scale, partition_size)


def write_kv_reference(key: Any, value: Any, key_cache: Any, value_cache: Any, slot_mapping: Any,
                       dtype: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The caches after writing token ``i`` at ``slot_mapping[i]`` (skipping -1), as float64 copies."""
    check_write_inputs(key, value, key_cache, value_cache, slot_mapping, dtype)
    slots = _host(slot_mapping)
    keys, values = _float64(key_cache, dtype), _float64(value_cache, dtype)
    reference.scatter(keys, _float64(key, dtype), slots)
    reference.scatter(values, _float64(value, dtype), slots)
    return keys, values


# ---- the launch configuration: kernels, grids, partitions, shared memory, scratch -------------------------


def kernel_names() -> tuple[str, ...]:
    """Every instantiation in paged_attention.cu, as name expressions."""
    names = []
    for cuda_type in dtypes.CUDA_TYPES.values():
        for head_dim in HEAD_DIMS:
            for block_size in BLOCK_SIZES:
                names += [f"paged_attention<{cuda_type}, {head_dim}, {block_size}, 1, false>",
                          f"paged_attention<{cuda_type}, {head_dim}, {block_size}, 1, true>",
                          f"paged_attention<{cuda_type}, {head_dim}, {block_size}, {GROUPED_HEADS}, true>"]
            names += [f"paged_attention_merge<{cuda_type}, {head_dim}>", f"write_kv<{cuda_type}, {head_dim}>"]
    return tuple(names)


@functools.cache
def _module() -> Any:
    return cuda_compile.load_file(SOURCE, name_expressions=kernel_names())


@functools.cache
def _gpu_kernel(name: str, shared_bytes: int = 0) -> Any:
    """The kernel ``name``, allowed ``shared_bytes`` of dynamic shared memory."""
    return cuda_compile.allow_shared_memory(_module().get_function(name), shared_bytes)


def decode_grids(version: str, rows: int, num_heads: int, num_kv_heads: int, max_context_len: int,
                 partition_size: int | None = None) -> dict[str, tuple[int, int, int]]:
    """The grid of each kernel a decode step launches: how many thread blocks share the work.

    v1: one block per (sequence, query head). v2: one per (partition, group of query heads, sequence),
    then one merge block per (query head, sequence).
    """
    if version == "v1":
        return {"decode": (1, num_heads, rows)}
    heads = GROUPED_HEADS if (num_heads // num_kv_heads) % GROUPED_HEADS == 0 else 1
    partitions = math.ceil(max_context_len / partition_size)
    return {"decode": (partitions, num_heads // heads, rows), "merge": (num_heads, rows, 1)}


def auto_partition_size(problem: Attention) -> int:
    """v2's partition length for ``problem``: 512 tokens, halved while the grid has fewer than BUSY_GRID blocks.

    A batch of 64 long contexts gives thousands of blocks; one sequence of 512 tokens with 8 KV heads gives 8,
    on a GPU of 132 SMs, and each of them walks all 512 tokens alone. Shorter partitions give more blocks with
    less to read each; the merge kernel pays a little for the extra partitions. The length stays a multiple of
    the block size and at least MIN_PARTITION_SIZE.
    """
    def blocks(size: int) -> int:
        return math.prod(decode_grids("v2", problem.rows, problem.num_heads, problem.cache.num_kv_heads,
                                      problem.max_context_len, size)["decode"])

    size, floor = DEFAULT_PARTITION_SIZE, max(MIN_PARTITION_SIZE, problem.cache.block_size)
    while size // 2 >= floor and blocks(size) < BUSY_GRID:
        size //= 2
    return size


def ring_bytes(head_dim: int, dtype: str) -> int:
    """Dynamic shared memory of one decode block: every warp's ring of STAGES tiles of K and V rows."""
    warps = THREADS // 32
    return warps * STAGES * 2 * TILE_TOKENS * head_dim * dtypes.ITEM_BYTES[dtype]


@dataclass(frozen=True)
class Workspace:
    """v2's partial results between its two kernels (float32), one row per (query row, head, partition)."""

    out: Any  # [rows, num_heads, partitions, head_dim]
    max: Any  # [rows, num_heads, partitions]
    sum: Any


def workspace(problem: Attention, partition_size: int, xp: Any = None) -> Workspace:
    """New scratch for v2's partials on ``problem`` split into partitions of ``partition_size`` tokens, as arrays
    of ``xp`` (default ``backend.xp``)."""
    partitions = math.ceil(problem.max_context_len / partition_size)
    xp, shape = xp or backend.xp, (problem.rows, problem.num_heads, partitions)
    return Workspace(xp.empty((*shape, problem.cache.head_dim), dtype=xp.float32), xp.empty(shape, dtype=xp.float32),
                     xp.empty(shape, dtype=xp.float32))


@dataclass(frozen=True)
class DecodePlan:
    """How a checked decode problem runs: v1 (``partition_size`` None) or v2, and v2's scratch on a GPU.

    Whoever keeps the plan owns the scratch. An engine step keeps one plan for all its layers; a CUDA graph
    that captured the step replays on the scratch's addresses, so it was allocated before the capture and
    lives as long as the step, never shared with another.
    """

    problem: Attention
    partition_size: int | None
    scratch: Workspace | None

    @property
    def version(self) -> str:
        return "v1" if self.partition_size is None else "v2"


def plan_decode(problem: Attention, version: str = "v2",
                partition_size: int | str = DEFAULT_PARTITION_SIZE) -> DecodePlan:
    """Choose how ``problem`` runs: ``version``, v2's ``partition_size`` (or ``"auto"``: see
    :func:`auto_partition_size`), and on a GPU v2's scratch."""
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    if version == "v1":
        return DecodePlan(problem, None, None)
    if partition_size == "auto":
        partition_size = auto_partition_size(problem)
    partition_size = check_partition_size(partition_size, problem.cache.block_size)
    return DecodePlan(problem, partition_size, workspace(problem, partition_size) if backend.has_gpu() else None)


# ---- the launches: validated device arrays in, outputs first as in paged_attention.cu ---------------------


def _require_instantiated(cache: Cache) -> None:
    if cache.head_dim not in HEAD_DIMS:
        raise ValueError(f"the CUDA kernels are built for head_dim in {HEAD_DIMS}, got {cache.head_dim}")


def launch_decode(plan: DecodePlan, out: Any, query: Any, key_cache: Any, value_cache: Any, block_tables: Any,
                  context_lens: Any, kernel: Callable[..., Any] | None = None) -> None:
    """Launch v1, or v2's partitions and merge, for ``plan`` (nothing checked but the kernel's existence).

    ``kernel(name, shared_bytes)`` gives the kernels: CuPy's by default, the warp emulator's for
    :func:`emulate_decode`.
    """
    get_kernel = kernel or _gpu_kernel
    problem, cache = plan.problem, plan.problem.cache
    _require_instantiated(cache)
    cuda_type, head_dim = dtypes.CUDA_TYPES[cache.dtype], cache.head_dim
    common = (query, key_cache, value_cache, block_tables, context_lens, np.int32(problem.num_heads),
              np.int32(cache.num_kv_heads), np.int32(problem.max_blocks_per_seq))
    scale = np.float32(problem.scale)
    shared = ring_bytes(head_dim, cache.dtype)
    grids = decode_grids(plan.version, problem.rows, problem.num_heads, cache.num_kv_heads, problem.max_context_len,
                         plan.partition_size)
    if plan.version == "v1":  # one partition as long as the longest context, written straight to out
        unused = context_lens  # v1 never touches the float partial-result arguments: any 4-byte array stands in
        name = f"paged_attention<{cuda_type}, {head_dim}, {cache.block_size}, 1, false>"
        get_kernel(name, shared)(grids["decode"], (THREADS,), (out, unused, unused, unused, *common,
                                                            np.int32(problem.max_context_len), scale),
                              shared_mem=shared)
        return
    partitions, head_groups, _ = grids["decode"]
    heads = problem.num_heads // head_groups
    scratch = plan.scratch
    name = f"paged_attention<{cuda_type}, {head_dim}, {cache.block_size}, {heads}, true>"
    get_kernel(name, shared)(grids["decode"], (THREADS,), (out, scratch.out, scratch.max, scratch.sum, *common,
                                                        np.int32(plan.partition_size), scale), shared_mem=shared)
    merge = f"paged_attention_merge<{cuda_type}, {head_dim}>"
    get_kernel(merge)(grids["merge"], (head_dim,),
                   (out, scratch.out, scratch.max, scratch.sum, context_lens, np.int32(problem.num_heads),
                    np.int32(partitions), np.int32(plan.partition_size)))


def launch_write_kv(cache: Cache, key_cache: Any, value_cache: Any, key: Any, value: Any, slot_mapping: Any,
                    kernel: Callable[..., Any] | None = None) -> None:
    """One block per token, a pack of PACK values of K and of V per thread (``kernel``: as in launch_decode)."""
    get_kernel = kernel or _gpu_kernel
    _require_instantiated(cache)
    threads = min(1024, cache.num_kv_heads * cache.head_dim // PACK)
    name = f"write_kv<{dtypes.CUDA_TYPES[cache.dtype]}, {cache.head_dim}>"
    get_kernel(name)((key.shape[0],), (threads,), (key_cache, value_cache, key, value, slot_mapping,
                                                np.int32(cache.num_kv_heads), np.int32(cache.block_size)))


# ---- decode on checked arrays, and the public functions ----------------------------------------------------


def emulated_kernel(name: str, shared_bytes: int = 0) -> Any:
    """The kernel ``name`` built for the CPU warp emulator (``course_lib.emulator``), for the launchers above."""
    return emulator.load_file(SOURCE, (name,)).get_function(name)


def emulate_decode(query: np.ndarray, key_cache: np.ndarray, value_cache: np.ndarray, block_tables: np.ndarray,
                   context_lens: np.ndarray, *, scale: float | None = None, version: str = "v2",
                   partition_size: int | str = DEFAULT_PARTITION_SIZE, dtype: str | None = None) -> np.ndarray:
    """:func:`paged_attention_decode` by paged_attention.cu's own kernels, run on the CPU by the warp emulator.

    For CPU mode and small problems: there the entry points compute with NumPy, which checks the inputs and the
    API but not the kernels; this runs them (every GPU thread a fiber). On a GPU the entry points run them for real.
    """
    if backend.has_gpu():
        raise RuntimeError("emulate_decode() is for CPU mode: on a GPU, paged_attention_decode runs the kernels")
    problem = check_decode_inputs(query, key_cache, value_cache, block_tables, context_lens, scale, dtype)
    _require_instantiated(problem.cache)
    plan = plan_decode(problem, version, partition_size)
    if plan.partition_size is not None:
        plan = DecodePlan(problem, plan.partition_size, workspace(problem, plan.partition_size, np))
    out = np.full(query.shape, np.nan, query.dtype)  # an element no thread writes stays NaN
    launch_decode(plan, out, query, key_cache, value_cache, block_tables, context_lens, kernel=emulated_kernel)
    return out


def decode_unchecked(plan: DecodePlan, query: Any, key_cache: Any, value_cache: Any, block_tables: Any,
                     context_lens: Any, out: Any = None) -> Any:
    """Decode attention with ``plan`` on arrays of its problem: the kernels on a GPU, NumPy in CPU mode.

    Nothing is checked, and nothing is read back to the host: the caller vouches that the arrays have the
    problem's layouts and that every index was checked (:func:`check_decode_inputs`, or an engine's own check
    of its step). ``out`` (default: a new array) gets ``[rows, num_heads, head_dim]`` and is returned.
    """
    problem = plan.problem
    kind = problem.cache.dtype
    if out is None:
        out = dtypes.empty((problem.rows, problem.num_heads, problem.cache.head_dim), kind)
    if backend.has_gpu():
        launch_decode(plan, out, query, key_cache, value_cache, block_tables, context_lens)
    else:
        out[...] = reference.decode(dtypes.widen(query, kind), dtypes.widen(key_cache, kind),
                                    dtypes.widen(value_cache, kind), block_tables, context_lens, problem.scale,
                                    plan.partition_size).astype(out.dtype)
    return out


def paged_attention_decode(
    query: Any, key_cache: Any, value_cache: Any, block_tables: Any, context_lens: Any, *,
    scale: float | None = None, version: str = "v2", partition_size: int | str = DEFAULT_PARTITION_SIZE,
    out: Any = None, dtype: str | None = None,
) -> Any:
    """Decode attention over paged KV caches: ``[num_seqs, num_heads, head_dim]`` in the query's type.

    ``version="v1"`` is one softmax per (sequence, head); ``"v2"`` splits the context into partitions
    of ``partition_size`` tokens (or ``"auto"``: see :func:`auto_partition_size`) and merges them. Both give
    the same result. Every input is checked first, the block tables on the host.
    """
    require_device_arrays({"query": query, "key_cache": key_cache, "value_cache": value_cache,
                           "block_tables": block_tables, "context_lens": context_lens})
    problem = check_decode_inputs(query, key_cache, value_cache, block_tables, context_lens, scale, dtype)
    plan = plan_decode(problem, version, partition_size)
    out = output_buffer(out, tuple(query.shape), problem.cache.dtype, dtype)
    return decode_unchecked(plan, query, key_cache, value_cache, block_tables, context_lens, out)


def write_kv(key: Any, value: Any, key_cache: Any, value_cache: Any, slot_mapping: Any, *,
             dtype: str | None = None) -> None:
    """Store each new token's key and value in the caches, in place, at ``slot_mapping[i]`` (-1: skip).

    The slot is ``block * block_size + offset``; -1 marks a padding token, as in vLLM.
    """
    require_device_arrays({"key": key, "value": value, "key_cache": key_cache, "value_cache": value_cache,
                           "slot_mapping": slot_mapping})
    cache = check_write_inputs(key, value, key_cache, value_cache, slot_mapping, dtype)
    if backend.has_gpu():
        launch_write_kv(cache, key_cache, value_cache, key, value, slot_mapping)
    else:
        reference.scatter(key_cache, key, slot_mapping)
        reference.scatter(value_cache, value, slot_mapping)
