"""Lab 10 checkers: the prefix-cache lookup, fork and copy-on-write pass when written as ``BlockPool`` works, and each
known mistake is rejected with its hint. The references are also held against ``BlockPool`` itself."""

from __future__ import annotations

import pytest
from checker_testing import rejected_with, unwritten

from course_lib.check.lab10 import (
    PREFIX_KINDS,
    RefCountPool,
    cached_prefix_reference,
    check_cached_prefix,
    check_copy_on_write,
    check_fork,
    copy_on_write_reference,
    fork_reference,
    prefix_case,
)
from course_lib.engine.block_pool import BlockPool, hash_block_tokens
from course_lib.engine.sequence import Sequence

# --- cached_prefix ------------------------------------------------------------------------------------------------


def lookup_with(chained=True, stop_at_miss=True, stop=lambda tokens, size: len(tokens) - size):
    """The solution with one rule broken; ``stop`` is where the last block looked up may start (exclusive)."""

    def cached_prefix(token_ids, block_size, cache):
        blocks, parent = [], None
        for start in range(0, stop(token_ids, block_size), block_size):
            key = hash_block_tokens(parent if chained else None, token_ids[start:start + block_size])
            parent = key
            if key in cache:
                blocks.append(cache[key])
            elif stop_at_miss:
                break
        return blocks

    return cached_prefix


def test_cached_prefix_accepts_the_solution(capsys):
    check_cached_prefix(lookup_with())
    check_cached_prefix(cached_prefix_reference)
    assert capsys.readouterr().out.startswith("PASSED cached_prefix: 7 random cases (shared, diverging, evicted")


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (lookup_with(chained=False), "Chain the hashes"),
        (lookup_with(stop_at_miss=False), "stop at the first miss"),
        (lookup_with(stop=lambda tokens, size: len(tokens) - size + 1), "token_ids[:-1] only"),
        (lookup_with(stop=lambda tokens, size: len(tokens)), "token_ids[:-1] only"),
    ],
    ids=["tokens-alone", "skips-a-miss", "last-token-block", "partial-last-block"],
)
def test_cached_prefix_rejects_known_mistakes(seed, wrong, hint):
    message = rejected_with(check_cached_prefix, wrong)
    assert hint in message and "expected [" in message and "block_size" in message


def test_cached_prefix_wrong_kinds_of_answer():
    def hashes(token_ids, block_size, cache):
        return [hash_block_tokens(None, token_ids[:block_size])]

    assert "return the block ids" in rejected_with(check_cached_prefix, hashes)
    assert "forget to `return`" in rejected_with(check_cached_prefix, lambda tokens, size, cache: None)


def test_cached_prefix_stub():
    def cached_prefix(token_ids, block_size, cache):
        raise NotImplementedError("Exercise: write cached_prefix; see the text above")

    assert unwritten(check_cached_prefix, cached_prefix).startswith("cached_prefix is not written yet")


def test_the_lookup_is_what_block_pool_allocate_reuses(rng):
    """Fill a real pool with the case's prompts' computed blocks, then admit the case's prompt: its hit blocks are
    as many as the reference finds (the ids differ: the pool numbers its own blocks)."""
    for kind in PREFIX_KINDS:
        tokens, size, _cache = prefix_case(rng, kind)
        pool = BlockPool(64, size, watermark=0.0)
        earlier = Sequence(0, tuple(tokens[: len(tokens) // size * size] or tokens))
        pool.allocate(earlier)
        earlier.num_computed_tokens = earlier.num_tokens
        pool.cache_full_blocks(earlier)
        cache = {key: block for key, block in zip(earlier.block_hashes, earlier.block_table, strict=False)}
        new = Sequence(1, tuple(tokens))
        hit_tokens = pool.allocate(new)
        assert hit_tokens == len(cached_prefix_reference(tokens, size, cache)) * size
        assert new.block_table[: hit_tokens // size] == cached_prefix_reference(tokens, size, cache)


# --- fork -------------------------------------------------------------------------------------------------------


def test_fork_accepts_the_solution(capsys):
    check_fork(fork_reference)
    assert capsys.readouterr().out.startswith("PASSED fork: 5 random cases (partial last blocks")


def fork_aliased(pool, parent_table):
    for block in parent_table:
        pool.ref_counts[block] += 1
    return parent_table


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (lambda pool, table: [pool.take_fresh_block() for _ in table], "copying at fork time"),
        (fork_aliased, "Return a new list"),
        (lambda pool, table: list(table), "no reference count went up"),
    ],
    ids=["copies-everything", "same-list", "no-increment"],
)
def test_fork_rejects_known_mistakes(seed, wrong, hint):
    message = rejected_with(check_fork, wrong)
    assert hint in message and "parent_table [" in message


def test_fork_none_and_stub():
    assert "forget to `return`" in rejected_with(check_fork, lambda pool, table: None)

    def stub(pool, parent_table):
        raise NotImplementedError("Exercise: write fork; see the text above")

    assert unwritten(check_fork, stub).startswith("fork is not written yet")


# --- copy_on_write -----------------------------------------------------------------------------------------------


def cow_with(copy_when_shared=True, copy_when_private=False, decrement=True, update_table=True, append=True,
             swapped=False):
    """The solution with one step left out or done wrong."""

    def copy_on_write(pool, table, position):
        index = position // pool.block_size
        if append and index == len(table):
            table.append(pool.take_fresh_block())
            return None
        old = table[index]
        shared = pool.ref_counts[old] > 1
        if not (shared and copy_when_shared) and not (not shared and copy_when_private):
            return None
        fresh = pool.take_fresh_block()
        pool.ref_counts[old] -= 1 if decrement else 0
        if update_table:
            table[index] = fresh
        return (fresh, old) if swapped else (old, fresh)

    return copy_on_write


def test_copy_on_write_accepts_the_solution(capsys):
    check_copy_on_write(cow_with())
    check_copy_on_write(copy_on_write_reference)
    assert capsys.readouterr().out.startswith("PASSED copy_on_write: 4 random cases (writes into shared, private")


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (cow_with(copy_when_shared=False), "writing into it puts this token's key and value into another"),
        (cow_with(copy_when_private=True), "write in place; copying wastes a block"),
        (cow_with(decrement=False), "count did not go down"),
        (cow_with(update_table=False), "the table still points at the shared block"),
        (cow_with(append=False), "append pool.take_fresh_block()"),
        (cow_with(swapped=True), "the other way round"),
    ],
    ids=["writes-into-shared", "copies-private", "no-decrement", "table-not-updated", "no-new-block", "swapped"],
)
def test_copy_on_write_rejects_known_mistakes(seed, wrong, hint):
    message = rejected_with(check_copy_on_write, wrong)
    assert hint in message and "position" in message


def test_copy_on_write_wrong_kinds_of_answer():
    assert "return (src, dst)" in rejected_with(check_copy_on_write, lambda pool, table, position: 7)

    def fresh_counted_twice(pool, table, position):
        copied = copy_on_write_reference(pool, table, position)
        if copied:
            pool.ref_counts[copied[1]] += 1
        return copied

    assert "take_fresh_block sets it to 1 already" in rejected_with(check_copy_on_write, fresh_counted_twice)


def test_the_references_do_what_block_pool_does():
    """A fork shares every block; the child's first write into the shared partial block copies it, and the parent's
    next write finds its block private again, as ``BlockPool.fork`` and ``BlockPool.grow`` do."""
    block_pool, parent = BlockPool(16, 4, watermark=0.0), Sequence(0, tuple(range(1, 11)))
    block_pool.allocate(parent)
    parent.num_computed_tokens = parent.num_tokens
    child = Sequence(1, parent.prompt_token_ids)
    block_pool.fork(parent, child)
    child.output_token_ids.append(5)
    copies = block_pool.grow(child, child.num_tokens)

    pool = RefCountPool(16, 4)
    table = [pool.take_fresh_block() for _ in range(3)]
    forked = fork_reference(pool, table)
    assert forked == table and forked is not table and pool.ref_counts[:3] == [2, 2, 2]
    copied = copy_on_write_reference(pool, forked, 10)
    assert [tuple(copy) for copy in copies] == [copied] == [(2, 3)]
    assert forked == child.block_table == [0, 1, 3] and pool.ref_counts[:4] == [2, 2, 1, 1]
    assert copy_on_write_reference(pool, table, 10) is None and table == [0, 1, 2]
