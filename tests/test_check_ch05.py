"""Chapter 05 checkers: the right answers pass, and each known mistake is rejected with its hint.

The ring's wrong versions are whole functions, each one change away from the solution, as a learner would write
them; the deadlock's timeout is shortened so that its test takes half a second a run.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from checker_testing import rejected_with, unwritten

from course_lib.check import ch05
from course_lib.check.ch05 import (
    check_dispatch_order,
    check_ring_all_reduce,
    dispatch_order_reference,
    routing,
)
from course_lib.distributed import run_ranks
from course_lib.distributed.algorithms import ring_all_reduce as course_ring
from course_lib.distributed.moe import moe_forward, random_moe_weights, route

# --- ring_all_reduce -------------------------------------------------------------------------------------------


def bounds_of(length, p):
    return [i * length // p for i in range(p + 1)]


def ring_all_reduce(comm, x):
    p, r = comm.size, comm.rank
    right, left = (r + 1) % p, (r - 1) % p
    result = x.copy()
    bounds = bounds_of(len(x), p)

    def segment(i):
        i %= p
        return result[bounds[i]:bounds[i + 1]]

    for step in range(p - 1):
        arriving = segment(r - step - 1)
        arriving += comm.sendrecv(segment(r - step), right, np.empty_like(arriving), left)
    for step in range(p - 1):
        comm.sendrecv(segment(r + 1 - step), right, segment(r - step), left)
    return result


def ring_with(reduce_offset=1, gather=True, gather_offset=0, chunks="bounds", send_first=False):
    """The solution with one part wrong: the segment the reduce-scatter adds into (``r - step - reduce_offset``),
    no all-gather, the segment the all-gather overwrites (``r - step + gather_offset``), segments of
    ``len(x) // p`` ("floor"), or a blocking send before each receive."""

    def wrong(comm, x):
        p, r = comm.size, comm.rank
        right, left = (r + 1) % p, (r - 1) % p
        result = x.copy()
        chunk = len(x) // p
        bounds = bounds_of(len(x), p) if chunks == "bounds" else [i * chunk for i in range(p + 1)]

        def segment(i):
            i %= p
            return result[bounds[i]:bounds[i + 1]]

        def exchange(outgoing, incoming):
            if send_first:
                comm.send(outgoing, right)
                return comm.recv(incoming, left)
            return comm.sendrecv(outgoing, right, incoming, left)

        for step in range(p - 1):
            arriving = segment(r - step - reduce_offset)
            arriving += exchange(segment(r - step), np.empty_like(arriving))
        for step in range(p - 1 if gather else 0):
            exchange(segment(r + 1 - step), segment(r - step + gather_offset))
        return result

    return wrong


def test_ring_accepts_the_solution(capsys):
    assert check_ring_all_reduce(ring_all_reduce) is None
    assert capsys.readouterr().out.startswith("PASSED ring_all_reduce: 6 random cases (2 to 5 ranks, lengths not a "
                                              "multiple of the ranks and below them, seed ")


def test_ring_accepts_other_right_rings():
    def with_array_split(comm, x):
        p, r = comm.size, comm.rank
        segments = np.array_split(x.copy(), p)  # views of the copy, lengths differing by at most one
        for step in range(p - 1):
            arriving = segments[(r - step - 1) % p]
            buffer = np.empty_like(arriving)
            if r % 2 == 0:  # even ranks send first, odd ranks receive first: no deadlock with blocking calls
                comm.send(segments[(r - step) % p], (r + 1) % p)
                comm.recv(buffer, (r - 1) % p)
            else:
                comm.recv(buffer, (r - 1) % p)
                comm.send(segments[(r - step) % p], (r + 1) % p)
            arriving += buffer
        for step in range(p - 1):
            comm.sendrecv(segments[(r + 1 - step) % p], (r + 1) % p, segments[(r - step) % p], (r - 1) % p)
        return np.concatenate(segments)

    check_ring_all_reduce(with_array_split)


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (ring_with(gather=False), "the all-gather is missing"),
        (ring_with(chunks="floor"), "leave the remainder out"),
        (lambda comm, x: x, "returned its own input unchanged"),
        (lambda comm, x: x.copy(), "returned its own input unchanged"),
    ],
    ids=["no-all-gather", "floor-chunks", "input-unchanged", "copy-of-input"],
)
def test_ring_rejects_known_mistakes(seed, wrong, hint):
    message = rejected_with(check_ring_all_reduce, wrong)
    assert hint in message and "rank " in message and "case ranks=" in message


def test_ring_names_a_wrong_chunk_index(seed):
    """Adding into the segment just sent: a buffer of the wrong size where segments are uneven, wrong sums (a
    contribution counted twice, one missing) where they are even."""
    message = rejected_with(check_ring_all_reduce, ring_with(reduce_offset=0))
    assert "(r - s - 1) mod p" in message and "At step s" in message
    assert "the buffer you received into" in message or "a chunk index" in message


def test_ring_chunk_index_on_even_lengths(monkeypatch):
    monkeypatch.setattr(ch05, "RING_CASES", ((4, "multiple", "float64"),))
    message = rejected_with(check_ring_all_reduce, ring_with(reduce_offset=0))
    assert "a chunk index" in message and "in a probe run" in message and "result[" in message
    assert "x0 + x1 + x2 + x3" not in message  # the wrong element's sum, not the right one


@pytest.mark.parametrize("gather_offset", [1, -1], ids=["overwrites-what-it-sends", "one-behind"])
def test_ring_all_gather_with_a_wrong_segment(monkeypatch, gather_offset):
    monkeypatch.setattr(ch05, "RING_CASES", ((3, "multiple", "float64"), (4, "uneven", "float64")))
    assert "passes on the wrong segments" in rejected_with(check_ring_all_reduce,
                                                           ring_with(gather_offset=gather_offset))
    monkeypatch.setattr(ch05, "RING_CASES", ((4, "uneven", "float64"),))  # segments of 2 lengths: sizes disagree
    assert "the buffer you received into" in rejected_with(check_ring_all_reduce,
                                                           ring_with(gather_offset=gather_offset))


def test_ring_segments_put_back_in_the_wrong_place(seed):
    message = rejected_with(check_ring_all_reduce, lambda comm, x: np.roll(ring_all_reduce(comm, x), 1))
    assert "segments ended up in another segment's place" in message


def test_ring_names_the_send_send_deadlock_by_its_timeout(monkeypatch):
    monkeypatch.setattr(ch05, "RING_TIMEOUT_S", 0.5)
    started = time.monotonic()
    message = rejected_with(check_ring_all_reduce, ring_with(send_first=True))
    assert time.monotonic() - started < 5
    assert "raised CollectiveTimeout" in message and "send/send deadlock" in message
    assert "comm.sendrecv(segment, right, buffer, left)" in message and "case ranks=3" in message


def test_ring_names_a_message_that_never_comes(monkeypatch):
    monkeypatch.setattr(ch05, "RING_TIMEOUT_S", 0.5)

    def wrong_neighbour(comm, x):  # receives from the right, where nobody sends to it from
        buffer = np.empty_like(x)
        return x + comm.sendrecv(x, (comm.rank + 1) % comm.size, buffer, (comm.rank + 1) % comm.size)

    assert "never came" in rejected_with(check_ring_all_reduce, wrong_neighbour)


def test_ring_refuses_the_library_collectives():
    message = rejected_with(check_ring_all_reduce, lambda comm, x: comm.all_reduce(x))
    assert "comm.all_reduce is the library's collective" in message and "comm.send, comm.recv" in message
    assert "barrier" in rejected_with(check_ring_all_reduce, lambda comm, x: comm.barrier())


def test_ring_refuses_the_courses_own_ring():
    assert "the course's own implementation" in rejected_with(check_ring_all_reduce, course_ring)
    assert "the course's own implementation" in rejected_with(check_ring_all_reduce,
                                                               lambda comm, x: course_ring(comm, x))


def test_ring_wrong_buffer_dtype():
    def float64_buffers(comm, x):
        p, r = comm.size, comm.rank
        result = x.copy()
        bounds = bounds_of(len(x), p)
        for step in range(p - 1):
            i, j = (r - step - 1) % p, (r - step) % p
            buffer = np.empty(bounds[i + 1] - bounds[i])  # float64, whatever x is
            result[bounds[i]:bounds[i + 1]] += comm.sendrecv(result[bounds[j]:bounds[j + 1]], (r + 1) % p, buffer,
                                                             (r - 1) % p)
        for step in range(p - 1):
            i, j = (r - step) % p, (r + 1 - step) % p
            comm.sendrecv(result[bounds[j]:bounds[j + 1]], (r + 1) % p, result[bounds[i]:bounds[i + 1]], (r - 1) % p)
        return result

    message = rejected_with(check_ring_all_reduce, float64_buffers)
    assert "float32" in message and "keeps x's dtype" in message


def test_ring_reshape_into_ranks_gets_the_uneven_hint():
    def reshaped(comm, x):
        return x.reshape(comm.size, -1).sum(axis=0)

    assert "leave the remainder out" in rejected_with(check_ring_all_reduce, reshaped)


def test_ring_not_implemented_missing_return_and_wrong_signature():
    def stub(comm, x):
        raise NotImplementedError("Exercise: write ring_all_reduce; see the text above")

    assert unwritten(check_ring_all_reduce, stub).startswith("ring_all_reduce is not written yet")
    assert "forget to `return`" in rejected_with(check_ring_all_reduce, lambda comm, x: None)
    message = rejected_with(check_ring_all_reduce, lambda x: x)
    assert "but the checker calls it as ring_all_reduce(comm, x)" in message


def test_ring_a_rank_that_loops_is_stopped(monkeypatch):
    monkeypatch.setenv("COURSE_CHECK_TIME_LIMIT_S", "1")
    monkeypatch.setattr(ch05, "RING_TIMEOUT_S", 0.3)

    def rank_one_loops(comm, x):
        while comm.rank == 1:
            pass
        return ring_all_reduce(comm, x)

    message = rejected_with(check_ring_all_reduce, rank_one_loops)
    assert "did not return within 1 s" in message


# --- dispatch_order ---------------------------------------------------------------------------------------------


def dispatch_order(expert_ids, experts_per_rank, size):
    flat = expert_ids.reshape(-1)
    order = np.argsort(flat, kind="stable")
    send_counts = np.bincount(flat // experts_per_rank, minlength=size)
    return order, send_counts


def dispatch_with(order_of=None, counts_of=None):
    """The solution with its order (``order_of(flat, per_rank)``) or counts (``counts_of(flat, per_rank, size)``)
    computed another way."""

    def wrong(expert_ids, experts_per_rank, size):
        flat = expert_ids.reshape(-1)
        order, counts = dispatch_order(expert_ids, experts_per_rank, size)
        return (order if order_of is None else order_of(flat, experts_per_rank),
                counts if counts_of is None else counts_of(flat, experts_per_rank, size))

    return wrong


def test_dispatch_accepts_the_solution(capsys):
    assert check_dispatch_order(dispatch_order) is None
    assert capsys.readouterr().out.startswith("PASSED dispatch_order: 7 random cases (top_k 1 and 2, 2 to 5 ranks, "
                                              "some receiving nothing, seed ")


def test_dispatch_accepts_loops_and_lists():
    def with_loops(expert_ids, experts_per_rank, size):
        flat = expert_ids.reshape(-1).tolist()
        order = sorted(range(len(flat)), key=lambda position: flat[position])  # sorted() is stable
        send_counts = [0] * size
        for expert in flat:
            send_counts[expert // experts_per_rank] += 1
        return order, send_counts

    check_dispatch_order(with_loops)
    check_dispatch_order(dispatch_order_reference)


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (dispatch_with(counts_of=lambda flat, per_rank, size: np.bincount(flat, minlength=size * per_rank)),
         "one count per destination rank"),
        (dispatch_with(counts_of=lambda flat, per_rank, size: np.bincount(flat % size, minlength=size)),
         "e % size"),
        (dispatch_with(counts_of=lambda flat, per_rank, size: np.bincount(flat // size, minlength=size)),
         "divide by experts_per_rank"),
        (dispatch_with(counts_of=lambda flat, per_rank, size: np.bincount(flat // per_rank + 1, minlength=size)),
         "numbered from 0"),
        (dispatch_with(counts_of=lambda flat, per_rank, size: np.bincount((flat + 1) // per_rank, minlength=size)),
         "(e + 1) // experts_per_rank"),
        (dispatch_with(counts_of=lambda flat, per_rank, size: np.bincount(flat // per_rank)), "minlength=size"),
        (dispatch_with(order_of=lambda flat, per_rank: np.sort(flat)), "np.argsort gives them"),
        (dispatch_with(order_of=lambda flat, per_rank: np.argsort(flat // per_rank, kind="stable")),
         "grouped by expert"),
        (dispatch_with(order_of=lambda flat, per_rank: np.lexsort((-np.arange(len(flat)), flat))), "kind='stable'"),
    ],
    ids=["counts-by-expert", "round-robin", "divided-by-size", "ranks-from-1", "expert-plus-1", "no-minlength",
         "sorted-values", "by-rank-only", "reversed-ties"],
)
def test_dispatch_rejects_known_mistakes(seed, wrong, hint):
    message = rejected_with(check_dispatch_order, wrong)
    assert hint in message and "expected" in message and "tokens, top_k=" in message


def test_dispatch_rejects_numpys_default_sort(seed):
    message = rejected_with(check_dispatch_order, dispatch_with(order_of=lambda flat, per_rank: np.argsort(flat)))
    assert "kind='stable'" in message and "order is wrong at" in message and "'s expert " in message


def test_dispatch_rejects_token_numbers(seed):
    def token_numbers(expert_ids, experts_per_rank, size):
        order, counts = dispatch_order(expert_ids, experts_per_rank, size)
        return order // expert_ids.shape[1], counts

    assert "token * top_k + slot" in rejected_with(check_dispatch_order, token_numbers)


def test_dispatch_index_error_and_wrong_kinds_of_answer():
    def counts_into_a_list(expert_ids, experts_per_rank, size):
        counts = [0] * size
        for expert in expert_ids.reshape(-1):
            counts[expert // experts_per_rank + 1] += 1
        return np.argsort(expert_ids.reshape(-1), kind="stable"), counts

    assert "from 0 to size - 1" in rejected_with(check_dispatch_order, counts_into_a_list)
    assert "forget to `return order, send_counts`" in rejected_with(check_dispatch_order, lambda e, k, s: None)
    assert "return the pair" in rejected_with(check_dispatch_order, lambda e, k, s: np.argsort(e.reshape(-1)))
    float_counts = dispatch_with(counts_of=lambda flat, per_rank, size: np.zeros(size))
    assert "expected integers" in rejected_with(check_dispatch_order, float_counts)
    assert "calls it as dispatch_order(expert_ids, experts_per_rank, size)" in rejected_with(
        check_dispatch_order, lambda expert_ids: None)


def test_routings_leave_ranks_idle_and_beat_insertion_sort():
    rng = np.random.default_rng(3)
    for ranks, per_rank, top_k, idle in ch05.DISPATCH_CASES:
        for _ in range(20):
            expert_ids = routing(rng, ranks, per_rank, top_k, idle)
            counts = dispatch_order_reference(expert_ids, per_rank, ranks)[1]
            assert expert_ids.size > 16 and expert_ids.shape[1] == top_k
            assert all(len(set(row)) == top_k for row in expert_ids.tolist())  # a token's experts differ
            assert (counts == 0).sum() >= (1 if idle == "last" else idle)  # a chosen rank may be unlucky too
            if idle == "last":
                assert counts[-1] == 0


@pytest.mark.parametrize(("size", "top_k"), [(2, 2), (4, 1), (4, 2)])
def test_dispatch_counts_are_what_moe_forward_sends(size, top_k):
    """The exercise's contract is the course's MoE layer's: its dispatch sends the reference's counts."""
    rng = np.random.default_rng(size * 10 + top_k)
    whole = random_moe_weights(rng, 8, 16, 24)
    tokens = [rng.standard_normal((int(rng.integers(3, 12)), 16)) for _ in range(size)]

    def rank_main(comm):
        return moe_forward(comm, tokens[comm.rank], whole.shard(comm.rank, size), top_k)[1]

    for rank, traffic in enumerate(run_ranks(rank_main, size)):
        expert_ids, _ = route(tokens[rank], whole.router, top_k)
        _, counts = dispatch_order_reference(expert_ids, 8 // size, size)
        assert traffic.dispatch_rows == tuple(counts.tolist())
