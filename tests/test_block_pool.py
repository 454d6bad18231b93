"""The KV-cache block pool: example tests for each rule, then a state machine against a plain model."""

import dataclasses

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from course_lib.engine.block_pool import (
    BlockCopy,
    BlockPool,
    OutOfBlocks,
    blocks_for,
    hash_block_tokens,
    hash_full_blocks,
)


def pool_state(pool: BlockPool) -> tuple:
    """Everything a failed operation must leave as it was."""
    return pool.snapshot(), pool.stats()


# --- hashing ---------------------------------------------------------------------------------------


def test_block_hash_is_stable_across_processes():
    assert hash_block_tokens(None, [1, 2, 3]) == "3771fbf9c448d81cc7788dac56014ed2c33fcf6e1408098ae141c5a22365a475"
    assert hash_block_tokens(None, np.array([1, 2, 3])) == hash_block_tokens(None, (1, 2, 3))


def test_block_hash_depends_on_the_whole_prefix():
    first, second = hash_full_blocks([7, 7, 7, 7, 9], block_size=2)  # the partial block [9] has no hash
    assert first != second  # same tokens (7, 7), different parents
    assert second == hash_block_tokens(first, [7, 7])


# --- prefix caching --------------------------------------------------------------------------------


def test_a_shared_prompt_prefix_reuses_full_blocks():
    pool = BlockPool(num_blocks=10, block_size=4, watermark=0.0)
    assert pool.allocate(1, range(10)) == 0
    assert pool.allocate(2, [*range(8), 99]) == 8  # two full blocks hit, the third is its own
    assert pool.block_table(2)[:2] == pool.block_table(1)[:2]
    assert pool.block_table(2)[2] != pool.block_table(1)[2]
    views = pool.snapshot()
    assert [views[block].ref_count for block in pool.block_table(2)] == [2, 2, 1]
    assert views[pool.block_table(1)[0]].owners == (1, 2)
    stats = pool.stats()
    assert (stats.query_tokens, stats.hit_tokens, stats.used_blocks) == (19, 8, 4)
    assert stats.hit_rate == pytest.approx(8 / 19)
    assert stats.usage == pytest.approx(4 / 10)


def test_the_last_prompt_token_is_never_a_hit():
    pool = BlockPool(num_blocks=10, block_size=4, watermark=0.0)
    pool.allocate(1, range(8))
    assert pool.allocate(2, range(8)) == 4  # the model still has to run token 7 to get the next logits
    assert pool.snapshot()[pool.block_table(2)[1]].block_hash is None  # a twin: the cache keeps the first


def test_a_freed_block_stays_cached_until_evicted():
    pool = BlockPool(num_blocks=3, block_size=2, watermark=0.0)
    pool.allocate(1, [1, 2, 3])
    pool.free(1)
    assert pool.stats().cached_free_blocks == 1
    assert pool.allocate(2, [1, 2, 5]) == 2  # the hit takes its block back off the free queue
    pool.free(2)
    pool.allocate(3, [8, 8, 8, 8, 8, 8])  # needs every block: the cached one is evicted
    pool.free(3)
    assert pool.stats().cached_blocks == 3  # three (8, 8) blocks, told apart by their chained hashes
    assert pool.allocate(4, [1, 2, 5]) == 0


def test_blocks_are_evicted_least_recently_freed_first_and_tail_first():
    pool = BlockPool(num_blocks=4, block_size=2, watermark=0.0)
    pool.allocate(1, [1, 2, 3, 4])  # blocks 0, 1
    pool.allocate(2, [5, 6])  # block 2
    pool.free(1)  # the tail block 1 before the head block 0
    pool.free(2)
    ranks = {view.block_id: view.eviction_rank for view in pool.snapshot()}
    assert ranks == {3: 0, 1: 1, 0: 2, 2: 3}
    pool.allocate(3, [9, 9])
    pool.allocate(4, [9, 8])
    assert (pool.block_table(3), pool.block_table(4)) == ([3], [1])  # block 1 evicted: its hash is gone
    assert pool.allocate(5, [1, 2, 0]) == 2  # block 0, the head, still hits
    assert pool.block_table(5) == [0, 2]


# --- sharing and copy-on-write ---------------------------------------------------------------------


def test_fork_shares_every_block():
    pool = BlockPool(num_blocks=8, block_size=4, watermark=0.0)
    pool.allocate(1, range(6))
    pool.fork(1, 2)
    pool.fork(1, 3)
    assert pool.block_table(2) == pool.block_table(3) == pool.block_table(1)
    assert [pool.snapshot()[block].ref_count for block in pool.block_table(1)] == [3, 3]
    assert pool.stats().used_blocks == 2


def test_appending_to_a_shared_block_copies_it_first():
    pool = BlockPool(num_blocks=8, block_size=4, watermark=0.0)
    pool.allocate(1, range(6))
    pool.fork(1, 2)
    shared = pool.block_table(1)[1]
    copy = pool.append(2, 42)
    assert copy == BlockCopy(src=shared, dst=pool.block_table(2)[1])
    assert copy.dst != shared and pool.block_table(2)[0] == pool.block_table(1)[0]
    assert pool.snapshot()[shared].ref_count == 1
    assert pool.append(1, 43) is None  # the parent now owns its block alone: it writes in place
    assert pool.block_table(1)[1] == shared


def test_a_full_last_block_gets_a_new_block_and_enters_the_cache():
    pool = BlockPool(num_blocks=8, block_size=2, watermark=0.0)
    pool.allocate(1, [1])
    assert pool.append(1, 2) is None
    assert pool.snapshot()[pool.block_table(1)[0]].block_hash == hash_block_tokens(None, [1, 2])
    pool.append(1, 3)
    assert len(pool.block_table(1)) == 2
    assert pool.allocate(2, [1, 2, 7]) == 2


def test_reserved_blocks_take_the_tokens_appended_later_and_cache_them_the_same_way():
    """Multi-step decoding reserves slots before the tokens exist; the blocks then fill as appends would."""
    reserved, plain = BlockPool(num_blocks=8, block_size=2, watermark=0.0), BlockPool(num_blocks=8, block_size=2,
                                                                                       watermark=0.0)
    for pool in (reserved, plain):
        pool.allocate(1, [1, 2, 3])
    assert reserved.blocks_to_grow(1, 4) == 2  # the second block has room for one, then two more blocks
    reserved.reserve(1, 4)
    table = reserved.block_table(1)
    assert len(table) == 4 and reserved.num_free_blocks == 4
    for token in (4, 5, 6, 7):
        assert reserved.append(1, token) is None and plain.append(1, token) is None
    assert reserved.block_table(1) == table  # no block taken: every token went into a reserved slot
    hashes = [[view.block_hash for view in pool.snapshot() if view.block_id in pool.block_table(1)]
              for pool in (reserved, plain)]
    assert sorted(hashes[0], key=str) == sorted(hashes[1], key=str) and None in hashes[0]  # last block: 1 token
    reserved.free(1)
    assert reserved.num_free_blocks == 8


def test_out_of_blocks_on_reserve_changes_nothing():
    pool = BlockPool(num_blocks=3, block_size=2, watermark=0.0)
    pool.allocate(1, [1, 2, 3])
    before = pool_state(pool)
    with pytest.raises(OutOfBlocks, match="needs 2 free KV-cache block"):
        pool.reserve(1, 4)
    assert pool_state(pool) == before


def test_free_returns_every_block_nobody_else_holds():
    pool = BlockPool(num_blocks=6, block_size=2, watermark=0.0)
    pool.allocate(1, [1, 2, 3])
    pool.fork(1, 2)
    pool.free(1)
    assert pool.stats().free_blocks == 4  # the child still holds both blocks
    pool.free(2)
    stats = pool.stats()
    assert (stats.free_blocks, stats.used_blocks, stats.cached_free_blocks) == (6, 0, 1)
    assert all(view.is_free and view.ref_count == 0 and not view.owners for view in pool.snapshot())


# --- watermark and running out ---------------------------------------------------------------------


def test_the_watermark_holds_back_blocks_from_new_sequences_only():
    pool = BlockPool(num_blocks=10, block_size=1, watermark=0.2)
    assert pool.watermark_blocks == 2
    assert pool.can_allocate(8) and not pool.can_allocate(9)
    with pytest.raises(OutOfBlocks, match="needs 9 free KV-cache block.*10 free.*2 of them kept back") as caught:
        pool.allocate(1, range(9))
    assert (caught.value.needed, caught.value.free, caught.value.reserved) == (9, 10, 2)
    pool.allocate(1, range(8))
    assert pool.can_append(1)
    pool.append(1, 8)  # a running sequence may dip into the watermark
    pool.append(1, 9)
    assert pool.stats().free_blocks == 0 and not pool.can_append(1)


def test_out_of_blocks_on_allocate_changes_nothing():
    pool = BlockPool(num_blocks=4, block_size=2, watermark=0.0)
    pool.allocate(1, [1, 2, 3, 4])
    pool.free(1)  # two cached free blocks a failed allocation must not evict
    pool.allocate(2, [5, 6, 7])
    before = pool_state(pool)
    with pytest.raises(OutOfBlocks) as caught:
        pool.allocate(3, [1, 2, 3, 4, 5, 6, 7])  # hits two blocks, still needs more than is free
    assert isinstance(caught.value, RuntimeError)
    assert pool_state(pool) == before
    with pytest.raises(KeyError):
        pool.block_table(3)


def test_out_of_blocks_on_copy_on_write_changes_nothing():
    pool = BlockPool(num_blocks=1, block_size=4, watermark=0.0)
    pool.allocate(1, [1, 2])
    pool.fork(1, 2)
    assert not pool.can_append(2)
    before = pool_state(pool)
    with pytest.raises(OutOfBlocks, match="needs 1 free KV-cache block"):
        pool.append(2, 3)
    assert pool_state(pool) == before


def test_the_snapshot_is_plain_data():
    pool = BlockPool(num_blocks=2, block_size=2, watermark=0.0)
    pool.allocate(7, [1, 2])
    first, second = (dataclasses.asdict(view) for view in pool.snapshot())
    assert first == {
        "block_id": 0,
        "ref_count": 1,
        "block_hash": hash_block_tokens(None, [1, 2]),
        "owners": (7,),
        "is_free": False,
        "is_cached": True,
        "eviction_rank": None,
    }
    assert second["is_free"] and second["eviction_rank"] == 0 and second["owners"] == ()


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"num_blocks": 0}, "num_blocks must be >= 1"),
        ({"num_blocks": 4, "block_size": 0}, "block_size must be >= 1"),
        ({"num_blocks": 4, "watermark": 1.0}, r"watermark .* in \[0, 1\)"),
        ({"num_blocks": 4, "watermark": -0.1}, r"watermark .* in \[0, 1\)"),
    ],
)
def test_bad_pool_settings_are_refused(arguments, message):
    with pytest.raises(ValueError, match=message):
        BlockPool(**arguments)


def test_bad_sequence_operations_are_refused_and_change_nothing():
    pool = BlockPool(num_blocks=4, block_size=2, watermark=0.0)
    pool.allocate(1, [1, 2, 3])
    before = pool_state(pool)
    with pytest.raises(ValueError, match="already has blocks"):
        pool.allocate(1, [4])
    with pytest.raises(ValueError, match="prompt is empty"):
        pool.allocate(2, [])
    with pytest.raises(ValueError, match="token ids are >= 0"):
        pool.allocate(2, [1, -1])
    with pytest.raises(TypeError):
        pool.allocate(2, [1.5])
    with pytest.raises(ValueError, match="token ids are >= 0"):
        pool.append(1, -3)
    with pytest.raises(ValueError, match="already exists"):
        pool.fork(1, 1)
    with pytest.raises(ValueError, match="num_tokens must be >= 1"):
        pool.can_allocate(0)
    for operation in (pool.free, pool.block_table, pool.can_append, lambda seq: pool.append(seq, 0)):
        with pytest.raises(KeyError, match="no sequence 9 in the block pool"):
            operation(9)
    with pytest.raises(KeyError, match="no sequence 9"):
        pool.fork(9, 10)
    assert pool_state(pool) == before


# --- the state machine -----------------------------------------------------------------------------


class PoolModel:
    """The pool's rules once more, as plainly as possible: lists, linear scans, hashes from scratch."""

    def __init__(self, num_blocks: int, block_size: int, watermark: float) -> None:
        self.block_size = block_size
        self.reserved = int(watermark * num_blocks)
        self.tokens: dict[int, list[int]] = {}
        self.tables: dict[int, list[int]] = {}
        self.free = list(range(num_blocks))  # front: evicted next
        self.hash_of: dict[int, str] = {}  # registered blocks only
        self.query_tokens = self.hit_tokens = 0

    def ref_count(self, block: int) -> int:
        return sum(block in table for table in self.tables.values())

    def holder(self, block_hash: str) -> int | None:
        return next((block for block, known in self.hash_of.items() if known == block_hash), None)

    def take_front_block(self) -> int:
        block = self.free.pop(0)
        self.hash_of.pop(block, None)
        return block

    def register(self, block: int, block_hash: str) -> None:
        if self.holder(block_hash) is None:
            self.hash_of[block] = block_hash

    def allocate(self, seq: int, prompt: list[int]) -> int | None:
        """The number of cached tokens, or None where the pool must raise OutOfBlocks."""
        hashes = hash_full_blocks(prompt, self.block_size)
        hits: list[int] = []
        for block_hash in hashes[: (len(prompt) - 1) // self.block_size]:
            if self.holder(block_hash) is None:
                break
            hits.append(self.holder(block_hash))
        revived = [block for block in hits if block in self.free]
        fresh = blocks_for(len(prompt), self.block_size) - len(hits)
        if fresh + len(revived) > len(self.free) - self.reserved:
            return None
        self.free = [block for block in self.free if block not in revived]
        self.tables[seq] = hits + [self.take_front_block() for _ in range(fresh)]
        self.tokens[seq] = list(prompt)
        for position in range(len(hits), len(hashes)):
            self.register(self.tables[seq][position], hashes[position])
        self.query_tokens += len(prompt)
        self.hit_tokens += len(hits) * self.block_size
        return len(hits) * self.block_size

    def fits_new_prompt(self, num_tokens: int) -> bool:
        return blocks_for(num_tokens, self.block_size) <= len(self.free) - self.reserved

    def can_append(self, seq: int) -> bool:
        needs_block = len(self.tokens[seq]) % self.block_size == 0 or self.ref_count(self.tables[seq][-1]) > 1
        return not needs_block or bool(self.free)

    def append(self, seq: int, token: int) -> tuple[int, int] | None:
        """The copy the pool must report, if any; only called where ``can_append`` holds."""
        table, copy = self.tables[seq], None
        if len(self.tokens[seq]) % self.block_size == 0:
            table.append(self.take_front_block())
        elif self.ref_count(table[-1]) > 1:
            copy = (table[-1], self.take_front_block())
            table[-1] = copy[1]
        self.tokens[seq].append(token)
        if len(self.tokens[seq]) % self.block_size == 0:
            self.register(table[-1], hash_full_blocks(self.tokens[seq], self.block_size)[-1])
        return copy

    def fork(self, parent: int, child: int) -> None:
        self.tables[child] = list(self.tables[parent])
        self.tokens[child] = list(self.tokens[parent])

    def free_sequence(self, seq: int) -> None:
        table = self.tables.pop(seq)
        del self.tokens[seq]
        self.free += [block for block in reversed(table) if self.ref_count(block) == 0]


class BlockPoolMachine(RuleBasedStateMachine):
    """Random allocate/append/fork/free traffic on a small pool, so blocks are evicted and shared often."""

    @initialize(
        num_blocks=st.integers(1, 12),
        block_size=st.integers(1, 4),
        watermark=st.sampled_from([0.0, 0.1, 0.3]),
    )
    def make_pool(self, num_blocks, block_size, watermark):
        self.pool = BlockPool(num_blocks, block_size, watermark)
        self.model = PoolModel(num_blocks, block_size, watermark)
        self.next_seq = 0
        self.prompts_seen: list[list[int]] = [[0, 1, 2, 0, 1, 2, 0, 1]]
        self.content: dict[int, str] = {}  # block -> hash of the full tokens last written into it

    def live_sequence(self, data) -> int:
        return data.draw(st.sampled_from(sorted(self.model.tables)), label="seq")

    def new_sequence_id(self) -> int:
        self.next_seq += 1
        return self.next_seq

    def expect_unchanged_on_out_of_blocks(self, operation) -> None:
        before = pool_state(self.pool)
        with pytest.raises(OutOfBlocks):
            operation()
        assert pool_state(self.pool) == before

    @rule(data=st.data(), suffix=st.lists(st.integers(0, 2), max_size=8))
    def allocate(self, data, suffix):
        """A prompt that often starts like an earlier one, so the prefix cache is exercised."""
        earlier = data.draw(st.sampled_from(self.prompts_seen), label="earlier prompt")
        prompt = earlier[: data.draw(st.integers(0, len(earlier)), label="shared")] + suffix
        if not prompt:
            return
        seq = self.new_sequence_id()
        fits_by_count = self.pool.can_allocate(len(prompt))
        assert fits_by_count == self.model.fits_new_prompt(len(prompt))
        expected = self.model.allocate(seq, prompt)
        if expected is None:
            assert not fits_by_count  # can_allocate never promises what allocate then refuses
            self.expect_unchanged_on_out_of_blocks(lambda: self.pool.allocate(seq, prompt))
        else:
            assert self.pool.allocate(seq, prompt) == expected
            self.prompts_seen.append(prompt)

    @precondition(lambda self: self.model.tables)
    @rule(data=st.data(), token=st.integers(0, 2))
    def append(self, data, token):
        seq = self.live_sequence(data)
        assert self.pool.can_append(seq) == self.model.can_append(seq)
        if self.model.can_append(seq):
            assert self.pool.append(seq, token) == self.model.append(seq, token)
        else:
            self.expect_unchanged_on_out_of_blocks(lambda: self.pool.append(seq, token))

    @precondition(lambda self: self.model.tables)
    @rule(data=st.data())
    def fork(self, data):
        parent, child = self.live_sequence(data), self.new_sequence_id()
        self.model.fork(parent, child)
        self.pool.fork(parent, child)

    @precondition(lambda self: self.model.tables)
    @rule(data=st.data())
    def free(self, data):
        seq = self.live_sequence(data)
        self.model.free_sequence(seq)
        self.pool.free(seq)

    @invariant()
    def pool_matches_the_model(self):
        stats, views = self.pool.stats(), self.pool.snapshot()
        model = self.model
        assert stats.free_blocks + stats.used_blocks == stats.num_blocks == len(views)
        assert stats.free_blocks == len(model.free)
        assert (stats.query_tokens, stats.hit_tokens) == (model.query_tokens, model.hit_tokens)
        for seq, table in model.tables.items():
            assert self.pool.block_table(seq) == table
            assert len(table) == len(set(table)) == blocks_for(len(model.tokens[seq]), model.block_size)
        for view in views:
            owners = {seq for seq, table in model.tables.items() if view.block_id in table}
            assert set(view.owners) == owners and view.ref_count == len(owners)
            assert view.is_free == (view.ref_count == 0) == (view.block_id in model.free)  # no leak
            assert view.eviction_rank == (model.free.index(view.block_id) if view.is_free else None)
            assert view.block_hash == model.hash_of.get(view.block_id)
            assert view.is_cached == (view.block_hash is not None)

    @invariant()
    def every_cached_hash_names_the_tokens_in_its_block(self):
        model, views = self.model, self.pool.snapshot()
        for seq, table in model.tables.items():
            for position, block_hash in enumerate(hash_full_blocks(model.tokens[seq], model.block_size)):
                self.content[table[position]] = block_hash
            if len(model.tokens[seq]) % model.block_size:
                assert views[table[-1]].block_hash is None  # a partial block is never cached
        hashes = [view.block_hash for view in views if view.is_cached]
        assert all(view.block_hash == self.content[view.block_id] for view in views if view.is_cached)
        assert len(hashes) == len(set(hashes)) == self.pool.stats().cached_blocks  # one block per hash
        assert self.pool.stats().cached_free_blocks == sum(view.is_cached and view.is_free for view in views)


# 300 runs of up to 80 steps: about 15,000 pool operations, each followed by the invariants (~20 s).
TestBlockPoolStateMachine = BlockPoolMachine.TestCase
TestBlockPoolStateMachine.settings = settings(max_examples=300, stateful_step_count=80, deadline=None)
