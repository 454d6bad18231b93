"""MPI works across ranks the way chapter 05's CPU path needs it, and the env report sees it."""

import numpy as np
import pytest

from course_lib.check import relative_error

pytestmark = pytest.mark.mpi


def test_every_rank_sees_the_world():
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    sizes = world.allgather(world.Get_size())
    assert sizes == [world.Get_size()] * world.Get_size() and world.Get_size() >= 2


def test_allreduce_of_random_arrays_matches_numpy():
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    seed = world.bcast(np.random.SeedSequence().entropy, root=0)
    inputs = [np.random.default_rng([seed, rank]).standard_normal(1000) for rank in range(world.Get_size())]
    total = np.empty(1000)
    world.Allreduce(inputs[world.Get_rank()], total, op=MPI.SUM)
    assert relative_error(total, np.sum(inputs, axis=0)) < 1e-12


def test_env_report_finds_the_mpi_it_runs_under():
    from course_lib import env

    facts = env.mpi_facts()
    assert "error" not in facts and facts["mpiexec"] and facts["library"]
