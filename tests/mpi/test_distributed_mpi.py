"""course_lib.distributed over MPI, on however many ranks ``mpiexec -n N`` started (CI: 2, 3 and 4).

Every rank runs every test; the inputs of all ranks come from one seed broadcast by rank 0, so each rank can
check its result against the NumPy answer. A test that makes a rank fail expects it, on every rank, and ends
with a barrier of ``MPI.COMM_WORLD``, so the next test starts together.
"""

import time

import numpy as np
import pytest

from course_lib import backend
from course_lib.check import relative_error
from course_lib.distributed import CollectiveTimeout, RankFailed, connect
from course_lib.distributed.algorithms import pairwise_all_to_all, recursive_doubling_all_reduce, ring_all_reduce

pytestmark = pytest.mark.mpi


@pytest.fixture
def comm():
    """A fresh communicator for each test: a failure in one leaves the next untouched."""
    return connect("mpi", timeout=10.0)


@pytest.fixture
def world():
    from mpi4py import MPI

    yield MPI.COMM_WORLD
    MPI.COMM_WORLD.Barrier()


@pytest.fixture
def rng(world):
    """The same generator on every rank, from a fresh seed."""
    return np.random.default_rng(world.bcast(np.random.SeedSequence().entropy, root=0))


def every_rank(rng, size, shape):
    """A fresh random float64 array for each rank, never zero."""
    return [rng.standard_normal(shape) + 0.5 for _ in range(size)]


def test_sendrecv_and_send_recv_by_parity_pass_arrays_around_the_ring(comm, rng):
    inputs = every_rank(rng, comm.size, (4, 3))
    right, left = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    got = comm.sendrecv(inputs[comm.rank], right, np.full((4, 3), np.nan), left, tag=3)
    np.testing.assert_array_equal(got, inputs[left])
    out = np.full((4, 3), np.nan)
    if comm.rank % 2 == 0:
        comm.send(inputs[comm.rank], right)
        comm.recv(out, left)
    else:
        comm.recv(out, left)
        comm.send(inputs[comm.rank], right)
    np.testing.assert_array_equal(out, inputs[left])


def test_broadcast_all_gather_and_barrier(comm, rng):
    inputs = every_rank(rng, comm.size, (3, 5))
    root = comm.size - 1
    buffer = inputs[root].copy() if comm.rank == root else np.full((3, 5), np.nan)
    np.testing.assert_array_equal(comm.broadcast(buffer, root=root), inputs[root])
    gathered = comm.all_gather(inputs[comm.rank], out=np.full((3 * comm.size, 5), np.nan))
    np.testing.assert_array_equal(gathered, np.concatenate(inputs))
    comm.barrier()


@pytest.mark.parametrize("op, reference", [("sum", np.sum), ("max", np.max), ("min", np.min)])
def test_all_reduce_and_reduce_scatter_match_numpy(comm, rng, op, reference):
    inputs = every_rank(rng, comm.size, (2 * comm.size, 3))
    expected = reference(np.stack(inputs), axis=0)
    assert relative_error(comm.all_reduce(inputs[comm.rank], op, out=np.full_like(expected, np.nan)), expected) < 1e-12
    in_place = inputs[comm.rank].copy()
    assert relative_error(comm.all_reduce(in_place, op, out=in_place), expected) < 1e-12
    mine = comm.reduce_scatter(inputs[comm.rank], op, out=np.full((2, 3), np.nan))
    assert relative_error(mine, expected[2 * comm.rank:2 * comm.rank + 2]) < 1e-12
    integers = [(array * 100).astype("int64") for array in inputs]
    np.testing.assert_array_equal(comm.all_reduce(integers[comm.rank], op), reference(np.stack(integers), axis=0))


def test_all_to_all_with_uneven_counts_by_library_and_by_hand(comm, rng):
    counts = rng.integers(0, 5, (comm.size, comm.size))
    inputs = [rng.standard_normal((counts[rank].sum(), 2)) + 0.5 for rank in range(comm.size)]
    library = comm.all_to_all(inputs[comm.rank], counts[comm.rank].tolist())
    by_hand = pairwise_all_to_all(comm, inputs[comm.rank], counts[comm.rank].tolist())
    for source in range(comm.size):
        sent = np.split(inputs[source], np.cumsum(counts[source])[:-1])[comm.rank]
        np.testing.assert_array_equal(library[source], sent)
        np.testing.assert_array_equal(by_hand[source], sent)


@pytest.mark.parametrize("length, chunk_elements", [(1, None), (3 * 4 + 1, None), (100, 7)])
def test_hand_ring_equals_the_library_all_reduce_and_numpy(comm, rng, length, chunk_elements):
    inputs = every_rank(rng, comm.size, length)
    by_hand = ring_all_reduce(comm, inputs[comm.rank], out=np.full(length, np.nan), chunk_elements=chunk_elements)
    assert relative_error(by_hand, comm.all_reduce(inputs[comm.rank])) < 1e-12
    assert relative_error(by_hand, np.sum(inputs, axis=0)) < 1e-12
    np.testing.assert_array_equal(comm.all_gather(by_hand[None]), np.stack([by_hand] * comm.size))  # same bits


def test_recursive_doubling_matches_numpy_on_every_rank_count(comm, rng):
    inputs = every_rank(rng, comm.size, (3, 3))
    got = recursive_doubling_all_reduce(comm, inputs[comm.rank], out=np.full((3, 3), np.nan))
    assert relative_error(got, np.sum(inputs, axis=0)) < 1e-12


@pytest.mark.skipif(backend.has_gpu(), reason="on a GPU the NCCL backend runs")
def test_the_nccl_backend_says_it_needs_a_gpu(world):
    with pytest.raises(RuntimeError, match=r"needs a GPU .* use the MPI backend, connect\('mpi'\)"):
        connect("nccl")


# ---- failures ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("waiting_in", ["recv", "all_reduce"])
def test_a_failing_rank_reaches_the_others_long_before_the_timeout(comm, world, waiting_in):
    failing = comm.size - 1
    if comm.rank == failing:
        with pytest.raises(ValueError, match="no such expert"), comm.report_failures():
            raise ValueError("no such expert: 17")
        return
    started = time.monotonic()
    with pytest.raises(RankFailed, match=f"rank {failing} raised ValueError: no such expert: 17"):
        comm.recv(np.empty(3), failing) if waiting_in == "recv" else comm.all_reduce(np.ones(3))
    assert time.monotonic() - started < comm.timeout / 2


def test_a_send_send_deadlock_times_out_on_both_ranks(world):
    comm = connect("mpi", timeout=0.5)
    if comm.rank > 1:
        return
    started = time.monotonic()
    with pytest.raises(CollectiveTimeout, match=f"rank {comm.rank} waited 0.5 s in send .* send/send deadlock"):
        comm.send(np.ones(1000), 1 - comm.rank)
    assert time.monotonic() - started < 3.0


def test_a_rank_that_skips_a_collective_leaves_the_others_a_timeout(world):
    comm = connect("mpi", timeout=0.5)
    if comm.rank == 0:
        return
    with pytest.raises(CollectiveTimeout, match="in all_reduce: do all ranks call the same collectives"):
        comm.all_reduce(np.ones(2))


@pytest.mark.parametrize("buffer_length", [3, 5])
def test_a_receive_buffer_of_the_wrong_size_is_an_error(comm, world, buffer_length):
    if comm.rank == 0:
        comm.send(np.ones(4), 1)
    elif comm.rank == 1:
        with pytest.raises(ValueError, match="receive buffer must match the message"):
            comm.recv(np.empty(buffer_length), 0)
