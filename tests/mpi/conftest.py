"""MPI tests run under ``mpiexec -n 2``, ``-n 3`` and ``-n 4`` (``scripts/course.py test`` does all three);
alone they skip."""

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mpi_items = [item for item in items if "mpi" in item.keywords]
    if not mpi_items:
        return
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_size() > 1:
        return
    skip = pytest.mark.skip(reason="MPI test: run it with `mpiexec -n 2 python -m pytest tests/mpi -m mpi`")
    for item in mpi_items:
        item.add_marker(skip)
