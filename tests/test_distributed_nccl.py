"""The NCCL backend with one rank on one GPU: every operation and hand algorithm gives back its input.

One rank is all a single-GPU machine allows (NCCL refuses two ranks on one device); it still runs the
communicator's whole path: the unique id over MPI, the stream, each NCCL call and the CuPy reductions of
the hand algorithms. Several ranks over NCCL need a machine with several GPUs.
"""

import numpy as np
import pytest

from course_lib import backend
from course_lib.distributed import connect
from course_lib.distributed.algorithms import pairwise_all_to_all, recursive_doubling_all_reduce, ring_all_reduce

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def comm():
    return connect("nccl", timeout=10.0)


@pytest.fixture
def x(comm):
    seed = np.random.SeedSequence().entropy
    print(f"inputs from seed {seed}")
    return backend.xp.asarray(np.random.default_rng(seed).standard_normal((13, 3)) + 0.5)


def poisoned(like):
    return backend.xp.full_like(like, np.nan)


def test_one_rank_collectives_give_back_their_input(comm, x):
    xp = backend.xp
    assert (comm.rank, comm.size) == (0, 1)
    for op in ("sum", "max", "min"):
        assert xp.array_equal(comm.all_reduce(x, op, out=poisoned(x)), x), op
    for dtype in ("float32", "int32", "int64"):
        y = (x * 100).astype(dtype)
        assert xp.array_equal(comm.all_reduce(y), y), dtype
    assert xp.array_equal(comm.reduce_scatter(x, out=poisoned(x)), x)
    assert xp.array_equal(comm.all_gather(x, out=poisoned(x)), x)
    assert xp.array_equal(comm.broadcast(x.copy(), root=0), x)
    assert xp.array_equal(comm.sendrecv(x, 0, poisoned(x), 0), x)
    [got] = comm.all_to_all(x, [13])
    assert xp.array_equal(got, x)
    comm.barrier()


def test_bfloat16_bits_travel_as_bytes(comm):
    bits = backend.xp.asarray(np.random.default_rng().integers(0, 65535, 10).astype(np.uint16))
    assert backend.xp.array_equal(comm.sendrecv(bits, 0, backend.xp.zeros_like(bits), 0), bits)


def test_hand_algorithms_over_nccl_point_to_point(comm, x):
    xp = backend.xp
    assert xp.array_equal(ring_all_reduce(comm, x, out=poisoned(x)), x)
    assert xp.array_equal(ring_all_reduce(comm, x, chunk_elements=4), x)
    assert xp.array_equal(recursive_doubling_all_reduce(comm, x), x)
    [got] = pairwise_all_to_all(comm, x, [13])
    assert xp.array_equal(got, x)


def test_host_arrays_and_tags_are_refused(comm, x):
    with pytest.raises(TypeError):
        comm.all_reduce(np.ones(3))
    with pytest.raises(ValueError):
        comm.send(x, 0, tag=3)
