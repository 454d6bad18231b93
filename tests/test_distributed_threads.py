"""course_lib.distributed on the threads backend: every operation and hand-written algorithm against NumPy,
on 1 to 5 ranks, with lengths that do not split evenly; failures, deadlocks and misuse raise, never hang."""

import time

import numpy as np
import pytest

from course_lib.check import relative_error
from course_lib.distributed import CollectiveError, CollectiveTimeout, RankFailed, connect, run_ranks
from course_lib.distributed.algorithms import (
    pairwise_all_to_all,
    recursive_doubling_all_reduce,
    ring_all_reduce,
    segment_bounds,
)

SIZES = (1, 2, 3, 4)
REDUCE = {"sum": np.sum, "max": np.max, "min": np.min}


@pytest.fixture
def rng():
    seed = np.random.SeedSequence().entropy
    print(f"seed {seed}")
    return np.random.default_rng(seed)


def assert_same_sum(got, expected) -> None:
    """Equal up to the order of the additions: ranks add in another order than NumPy, so an element whose random
    addends cancel can differ in its relative last bits; the norm-wise error of the whole result cannot."""
    assert relative_error(got, expected) < 1e-12


def rank_inputs(rng, size, shape, dtype="float64"):
    """One fresh random array per rank, never zero (ints from 1 to 99 with a random sign)."""
    if np.dtype(dtype).kind == "i":
        return [(rng.integers(1, 100, shape) * rng.choice([-1, 1], shape)).astype(dtype) for _ in range(size)]
    return [rng.standard_normal(shape).astype(dtype) + 0.5 for _ in range(size)]


def poisoned(shape, dtype="float64"):
    return np.full(shape, np.nan if np.dtype(dtype).kind == "f" else -12345, dtype)


# ---- point-to-point ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_sendrecv_passes_arrays_around_a_ring(rng, size):
    inputs = rank_inputs(rng, size, (5, 3))

    def rank_main(comm):
        out = poisoned((5, 3))
        return comm.sendrecv(inputs[comm.rank], (comm.rank + 1) % size, out, (comm.rank - 1) % size)

    for rank, got in enumerate(run_ranks(rank_main, size)):
        np.testing.assert_array_equal(got, inputs[(rank - 1) % size])


@pytest.mark.parametrize("size", (2, 3, 4))
def test_send_and_recv_ordered_by_parity_do_not_deadlock(rng, size):
    inputs = rank_inputs(rng, size, 11, "int32")

    def rank_main(comm):
        right, left = (comm.rank + 1) % size, (comm.rank - 1) % size
        out = poisoned(11, "int32")
        if comm.rank % 2 == 0:
            comm.send(inputs[comm.rank], right, tag=7)
            comm.recv(out, left, tag=7)
        else:
            comm.recv(out, left, tag=7)
            comm.send(inputs[comm.rank], right, tag=7)
        return out

    for rank, got in enumerate(run_ranks(rank_main, size)):
        np.testing.assert_array_equal(got, inputs[(rank - 1) % size])


def test_messages_with_different_tags_are_kept_apart(rng):
    first, second = rank_inputs(rng, 2, 4)

    def rank_main(comm):
        if comm.rank == 0:
            comm.sendrecv(first, 1, np.empty(0), 1, tag=1)
            comm.send(second, 1, tag=2)
            return None
        late, early = poisoned(4), poisoned(4)
        comm.sendrecv(np.empty(0), 0, early, 0, tag=1)
        return early, comm.recv(late, 0, tag=2)

    early, late = run_ranks(rank_main, 2)[1]
    np.testing.assert_array_equal(early, first)
    np.testing.assert_array_equal(late, second)


# ---- the library collectives ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_broadcast_copies_the_roots_array_in_place(rng, size):
    inputs = rank_inputs(rng, size, (3, 7))
    root = size - 1

    def rank_main(comm):
        buffer = inputs[root].copy() if comm.rank == root else poisoned((3, 7))
        return comm.broadcast(buffer, root=root)

    for got in run_ranks(rank_main, size):
        np.testing.assert_array_equal(got, inputs[root])


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("op", sorted(REDUCE))
@pytest.mark.parametrize("dtype", ["float64", "int64"])
def test_all_reduce_matches_numpy(rng, size, op, dtype):
    inputs = rank_inputs(rng, size, (7, 2), dtype)

    def rank_main(comm):
        return comm.all_reduce(inputs[comm.rank], op=op, out=poisoned((7, 2), dtype))

    results = run_ranks(rank_main, size)
    expected = REDUCE[op](np.stack(inputs), axis=0)
    for got in results:
        assert_same_sum(got, expected)
        np.testing.assert_array_equal(got, results[0])  # every rank has the same bits


@pytest.mark.parametrize("size", SIZES)
def test_reduce_scatter_keeps_this_ranks_rows_of_the_sum(rng, size):
    inputs = rank_inputs(rng, size, (3 * size, 2))
    total = np.sum(inputs, axis=0)

    def rank_main(comm):
        return comm.reduce_scatter(inputs[comm.rank], out=poisoned((3, 2)))

    for rank, got in enumerate(run_ranks(rank_main, size)):
        assert_same_sum(got, total[3 * rank:3 * rank + 3])


@pytest.mark.parametrize("size", SIZES)
def test_all_gather_stacks_every_ranks_array_in_rank_order(rng, size):
    inputs = rank_inputs(rng, size, (5, 3))

    def rank_main(comm):
        return comm.all_gather(inputs[comm.rank], out=poisoned((5 * size, 3)))

    for got in run_ranks(rank_main, size):
        np.testing.assert_array_equal(got, np.concatenate(inputs))


def uneven_counts(rng, size):
    """counts[source][dest]: rows each rank sends each rank, zeros included."""
    return rng.integers(0, 5, (size, size)).tolist()


@pytest.mark.parametrize("size", SIZES)
def test_all_to_all_with_uneven_counts(rng, size):
    counts = uneven_counts(rng, size)
    inputs = [rng.standard_normal((sum(counts[rank]), 3)) + 0.5 for rank in range(size)]
    expected = [np.split(inputs[rank], np.cumsum(counts[rank])[:-1]) for rank in range(size)]

    def rank_main(comm):
        return comm.all_to_all(inputs[comm.rank], counts[comm.rank])

    for rank, got in enumerate(run_ranks(rank_main, size)):
        assert len(got) == size
        for source in range(size):
            np.testing.assert_array_equal(got[source], expected[source][rank])


def test_barrier_holds_every_rank_until_the_last_arrives():
    def rank_main(comm):
        if comm.rank == 2:
            time.sleep(0.2)
        arrived = time.monotonic()
        comm.barrier()
        return arrived, time.monotonic()

    times = run_ranks(rank_main, 4)
    last_arrival = max(arrived for arrived, _ in times)
    assert all(left >= last_arrival for _, left in times)


# ---- the algorithms by hand ----------------------------------------------------------------------------------


def test_segments_cover_any_length_with_sizes_differing_by_at_most_one():
    for length in range(12):
        for parts in range(1, 6):
            bounds = segment_bounds(length, parts)
            sizes = np.diff(bounds)
            assert bounds[0] == 0 and bounds[-1] == length and sizes.min() >= 0 and np.ptp(sizes) <= 1


@pytest.mark.parametrize("size", (1, 2, 3, 4, 5))
@pytest.mark.parametrize("length,chunk_elements", [(1, None), (2, None), (13, None), (13, 2), (100, 7)])
def test_hand_ring_equals_the_library_all_reduce_and_numpy(rng, size, length, chunk_elements):
    inputs = rank_inputs(rng, size, length)

    def rank_main(comm):
        by_hand = ring_all_reduce(comm, inputs[comm.rank], out=poisoned(length), chunk_elements=chunk_elements)
        return by_hand, comm.all_reduce(inputs[comm.rank])

    results = run_ranks(rank_main, size)
    for by_hand, library in results:
        assert_same_sum(by_hand, np.sum(inputs, axis=0))
        assert_same_sum(by_hand, library)
        np.testing.assert_array_equal(by_hand, results[0][0])


@pytest.mark.parametrize("op", ["max", "min"])
def test_hand_ring_reduces_other_ops_and_shapes_in_place(rng, op):
    inputs = rank_inputs(rng, 3, (4, 5), "int32")

    def rank_main(comm):
        mine = inputs[comm.rank].copy()
        return ring_all_reduce(comm, mine, op=op, out=mine)

    for got in run_ranks(rank_main, 3):
        np.testing.assert_array_equal(got, REDUCE[op](np.stack(inputs), axis=0))


@pytest.mark.parametrize("size", (1, 2, 3, 4, 5, 6, 7))
def test_recursive_doubling_folds_in_ranks_beyond_a_power_of_two(rng, size):
    inputs = rank_inputs(rng, size, (3, 3))

    def rank_main(comm):
        return recursive_doubling_all_reduce(comm, inputs[comm.rank], out=poisoned((3, 3)))

    results = run_ranks(rank_main, size)
    for got in results:
        assert_same_sum(got, np.sum(inputs, axis=0))
        np.testing.assert_array_equal(got, results[0])


@pytest.mark.parametrize("size", (1, 2, 3, 4, 5))
def test_pairwise_all_to_all_equals_the_library_one(rng, size):
    counts = uneven_counts(rng, size)
    inputs = [rng.standard_normal((sum(counts[rank]), 2)) + 0.5 for rank in range(size)]

    def rank_main(comm):
        mine = inputs[comm.rank]
        return pairwise_all_to_all(comm, mine, counts[comm.rank]), comm.all_to_all(mine, counts[comm.rank])

    for by_hand, library in run_ranks(rank_main, size):
        for mine, theirs in zip(by_hand, library, strict=True):
            np.testing.assert_array_equal(mine, theirs)


# ---- failures: raised, reported, never a hang ----------------------------------------------------------------


def test_a_failing_rank_stops_the_others_at_once_and_the_caller_sees_its_error():
    stopped = {}

    def rank_main(comm):
        if comm.rank == 2:
            raise ValueError("rank 2 found a bad shape")
        started = time.monotonic()
        try:
            comm.all_reduce(np.ones(3)) if comm.rank == 0 else comm.recv(np.empty(3), 2)
        except RankFailed as exc:
            stopped[comm.rank] = (str(exc), time.monotonic() - started)
            with pytest.raises(CollectiveError, match="stopped after an earlier failure"):
                comm.barrier()
            raise

    with pytest.raises(ValueError, match="bad shape") as caught:
        run_ranks(rank_main, 4, timeout=20.0)
    assert "raised on rank 2 of 4" in caught.value.__notes__[0]
    assert sorted(stopped) == [0, 1, 3]
    for message, seconds in stopped.values():
        assert message == "rank 2 raised ValueError: rank 2 found a bad shape"
        assert seconds < 2.0  # woken by the failure, not by the 20 s timeout


def test_a_send_send_deadlock_times_out_and_says_so():
    def rank_main(comm):
        peer = 1 - comm.rank
        comm.send(np.ones(4), peer)
        comm.recv(np.empty(4), peer)

    started = time.monotonic()
    with pytest.raises(CollectiveTimeout, match="send/send deadlock") as caught:
        run_ranks(rank_main, 2, timeout=0.5)
    assert 0.5 <= time.monotonic() - started < 3.0
    assert "waited 0.5 s in send to rank" in str(caught.value)


def test_a_rank_that_skips_a_collective_times_out_naming_the_missing_rank():
    def rank_main(comm):
        if comm.rank != 1:
            comm.all_reduce(np.ones(2))

    with pytest.raises(CollectiveTimeout, match=r"in all_reduce\(op='sum'\) for ranks \[1\] to join"):
        run_ranks(rank_main, 3, timeout=0.5)


def test_ranks_calling_different_collectives_are_told():
    def rank_main(comm):
        comm.all_gather(np.ones(2)) if comm.rank == 0 else comm.all_reduce(np.ones(2))

    with pytest.raises(ValueError, match="called all_reduce.* where rank 0 called all_gather"):
        run_ranks(rank_main, 2, timeout=5.0)


def test_a_receive_buffer_of_the_wrong_size_is_an_error():
    def rank_main(comm):
        comm.send(np.ones(4), 1) if comm.rank == 0 else comm.recv(np.empty(3), 0)

    with pytest.raises(ValueError, match="received 32 bytes from rank 0 .* into a buffer of 24 bytes"):
        run_ranks(rank_main, 2, timeout=5.0)


@pytest.mark.parametrize("call, message", [
    (lambda comm: comm.send(np.ones(2), 2), "dest must be a rank from 0 to 1"),
    (lambda comm: comm.send(np.ones(2), 1, tag=-1), "tag must be a whole number"),
    (lambda comm: comm.send([1.0, 2.0], 1), "takes numpy arrays, got builtins.list"),
    (lambda comm: comm.send(np.ones((4, 4))[:, 0], 1), "C-contiguous"),
    (lambda comm: comm.all_reduce(np.ones(2), op="mean"), "op must be one of"),
    (lambda comm: comm.all_reduce(np.ones(2, "float16")), "reduces float32, float64, int32, int64"),
    (lambda comm: comm.all_reduce(np.ones(2), out=np.empty(3)), "out must have shape"),
    (lambda comm: comm.reduce_scatter(np.ones(5)), "multiple of 2"),
    (lambda comm: comm.all_to_all(np.ones(5), [1, 1]), "add up to 2 rows"),
    (lambda comm: comm.all_to_all(np.ones(2), [2]), "one count >= 0 for each of the 2 ranks"),
    (lambda comm: ring_all_reduce(comm, np.ones(2), chunk_elements=0), "chunk_elements must be"),
])
def test_misuse_is_refused_before_anything_is_sent(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        run_ranks(call, 2, timeout=5.0)


def test_run_ranks_and_timeouts_take_only_sensible_numbers():
    with pytest.raises(ValueError, match="whole number of ranks >= 1"):
        run_ranks(lambda comm: None, 0)
    with pytest.raises(ValueError, match="timeout must be > 0"):
        run_ranks(lambda comm: None, 1, timeout=0)


def test_connect_names_the_backends_it_knows():
    with pytest.raises(ValueError, match="threads start with run_ranks"):
        connect("threads")
