"""The GPU side of paged attention: launchers for the kernels of ``paged_attention.cu``.

``paged_attention.py`` validates every input (block tables included) and then calls :func:`launch`
with device arrays, outputs first. Nothing here checks indices again: it only picks the kernel
instantiation and the grid.

* v1: one block of THREADS threads per (sequence, query head), the whole context in one pass.
* v2: one block per (sequence, partition, group of query heads sharing a KV head), then a merge kernel
  that combines the partitions with their log-sum-exp.
* prefill: the same decode kernel, one "sequence" per new token: new token i of a sequence whose
  context ends at L attends to the first L - num_new + i + 1 tokens through the same block table,
  which is exactly causal attention over the cached prefix and the new tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from course_lib import backend, dtypes
from course_lib import compile as cuda_compile

if TYPE_CHECKING:
    from course_lib.kernels.paged_attention import Attention, Cache

SOURCE = "paged_attention.cu"
HEAD_DIMS = (64, 128)  # the head sizes paged_attention.cu is instantiated for
BLOCK_SIZES = (8, 16, 32)
THREADS = 128
# Each warp of a decode block streams the cache through a ring of STAGES tiles of TILE_TOKENS K rows and
# as many V rows, in dynamic shared memory; these mirror paged::TILE and paged::STAGES in the .cu file.
TILE_TOKENS, STAGES = 8, 2
GROUPED_HEADS = 4  # v2 reads a K/V tile once for 4 query heads when heads come in groups of 4 per KV head
PACK = 8  # values per thread and load in write_kv
PREFILL_PARTITION = 512


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
def _kernel(name: str, shared_bytes: int = 0) -> Any:
    """The kernel ``name``, allowed ``shared_bytes`` of dynamic shared memory."""
    return cuda_compile.allow_shared_memory(_module().get_function(name), shared_bytes)


def ring_bytes(head_dim: int, dtype: str) -> int:
    """Dynamic shared memory of one decode block: every warp's ring of STAGES tiles of K and V rows."""
    warps = THREADS // 32
    return warps * STAGES * 2 * TILE_TOKENS * head_dim * dtypes.ITEM_BYTES[dtype]


@dataclasses.dataclass(frozen=True)
class Workspace:
    """v2's partial results between its two kernels (float32), owned by one prepared step.

    A CUDA graph that captured the step reads and writes these addresses on every replay, so they must live
    as long as the step and belong to nobody else: a cache shared by all steps could evict them and let the
    allocator hand their memory to other arrays.
    """

    out: Any  # [rows, num_heads, partitions, head_dim]
    max: Any  # [rows, num_heads, partitions]
    sum: Any


def workspace(op: str, problem: Attention) -> Workspace | None:
    """The scratch ``op`` needs on ``problem``: v2's partials for decode_v2 and prefill, none otherwise."""
    if op not in ("decode_v2", "prefill"):
        return None
    decode = _prefill_as_decode(problem) if op == "prefill" else problem
    partitions = decode_grids("v2", decode.rows, decode.num_heads, decode.cache.num_kv_heads, decode.max_context_len,
                              decode.partition_size)["decode"][0]
    xp, rows_heads = backend.xp, (decode.rows, decode.num_heads, partitions)
    return Workspace(xp.empty((*rows_heads, decode.cache.head_dim), dtype=xp.float32),
                     xp.empty(rows_heads, dtype=xp.float32), xp.empty(rows_heads, dtype=xp.float32))


def launch(op: str, problem: Cache | Attention, arrays: list[Any], scratch: Workspace | None = None) -> None:
    """Launch ``op`` ("decode_v1", "decode_v2", "write_kv" or "prefill") on validated device arrays
    (v2 and prefill also take their ``workspace``)."""
    cache = getattr(problem, "cache", problem)
    if cache.head_dim not in HEAD_DIMS:
        raise ValueError(f"the CUDA kernels are built for head_dim in {HEAD_DIMS}, got {cache.head_dim}")
    if op == "write_kv":
        _write_kv(cache, *arrays)
    elif op == "prefill":
        _prefill(problem, scratch, *arrays)
    else:
        _decode(op.removeprefix("decode_"), problem, scratch, *arrays)


def _write_kv(cache: Cache, key_cache: Any, value_cache: Any, key: Any, value: Any, slot_mapping: Any) -> None:
    threads = min(1024, cache.num_kv_heads * cache.head_dim // PACK)
    name = f"write_kv<{dtypes.CUDA_TYPES[cache.dtype]}, {cache.head_dim}>"
    _kernel(name)((key.shape[0],), (threads,), (key_cache, value_cache, key, value, slot_mapping,
                                                np.int32(cache.num_kv_heads), np.int32(cache.block_size)))


def _prefill_as_decode(problem: Attention) -> Attention:
    return dataclasses.replace(problem, partition_size=PREFILL_PARTITION)


def _prefill(problem: Attention, scratch: Workspace, out: Any, query: Any, key_cache: Any, value_cache: Any,
             block_table: Any) -> None:
    xp = backend.xp
    first = problem.max_context_len - problem.rows  # context before the first new token
    tables = xp.ascontiguousarray(xp.broadcast_to(block_table[None, :], (problem.rows, block_table.shape[0])))
    context_lens = xp.arange(first + 1, problem.max_context_len + 1, dtype=xp.int32)
    _decode("v2", _prefill_as_decode(problem), scratch, out, query, key_cache, value_cache, tables, context_lens)


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


def _decode(version: str, problem: Attention, scratch: Workspace | None, out: Any, query: Any, key_cache: Any,
            value_cache: Any, block_tables: Any, context_lens: Any) -> None:
    cache = problem.cache
    cuda_type, head_dim = dtypes.CUDA_TYPES[cache.dtype], cache.head_dim
    common = (query, key_cache, value_cache, block_tables, context_lens, np.int32(problem.num_heads),
              np.int32(cache.num_kv_heads), np.int32(problem.max_blocks_per_seq))
    scale = np.float32(problem.scale)
    shared = ring_bytes(head_dim, cache.dtype)
    grids = decode_grids(version, problem.rows, problem.num_heads, cache.num_kv_heads, problem.max_context_len,
                         problem.partition_size)
    if version == "v1":  # one partition as long as the longest context, written straight to out
        unused = out  # v1 never touches the partial-result arguments
        name = f"paged_attention<{cuda_type}, {head_dim}, {cache.block_size}, 1, false>"
        _kernel(name, shared)(grids["decode"], (THREADS,), (out, unused, unused, unused, *common,
                                                            np.int32(problem.max_context_len), scale),
                              shared_mem=shared)
        return
    partitions, head_groups, _ = grids["decode"]
    heads = problem.num_heads // head_groups
    partial_out, partial_max, partial_sum = scratch.out, scratch.max, scratch.sum
    name = f"paged_attention<{cuda_type}, {head_dim}, {cache.block_size}, {heads}, true>"
    _kernel(name, shared)(grids["decode"], (THREADS,), (out, partial_out, partial_max, partial_sum, *common,
                                                        np.int32(problem.partition_size), scale), shared_mem=shared)
    merge = f"paged_attention_merge<{cuda_type}, {head_dim}>"
    _kernel(merge)(grids["merge"], (head_dim,),
                   (out, partial_out, partial_max, partial_sum, context_lens, np.int32(problem.num_heads),
                    np.int32(partitions), np.int32(problem.partition_size)))
