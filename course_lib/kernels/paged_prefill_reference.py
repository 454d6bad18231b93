"""Prefill attention over a paged KV cache, tile by tile, in NumPy: the loops a FlashAttention-2-style kernel runs.

Today the engine computes a prompt as decode rows: each prompt token is one query that reads its whole prefix
again, so a 512-token prompt reads its first keys 512 times and its keys about 256 times on average. A prefill
kernel reads each key and value tile once for a whole *tile of queries*, which turns a memory-bound loop into
matrix products a tensor core can run. This module is that kernel's algorithm with every loop spelled out:

* a thread block owns one **query tile** (``query_tile`` consecutive positions of one sequence) and one **kv-head
  group**: the ``group = num_heads // num_kv_heads`` query heads that read the same kv head (grouped-query
  attention). Its rows are (position, head) pairs, so one key tile serves all of them;
* it streams **key/value tiles** of ``key_tile`` positions from the paged cache, from position 0 up to its own
  last query. A tile's keys may lie in several blocks: each tile looks its blocks up in the block table;
* it keeps a **running max, running sum and accumulator** per row (the online softmax), so no logit array the size
  of the context exists;
* the **causal mask** is needed only on *diagonal* tiles, those holding a key that lies after one of the tile's
  queries. Tiles wholly before the queries need no mask; tiles wholly after them are never read.

The queries of a sequence are the tokens of this step, at positions ``context_len - query_len`` ..
``context_len - 1``: a whole prompt (no prefix), a chunk of a long prompt (chunked prefill: the earlier chunks are
in the cache), or the rest of a prompt whose first blocks were a prefix-cache hit. Their keys and values are in the
cache already (written before attention, as the engine does), so every key is read through the block table.

The layout is ``paged_attention``'s: caches ``[num_blocks, num_kv_heads, block_size, head_dim]``; the batch is flat,
as the engine's: ``query [total_new_tokens, num_heads, head_dim]``, sequence ``s`` owning rows
``query_start_loc[s]:query_start_loc[s + 1]``. ``tiled_prefill`` computes in the arrays' precision (float32 models a
kernel's fp32 accumulators); ``prefill_reference`` is the float64 full softmax the tests and checkers trust.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from course_lib.kernels.kv_blocks import blocks_for
from course_lib.kernels.paged_attention_reference import gather

DEFAULT_QUERY_TILE = 64  # positions a thread block owns: 64 positions x 4 heads = 256 rows for a tensor core
DEFAULT_KEY_TILE = 64  # positions a key/value tile holds: 4 blocks of 16


@dataclass(frozen=True)
class KeyTile:
    """Key positions ``start .. stop - 1`` of one sequence; ``masked`` on a diagonal tile."""

    start: int
    stop: int
    masked: bool  # some key of the tile lies after some query of the query tile: the causal mask is needed


@dataclass(frozen=True)
class TileVisit:
    """One iteration of a thread block's key loop, recorded for the chapter's counts and pictures."""

    seq: int
    kv_head: int
    query_start: int  # positions of the block's queries: query_start .. query_stop - 1
    query_stop: int
    key_tile: KeyTile
    blocks: tuple[int, ...]  # the cache blocks the key tile's positions lie in, looked up in the block table


def query_tiles(first_position: int, context_len: int, query_tile: int) -> Iterator[tuple[int, int]]:
    """The query tiles of one sequence's new tokens, ``(start, stop)`` positions, ``query_tile`` at a time.

    They start at the chunk's first position, not at a multiple of the tile: a kernel's blocks cover the rows of the
    step, whatever prefix lies before them.
    """
    for start in range(first_position, context_len, query_tile):
        yield start, min(start + query_tile, context_len)


def key_tiles_for(query_start: int, query_stop: int, key_tile: int) -> list[KeyTile]:
    """The key tiles a query tile reads: position 0 up to its last query, in tiles aligned to multiples of key_tile.

    Keys past the last query (``query_stop - 1``) are masked for every row, so they are never loaded. A tile needs
    the mask when its last key lies after the tile's first query: that is the diagonal, one or two tiles per query
    tile when key tiles are at least as long as query tiles (more when they are shorter). Every tile before it is
    visible to every row and runs without a mask.
    """
    tiles = []
    for start in range(0, query_stop, key_tile):
        stop = min(start + key_tile, query_stop)
        tiles.append(KeyTile(start, stop, masked=stop - 1 > query_start))
    return tiles


def causal_mask(query_positions: np.ndarray, key_start: int, key_stop: int) -> np.ndarray:
    """``[rows, keys]`` booleans, True where the key may be attended to: key position <= query position."""
    return np.arange(key_start, key_stop)[None, :] <= np.asarray(query_positions)[:, None]


def load_key_tile(cache: np.ndarray, block_table: np.ndarray, kv_head: int,
                  tile: KeyTile) -> tuple[np.ndarray, tuple[int, ...]]:
    """The ``[tile positions, head_dim]`` rows of ``kv_head`` for one key tile, and the blocks they came from.

    Position ``p`` lives in block ``block_table[p // block_size]``, row ``p % block_size``; a tile that does not start
    at a block boundary, or is longer than a block, spans several blocks, each looked up once per tile.
    """
    block_size = cache.shape[2]
    positions = np.arange(tile.start, tile.stop)
    blocks = block_table[positions // block_size]
    looked_up = tuple(int(b) for b in block_table[tile.start // block_size:(tile.stop - 1) // block_size + 1])
    return cache[blocks, kv_head, positions % block_size], looked_up


def online_softmax_step(running_max: np.ndarray, running_sum: np.ndarray, acc: np.ndarray, logits: np.ndarray,
                        values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fold one key tile into the running state: ``[rows]`` max and sum, ``[rows, head_dim]`` accumulator.

    ``logits`` is ``[rows, keys]`` (``-inf`` where masked), ``values`` ``[keys, head_dim]``. The new max is taken over
    the logits before any ``exp``; what was summed against the old max is multiplied by ``exp(old_max - new_max)``
    (1 while the max does not grow, 0 on the first tile), so every term ends up relative to the same max. A row
    that has seen only masked keys keeps max ``-inf`` and sum 0: its exponents are taken against 0 instead, which
    gives ``exp(-inf) = 0`` rather than the NaN of ``-inf - (-inf)``.
    """
    new_max = np.maximum(running_max, logits.max(axis=1))
    finite_max = np.where(np.isfinite(new_max), new_max, 0.0).astype(logits.dtype)
    weights = np.exp(logits - finite_max[:, None])
    rescale = np.exp(running_max - finite_max)
    return new_max, running_sum * rescale + weights.sum(axis=1), acc * rescale[:, None] + weights @ values


def tiled_prefill(query: np.ndarray, key_cache: np.ndarray, value_cache: np.ndarray, block_tables: np.ndarray,
                  query_start_loc: np.ndarray, context_lens: np.ndarray, scale: float | None = None, *,
                  query_tile: int = DEFAULT_QUERY_TILE, key_tile: int = DEFAULT_KEY_TILE,
                  trace: list[TileVisit] | None = None) -> np.ndarray:
    """Causal attention of a flat batch of new tokens over the paged cache, in the loop order of a prefill kernel.

    The three outer loops are a kernel's grid (sequence, kv head, query tile); the key loop is what one thread block
    runs. Computes in ``query``'s precision and checks nothing (``check_prefill_inputs`` does). Each key tile the
    blocks read is appended to ``trace`` when one is given.
    """
    total, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[1]
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = np.empty_like(query)
    for seq, context_len in enumerate(int(c) for c in context_lens):
        first_row, stop_row = int(query_start_loc[seq]), int(query_start_loc[seq + 1])
        first_position = context_len - (stop_row - first_row)
        for kv_head in range(num_kv_heads):
            heads = slice(kv_head * group, (kv_head + 1) * group)
            for query_start, query_stop in query_tiles(first_position, context_len, query_tile):
                rows = slice(first_row + query_start - first_position, first_row + query_stop - first_position)
                q = query[rows, heads].reshape(-1, head_dim) * query.dtype.type(scale)  # rows: (position, head)
                positions = np.repeat(np.arange(query_start, query_stop), group)
                running_max = np.full(positions.size, -np.inf, dtype=query.dtype)
                running_sum = np.zeros(positions.size, dtype=query.dtype)
                acc = np.zeros((positions.size, head_dim), dtype=query.dtype)
                for tile in key_tiles_for(query_start, query_stop, key_tile):
                    keys, blocks = load_key_tile(key_cache, block_tables[seq], kv_head, tile)
                    values, _ = load_key_tile(value_cache, block_tables[seq], kv_head, tile)
                    logits = q @ keys.T
                    if tile.masked:  # only on the diagonal: elsewhere every key is visible to every row
                        logits = np.where(causal_mask(positions, tile.start, tile.stop), logits, -np.inf)
                    running_max, running_sum, acc = online_softmax_step(running_max, running_sum, acc, logits, values)
                    if trace is not None:
                        trace.append(TileVisit(seq, kv_head, query_start, query_stop, tile, blocks))
                out[rows, heads] = (acc / running_sum[:, None]).reshape(query_stop - query_start, group, head_dim)
    return out


def check_prefill_inputs(query: np.ndarray, key_cache: np.ndarray, value_cache: np.ndarray, block_tables: np.ndarray,
                         query_start_loc: np.ndarray, context_lens: np.ndarray) -> None:
    """Raise ValueError unless the shapes agree and every block a sequence reads is a valid entry of the pool.

    A kernel given a bad block id reads another sequence's keys (or outside the cache), silently: the launcher
    checks every index a block will follow, as ``paged_attention``'s does.
    """
    if query.ndim != 3 or key_cache.ndim != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(f"expected query [tokens, heads, head_dim] and two caches [blocks, kv_heads, block_size, "
                         f"head_dim] of one shape, got {query.shape}, {key_cache.shape}, {value_cache.shape}")
    num_blocks, num_kv_heads, block_size, head_dim = key_cache.shape
    if query.shape[2] != head_dim or query.shape[1] % num_kv_heads:
        raise ValueError(f"query {query.shape} does not fit caches {key_cache.shape}: head_dim must match and "
                         "num_heads must be a multiple of num_kv_heads")
    num_seqs = len(context_lens)
    starts = np.asarray(query_start_loc, dtype=np.int64)
    if starts.shape != (num_seqs + 1,) or starts[0] != 0 or starts[-1] != query.shape[0] or np.any(np.diff(starts) < 1):
        raise ValueError(f"query_start_loc must rise from 0 to {query.shape[0]} in {num_seqs + 1} steps of at least "
                         f"1, got {starts.tolist()}")
    lens = np.asarray(context_lens, dtype=np.int64)
    if np.any(lens < np.diff(starts)):
        raise ValueError(f"context_lens {lens.tolist()} must hold each sequence's new tokens "
                         f"{np.diff(starts).tolist()}")
    if block_tables.ndim != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must be [{num_seqs}, max_blocks], got {block_tables.shape}")
    for seq, length in enumerate(lens):
        used = block_tables[seq, :blocks_for(int(length), block_size)]
        if used.size < blocks_for(int(length), block_size) or np.any((used < 0) | (used >= num_blocks)):
            raise ValueError(f"sequence {seq} ({length} tokens) needs {blocks_for(int(length), block_size)} block ids "
                             f"in 0..{num_blocks - 1}, its table holds {block_tables[seq].tolist()}")


def prefill_reference(query: np.ndarray, key_cache: np.ndarray, value_cache: np.ndarray, block_tables: np.ndarray,
                      query_start_loc: np.ndarray, context_lens: np.ndarray, scale: float | None = None) -> np.ndarray:
    """The float64 answer, by the definition: gather each context, mask keys after each query, one full softmax."""
    check_prefill_inputs(query, key_cache, value_cache, block_tables, query_start_loc, context_lens)
    head_dim = query.shape[2]
    group = query.shape[1] // key_cache.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = np.empty(query.shape)
    for seq, context_len in enumerate(int(c) for c in context_lens):
        rows = slice(int(query_start_loc[seq]), int(query_start_loc[seq + 1]))
        keys, values = (np.repeat(gather(cache.astype(np.float64), block_tables[seq], context_len), group, axis=1)
                        for cache in (key_cache, value_cache))
        q = query[rows].astype(np.float64)
        positions = np.arange(context_len - q.shape[0], context_len)
        logits = np.einsum("thd,lhd->thl", q, keys) * scale
        logits = np.where(np.arange(context_len)[None, None, :] > positions[:, None, None], -np.inf, logits)
        weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
        out[rows] = np.einsum("thl,lhd->thd", weights, values) / weights.sum(axis=-1)[..., None]
    return out


@dataclass(frozen=True)
class PrefillBatch:
    """A step of new tokens over a paged cache whose blocks are shuffled over a pool with spare blocks."""

    query: np.ndarray  # [total_new_tokens, num_heads, head_dim]
    key_cache: np.ndarray  # [num_blocks, num_kv_heads, block_size, head_dim]
    value_cache: np.ndarray
    block_tables: np.ndarray  # int32 [num_seqs, max_blocks], -1 past a sequence's last block
    query_start_loc: np.ndarray  # int32 [num_seqs + 1]
    context_lens: np.ndarray  # int32 [num_seqs]: prefix + new tokens

    def arrays(self) -> tuple[np.ndarray, ...]:
        """query, key_cache, value_cache, block_tables, query_start_loc, context_lens: the arguments, in order."""
        return (self.query, self.key_cache, self.value_cache, self.block_tables, self.query_start_loc,
                self.context_lens)


def random_prefill_batch(rng: np.random.Generator, new_lens: list[int], prefix_lens: list[int], *, num_heads: int,
                         num_kv_heads: int, head_dim: int, block_size: int,
                         dtype: type[np.floating] = np.float32) -> PrefillBatch:
    """Random queries, keys and values for sequences with ``prefix_lens`` cached tokens and ``new_lens`` new ones.

    Every block of every sequence is a distinct block of the pool, in shuffled order, so a kernel that confuses a
    position with a block id, or reads another sequence's block, gets another answer.
    """
    context_lens = np.array([p + n for p, n in zip(prefix_lens, new_lens, strict=True)], dtype=np.int32)
    needed = blocks_for(context_lens, block_size)
    pool = rng.permutation(int(needed.sum()) + 3).astype(np.int32)
    tables = np.full((len(new_lens), int(needed.max())), -1, dtype=np.int32)
    for seq, (start, count) in enumerate(zip(np.cumsum(needed) - needed, needed, strict=True)):
        tables[seq, :count] = pool[start:start + count]
    cache_shape = (pool.size, num_kv_heads, block_size, head_dim)
    key_cache, value_cache = (rng.standard_normal(cache_shape).astype(dtype) for _ in range(2))
    query = rng.standard_normal((sum(new_lens), num_heads, head_dim)).astype(dtype)
    starts = np.concatenate([[0], np.cumsum(new_lens)]).astype(np.int32)
    return PrefillBatch(query, key_cache, value_cache, tables, starts, context_lens)
