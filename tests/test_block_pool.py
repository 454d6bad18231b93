"""The KV-cache block pool: example tests for each rule, then a state machine against a plain model."""

import dataclasses
import hashlib

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from course_lib.engine.block_pool import BlockCopy, BlockPool, OutOfBlocks, hash_block_tokens, hash_full_blocks
from course_lib.engine.sequence import Sequence
from course_lib.kernels.kv_blocks import blocks_for


def pool_state(pool: BlockPool, *sequences: Sequence) -> tuple:
    """Everything a failed operation must leave as it was."""
    return pool.snapshot(), pool.stats(), [(list(seq.block_table), list(seq.block_hashes)) for seq in sequences]


def admitted(pool: BlockPool, seq_id: int, prompt, **options) -> Sequence:
    """A new sequence with blocks for its prompt, whose KV the model has not computed yet."""
    sequence = Sequence(seq_id, prompt)
    sequence.num_computed_tokens = pool.allocate(sequence, **options)
    return sequence


def compute(pool: BlockPool, sequence: Sequence, *new_tokens: int) -> list[BlockCopy]:
    """What an engine step does for a sequence: feed it ``new_tokens``, give every token a slot (copies first),
    write the KV, then cache the blocks now full."""
    sequence.output_token_ids.extend(new_tokens)
    copies = pool.grow(sequence, sequence.num_tokens)
    sequence.num_computed_tokens = sequence.num_tokens
    pool.cache_full_blocks(sequence)
    return copies


def computed(pool: BlockPool, seq_id: int, prompt) -> Sequence:
    """A sequence admitted and its prompt computed: its full blocks are in the prefix cache."""
    sequence = admitted(pool, seq_id, prompt)
    compute(pool, sequence)
    return sequence


# --- hashing ---------------------------------------------------------------------------------------


def test_block_hash_is_stable_across_processes():
    """SHA-256 of the tokens as little-endian int64 (after the parent's hex digest): no process-salted hash()."""
    assert hash_block_tokens(None, [1, 2, 3]) == "e2e2033ae7e19d680599d4eb0a1359a2b48ec5baac75066c317fbf85159c54ef"
    assert hash_block_tokens("ab", [1]) == hashlib.sha256(b"ab" + (1).to_bytes(8, "little")).hexdigest()
    assert hash_block_tokens(None, np.array([1, 2, 3])) == hash_block_tokens(None, (1, 2, 3))


def test_block_hash_depends_on_the_whole_prefix():
    first, second = hash_full_blocks([7, 7, 7, 7, 9], block_size=2)  # the partial block [9] has no hash
    assert first != second  # same tokens (7, 7), different parents
    assert second == hash_block_tokens(first, [7, 7])


# --- prefix caching --------------------------------------------------------------------------------


def test_a_shared_prompt_prefix_reuses_full_blocks():
    pool = BlockPool(num_blocks=10, block_size=4, watermark=0.0)
    first = computed(pool, 1, range(10))
    assert first.num_computed_tokens == 10 and len(first.block_hashes) == 2
    second = admitted(pool, 2, [*range(8), 99])
    assert second.num_computed_tokens == 8  # two full blocks hit, the third is its own
    assert second.block_table[:2] == first.block_table[:2] and second.block_table[2] != first.block_table[2]
    assert second.block_hashes == first.block_hashes
    views = pool.snapshot()
    assert [views[block].ref_count for block in second.block_table] == [2, 2, 1]
    stats = pool.stats()
    assert (stats.query_tokens, stats.hit_tokens, stats.used_blocks) == (19, 8, 4)
    assert stats.hit_rate == pytest.approx(8 / 19)
    assert stats.usage == pytest.approx(4 / 10)


def test_only_blocks_whose_kv_is_written_are_shared():
    """A twin admitted before its KV is computed (the same step, say) computes its own blocks."""
    pool = BlockPool(num_blocks=10, block_size=4, watermark=0.0)
    first = admitted(pool, 1, range(10))
    assert pool.stats().cached_blocks == 0
    twin = admitted(pool, 2, range(10))
    assert twin.num_computed_tokens == 0 and not set(twin.block_table) & set(first.block_table)
    compute(pool, first)
    assert pool.stats().cached_blocks == 2
    assert admitted(pool, 3, range(10)).num_computed_tokens == 8


def test_the_last_prompt_token_is_never_a_hit():
    pool = BlockPool(num_blocks=10, block_size=4, watermark=0.0)
    computed(pool, 1, range(8))
    twin = admitted(pool, 2, range(8))
    assert twin.num_computed_tokens == 4  # the model still has to run token 7 to get the next logits
    compute(pool, twin)
    assert pool.snapshot()[twin.block_table[1]].block_hash is None  # a twin: the cache keeps the first


def test_allocate_can_skip_the_prefix_cache():
    pool = BlockPool(num_blocks=10, block_size=4, watermark=0.0)
    computed(pool, 1, range(10))
    assert admitted(pool, 2, range(10), use_prefix_cache=False).num_computed_tokens == 0


def test_a_freed_block_stays_cached_until_evicted():
    pool = BlockPool(num_blocks=3, block_size=2, watermark=0.0)
    pool.free(computed(pool, 1, [1, 2, 3]))
    assert pool.stats().cached_free_blocks == 1
    second = admitted(pool, 2, [1, 2, 5])
    assert second.num_computed_tokens == 2  # the hit takes its block back off the free queue
    pool.free(second)
    assert second.block_table == []
    pool.free(computed(pool, 3, [8, 8, 8, 8, 8, 8]))  # needs every block: the cached one is evicted
    assert pool.stats().cached_blocks == 3  # three (8, 8) blocks, told apart by their chained hashes
    assert admitted(pool, 4, [1, 2, 5]).num_computed_tokens == 0


def test_blocks_are_evicted_least_recently_freed_first_and_tail_first():
    pool = BlockPool(num_blocks=4, block_size=2, watermark=0.0)
    first = computed(pool, 1, [1, 2, 3, 4])  # blocks 0, 1
    second = computed(pool, 2, [5, 6])  # block 2
    pool.free(first)  # the tail block 1 before the head block 0
    pool.free(second)
    ranks = {view.block_id: view.eviction_rank for view in pool.snapshot()}
    assert ranks == {3: 0, 1: 1, 0: 2, 2: 3}
    assert admitted(pool, 3, [9, 9]).block_table == [3]
    assert admitted(pool, 4, [9, 8]).block_table == [1]  # block 1 evicted: its hash is gone
    fifth = admitted(pool, 5, [1, 2, 0])
    assert (fifth.num_computed_tokens, fifth.block_table) == (2, [0, 2])  # block 0, the head, still hits


# --- sharing and copy-on-write ---------------------------------------------------------------------


def test_fork_shares_every_block():
    pool = BlockPool(num_blocks=8, block_size=4, watermark=0.0)
    parent = computed(pool, 1, range(6))
    children = [Sequence(2, tuple(range(6))), Sequence(3, tuple(range(6)))]
    for child in children:
        pool.fork(parent, child)
    assert children[0].block_table == children[1].block_table == parent.block_table
    assert children[0].num_computed_tokens == 6
    assert [pool.snapshot()[block].ref_count for block in parent.block_table] == [3, 3]
    assert pool.stats().used_blocks == 2


def test_writing_into_a_shared_block_copies_it_first():
    pool = BlockPool(num_blocks=8, block_size=4, watermark=0.0)
    parent = computed(pool, 1, range(6))
    child = Sequence(2, tuple(range(6)))
    pool.fork(parent, child)
    shared = parent.block_table[1]
    assert pool.blocks_to_grow(child, 7) == 1
    assert compute(pool, child, 42) == [BlockCopy(src=shared, dst=child.block_table[1])]
    assert child.block_table[1] != shared and child.block_table[0] == parent.block_table[0]
    assert pool.snapshot()[shared].ref_count == 1
    assert compute(pool, parent, 43) == []  # the parent now owns its block alone: it writes in place
    assert parent.block_table[1] == shared


def test_a_full_last_block_gets_a_new_block_and_enters_the_cache():
    pool = BlockPool(num_blocks=8, block_size=2, watermark=0.0)
    sequence = computed(pool, 1, [1])
    assert compute(pool, sequence, 2) == [] and len(sequence.block_table) == 1
    assert pool.snapshot()[sequence.block_table[0]].block_hash == hash_block_tokens(None, [1, 2])
    compute(pool, sequence, 3)
    assert len(sequence.block_table) == 2
    assert admitted(pool, 2, [1, 2, 7]).num_computed_tokens == 2


def test_growing_ahead_gives_slots_to_tokens_not_sampled_yet():
    """Multi-step decoding grows a table before the GPU samples the tokens; they are cached once computed."""
    pool = BlockPool(num_blocks=8, block_size=2, watermark=0.0)
    sequence = computed(pool, 1, [1, 2, 3])
    assert pool.blocks_to_grow(sequence, 7) == 2  # the second block has room for one, then two more blocks
    assert pool.grow(sequence, 7) == []
    table = list(sequence.block_table)
    assert len(table) == 4 and pool.num_free_blocks == 4
    for token in (4, 5, 6, 7):
        assert compute(pool, sequence, token) == []
    assert sequence.block_table == table  # no block taken: every token went into a slot grown ahead
    assert [view.block_hash for view in pool.snapshot()][:4] == [*hash_full_blocks(range(1, 8), 2), None]
    pool.free(sequence)
    assert pool.num_free_blocks == 8


def test_out_of_blocks_on_grow_changes_nothing():
    pool = BlockPool(num_blocks=3, block_size=2, watermark=0.0)
    sequence = computed(pool, 1, [1, 2, 3])
    before = pool_state(pool, sequence)
    with pytest.raises(OutOfBlocks, match="needs 2 free KV-cache block"):
        pool.grow(sequence, 7)
    assert pool_state(pool, sequence) == before


def test_free_returns_every_block_nobody_else_holds():
    pool = BlockPool(num_blocks=6, block_size=2, watermark=0.0)
    parent = computed(pool, 1, [1, 2, 3])
    child = Sequence(2, (1, 2, 3))
    pool.fork(parent, child)
    pool.free(parent)
    assert pool.stats().free_blocks == 4  # the child still holds both blocks
    pool.free(child)
    stats = pool.stats()
    assert (stats.free_blocks, stats.used_blocks, stats.cached_free_blocks) == (6, 0, 1)
    assert all(view.is_free and view.ref_count == 0 for view in pool.snapshot())


# --- watermark and running out ---------------------------------------------------------------------


def test_the_watermark_holds_back_blocks_from_new_sequences_only():
    pool = BlockPool(num_blocks=10, block_size=1, watermark=0.2)
    assert pool.watermark_blocks == 2
    assert pool.can_allocate(8) and not pool.can_allocate(9)
    with pytest.raises(OutOfBlocks, match="needs 9 free KV-cache block.*10 free.*2 of them kept back") as caught:
        admitted(pool, 1, range(9))
    assert (caught.value.needed, caught.value.free, caught.value.reserved) == (9, 10, 2)
    sequence = computed(pool, 1, range(8))
    compute(pool, sequence, 8)  # a running sequence may dip into the watermark
    compute(pool, sequence, 9)
    assert pool.stats().free_blocks == 0 and pool.blocks_to_grow(sequence, 11) == 1


def test_out_of_blocks_on_allocate_changes_nothing():
    pool = BlockPool(num_blocks=4, block_size=2, watermark=0.0)
    pool.free(computed(pool, 1, [1, 2, 3, 4]))  # two cached free blocks a failed allocation must not evict
    second = admitted(pool, 2, [5, 6, 7])
    third = Sequence(3, (1, 2, 3, 4, 5, 6, 7))
    before = pool_state(pool, second, third)
    with pytest.raises(OutOfBlocks) as caught:
        pool.allocate(third)  # hits two blocks, still needs more than is free
    assert isinstance(caught.value, RuntimeError)
    assert pool_state(pool, second, third) == before


def test_out_of_blocks_on_copy_on_write_changes_nothing():
    pool = BlockPool(num_blocks=1, block_size=4, watermark=0.0)
    parent = computed(pool, 1, [1, 2])
    child = Sequence(2, (1, 2))
    pool.fork(parent, child)
    child.output_token_ids.append(3)
    before = pool_state(pool, parent, child)
    with pytest.raises(OutOfBlocks, match="needs 1 free KV-cache block"):
        pool.grow(child, 3)
    assert pool_state(pool, parent, child) == before


def test_the_snapshot_is_plain_data():
    pool = BlockPool(num_blocks=2, block_size=2, watermark=0.0)
    computed(pool, 7, [1, 2])
    first, second = (dataclasses.asdict(view) for view in pool.snapshot())
    assert first == {
        "block_id": 0,
        "ref_count": 1,
        "block_hash": hash_block_tokens(None, [1, 2]),
        "is_free": False,
        "is_cached": True,
        "eviction_rank": None,
    }
    assert second["is_free"] and second["eviction_rank"] == 0


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
    sequence = admitted(pool, 1, [1, 2, 3])
    other = Sequence(2, (5,))
    before = pool_state(pool, sequence, other)
    with pytest.raises(ValueError, match="sequence 1 already has blocks"):
        pool.allocate(sequence)
    with pytest.raises(ValueError, match="prompt is empty"):
        pool.allocate(Sequence(3, ()))
    with pytest.raises(ValueError, match="cannot fork into sequence 1: it already has blocks"):
        pool.fork(other, sequence)
    with pytest.raises(ValueError, match="num_tokens must be >= 1"):
        pool.can_allocate(0)
    assert pool_state(pool, sequence, other) == before


# --- the state machine -----------------------------------------------------------------------------


class PoolModel:
    """The pool's rules once more, as plainly as possible: lists, linear scans, hashes from scratch."""

    def __init__(self, num_blocks: int, block_size: int, watermark: float) -> None:
        self.block_size = block_size
        self.reserved = int(watermark * num_blocks)
        self.tokens: dict[int, list[int]] = {}
        self.tables: dict[int, list[int]] = {}
        self.computed: dict[int, int] = {}  # tokens whose KV is written
        self.hashed: dict[int, int] = {}  # full blocks whose hash the sequence knows
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

    def allocate(self, seq: int, prompt: list[int]) -> int | None:
        """The number of cached tokens, or None where the pool must raise OutOfBlocks."""
        hits: list[int] = []
        for block_hash in hash_full_blocks(prompt, self.block_size)[: (len(prompt) - 1) // self.block_size]:
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
        self.computed[seq] = len(hits) * self.block_size
        self.hashed[seq] = len(hits)
        self.query_tokens += len(prompt)
        self.hit_tokens += len(hits) * self.block_size
        return len(hits) * self.block_size

    def fits_new_prompt(self, num_tokens: int) -> bool:
        return blocks_for(num_tokens, self.block_size) <= len(self.free) - self.reserved

    def written_blocks(self, seq: int) -> list[int]:
        """Indices of the table's blocks the next computation writes into (and that exist already)."""
        first, last = self.computed[seq] // self.block_size, blocks_for(len(self.tokens[seq]), self.block_size)
        return list(range(first, min(last, len(self.tables[seq]))))

    def blocks_to_compute(self, seq: int) -> int:
        shared = sum(self.ref_count(self.tables[seq][index]) > 1 for index in self.written_blocks(seq))
        return shared + max(0, blocks_for(len(self.tokens[seq]), self.block_size) - len(self.tables[seq]))

    def compute(self, seq: int) -> list[BlockCopy]:
        """Slots for every token (copies first, then new blocks), KV written, full blocks registered."""
        table, copies = self.tables[seq], []
        for index in self.written_blocks(seq):
            if self.ref_count(table[index]) > 1:
                copies.append(BlockCopy(table[index], self.take_front_block()))
                table[index] = copies[-1].dst
        while len(table) < blocks_for(len(self.tokens[seq]), self.block_size):
            table.append(self.take_front_block())
        self.computed[seq] = len(self.tokens[seq])
        hashes = hash_full_blocks(self.tokens[seq], self.block_size)
        for index in range(self.hashed[seq], self.computed[seq] // self.block_size):
            if self.holder(hashes[index]) is None:
                self.hash_of[table[index]] = hashes[index]
        self.hashed[seq] = max(self.hashed[seq], self.computed[seq] // self.block_size)
        return copies

    def fork(self, parent: int, child: int) -> None:
        for book in (self.tables, self.tokens):
            book[child] = list(book[parent])
        self.computed[child], self.hashed[child] = self.computed[parent], self.hashed[parent]

    def free_sequence(self, seq: int) -> None:
        table = self.tables.pop(seq)
        del self.tokens[seq]
        self.free += [block for block in reversed(table) if self.ref_count(block) == 0]


class BlockPoolMachine(RuleBasedStateMachine):
    """Random allocate/feed/compute/fork/free traffic on a small pool, so blocks are evicted and shared often."""

    @initialize(
        num_blocks=st.integers(1, 12),
        block_size=st.integers(1, 4),
        watermark=st.sampled_from([0.0, 0.1, 0.3]),
    )
    def make_pool(self, num_blocks, block_size, watermark):
        self.pool = BlockPool(num_blocks, block_size, watermark)
        self.model = PoolModel(num_blocks, block_size, watermark)
        self.sequences: dict[int, Sequence] = {}
        self.next_seq = 0
        self.prompts_seen: list[list[int]] = [[0, 1, 2, 0, 1, 2, 0, 1]]
        self.content: dict[int, str] = {}  # block -> hash of the full tokens last written into it

    def live_sequence(self, data) -> int:
        return data.draw(st.sampled_from(sorted(self.model.tables)), label="seq")

    def new_sequence(self, tokens) -> Sequence:
        self.next_seq += 1
        return Sequence(self.next_seq, tuple(tokens))

    def expect_unchanged_on_out_of_blocks(self, operation, *sequences: Sequence) -> None:
        before = pool_state(self.pool, *sequences)
        with pytest.raises(OutOfBlocks):
            operation()
        assert pool_state(self.pool, *sequences) == before

    @rule(data=st.data(), suffix=st.lists(st.integers(0, 2), max_size=8))
    def allocate(self, data, suffix):
        """A prompt that often starts like an earlier one, so the prefix cache is exercised."""
        earlier = data.draw(st.sampled_from(self.prompts_seen), label="earlier prompt")
        prompt = earlier[: data.draw(st.integers(0, len(earlier)), label="shared")] + suffix
        if not prompt:
            return
        sequence = self.new_sequence(prompt)
        fits_by_count = self.pool.can_allocate(len(prompt))
        assert fits_by_count == self.model.fits_new_prompt(len(prompt))
        expected = self.model.allocate(sequence.seq_id, prompt)
        if expected is None:
            assert not fits_by_count  # can_allocate never promises what allocate then refuses
            self.expect_unchanged_on_out_of_blocks(lambda: self.pool.allocate(sequence), sequence)
        else:
            assert self.pool.allocate(sequence) == expected
            sequence.num_computed_tokens = expected
            self.sequences[sequence.seq_id] = sequence
            self.prompts_seen.append(prompt)

    @precondition(lambda self: self.model.tables)
    @rule(data=st.data(), token=st.integers(0, 2))
    def feed(self, data, token):
        """A sampled token joins a sequence; it gets its slot when computed."""
        seq = self.live_sequence(data)
        self.sequences[seq].output_token_ids.append(token)
        self.model.tokens[seq].append(token)

    @precondition(lambda self: self.model.tables)
    @rule(data=st.data())
    def compute(self, data):
        seq = self.live_sequence(data)
        sequence, needed = self.sequences[seq], self.model.blocks_to_compute(seq)
        assert self.pool.blocks_to_grow(sequence, sequence.num_tokens) == needed
        if needed > len(self.model.free):
            self.expect_unchanged_on_out_of_blocks(lambda: self.pool.grow(sequence, sequence.num_tokens), sequence)
            return
        assert compute(self.pool, sequence) == self.model.compute(seq)

    @precondition(lambda self: self.model.tables)
    @rule(data=st.data())
    def fork(self, data):
        parent = self.sequences[self.live_sequence(data)]
        child = self.new_sequence(parent.token_ids_between(0, parent.num_tokens))
        self.model.fork(parent.seq_id, child.seq_id)
        self.pool.fork(parent, child)
        self.sequences[child.seq_id] = child

    @precondition(lambda self: self.model.tables)
    @rule(data=st.data())
    def free(self, data):
        seq = self.live_sequence(data)
        self.model.free_sequence(seq)
        self.pool.free(self.sequences.pop(seq))

    @invariant()
    def pool_matches_the_model(self):
        stats, views = self.pool.stats(), self.pool.snapshot()
        model = self.model
        assert stats.free_blocks + stats.used_blocks == stats.num_blocks == len(views)
        assert stats.free_blocks == len(model.free)
        assert (stats.query_tokens, stats.hit_tokens) == (model.query_tokens, model.hit_tokens)
        for seq, table in model.tables.items():
            assert self.sequences[seq].block_table == table and len(table) == len(set(table))
            assert self.sequences[seq].num_computed_tokens == model.computed[seq]
        for view in views:
            owners = {seq for seq, table in model.tables.items() if view.block_id in table}
            assert view.ref_count == len(owners)
            assert view.is_free == (view.ref_count == 0) == (view.block_id in model.free)  # no leak
            assert view.eviction_rank == (model.free.index(view.block_id) if view.is_free else None)
            assert view.block_hash == model.hash_of.get(view.block_id)
            assert view.is_cached == (view.block_hash is not None)

    @invariant()
    def every_cached_hash_names_the_tokens_in_its_block(self):
        model, views = self.model, self.pool.snapshot()
        for seq, table in model.tables.items():
            written = model.tokens[seq][: model.computed[seq]]
            for position, block_hash in enumerate(hash_full_blocks(written, model.block_size)):
                self.content[table[position]] = block_hash
            for index in range(model.computed[seq] // model.block_size, len(table)):
                if model.ref_count(table[index]) == 1:
                    assert views[table[index]].block_hash is None  # a block without all its KV is never cached
        hashes = [view.block_hash for view in views if view.is_cached]
        assert all(view.block_hash == self.content[view.block_id] for view in views if view.is_cached)
        assert len(hashes) == len(set(hashes)) == self.pool.stats().cached_blocks  # one block per hash
        assert self.pool.stats().cached_free_blocks == sum(view.is_cached and view.is_free for view in views)


# 300 runs of up to 80 steps: about 15,000 pool operations, each followed by the invariants (~20 s).
TestBlockPoolStateMachine = BlockPoolMachine.TestCase
TestBlockPoolStateMachine.settings = settings(max_examples=300, stateful_step_count=80, deadline=None)
