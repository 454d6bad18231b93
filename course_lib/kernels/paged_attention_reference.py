"""Paged attention in NumPy: what the CUDA kernels of ``paged_attention.cu`` compute, on host arrays.

Two callers run these functions: the float64 references of ``paged_attention`` (``paged_decode_reference``
and the others, which check their inputs first and hand float64 copies here), and CPU mode's decode and
cache write, in float32. Neither checks anything here: every index was checked by the caller, as a
kernel's launcher checks them before a launch.

The layout is ``paged_attention``'s: caches ``[num_blocks, num_kv_heads, block_size, head_dim]``, token
``t`` of a sequence in block ``block_table[t // block_size]`` at row ``t % block_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from course_lib.kernels.kv_blocks import blocks_for


def gather(cache: np.ndarray, block_table: np.ndarray, context_len: int) -> np.ndarray:
    """One sequence's keys or values, contiguous: ``[context_len, num_kv_heads, head_dim]``."""
    _, num_kv_heads, block_size, head_dim = cache.shape
    tiles = cache[block_table[:blocks_for(context_len, block_size)]]  # [blocks, kv heads, block_size, head_dim]
    return tiles.transpose(0, 2, 1, 3).reshape(-1, num_kv_heads, head_dim)[:context_len]


def softmax_attention(query: np.ndarray, keys: np.ndarray, values: np.ndarray,
                      scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Attention of ``query`` [rows, heads, d] over ``keys``/``values`` [length, kv heads, d].

    Returns the max logit and the sum of ``exp(logit - max)`` per (row, head), and the normalised output
    [rows, heads, d]. Query head ``h`` reads kv head ``h // (heads // kv_heads)`` (grouped-query attention).
    """
    group = query.shape[1] // keys.shape[1]
    keys, values = np.repeat(keys, group, axis=1), np.repeat(values, group, axis=1)
    logits = np.einsum("thd,lhd->thl", query, keys) * scale
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
    parts = [softmax_attention(query[None], keys[start:start + partition_size], values[start:start + partition_size],
                               scale) for start in range(0, keys.shape[0], partition_size)]
    max_logits, exp_sums, outputs = (np.concatenate(column) for column in zip(*parts, strict=True))
    return Partials(max_logits, exp_sums, outputs)


def merge_partials(partials: Partials) -> np.ndarray:
    """Combine partitions into the full softmax: rescale each to the global max logit (log-sum-exp)."""
    global_max = partials.max_logits.max(axis=0)
    weights = partials.exp_sums * np.exp(partials.max_logits - global_max)  # each partition's share of the sum
    return np.einsum("ph,phd->hd", weights, partials.outputs) / weights.sum(axis=0)[:, None]


def decode(query: np.ndarray, key_cache: np.ndarray, value_cache: np.ndarray, block_tables: np.ndarray,
           context_lens: np.ndarray, scale: float, partition_size: int | None = None) -> np.ndarray:
    """Decode in the precision of the arrays given: v1 (one softmax) when ``partition_size`` is None, else v2's
    partitions and merge. ``[rows, num_heads, head_dim]``, a query row per table row."""
    rows = []
    for seq, query_row in enumerate(query):
        keys, values = (gather(cache, block_tables[seq], int(context_lens[seq])) for cache in (key_cache, value_cache))
        if partition_size is None:
            rows.append(softmax_attention(query_row[None], keys, values, scale)[2][0])
        else:
            rows.append(merge_partials(partition_partials(query_row, keys, values, scale, partition_size)))
    return np.stack(rows)


def scatter(cache: np.ndarray, tokens: np.ndarray, slots: np.ndarray) -> None:
    """``cache[slot // block_size, :, slot % block_size, :] = token`` for every slot that is not -1."""
    block_size = cache.shape[2]
    kept = slots >= 0
    cache[slots[kept] // block_size, :, slots[kept] % block_size, :] = tokens[kept]
