"""Checkers for lab 10: the block pool's prefix-cache lookup, and sharing blocks between forked sequences.

The lookup's caches are built the way ``course_lib.engine.block_pool.BlockPool`` fills its own: every full block
of earlier prompts registered under its chained hash (``hash_full_blocks``), block ids shuffled. Each run asks
about prompts that share a prefix and then diverge, a prompt whose next block has the tokens of another prompt's
*first* block (hashing a block's tokens alone finds it), a cached prompt whose middle block was evicted (a lookup
that skips a miss goes on to the block after it), a prompt that is whole blocks and wholly cached (its last block
holds the last token, which is never a hit), a prompt shorter than a block, and a prompt the cache has never seen.

The fork and copy-on-write checks run on ``RefCountPool``, the part of the pool those two need: a reference count
per block and a free list. The sequences' blocks start shared with others (a common prompt prefix) and their last
block is partial, so the first write after a fork lands in a shared block; each sequence then decodes past the end
of a block, so a write that needs a new block shows too. After every call the checker compares the whole pool,
not only what the function returned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from course_lib.check.exercise import checks_an_exercise
from course_lib.check.failure import CheckFailed
from course_lib.check.learner import call_learner
from course_lib.check.mistakes import Mistake, hint_for
from course_lib.check.run import CheckRun
from course_lib.engine.block_pool import hash_block_tokens, hash_full_blocks

# --- cached_prefix: the blocks a new prompt finds in the prefix cache ------------------------------------------------

PREFIX_SIGNATURE = "cached_prefix(token_ids, block_size, cache)"
PREFIX_KINDS = ("diverges", "first block elsewhere", "evicted middle", "whole blocks", "short", "unseen",
                "diverges")
CHAIN_RULE = ("block i's key is hash_block_tokens(key of block i - 1, its tokens), None for block 0: the key stands "
              "for the whole prefix, so a block is a hit only if every block before it was the same too")


def cached_prefix_reference(token_ids: Sequence[int], block_size: int, cache: dict[str, int]) -> list[int]:
    """What ``BlockPool.allocate`` reuses: the cached blocks of the leading full blocks, up to the first miss, never
    the block that holds the last token (the model must compute at least one token to predict the next)."""
    return _lookup(token_ids, block_size, cache)


def _lookup(token_ids: Sequence[int], block_size: int, cache: dict[str, int], *, chained: bool = True,
            stop_at_miss: bool = True, last_token: bool = False) -> list[int]:
    """The lookup with one rule broken the way a known mistake breaks it; the defaults give the reference."""
    usable = len(token_ids) if last_token else len(token_ids) - 1
    hits, parent = [], None
    for start in range(0, usable - usable % block_size, block_size):
        key = hash_block_tokens(parent if chained else None, token_ids[start:start + block_size])
        parent = key
        if key in cache:
            hits.append(cache[key])
        elif stop_at_miss:
            break
    return hits


PREFIX_MISTAKES = (
    Mistake("tokens alone", "each block was hashed from its tokens alone, as if it were a prompt's first block: that "
            "misses blocks the cache holds under their chained key, and finds blocks other prompts start with. Chain "
            f"the hashes: {CHAIN_RULE}",
            wrong_reference=lambda tokens, size, cache: _lookup(tokens, size, cache, chained=False)),
    Mistake("skips a miss", "the lookup went on past a block the cache does not hold: the reused blocks must be a "
            "prefix, since the engine computes only what follows them, so stop at the first miss",
            wrong_reference=lambda tokens, size, cache: _lookup(tokens, size, cache, stop_at_miss=False)),
    Mistake("last token", "the block that holds the prompt's last token is never reused, even when the cache holds "
            "it: the model must run at least that token to predict the next one. Look up the full blocks of "
            "token_ids[:-1] only",
            wrong_reference=lambda tokens, size, cache: _lookup(tokens, size, cache, last_token=True)),
)


def _random_blocks(rng: np.random.Generator, blocks: int, block_size: int) -> list[int]:
    return rng.integers(1, 32_000, size=blocks * block_size).tolist()


def prefix_case(rng: np.random.Generator, kind: str) -> tuple[list[int], int, dict[str, int]]:
    """(token_ids, block_size, cache) of one kind; the cache also holds a few unrelated prompts."""
    size = int(rng.choice((4, 8, 16)))
    ids = iter(rng.permutation(4096).tolist())
    cache: dict[str, int] = {}

    def register(tokens: list[int]) -> list[str]:
        keys = hash_full_blocks(tokens, size)
        for key in keys:
            cache.setdefault(key, next(ids))
        return keys

    for _ in range(int(rng.integers(1, 4))):
        register(_random_blocks(rng, int(rng.integers(1, 4)), size))
    tail = _random_blocks(rng, 1, size)[: int(rng.integers(1, size))]  # a partial last block
    base = _random_blocks(rng, int(rng.integers(3, 6)), size)
    if kind == "diverges":
        register(base)
        return base[: int(rng.integers(1, 3)) * size] + tail, size, cache
    if kind == "first block elsewhere":
        first, elsewhere = _random_blocks(rng, 1, size), _random_blocks(rng, 1, size)
        register(first + _random_blocks(rng, 1, size))
        register(elsewhere + _random_blocks(rng, 1, size))  # cached under hash_block_tokens(None, elsewhere)
        return first + elsewhere + tail, size, cache
    if kind == "evicted middle":
        keys = register(base)
        del cache[keys[int(rng.integers(1, len(keys) - 1))]]
        return base + tail, size, cache
    if kind == "whole blocks":
        register(base)
        return base, size, cache
    if kind == "short":
        register(base)
        return base[: int(rng.integers(1, size))], size, cache
    return base + tail, size, cache  # unseen


def _block_ids(out: Any) -> np.ndarray:
    """The learner's answer as integers, or a CheckFailed saying what it holds instead."""
    __tracebackhide__ = True
    if out is None:
        raise CheckFailed("cached_prefix returned None: did you forget to `return` the list of block ids?")
    values = list(out) if isinstance(out, list | tuple | np.ndarray) else None
    if values is None:
        raise CheckFailed(f"cached_prefix returned {out!r:.60} (a {type(out).__name__}): return a list of block ids")
    if any(isinstance(value, str) for value in values):
        raise CheckFailed("cached_prefix returned hashes: return the block ids the cache maps them to, cache[key]")
    array = np.asarray(values, dtype=np.int64) if values else np.zeros(0, np.int64)
    if array.ndim != 1:
        raise CheckFailed(f"cached_prefix returned an array of shape {array.shape}: return a flat list of block ids")
    return array


@checks_an_exercise
def check_cached_prefix(cached_prefix: Callable[[list[int], int, dict[str, int]], Any]) -> None:
    """Check ``cached_prefix(token_ids, block_size, cache)``: the ids of the cached blocks a new prompt reuses, as
    ``BlockPool.allocate`` finds them (``cache`` maps a chained block hash to a block id)."""
    __tracebackhide__ = True
    with CheckRun("cached_prefix") as run:
        for kind in [PREFIX_KINDS[i] for i in run.rng.permutation(len(PREFIX_KINDS))]:
            token_ids, size, cache = prefix_case(run.rng, kind)
            run.case = (f"a prompt of {len(token_ids)} tokens, block_size {size}, a cache of {len(cache)} blocks "
                        f"({kind})")
            out = call_learner(cached_prefix, list(token_ids), size, dict(cache), name="cached_prefix",
                               expected_signature=PREFIX_SIGNATURE)
            got, expected = _block_ids(out), np.asarray(cached_prefix_reference(token_ids, size, cache), np.int64)
            if not np.array_equal(got, expected):
                hint = hint_for(got, expected, PREFIX_MISTAKES, (token_ids, size, cache), 0.0)
                message = f"cached_prefix returned {got.tolist()}, expected {expected.tolist()}"
                raise CheckFailed(f"{message}\nHint: {hint}" if hint else message)
        run.passed(len(PREFIX_KINDS), detail="shared, diverging, evicted and unseen prefixes")


# --- fork and copy_on_write: blocks shared by reference count ------------------------------------------------------


class RefCountPool:
    """KV-cache blocks as the lab's exercises see them: a reference count per block and a free list.

    ``ref_counts[b]`` is how many sequences' block tables hold block ``b`` (0: free); ``free`` lists the free
    blocks, the next one to hand out first; ``take_fresh_block()`` hands it out with a count of 1. It is the part of
    ``BlockPool`` that sharing needs, with nothing hidden, so that a check can compare every count.
    """

    def __init__(self, num_blocks: int, block_size: int, free: Sequence[int] | None = None) -> None:
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free = list(range(num_blocks)) if free is None else list(free)

    def take_fresh_block(self) -> int:
        """Hand out the first free block, with a reference count of 1."""
        if not self.free:
            raise RuntimeError("no free block left: every block is held by some sequence")
        block = self.free.pop(0)
        self.ref_counts[block] = 1
        return block

    def state(self) -> tuple[list[int], list[int]]:
        return list(self.ref_counts), list(self.free)

    def copy(self) -> RefCountPool:
        twin = RefCountPool(len(self.ref_counts), self.block_size, self.free)
        twin.ref_counts = list(self.ref_counts)
        return twin

    def __repr__(self) -> str:
        return f"RefCountPool(block_size={self.block_size}, ref_counts={self.ref_counts}, free={self.free})"


def fork_reference(pool: RefCountPool, parent_table: list[int]) -> list[int]:
    """The child's table: the parent's blocks, each shared once more. Nothing is copied."""
    for block in parent_table:
        pool.ref_counts[block] += 1
    return list(parent_table)


def copy_on_write_reference(pool: RefCountPool, table: list[int], position: int) -> tuple[int, int] | None:
    """Make the block that token ``position`` goes into private to this sequence; (src, dst) if it was copied.

    As ``BlockPool.grow``: past the table's end a fresh block is appended; a shared block (count > 1) is replaced in
    the table by a fresh one, its own count going down by one (the other sharers still hold it); a block the
    sequence holds alone is written in place.
    """
    index = position // pool.block_size
    if index == len(table):
        table.append(pool.take_fresh_block())
        return None
    block = table[index]
    if pool.ref_counts[block] == 1:
        return None
    fresh = pool.take_fresh_block()
    pool.ref_counts[block] -= 1
    table[index] = fresh
    return block, fresh


def shared_pool(rng: np.random.Generator) -> tuple[RefCountPool, list[int], int]:
    """A pool, a sequence's table and its token count: a partial last block, its first blocks shared with another
    sequence (a common prompt prefix), free blocks in shuffled order."""
    size = int(rng.choice((4, 8, 16)))
    blocks = int(rng.integers(2, 5))
    order = rng.permutation(int(rng.integers(3 * blocks + 8, 4 * blocks + 16))).tolist()
    pool = RefCountPool(len(order), size, order)
    table = [pool.take_fresh_block() for _ in range(blocks)]
    for block in table[: int(rng.integers(1, blocks))]:  # the prompt prefix another sequence shares
        pool.ref_counts[block] += 1
    for _ in range(int(rng.integers(1, 3))):  # other sequences' blocks
        pool.take_fresh_block()
    tokens = (blocks - 1) * size + int(rng.integers(1, size))
    return pool, table, tokens


def _describe_counts(pool: RefCountPool, blocks: Sequence[int]) -> str:
    return ", ".join(f"block {b}: {pool.ref_counts[b]}" for b in sorted(set(blocks)))


def _pool_difference(pool: RefCountPool, expected: RefCountPool) -> str | None:
    """The first way the learner's pool differs from the reference's, in words; None if they agree."""
    for block, (got, want) in enumerate(zip(pool.ref_counts, expected.ref_counts, strict=True)):
        if got != want:
            return f"ref_counts[{block}] is {got}, expected {want}"
    if pool.free != expected.free:
        return f"the free list is {pool.free}, expected {expected.free}"
    return None


FORK_SIGNATURE = "fork(pool, parent_table)"
FORK_CASES = 5
FORK_RULE = ("a fork shares: the child's table is a new list holding the parent's block ids, and each of those blocks' "
             "ref_counts goes up by one; no block is copied until someone writes into it")


def _fork_hint(pool: RefCountPool, before: RefCountPool, parent_table: list[int], child: Any) -> str:
    if len(pool.free) < len(before.free):
        return ("the fork took fresh blocks: copying at fork time costs memory for blocks nobody has written. "
                + FORK_RULE)
    if child is parent_table:
        return ("the child's table is the parent's list itself: when one of them appends a block or replaces a shared "
                f"one, the other's table changes too. Return a new list (list(parent_table)). {FORK_RULE}")
    if pool.ref_counts == before.ref_counts:
        return ("no reference count went up: freeing the parent would then free blocks the child still reads. "
                f"{FORK_RULE}")
    return FORK_RULE


@checks_an_exercise
def check_fork(fork: Callable[[RefCountPool, list[int]], Any]) -> None:
    """Check ``fork(pool, parent_table) -> child_table``: the child shares every block of the parent."""
    __tracebackhide__ = True
    with CheckRun("fork") as run:
        for _ in range(FORK_CASES):
            pool, parent_table, _tokens = shared_pool(run.rng)
            before, expected_pool = pool.copy(), pool.copy()
            expected = fork_reference(expected_pool, list(parent_table))
            run.case = f"parent_table {parent_table}, counts {_describe_counts(before, parent_table)}"
            table = list(parent_table)
            child = call_learner(fork, pool, table, name="fork", expected_signature=FORK_SIGNATURE)
            if child is None:
                raise CheckFailed("fork returned None: did you forget to `return` the child's table?")
            problem = None
            if table != parent_table:
                problem = f"the parent's table changed to {table}"
            elif not isinstance(child, list) or child != expected:
                problem = f"the child's table is {child!r:.80}, expected {expected}"
            else:
                problem = _pool_difference(pool, expected_pool) or ("the child's table is the parent's list itself"
                                                                   if child is table else None)
            if problem:
                raise CheckFailed(f"{problem}\nHint: {_fork_hint(pool, before, table, child)}")
        run.passed(FORK_CASES, detail="partial last blocks, prefixes shared already")


COW_SIGNATURE = "copy_on_write(pool, table, position)"
COW_CASES = 4
COW_RULE = ("block position // block_size is the one written: past the table's end, append pool.take_fresh_block(); "
            "shared (ref_counts > 1), take a fresh block, put it in its place in the table, lower the old block's "
            "count by one and return (old, fresh); held alone, write in place and return None")


def _cow_hint(before: RefCountPool, pool: RefCountPool, table_before: list[int], table: list[int], index: int,
              out: Any, expected: tuple[int, int] | None) -> str:
    """The likely mistake behind one wrong call, from the pool and table before and after it."""
    if index >= len(table_before):
        return COW_RULE
    block = table_before[index]
    shared = before.ref_counts[block] > 1
    if shared and out is None and table == table_before:
        return (f"block {block} is shared (ref_counts {before.ref_counts[block]}): writing into it puts this "
                f"token's key and value into another sequence's context. Copy it first. {COW_RULE}")
    if not shared and out is not None:
        return (f"block {block} is held by this sequence alone (ref_counts 1): nobody else reads it, so write in "
                f"place; copying wastes a block. {COW_RULE}")
    if expected is not None and out is not None and tuple(out) == expected[::-1]:
        return f"(src, dst) is the other way round: the copy goes from the shared block to the fresh one. {COW_RULE}"
    if shared and table[index] == block:
        return f"the table still points at the shared block {block}: put the fresh block in its place. {COW_RULE}"
    if shared and pool.ref_counts[block] == before.ref_counts[block]:
        return (f"block {block}'s count did not go down: this sequence no longer holds it, and with its count too "
                f"high it would never be freed. {COW_RULE}")
    if shared and table[index] != block and pool.ref_counts[table[index]] > 1:
        return f"the fresh block's count is {pool.ref_counts[table[index]]}: take_fresh_block sets it to 1 already"
    return COW_RULE


def _as_copy(out: Any) -> tuple[int, int] | None:
    """The learner's answer as (src, dst) or None, or a CheckFailed saying what it is instead."""
    __tracebackhide__ = True
    if out is None:
        return None
    try:
        src, dst = (int(value) for value in out)
    except (TypeError, ValueError):
        raise CheckFailed(f"copy_on_write returned {out!r:.40}: return (src, dst), the blocks to copy from and to, "
                          "or None when nothing is copied") from None
    return src, dst


def _explain_cow_error(error: BaseException) -> str | None:
    if isinstance(error, IndexError):
        return ("a position in the block just past the table's end needs a new block: when position // block_size "
                "== len(table), append pool.take_fresh_block()")
    return None


@checks_an_exercise
def check_copy_on_write(copy_on_write: Callable[[RefCountPool, list[int], int], Any]) -> None:
    """Check ``copy_on_write(pool, table, position)``: after a fork, parent and child decode token after token, and
    each call must leave the table and every reference count as ``BlockPool.grow`` would."""
    __tracebackhide__ = True
    with CheckRun("copy_on_write") as run:
        for _ in range(COW_CASES):
            pool, parent, tokens = shared_pool(run.rng)
            child = fork_reference(pool, list(parent))
            expected_pool = pool.copy()
            tables = {"parent": parent, "child": child}
            expected_tables = {name: list(table) for name, table in tables.items()}
            lengths = {"parent": tokens, "child": tokens}
            for _step in range(pool.block_size + 2):  # each writes past the end of a block once
                who = ("child", "parent")[int(run.rng.integers(2))]
                position, table = lengths[who], tables[who]
                run.case = (f"block_size {pool.block_size}, the {who}'s table {table} (the other's "
                            f"{tables['parent' if who == 'child' else 'child']}), counts "
                            f"{_describe_counts(pool, tables['parent'] + tables['child'])}, position {position}")
                before, table_before = pool.copy(), list(table)
                expected = copy_on_write_reference(expected_pool, expected_tables[who], position)
                out = call_learner(copy_on_write, pool, table, position, name="copy_on_write",
                                   expected_signature=COW_SIGNATURE, explain_error=_explain_cow_error)
                got = _as_copy(out)
                problem = (f"returned {out!r:.40}, expected {expected}" if got != expected else
                           f"the table is {table}, expected {expected_tables[who]}" if table != expected_tables[who]
                           else _pool_difference(pool, expected_pool))
                if problem:
                    hint = _cow_hint(before, pool, table_before, table, position // pool.block_size, out, expected)
                    raise CheckFailed(f"{problem}\nHint: {hint}")
                lengths[who] += 1
        run.passed(COW_CASES, detail="writes into shared, private and new blocks after a fork")
