"""One communicator interface for every way ranks can talk: threads, MPI processes, NCCL on GPUs.

A *rank* is one participant of a parallel program (a thread, a process, a GPU); ``size`` is how many there
are. Ranks exchange arrays in two ways:

* **point-to-point**: ``send`` to one rank, ``recv`` from one rank, ``sendrecv`` to do both at once;
* **collectives**, which every rank calls together: ``broadcast``, ``all_reduce``, ``reduce_scatter``,
  ``all_gather``, ``all_to_all`` (with a different count for each destination) and ``barrier``.

Three rules hold on every backend, so a program that is right on one is right on the others:

* ``send`` returns once the receiver has the data (MPI calls this a *synchronous* send). Two ranks that
  both send to each other first therefore wait for ever: a *send/send deadlock*. MPI's ordinary send hides
  it for small messages by buffering them, so the bug appears only once the messages grow; here it appears
  at every size. ``sendrecv`` posts both halves at once and cannot deadlock that way.
* ``recv`` fills a buffer the caller made, of the exact size expected, and returns it. MPI and NCCL work
  like this (NCCL cannot allocate for you: it needs the count and the type before the data arrives), and
  a message of the wrong size becomes an error instead of a silently short or long array.
* Every blocking call gives up after ``timeout`` seconds with a ``CollectiveTimeout`` that says what it
  waited for and the likely cause; a rank that fails inside ``report_failures()`` tells the others, whose
  pending calls raise ``RankFailed`` naming it. Never a hang. After either, the communicator is broken
  (the ranks no longer agree on which message is which): every later call raises at once.

Collectives act on axis 0 of C-contiguous arrays (NumPy on the CPU backends, CuPy on NCCL) and, like NCCL,
need the same shape and dtype on every rank. Reductions take float32, float64, int32 and int64 with
``op`` one of "sum", "max", "min"; the other operations move raw bytes, so any dtype (bfloat16 too) travels.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

import numpy

Array = Any  # a NumPy array, or a CuPy array on the NCCL backend

DEFAULT_TIMEOUT_S = 30.0
MAX_TAG = 32767  # the largest tag MPI promises on every implementation
REDUCE_OPS = {"sum": "add", "max": "maximum", "min": "minimum"}  # op -> the ufunc that combines two arrays
REDUCIBLE_DTYPES = ("float32", "float64", "int32", "int64")

SEND_HINT = ("the receiver never took the message. Is it sending to this rank at the same time (a send/send "
             "deadlock)? Use sendrecv, or let even ranks send first and odd ranks receive first")
RECV_HINT = ("no message came. Does the source send it, with the same tag, or is it blocked itself "
             "(e.g. in a send that nobody receives)?")
COLLECTIVE_HINT = ("do all ranks call the same collectives in the same order? One rank that skips a "
                   "collective (e.g. inside `if rank == 0:`) leaves the others waiting")


class CollectiveError(RuntimeError):
    """Communication between ranks failed; the communicator that raised it is broken."""


class RankFailed(CollectiveError):
    """Another rank raised an exception, so the message or collective this rank waits for will not come."""

    def __init__(self, rank: int, reason: str):
        super().__init__(f"rank {rank} raised {reason}")
        self.rank = rank


class CollectiveTimeout(CollectiveError, TimeoutError):
    """A blocking call waited longer than the communicator's timeout."""


def describe_exception(exc: BaseException) -> str:
    """``ValueError: bad shape``: how a failure is reported to the other ranks."""
    return f"{type(exc).__name__}: {exc}"


def output_buffer(xp: ModuleType, out: Array | None, shape: tuple[int, ...], dtype: Any, name: str) -> Array:
    """``out`` checked to be a contiguous ``xp`` array of ``shape`` and ``dtype``; a new one when it is None."""
    if out is None:
        return xp.empty(shape, dtype)
    if not isinstance(out, xp.ndarray):
        raise TypeError(f"{name}: out must be a {xp.__name__} array, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        raise ValueError(f"{name}: out must have shape {tuple(shape)} and dtype {numpy.dtype(dtype)}, "
                         f"got {tuple(out.shape)} {out.dtype}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{name}: out must be C-contiguous (messages are read from and written to flat memory)")
    return out


def check_reduction(name: str, array: Array, op: str) -> None:
    """``op`` is a reduction the course knows and ``array`` has a dtype every backend can reduce."""
    if op not in REDUCE_OPS:
        raise ValueError(f"{name}: op must be one of {sorted(REDUCE_OPS)}, got {op!r}")
    if str(array.dtype) not in REDUCIBLE_DTYPES:
        raise TypeError(f"{name} reduces {', '.join(REDUCIBLE_DTYPES)} arrays, got {array.dtype}")


def split_rows(array: Array, counts: Sequence[int], size: int) -> list[Array]:
    """``array`` cut along axis 0 into ``size`` consecutive pieces of ``counts[i]`` rows (views, not copies)."""
    counts = [int(count) for count in counts]
    if len(counts) != size or any(count < 0 for count in counts):
        raise ValueError(f"all_to_all needs one count >= 0 for each of the {size} ranks, got {counts}")
    if array.ndim == 0 or sum(counts) != array.shape[0]:
        raise ValueError(f"all_to_all: the counts {counts} add up to {sum(counts)} rows, but the array has "
                         f"shape {tuple(array.shape)}: they must add up to its length")
    offsets = numpy.cumsum([0, *counts]).tolist()
    return [array[start:stop] for start, stop in zip(offsets[:-1], offsets[1:], strict=True)]


def as_bytes(array: Array) -> Array:
    """A flat uint8 view of a contiguous array: how the data-moving operations carry any dtype."""
    return array.reshape(-1).view("uint8")


class Communicator(ABC):
    """What every backend offers. The public methods check their arguments here; a backend implements the
    underscored ones, which receive arguments already checked and output buffers already allocated."""

    backend: str  # "threads", "mpi" or "nccl"
    xp: ModuleType = numpy  # the array module of the arrays this communicator moves

    def __init__(self, rank: int, size: int, timeout: float = DEFAULT_TIMEOUT_S):
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.rank = rank
        self.size = size
        self.timeout = float(timeout)
        self.failure: CollectiveError | None = None  # set once a call failed: the communicator is broken

    def __repr__(self) -> str:
        return f"<{type(self).__name__} rank {self.rank} of {self.size}, timeout {self.timeout:g} s>"

    # --- point-to-point -------------------------------------------------------------------------------

    def send(self, array: Array, dest: int, tag: int = 0) -> None:
        """Send ``array`` to rank ``dest``; return once it has received it."""
        self._check_usable()
        self._check_array("send", array)
        self._check_peer("send", "dest", dest)
        self._check_tag(tag)
        self._send(array, dest, tag)

    def recv(self, out: Array, source: int, tag: int = 0) -> Array:
        """Receive a message from rank ``source`` into ``out`` (which must have exactly its size); return ``out``."""
        self._check_usable()
        self._check_array("recv", out)
        self._check_peer("recv", "source", source)
        self._check_tag(tag)
        self._recv(out, source, tag)
        return out

    def sendrecv(self, array: Array, dest: int, out: Array, source: int, tag: int = 0) -> Array:
        """Send ``array`` to ``dest`` and receive from ``source`` into ``out``, both at once; return ``out``."""
        self._check_usable()
        self._check_array("sendrecv", array)
        self._check_array("sendrecv", out)
        self._check_peer("sendrecv", "dest", dest)
        self._check_peer("sendrecv", "source", source)
        self._check_tag(tag)
        self._sendrecv(array, dest, out, source, tag)
        return out

    # --- collectives ----------------------------------------------------------------------------------

    def broadcast(self, array: Array, root: int = 0) -> Array:
        """Copy rank ``root``'s ``array`` into ``array`` on every other rank (in place); return it."""
        self._check_usable()
        self._check_array("broadcast", array)
        self._check_peer("broadcast", "root", root)
        self._broadcast(array, root)
        return array

    def all_reduce(self, array: Array, op: str = "sum", out: Array | None = None) -> Array:
        """The element-wise ``op`` of ``array`` over all ranks, on every rank (``out`` may be ``array``)."""
        self._check_reduction("all_reduce", array, op)
        out = output_buffer(self.xp, out, array.shape, array.dtype, "all_reduce")
        self._all_reduce(array, out, op)
        return out

    def reduce_scatter(self, array: Array, op: str = "sum", out: Array | None = None) -> Array:
        """Reduce ``array`` over all ranks and keep this rank's share: rows ``rank * n`` to ``(rank + 1) * n``
        of the result, where ``n = len(array) // size``."""
        self._check_reduction("reduce_scatter", array, op)
        if array.ndim == 0 or array.shape[0] % self.size:
            raise ValueError(f"reduce_scatter splits axis 0 evenly over the {self.size} ranks: it needs a length "
                             f"that is a multiple of {self.size}, got shape {tuple(array.shape)} (the hand ring "
                             "in course_lib.distributed.algorithms takes any length)")
        shape = (array.shape[0] // self.size, *array.shape[1:])
        out = output_buffer(self.xp, out, shape, array.dtype, "reduce_scatter")
        self._reduce_scatter(array, out, op)
        return out

    def all_gather(self, array: Array, out: Array | None = None) -> Array:
        """Every rank's ``array`` stacked along axis 0 in rank order, on every rank."""
        self._check_usable()
        self._check_array("all_gather", array)
        if array.ndim == 0:
            raise ValueError("all_gather stacks arrays along axis 0: give it an array of at least one dimension")
        shape = (self.size * array.shape[0], *array.shape[1:])
        out = output_buffer(self.xp, out, shape, array.dtype, "all_gather")
        self._all_gather(array, out)
        return out

    def all_to_all(self, array: Array, send_counts: Sequence[int]) -> list[Array]:
        """Send ``send_counts[d]`` consecutive rows of ``array`` to each rank ``d`` (its own share included);
        return what each rank sent here, one array per source rank in rank order.

        The receivers learn their counts first, from an ``all_gather`` of every rank's ``send_counts``: in a
        mixture-of-experts layer nobody knows in advance how many tokens the router will send it.
        """
        self._check_usable()
        self._check_array("all_to_all", array)
        send_counts = [len(rows) for rows in split_rows(array, send_counts, self.size)]
        counts = self.all_gather(self.xp.asarray(send_counts, dtype="int64"))
        recv_counts = counts.reshape(self.size, self.size)[:, self.rank].tolist()
        out = self.xp.empty((sum(recv_counts), *array.shape[1:]), array.dtype)
        self._all_to_all(array, send_counts, out, recv_counts)
        return split_rows(out, recv_counts, self.size)

    def barrier(self) -> None:
        """Return once every rank has called ``barrier``."""
        self._check_usable()
        self._barrier()

    # --- failures -------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def report_failures(self) -> Iterator[None]:
        """Run a block so that an exception inside it reaches the other ranks (as ``RankFailed``) before it
        propagates here. A ``RankFailed`` is not passed on: the rank it names has told everyone already."""
        try:
            yield
        except BaseException as exc:
            if not isinstance(exc, RankFailed):
                self.announce_failure(exc)
                self._broken(CollectiveError(f"rank {self.rank} raised {describe_exception(exc)}"))
            raise

    @abstractmethod
    def announce_failure(self, exc: BaseException) -> None:
        """Tell every other rank that this one raised ``exc``."""

    # --- what a backend implements --------------------------------------------------------------------

    @abstractmethod
    def _send(self, array: Array, dest: int, tag: int) -> None: ...

    @abstractmethod
    def _recv(self, out: Array, source: int, tag: int) -> None: ...

    @abstractmethod
    def _sendrecv(self, array: Array, dest: int, out: Array, source: int, tag: int) -> None: ...

    @abstractmethod
    def _broadcast(self, array: Array, root: int) -> None: ...

    @abstractmethod
    def _all_reduce(self, array: Array, out: Array, op: str) -> None: ...

    @abstractmethod
    def _reduce_scatter(self, array: Array, out: Array, op: str) -> None: ...

    @abstractmethod
    def _all_gather(self, array: Array, out: Array) -> None: ...

    @abstractmethod
    def _all_to_all(self, array: Array, send_counts: list[int], out: Array, recv_counts: list[int]) -> None:
        """Rows of ``array`` go out by ``send_counts``; ``out`` takes ``recv_counts[s]`` rows from each rank s."""

    @abstractmethod
    def _barrier(self) -> None: ...

    # --- shared by the backends -----------------------------------------------------------------------

    def _timed_out(self, what: str, hint: str) -> CollectiveTimeout:
        """The error for a call that waited ``timeout`` seconds ``what`` (e.g. 'in recv from rank 0')."""
        return self._broken(CollectiveTimeout(f"rank {self.rank} waited {self.timeout:g} s {what}: {hint}"))

    def _broken(self, error: CollectiveError) -> CollectiveError:
        """Remember ``error`` as the reason this communicator is broken; return it to be raised."""
        self.failure = self.failure or error
        return error

    def _check_usable(self) -> None:
        if self.failure is not None:
            raise CollectiveError(f"rank {self.rank}: this communicator stopped after an earlier failure "
                                  f"({self.failure}); make a new one") from self.failure

    def _check_array(self, name: str, array: Array) -> None:
        if not isinstance(array, self.xp.ndarray):
            raise TypeError(f"{name} on the {self.backend} backend takes {self.xp.__name__} arrays, "
                            f"got {type(array).__module__}.{type(array).__name__}")
        if not array.flags.c_contiguous:
            raise ValueError(f"{name} needs a C-contiguous array (messages are flat memory); "
                             f"pass {self.xp.__name__}.ascontiguousarray(array)")

    def _check_reduction(self, name: str, array: Array, op: str) -> None:
        self._check_usable()
        self._check_array(name, array)
        check_reduction(name, array, op)

    def _check_peer(self, name: str, role: str, peer: int) -> None:
        if isinstance(peer, bool) or not isinstance(peer, int | numpy.integer) or not 0 <= peer < self.size:
            raise ValueError(f"{name}: {role} must be a rank from 0 to {self.size - 1}, got {peer!r}")

    @staticmethod
    def _check_tag(tag: int) -> None:
        if isinstance(tag, bool) or not isinstance(tag, int | numpy.integer) or not 0 <= tag <= MAX_TAG:
            raise ValueError(f"tag must be a whole number from 0 to {MAX_TAG}, got {tag!r}")
