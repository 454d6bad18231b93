"""The KV-cache block pool: which blocks are free, shared or cached. It knows blocks, not sequences.

The KV cache is not one buffer per sequence. It is cut into blocks of ``block_size`` tokens, and each
sequence keeps a *block table* (``Sequence.block_table``): the ids of the blocks that hold its tokens, in
order. This pool hands blocks out and takes them back; the engine owns the KV tensors and follows the
tables and the copies reported here. It works like vLLM's (v1) ``BlockPool`` and ``KVCacheManager``:

- Free blocks wait in a queue in eviction order, least recently freed first.
- A block shared by several sequences (a common prompt prefix, a fork) carries a reference count.
- Once the model has written a FULL block's keys and values, the block is registered under a hash of its
  tokens chained to the hash of the block before it (``cache_full_blocks``). A new prompt that starts with
  the same tokens reuses those blocks: a prefix-cache hit. A freed block keeps its hash and stays reusable
  until it is evicted, that is, handed out again as a fresh block. Registering only written blocks means a
  hit always finds keys and values there, whatever else runs in the same step.
- A sequence about to write into a block it shares gets its own copy first: copy-on-write.
- Admitting a new sequence keeps a watermark of blocks free, so running sequences can still grow.
- Running out raises ``OutOfBlocks`` before anything changes, so a scheduler can preempt and retry.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from course_lib.engine.sequence import Sequence
from course_lib.kernels.kv_blocks import blocks_for


class OutOfBlocks(RuntimeError):
    """Not enough free blocks for an operation; raised before the pool changes, so the caller can act."""

    def __init__(self, needed: int, free: int, reserved: int = 0) -> None:
        self.needed, self.free, self.reserved = needed, free, reserved
        held_back = f" ({reserved} of them kept back by the watermark)" if reserved else ""
        super().__init__(f"needs {needed} free KV-cache block(s), {free} free{held_back}")


class BlockCopy(NamedTuple):
    """A copy-on-write the engine must perform on the KV cache: block ``src`` into block ``dst``."""

    src: int
    dst: int


@dataclass(frozen=True)
class PoolStats:
    """How full the pool is and how well the prefix cache works (hits are counted in prompt tokens)."""

    num_blocks: int
    used_blocks: int
    free_blocks: int
    cached_blocks: int  # blocks registered under a hash, in use or free
    cached_free_blocks: int  # free, but still holding a prefix a new prompt can reuse
    query_tokens: int  # prompt tokens looked up in the prefix cache
    hit_tokens: int  # of those, tokens whose KV the cache already held

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    @property
    def usage(self) -> float:
        return self.used_blocks / self.num_blocks


@dataclass(frozen=True)
class BlockView:
    """One block as the lab draws it; ``eviction_rank`` 0 is the next block a fresh allocation takes."""

    block_id: int
    ref_count: int
    block_hash: str | None
    is_free: bool
    is_cached: bool
    eviction_rank: int | None


def hash_block_tokens(parent_hash: str | None, token_ids: Iterable[int]) -> str:
    """The prefix-cache key of a full block: SHA-256 over the parent's hash and the block's tokens.

    Chaining in the parent makes the key stand for the whole prefix, not just this block's tokens. The
    encoding is fixed (the parent's hex digest, then the tokens as little-endian 64-bit integers), so the same
    tokens give the same digest in every process; it runs for every block every sequence fills, so it hashes
    bytes rather than encoding text first.
    """
    payload = (parent_hash or "").encode() + np.asarray(token_ids, dtype="<i8").tobytes()
    return hashlib.sha256(payload).hexdigest()


def hash_full_blocks(token_ids: list[int] | tuple[int, ...], block_size: int) -> list[str]:
    """The chained hashes of every full block of ``token_ids``; a partial last block has none."""
    hashes: list[str] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        hashes.append(hash_block_tokens(hashes[-1] if hashes else None, token_ids[start : start + block_size]))
    return hashes


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    block_hash: str | None = None  # set only while the prefix cache maps this hash to this block


class BlockPool:
    """Fixed-size KV-cache blocks shared by reference count and reused by prefix hash."""

    def __init__(self, num_blocks: int, block_size: int = 16, watermark: float = 0.01) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if not 0.0 <= watermark < 1.0:
            raise ValueError(f"watermark is the fraction of blocks kept free, in [0, 1); got {watermark}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.watermark_blocks = int(watermark * num_blocks)
        self._blocks = [_Block(block_id) for block_id in range(num_blocks)]
        self._free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front: evict next
        self._cached: dict[str, int] = {}  # prefix cache: block hash -> block id
        self._query_tokens = 0
        self._hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_queue)

    # --- a sequence's blocks: admit, grow, fork, free ---------------------------------------------------

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether a new prompt of ``num_tokens`` fits and leaves the watermark free, counting no cache hits."""
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        return blocks_for(num_tokens, self.block_size) <= len(self._free_queue) - self.watermark_blocks

    def allocate(self, sequence: Sequence, *, use_prefix_cache: bool = True) -> int:
        """Give a sequence blocks for all its tokens; returns how many of them the prefix cache already holds.

        Full blocks the cache holds are reused, up to the first miss. The last token is never a hit: the
        model must run at least one token to produce the logits of the next one. ``use_prefix_cache=False``
        takes fresh blocks only (a request that wants every prompt token scored must compute them all).
        """
        if sequence.block_table:
            raise ValueError(f"sequence {sequence.seq_id} already has blocks; free it first")
        token_ids = sequence.token_ids_between(0, sequence.num_tokens)
        if not token_ids:
            raise ValueError("the prompt is empty: a sequence needs at least one token")
        block_hashes = hash_full_blocks(token_ids, self.block_size)[: (len(token_ids) - 1) // self.block_size]
        hit_blocks = self._cached_prefix(block_hashes) if use_prefix_cache else []
        num_fresh = blocks_for(len(token_ids), self.block_size) - len(hit_blocks)
        num_revived = sum(1 for block_id in hit_blocks if self._blocks[block_id].ref_count == 0)
        self._check_free(num_fresh + num_revived, reserved=self.watermark_blocks)

        for block_id in hit_blocks:  # before taking fresh blocks, so that no hit gets evicted
            self._share(block_id)
        sequence.block_table = hit_blocks + [self._take_fresh_block() for _ in range(num_fresh)]
        sequence.block_hashes = block_hashes[: len(hit_blocks)]
        self._query_tokens += len(token_ids)
        self._hit_tokens += len(hit_blocks) * self.block_size
        return len(hit_blocks) * self.block_size

    def blocks_to_grow(self, sequence: Sequence, num_slots: int) -> int:
        """Fresh blocks ``grow(sequence, num_slots)`` takes: new blocks past the table's end, and a private copy
        of every shared block the new tokens (from ``num_computed_tokens`` on) will write into."""
        table, size = sequence.block_table, self.block_size
        new = max(0, blocks_for(num_slots, size) - len(table))
        written = range(sequence.num_computed_tokens // size, min(blocks_for(num_slots, size), len(table)))
        return new + sum(1 for index in written if self._blocks[table[index]].ref_count > 1)

    def grow(self, sequence: Sequence, num_slots: int) -> list[BlockCopy]:
        """Give the sequence KV slots for its first ``num_slots`` tokens; returns the copies to do first.

        A block the sequence shares and is about to write into (its tokens from ``num_computed_tokens`` on)
        becomes a private copy: copy-on-write. Running sequences may use the blocks the watermark keeps back.
        Multi-step decoding grows a sequence past its known tokens: the GPU samples them later.
        """
        self._check_free(self.blocks_to_grow(sequence, num_slots))
        table, size, copies = sequence.block_table, self.block_size, []
        for index in range(sequence.num_computed_tokens // size, min(blocks_for(num_slots, size), len(table))):
            if self._blocks[table[index]].ref_count > 1:
                copy = BlockCopy(src=table[index], dst=self._take_fresh_block())
                self._blocks[copy.src].ref_count -= 1  # still held by the other sharers, so never freed here
                table[index] = copy.dst
                copies.append(copy)
        table.extend(self._take_fresh_block() for _ in range(blocks_for(num_slots, size) - len(table)))
        return copies

    def cache_full_blocks(self, sequence: Sequence) -> None:
        """Register the sequence's full blocks whose KV the model has now written in the prefix cache.

        Call it after each step that computed tokens of the sequence: blocks up to ``num_computed_tokens``
        hold keys and values, so a later prompt with the same tokens may share them.
        """
        size, hashes = self.block_size, sequence.block_hashes
        for index in range(len(hashes), sequence.num_computed_tokens // size):
            tokens = sequence.token_ids_between(index * size, (index + 1) * size)
            hashes.append(hash_block_tokens(hashes[-1] if hashes else None, tokens))
            if hashes[-1] not in self._cached:  # a twin with the same tokens may be registered already
                self._cached[hashes[-1]] = sequence.block_table[index]
                self._blocks[sequence.block_table[index]].block_hash = hashes[-1]

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Start ``child`` (parallel sampling) sharing all of ``parent``'s blocks and its computed tokens."""
        if child.block_table:
            raise ValueError(f"cannot fork into sequence {child.seq_id}: it already has blocks")
        for block_id in parent.block_table:
            self._blocks[block_id].ref_count += 1
        child.block_table, child.block_hashes = list(parent.block_table), list(parent.block_hashes)
        child.num_computed_tokens = parent.num_computed_tokens

    def free(self, sequence: Sequence) -> None:
        """Release a finished or preempted sequence's blocks; those nobody holds go to the back of the free queue.

        The table is released tail first, so a sequence's last blocks are evicted before its first
        ones: a cached block is only reachable while every block before it is cached too.
        """
        for block_id in reversed(sequence.block_table):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free_queue[block_id] = None
        sequence.block_table = []

    # --- looking at the pool ------------------------------------------------------------------------

    def stats(self) -> PoolStats:
        """Blocks used, free and cached, and the prefix cache's queries and hits so far."""
        free = len(self._free_queue)
        return PoolStats(
            num_blocks=self.num_blocks,
            used_blocks=self.num_blocks - free,
            free_blocks=free,
            cached_blocks=len(self._cached),
            cached_free_blocks=sum(1 for block_id in self._free_queue if self._blocks[block_id].block_hash is not None),
            query_tokens=self._query_tokens,
            hit_tokens=self._hit_tokens,
        )

    def snapshot(self) -> list[BlockView]:
        """Every block as plain data, in block-id order, for a notebook to draw (``dataclasses.asdict``)."""
        eviction_rank = {block_id: rank for rank, block_id in enumerate(self._free_queue)}
        return [
            BlockView(
                block_id=block.block_id,
                ref_count=block.ref_count,
                block_hash=block.block_hash,
                is_free=block.block_id in eviction_rank,
                is_cached=block.block_hash is not None,
                eviction_rank=eviction_rank.get(block.block_id),
            )
            for block in self._blocks
        ]

    # --- the moves every operation is made of ------------------------------------------------------

    def _check_free(self, needed: int, reserved: int = 0) -> None:
        if needed > len(self._free_queue) - reserved:
            raise OutOfBlocks(needed, len(self._free_queue), reserved)

    def _cached_prefix(self, block_hashes: list[str]) -> list[int]:
        """The cached blocks for the leading hashes, up to the first one the cache does not hold."""
        hit_blocks = []
        for block_hash in block_hashes:
            if block_hash not in self._cached:
                break
            hit_blocks.append(self._cached[block_hash])
        return hit_blocks

    def _share(self, block_id: int) -> None:
        """Take one more reference to a cached block, pulling it off the free queue if nobody held it."""
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._free_queue[block_id]
        block.ref_count += 1

    def _take_fresh_block(self) -> int:
        """Pop the front of the free queue, evicting the prefix it held from the cache."""
        block_id, _ = self._free_queue.popitem(last=False)
        block = self._blocks[block_id]
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block_id
