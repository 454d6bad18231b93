"""The expert-parallel MoE layer over MPI, on however many ranks ``mpiexec -n N`` started (CI: 2, 3 and 4).

12 experts split over 2, 3 and 4 ranks alike. Every rank draws every rank's tokens and the whole layer from
one seed broadcast by rank 0, runs the layer on its own tokens with its own experts, and checks its rows of
the output against the dense reference on all the tokens.
"""

import numpy as np
import pytest

from course_lib.check.tolerance import relative_error
from course_lib.distributed import connect
from course_lib.distributed.moe import moe_forward, moe_reference, random_moe_weights

pytestmark = pytest.mark.mpi

NUM_EXPERTS, HIDDEN, INNER = 12, 16, 24


@pytest.fixture
def comm():
    return connect("mpi", timeout=10.0)


@pytest.fixture
def rng():
    """The same generator on every rank, from a fresh seed; the next test starts once all ranks are done."""
    from mpi4py import MPI

    yield np.random.default_rng(MPI.COMM_WORLD.bcast(np.random.SeedSequence().entropy, root=0))
    MPI.COMM_WORLD.Barrier()


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_moe_forward_over_mpi_equals_the_dense_reference(comm, rng, top_k):
    weights = random_moe_weights(rng, NUM_EXPERTS, HIDDEN, INNER)
    tokens = rng.integers(1, 10, comm.size)
    tokens[rng.integers(comm.size)] = 0  # a rank with no tokens still takes part in every collective
    xs = [rng.standard_normal((count, HIDDEN)) + 0.5 for count in tokens]

    with comm.report_failures():
        out, traffic = moe_forward(comm, xs[comm.rank], weights.shard(comm.rank, comm.size).to(comm.xp), top_k)
        sent_here = comm.all_gather(np.asarray(traffic.dispatch_rows)).reshape(comm.size, comm.size)[:, comm.rank]

    first = int(tokens[:comm.rank].sum())
    expected = moe_reference(np.concatenate(xs), weights, top_k)[first:first + tokens[comm.rank]]
    assert out.shape == expected.shape
    assert relative_error(out, expected) < 1e-12
    assert sum(traffic.dispatch_rows) == top_k * tokens[comm.rank]
    assert traffic.combine_rows == tuple(sent_here.tolist())
