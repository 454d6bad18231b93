"""Ranks as processes with one GPU each, talking through NCCL (``cupy.cuda.nccl``) on CuPy arrays.

**Bootstrap.** NCCL's ranks find each other through a *unique id* (an address rank 0 listens on). Rank 0
makes it and MPI broadcasts it; each rank picks its GPU by its *local rank* (its index among the ranks on
the same host), makes it current, and joins with ``ncclCommInitRank``. MPI stays beside NCCL afterwards to
carry failure notices, exactly as in ``course_lib.distributed.mpi``.

**Streams.** NCCL queues its work on a CUDA stream and returns at once. This communicator queues on a
stream of its own, after the work already queued on the caller's current stream (so NCCL reads finished
inputs), then waits for that stream, polling so that it can give up: on a timeout, a failure notice or an
error NCCL reports, it calls ``ncclCommAbort`` (which stops NCCL's kernels; they would otherwise spin on the
GPU for ever) and raises. Waiting keeps the timeout and makes every result ready when the call returns; an
engine that wants communication to overlap computation would leave the work queued and make its next kernel
wait on the stream instead.

**What the timeout cannot cover.** In NCCL's default (blocking) mode, the first send between two ranks
sets up their connection inside the NCCL call itself, and a call with no partner can block there, before any
work reaches the stream. CuPy exposes no non-blocking NCCL configuration, so such a mismatch can hang here
where the MPI and threads backends raise ``CollectiveTimeout``: debug a new algorithm on those first.

**Point-to-point.** ``ncclSend``/``ncclRecv`` match by order between two ranks, with no tags: ``tag`` must be
0. ``sendrecv`` and ``all_to_all`` put their sends and receives in one group (``ncclGroupStart``/``End``),
which NCCL runs together: that is how NCCL itself builds an all-to-all.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from mpi4py import MPI

from course_lib.backend import has_gpu, mode_text
from course_lib.distributed.communicator import (
    COLLECTIVE_HINT,
    DEFAULT_TIMEOUT_S,
    RECV_HINT,
    SEND_HINT,
    CollectiveError,
    Communicator,
    split_rows,
)
from course_lib.distributed.mpi import LONGEST_PAUSE_S, MpiCommunicator

NCCL_TYPES = {"float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64", "int32": "NCCL_INT32", "int64": "NCCL_INT64"}
NCCL_OPS = {"sum": "NCCL_SUM", "max": "NCCL_MAX", "min": "NCCL_MIN"}


def gpu_for_this_rank(comm: MPI.Comm, gpus: int) -> int:
    """The GPU a rank drives: its index among the ranks on its host (one GPU a rank).

    A host that shows a single GPU to each rank (a launcher that sets ``CUDA_VISIBLE_DEVICES`` per rank) gets
    device 0 everywhere; two ranks on the very same GPU are refused by NCCL itself ("Duplicate GPU detected").
    """
    host = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, local_size = host.Get_rank(), host.Get_size()
    host.Free()
    if gpus == 1:
        return 0
    if local_size > gpus:
        raise ValueError(f"{local_size} ranks run on this host, which has {gpus} GPUs: NCCL needs one GPU for each "
                         f"rank (start at most {gpus} ranks a host, e.g. mpiexec -n {gpus})")
    return local_rank


class NcclCommunicator(Communicator):
    """One GPU's rank in an NCCL communicator over the MPI ranks of ``comm`` (``MPI.COMM_WORLD`` by default).
    Making one is collective; ``device`` overrides the GPU chosen by local rank."""

    backend = "nccl"

    def __init__(self, comm: MPI.Comm | None = None, timeout: float = DEFAULT_TIMEOUT_S, device: int | None = None):
        # NVLink SHARP (NVLS) multicast makes objects on the NVSwitch fabric that every GPU of the host
        # shares; on a shared machine a program using it can put the host's GPUs out of service for others.
        # The course keeps it off, whatever the environment says. NCCL reads its environment when it
        # initialises: this must come first.
        os.environ["NCCL_NVLS_ENABLE"] = "0"
        if not has_gpu():
            raise RuntimeError(f"the NCCL backend needs a GPU for each rank; this process runs in CPU mode "
                               f"({mode_text()}): use the MPI backend, connect('mpi')")
        import cupy
        from cupy.cuda import nccl

        comm = MPI.COMM_WORLD if comm is None else comm
        super().__init__(comm.Get_rank(), comm.Get_size(), timeout)
        self.xp = cupy
        self._nccl = nccl
        self._control = MpiCommunicator(comm, timeout)  # failure notices travel over MPI
        self.device = gpu_for_this_rank(comm, cupy.cuda.runtime.getDeviceCount()) if device is None else device
        cupy.cuda.Device(self.device).use()
        unique_id = comm.bcast(nccl.get_unique_id() if self.rank == 0 else None, root=0)
        self._comm = nccl.NcclCommunicator(self.size, unique_id, self.rank)
        self._stream = cupy.cuda.Stream(non_blocking=True)
        self._token = cupy.zeros(1, dtype="int32")  # what a barrier all-reduces

    def announce_failure(self, exc: BaseException) -> None:
        self._control.announce_failure(exc)
        self._comm.abort()

    def _run(self, enqueue: Callable[[int], None], what: str, hint: str) -> None:
        """Queue NCCL work with ``enqueue(stream_pointer)`` behind the caller's queued work; wait for it."""
        self._stream.wait_event(self.xp.cuda.get_current_stream().record())
        enqueue(self._stream.ptr)
        deadline = time.monotonic() + self.timeout
        pause = 1e-6
        while not self._stream.done:
            try:
                self._comm.check_async_error()
                self._control.raise_if_a_peer_failed()
                if time.monotonic() > deadline:
                    raise self._timed_out(what, hint)
            except CollectiveError as exc:
                self._comm.abort()
                raise self._broken(exc) from None
            except self._nccl.NcclError as exc:
                self._comm.abort()
                raise self._broken(CollectiveError(f"rank {self.rank}: NCCL failed {what}: {exc}")) from exc
            time.sleep(pause)
            pause = min(2 * pause, LONGEST_PAUSE_S)

    def _grouped(self, calls: list[Callable[[int], None]]) -> Callable[[int], None]:
        """One enqueue function that runs ``calls`` as one NCCL group."""
        def enqueue(stream: int) -> None:
            self._nccl.groupStart()
            try:
                for call in calls:
                    call(stream)
            finally:
                self._nccl.groupEnd()
        return enqueue

    def _sends(self, array: Any, dest: int) -> list[Callable[[int], None]]:
        """The NCCL call that sends ``array``'s bytes to ``dest``; none for an empty array."""
        uint8 = self._nccl.NCCL_UINT8
        return [lambda stream: self._comm.send(array.data.ptr, array.nbytes, uint8, dest, stream)] if array.size else []

    def _receives(self, out: Any, source: int) -> list[Callable[[int], None]]:
        """The NCCL call that receives ``out``'s bytes from ``source``; none for an empty buffer."""
        uint8 = self._nccl.NCCL_UINT8
        return [lambda stream: self._comm.recv(out.data.ptr, out.nbytes, uint8, source, stream)] if out.size else []

    @staticmethod
    def _check_no_tag(tag: int) -> None:
        if tag != 0:
            raise ValueError(f"NCCL matches the messages between two ranks by their order, not by tag: pass tag=0, "
                             f"got {tag}")

    def _types(self, array: Any, op: str) -> tuple[int, int]:
        """NCCL's codes for ``array``'s dtype and for ``op`` (both already checked by the interface)."""
        return getattr(self._nccl, NCCL_TYPES[str(array.dtype)]), getattr(self._nccl, NCCL_OPS[op])

    # --- point-to-point -------------------------------------------------------------------------------

    def _send(self, array: Any, dest: int, tag: int) -> None:
        self._check_no_tag(tag)
        self._run(self._grouped(self._sends(array, dest)), f"in send to rank {dest}", SEND_HINT)

    def _recv(self, out: Any, source: int, tag: int) -> None:
        self._check_no_tag(tag)
        self._run(self._grouped(self._receives(out, source)), f"in recv from rank {source}", RECV_HINT)

    def _sendrecv(self, array: Any, dest: int, out: Any, source: int, tag: int) -> None:
        self._check_no_tag(tag)
        calls = self._sends(array, dest) + self._receives(out, source)
        self._run(self._grouped(calls), f"in sendrecv (to rank {dest}, from rank {source})", RECV_HINT)

    # --- collectives: NCCL's own ----------------------------------------------------------------------

    def _broadcast(self, array: Any, root: int) -> None:
        pointer, uint8 = array.data.ptr, self._nccl.NCCL_UINT8
        self._run(lambda stream: self._comm.broadcast(pointer, pointer, array.nbytes, uint8, root, stream),
                  f"in broadcast from rank {root}", COLLECTIVE_HINT)

    def _all_reduce(self, array: Any, out: Any, op: str) -> None:
        dtype, nccl_op = self._types(array, op)
        self._run(lambda stream: self._comm.allReduce(array.data.ptr, out.data.ptr, array.size, dtype, nccl_op,
                                                      stream), "in all_reduce", COLLECTIVE_HINT)

    def _reduce_scatter(self, array: Any, out: Any, op: str) -> None:
        dtype, nccl_op = self._types(array, op)
        self._run(lambda stream: self._comm.reduceScatter(array.data.ptr, out.data.ptr, out.size, dtype, nccl_op,
                                                          stream), "in reduce_scatter", COLLECTIVE_HINT)

    def _all_gather(self, array: Any, out: Any) -> None:
        uint8 = self._nccl.NCCL_UINT8
        self._run(lambda stream: self._comm.allGather(array.data.ptr, out.data.ptr, array.nbytes, uint8, stream),
                  "in all_gather", COLLECTIVE_HINT)

    def _all_to_all(self, array: Any, send_counts: list[int], out: Any, recv_counts: list[int]) -> None:
        calls = []
        for peer, (rows_out, rows_in) in enumerate(zip(split_rows(array, send_counts, self.size),
                                                       split_rows(out, recv_counts, self.size), strict=True)):
            calls += self._sends(rows_out, peer) + self._receives(rows_in, peer)
        self._run(self._grouped(calls), "in all_to_all", COLLECTIVE_HINT)

    def _barrier(self) -> None:
        token, int32, nccl_sum = self._token.data.ptr, self._nccl.NCCL_INT32, self._nccl.NCCL_SUM
        self._run(lambda stream: self._comm.allReduce(token, token, 1, int32, nccl_sum, stream), "in barrier",
                  COLLECTIVE_HINT)
