"""The KV-cache block pool: which block of the KV cache holds which tokens of which sequence.

The KV cache is not one buffer per sequence. It is cut into blocks of ``block_size`` tokens, and each
sequence has a *block table*: the ids of the blocks that hold its tokens, in order. This pool only does
the bookkeeping; the engine owns the KV tensors and follows the tables and the copies reported here.
It works like vLLM's (v1) ``KVCacheManager`` and ``BlockPool``:

- Free blocks wait in a queue in eviction order, least recently freed first.
- A block shared by several sequences (a common prompt prefix, a fork) carries a reference count.
- A FULL block is registered under a hash of its tokens chained to the hash of the block before it, so
  a new prompt that starts with the same tokens reuses those blocks: a prefix-cache hit. A freed block
  keeps its hash and stays reusable until it is evicted, that is, handed out again as a fresh block.
- A sequence about to write into a block it shares gets its own copy first: copy-on-write.
- Admitting a new sequence keeps a watermark of blocks free, so running sequences can still grow.
- Running out raises ``OutOfBlocks`` before anything changes, so a scheduler can preempt and retry.
"""

from __future__ import annotations

import hashlib
import json
import operator
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple


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
    owners: tuple[int, ...]
    is_free: bool
    is_cached: bool
    eviction_rank: int | None


def hash_block_tokens(parent_hash: str | None, token_ids: Sequence[int]) -> str:
    """The prefix-cache key of a full block: SHA-256 over the parent's hash and the block's tokens.

    Chaining in the parent makes the key stand for the whole prefix, not just this block's tokens. The
    encoding is canonical JSON, so the same tokens give the same hex digest in every process.
    """
    payload = json.dumps([parent_hash, [int(token) for token in token_ids]], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def hash_full_blocks(token_ids: Sequence[int], block_size: int) -> list[str]:
    """The chained hashes of every full block of ``token_ids``; a partial last block has none."""
    hashes: list[str] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        hashes.append(hash_block_tokens(hashes[-1] if hashes else None, token_ids[start : start + block_size]))
    return hashes


def blocks_for(num_tokens: int, block_size: int) -> int:
    """How many blocks hold ``num_tokens`` tokens: ceil(num_tokens / block_size)."""
    return -(-num_tokens // block_size)


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    block_hash: str | None = None  # set only while the prefix cache maps this hash to this block


@dataclass
class _Sequence:
    token_ids: list[int]
    table: list[int]
    full_block_hashes: list[str]

    def copy(self) -> _Sequence:
        return _Sequence(list(self.token_ids), list(self.table), list(self.full_block_hashes))


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
        self._sequences: dict[int, _Sequence] = {}
        self._query_tokens = 0
        self._hit_tokens = 0

    # --- admitting and growing sequences ----------------------------------------------------------

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether a new prompt of ``num_tokens`` fits and leaves the watermark free, counting no cache hits."""
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        return blocks_for(num_tokens, self.block_size) <= len(self._free_queue) - self.watermark_blocks

    def allocate(self, seq_id: int, prompt_token_ids: Sequence[int],
                 written: Callable[[int], bool] | None = None) -> int:
        """Give a new sequence the blocks for its prompt; returns how many prompt tokens the cache already holds.

        Full blocks the cache holds are reused, up to the first miss. The last prompt token is never a
        hit: the model must run at least one token to produce the logits of the next one. A block is
        registered when it is allocated, before the model has written its KV: ``written`` (the scheduler
        knows) ends the hits at the first block whose KV is not there yet, and the new sequence gets a fresh
        block and computes it itself. Sharing it would have two sequences write the same slots in one step.
        """
        if seq_id in self._sequences:
            raise ValueError(f"sequence {seq_id!r} already has blocks; free it first or pick a new id")
        token_ids = [_as_token_id(token) for token in prompt_token_ids]
        if not token_ids:
            raise ValueError("the prompt is empty: a sequence needs at least one token")
        block_hashes = hash_full_blocks(token_ids, self.block_size)
        hit_blocks = self._cached_prefix(block_hashes[: (len(token_ids) - 1) // self.block_size], written)
        num_fresh = blocks_for(len(token_ids), self.block_size) - len(hit_blocks)
        num_revived = sum(1 for block_id in hit_blocks if self._blocks[block_id].ref_count == 0)
        self._check_free(num_fresh + num_revived, reserved=self.watermark_blocks)

        for block_id in hit_blocks:  # before taking fresh blocks, so that no hit gets evicted
            self._share(block_id)
        table = hit_blocks + [self._take_fresh_block() for _ in range(num_fresh)]
        for position in range(len(hit_blocks), len(block_hashes)):
            self._register(table[position], block_hashes[position])
        self._sequences[seq_id] = _Sequence(token_ids, table, block_hashes)
        self._query_tokens += len(token_ids)
        self._hit_tokens += len(hit_blocks) * self.block_size
        return len(hit_blocks) * self.block_size

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_queue)

    def can_append(self, seq_id: int) -> bool:
        """Whether ``append`` can run now; running sequences may use the blocks kept back by the watermark."""
        return self._blocks_needed_to_append(self._sequence(seq_id)) <= len(self._free_queue)

    def append(self, seq_id: int, token_id: int) -> BlockCopy | None:
        """Add one generated token; returns the block copy the engine must do first, if the block was shared.

        The token goes into the block after the sequence's last token: a fresh block if that one is full
        and none was reserved, a private copy if it is shared (copy-on-write).
        """
        sequence = self._sequence(seq_id)
        token_id = _as_token_id(token_id)
        self._check_free(self._blocks_needed_to_append(sequence))
        copy, index = None, len(sequence.token_ids) // self.block_size  # the block the token goes into
        if index == len(sequence.table):
            sequence.table.append(self._take_fresh_block())
        elif self._blocks[sequence.table[index]].ref_count > 1:
            copy = BlockCopy(src=sequence.table[index], dst=self._take_fresh_block())
            self._blocks[copy.src].ref_count -= 1  # still held by the other sharers, so never freed here
            sequence.table[index] = copy.dst
        sequence.token_ids.append(token_id)
        if len(sequence.token_ids) % self.block_size == 0:
            self._register_full_block(sequence, index)
        return copy

    def blocks_to_grow(self, seq_id: int, num_tokens: int) -> int:
        """Fresh blocks ``num_tokens`` more tokens take, appended or reserved: new blocks, and a private copy
        if the next token's block is shared."""
        sequence = self._sequence(seq_id)
        index = len(sequence.token_ids) // self.block_size
        shared = index < len(sequence.table) and self._blocks[sequence.table[index]].ref_count > 1
        return self._blocks_to_reserve(sequence, num_tokens) + int(shared and num_tokens > 0)

    def _blocks_to_reserve(self, sequence: _Sequence, num_tokens: int) -> int:
        return max(0, blocks_for(len(sequence.token_ids) + num_tokens, self.block_size) - len(sequence.table))

    def reserve(self, seq_id: int, num_tokens: int) -> None:
        """Give a sequence the blocks for ``num_tokens`` more tokens now, before the tokens are known.

        Multi-step decoding (``Scheduler.schedule_decode_run``) launches several decode steps at once: the
        GPU samples the tokens of the later steps and writes their keys and values, so their slots must exist
        at launch. ``append`` then records each token in its reserved slot (registering the block in the
        prefix cache once it is full), and ``free`` returns reserved blocks with the rest.
        """
        sequence = self._sequence(seq_id)
        needed = self._blocks_to_reserve(sequence, num_tokens)
        self._check_free(needed)
        sequence.table.extend(self._take_fresh_block() for _ in range(needed))

    def fork(self, parent_id: int, child_id: int) -> None:
        """Start ``child_id`` as a copy of ``parent_id`` (parallel sampling) that shares all its blocks."""
        parent = self._sequence(parent_id)
        if child_id in self._sequences:
            raise ValueError(f"cannot fork into sequence {child_id!r}: it already exists")
        for block_id in parent.table:
            self._blocks[block_id].ref_count += 1
        self._sequences[child_id] = parent.copy()

    def free(self, seq_id: int) -> None:
        """Release a finished or preempted sequence; blocks nobody holds go to the back of the free queue.

        The table is released tail first, so a sequence's last blocks are evicted before its first
        ones: a cached block is only reachable while every block before it is cached too.
        """
        sequence = self._sequence(seq_id)
        del self._sequences[seq_id]
        for block_id in reversed(sequence.table):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free_queue[block_id] = None

    # --- looking at the pool ------------------------------------------------------------------------

    def block_table(self, seq_id: int) -> list[int]:
        """The ids of the blocks holding the sequence's tokens, in token order."""
        return list(self._sequence(seq_id).table)

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
        owners: dict[int, list[int]] = {block.block_id: [] for block in self._blocks}
        for seq_id, sequence in self._sequences.items():
            for block_id in sequence.table:
                owners[block_id].append(seq_id)
        eviction_rank = {block_id: rank for rank, block_id in enumerate(self._free_queue)}
        return [
            BlockView(
                block_id=block.block_id,
                ref_count=block.ref_count,
                block_hash=block.block_hash,
                owners=tuple(owners[block.block_id]),
                is_free=block.block_id in eviction_rank,
                is_cached=block.block_hash is not None,
                eviction_rank=eviction_rank.get(block.block_id),
            )
            for block in self._blocks
        ]

    # --- the moves every operation is made of ------------------------------------------------------

    def _sequence(self, seq_id: int) -> _Sequence:
        try:
            return self._sequences[seq_id]
        except KeyError:
            raise KeyError(f"no sequence {seq_id!r} in the block pool") from None

    def _check_free(self, needed: int, reserved: int = 0) -> None:
        if needed > len(self._free_queue) - reserved:
            raise OutOfBlocks(needed, len(self._free_queue), reserved)

    def _blocks_needed_to_append(self, sequence: _Sequence) -> int:
        """One block if the next token's block does not exist yet (a new one) or is shared (a copy), else none."""
        index = len(sequence.token_ids) // self.block_size
        return int(index == len(sequence.table) or self._blocks[sequence.table[index]].ref_count > 1)

    def _cached_prefix(self, block_hashes: list[str], written: Callable[[int], bool] | None) -> list[int]:
        """The cached blocks for the leading hashes, up to the first one the cache does not hold (or not written)."""
        hit_blocks = []
        for block_hash in block_hashes:
            block_id = self._cached.get(block_hash)
            if block_id is None or (written is not None and not written(block_id)):
                break
            hit_blocks.append(block_id)
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

    def _register(self, block_id: int, block_hash: str) -> None:
        """Put a full block in the prefix cache, unless a twin with the same tokens is already there."""
        if block_hash not in self._cached:
            self._cached[block_hash] = block_id
            self._blocks[block_id].block_hash = block_hash

    def _register_full_block(self, sequence: _Sequence, index: int) -> None:
        """Block ``index`` of the sequence has just filled up: put it in the prefix cache."""
        parent_hash = sequence.full_block_hashes[-1] if sequence.full_block_hashes else None
        block_hash = hash_block_tokens(parent_hash, sequence.token_ids[-self.block_size :])
        sequence.full_block_hashes.append(block_hash)
        self._register(sequence.table[index], block_hash)


def _as_token_id(token: int) -> int:
    """A token id as a plain int (NumPy integers welcome); floats and negative ids are mistakes."""
    token_id = operator.index(token)
    if token_id < 0:
        raise ValueError(f"token ids are >= 0, got {token_id}")
    return token_id
