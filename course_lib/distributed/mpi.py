"""Ranks as MPI processes (mpi4py) moving host NumPy arrays: the CPU stand-in for NCCL, and NCCL's bootstrap.

Start the ranks with ``mpiexec -n 4 python program.py``; in each, ``MpiCommunicator()`` (or
``course_lib.distributed.connect()`` in CPU mode) wraps ``MPI.COMM_WORLD``.

**Timeouts.** MPI's blocking calls cannot be interrupted, so every operation here is the nonblocking one
(``Issend``, ``Irecv``, ``Iallreduce``, ...), polled with ``Testall`` until it completes, a failure notice
arrives, or ``timeout`` seconds pass. Sends are synchronous (``Issend``): they complete only once matched by
a receive, which makes a send/send deadlock show up for every message size, not only for those too large
for MPI's eager buffers.

**Failures.** The communicator holds two duplicates of the MPI communicator it is given: one carries the
data, the other only failure notices, so a notice can never be mistaken for data. A rank that raises inside
``report_failures()`` sends every other rank a notice (a short pickled string); each wait polls for notices
beside its own requests, so the others raise ``RankFailed`` within a millisecond or so, not at their
timeout. Nothing calls ``MPI_Abort``: every process lives on, so pytest reports and ``mpiexec`` ends
normally. A rank that dies without a word (killed, crashed) sends nothing: the others raise
``CollectiveTimeout`` after ``timeout`` seconds, naming what they waited for. The requests a failure leaves
pending are left as they are; the communicator is broken and is not used again.
"""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

from course_lib.distributed.communicator import (
    COLLECTIVE_HINT,
    DEFAULT_TIMEOUT_S,
    RECV_HINT,
    SEND_HINT,
    Communicator,
    RankFailed,
    as_bytes,
    describe_exception,
)

FAILURE_TAG = 1
LONGEST_PAUSE_S = 1e-3  # between two polls: short enough not to add latency that matters, long enough to idle
MPI_OPS = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}


def _byte_buffer(array: np.ndarray) -> list:
    return [as_bytes(array), MPI.BYTE]


class MpiCommunicator(Communicator):
    """One MPI process's rank in ``comm`` (``MPI.COMM_WORLD`` by default). Making one is collective: every
    rank of ``comm`` must make it, in the same order as any other communicator made from ``comm``."""

    backend = "mpi"

    def __init__(self, comm: MPI.Comm | None = None, timeout: float = DEFAULT_TIMEOUT_S):
        comm = MPI.COMM_WORLD if comm is None else comm
        super().__init__(comm.Get_rank(), comm.Get_size(), timeout)
        self._data = comm.Dup()
        self._notices = comm.Dup()
        self._notices_sent: list[MPI.Request] = []  # kept alive until MPI has sent them

    # --- failures -------------------------------------------------------------------------------------

    def announce_failure(self, exc: BaseException) -> None:
        reason = describe_exception(exc)
        self._notices_sent += [self._notices.isend(reason, dest=peer, tag=FAILURE_TAG)
                               for peer in range(self.size) if peer != self.rank]

    def raise_if_a_peer_failed(self) -> None:
        """Raise ``RankFailed`` if another rank has announced a failure (a check that does not block)."""
        status = MPI.Status()
        if self._notices.Iprobe(MPI.ANY_SOURCE, FAILURE_TAG, status):
            reason = self._notices.recv(source=status.Get_source(), tag=FAILURE_TAG)
            raise self._broken(RankFailed(status.Get_source(), reason))

    def _wait(self, requests: list[MPI.Request], what: str, hint: str) -> list[MPI.Status]:
        """Poll ``requests`` until all complete; their statuses. Raise on a peer's failure or the timeout."""
        statuses = [MPI.Status() for _ in requests]
        deadline = time.monotonic() + self.timeout
        pause = 1e-6
        try:
            while not MPI.Request.Testall(requests, statuses):
                self.raise_if_a_peer_failed()
                if time.monotonic() > deadline:
                    raise self._timed_out(what, hint)
                time.sleep(pause)
                pause = min(2 * pause, LONGEST_PAUSE_S)
        except MPI.Exception as exc:
            errors = {exc.Get_error_class()} | {MPI.Get_error_class(status.Get_error()) for status in statuses}
            if MPI.ERR_TRUNCATE not in errors:
                raise
            raise ValueError(f"rank {self.rank} {what}: the message is larger than the receive buffer; "
                             "the receive buffer must match the message") from None
        return statuses

    def _check_received(self, status: MPI.Status, out: np.ndarray, source: int, tag: int) -> None:
        got = status.Get_count(MPI.BYTE)
        if got != out.nbytes:
            raise ValueError(f"rank {self.rank} received {got} bytes from rank {source} (tag {tag}) into a buffer "
                             f"of {out.nbytes} bytes: the receive buffer must match the message")

    # --- point-to-point -------------------------------------------------------------------------------

    def _send(self, array: np.ndarray, dest: int, tag: int) -> None:
        self._wait([self._data.Issend(_byte_buffer(array), dest, tag)], f"in send to rank {dest} (tag {tag})",
                   SEND_HINT)

    def _recv(self, out: np.ndarray, source: int, tag: int) -> None:
        request = self._data.Irecv(_byte_buffer(out), source, tag)
        [status] = self._wait([request], f"in recv from rank {source} (tag {tag})", RECV_HINT)
        self._check_received(status, out, source, tag)

    def _sendrecv(self, array: np.ndarray, dest: int, out: np.ndarray, source: int, tag: int) -> None:
        requests = [self._data.Issend(_byte_buffer(array), dest, tag), self._data.Irecv(_byte_buffer(out), source, tag)]
        _, status = self._wait(requests, f"in sendrecv (to rank {dest}, from rank {source}, tag {tag})", RECV_HINT)
        self._check_received(status, out, source, tag)

    # --- collectives: MPI's own, nonblocking ----------------------------------------------------------

    def _collective(self, request: MPI.Request, name: str) -> None:
        self._wait([request], f"in {name}", COLLECTIVE_HINT)

    def _broadcast(self, array: np.ndarray, root: int) -> None:
        self._collective(self._data.Ibcast(_byte_buffer(array), root), f"broadcast from rank {root}")

    def _all_reduce(self, array: np.ndarray, out: np.ndarray, op: str) -> None:
        send = MPI.IN_PLACE if out is array else array
        self._collective(self._data.Iallreduce(send, out, MPI_OPS[op]), "all_reduce")

    def _reduce_scatter(self, array: np.ndarray, out: np.ndarray, op: str) -> None:
        self._collective(self._data.Ireduce_scatter_block(array, out, MPI_OPS[op]), "reduce_scatter")

    def _all_gather(self, array: np.ndarray, out: np.ndarray) -> None:
        self._collective(self._data.Iallgather(_byte_buffer(array), _byte_buffer(out)), "all_gather")

    def _all_to_all(self, array: np.ndarray, send_counts: list[int], out: np.ndarray,
                    recv_counts: list[int]) -> None:
        row_bytes = array.itemsize * int(np.prod(array.shape[1:]))

        def layout(counts: list[int]) -> tuple[list[int], list[int]]:  # bytes to each rank, and where they start
            sizes = [count * row_bytes for count in counts]
            return sizes, np.cumsum([0, *sizes[:-1]]).tolist()

        send = [as_bytes(array), layout(send_counts), MPI.BYTE]
        receive = [as_bytes(out), layout(recv_counts), MPI.BYTE]
        self._collective(self._data.Ialltoallv(send, receive), "all_to_all")

    def _barrier(self) -> None:
        self._collective(self._data.Ibarrier(), "barrier")
