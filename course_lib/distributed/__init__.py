"""Ranks that talk: one communicator interface over threads, MPI processes or NCCL on GPUs.

* In a notebook or a test: ``run_ranks(fn, 4)`` runs ``fn(comm)`` on 4 threads (``threads.py``).
* In a program started by ``mpiexec -n N``: ``comm = connect()`` gives NCCL over CuPy arrays in GPU mode and
  MPI over NumPy arrays in CPU mode (``nccl.py``, ``mpi.py``).

``communicator.py`` says what every backend promises (timeouts, failures, buffers); ``algorithms.py`` builds
the ring all-reduce and its friends out of ``send`` and ``recv`` on any of them.
"""

from __future__ import annotations

from typing import Any

from course_lib.backend import has_gpu
from course_lib.distributed.communicator import (
    DEFAULT_TIMEOUT_S,
    CollectiveError,
    CollectiveTimeout,
    Communicator,
    RankFailed,
)
from course_lib.distributed.threads import ThreadCommunicator, run_ranks

BACKENDS = ("auto", "mpi", "nccl")

__all__ = ["BACKENDS", "DEFAULT_TIMEOUT_S", "CollectiveError", "CollectiveTimeout", "Communicator", "RankFailed",
           "ThreadCommunicator", "connect", "run_ranks"]


def connect(backend: str = "auto", timeout: float = DEFAULT_TIMEOUT_S, comm: Any = None) -> Communicator:
    """This process's communicator among the ranks ``mpiexec`` started (``comm``: an MPI communicator,
    ``MPI.COMM_WORLD`` by default). "auto" is NCCL in GPU mode and MPI in CPU mode.

    Threads are not connected this way: they need a runner to start them (``run_ranks``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (threads start with run_ranks), got {backend!r}")
    if backend == "nccl" or (backend == "auto" and has_gpu()):
        from course_lib.distributed.nccl import NcclCommunicator

        return NcclCommunicator(comm, timeout)
    from course_lib.distributed.mpi import MpiCommunicator

    return MpiCommunicator(comm, timeout)
