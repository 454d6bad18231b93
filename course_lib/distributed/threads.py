"""Ranks as threads of one process: a 4-rank collective in a notebook, with no ``mpiexec``.

``run_ranks(fn, 4)`` starts four threads; each calls ``fn(comm, ...)`` with its own ``ThreadCommunicator``
and the runner returns the four results in rank order. The ranks move NumPy arrays, or with ``xp=cupy`` CuPy
arrays: four ranks sharing one GPU, how a tensor-parallel engine's GPU path is tested on a single card.

The threads share one ``_World``: a mailbox for every (source, destination, tag), a table of the collectives
under way, and the first failure. One condition variable guards it all, so a rank that fails wakes every
waiting rank at once: they raise ``RankFailed`` straight away, not after their timeout, and the runner
re-raises the original exception.

The collectives here move no messages: each rank leaves a copy of its contribution in the table, and once
all ``size`` copies are there every rank computes its result from them (reductions in rank order, so every
rank gets the same bits). That is the *library* answer the hand-written algorithms are checked against;
``course_lib.distributed.algorithms`` builds the same collectives out of ``send`` and ``recv``.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from course_lib.distributed.communicator import (
    COLLECTIVE_HINT,
    DEFAULT_TIMEOUT_S,
    RECV_HINT,
    REDUCE_OPS,
    SEND_HINT,
    Communicator,
    RankFailed,
    as_bytes,
    describe_exception,
    split_rows,
)


@dataclass
class _Letter:
    """A message in a mailbox; ``delivered`` turns True when the receiver has copied it out."""

    data: np.ndarray
    delivered: bool = False


@dataclass
class _Round:
    """One collective call: what it is (every rank must agree) and the contributions so far."""

    kind: str
    contributions: dict[int, Any] = field(default_factory=dict)
    readers: int = 0


class _World:
    """What the ranks of one ``run_ranks`` call share."""

    def __init__(self, size: int, xp: ModuleType):
        self.size = size
        self.xp = xp  # the array module every rank's arrays belong to
        self.changed = threading.Condition()  # notified whenever anything below changes
        self.mailboxes: defaultdict[tuple[int, int, int], deque[_Letter]] = defaultdict(deque)
        self.rounds: dict[int, _Round] = {}  # collective number -> its round
        self.failures: list[tuple[int, BaseException]] = []  # (rank, exception), in the order they happened

    def fail(self, rank: int, exc: BaseException) -> None:
        with self.changed:
            self.failures.append((rank, exc))
            self.changed.notify_all()

    def first_failure(self) -> tuple[int, BaseException] | None:
        """The failure that started it all: the first one that is not a ``RankFailed`` echo of another."""
        causes = [failure for failure in self.failures if not isinstance(failure[1], RankFailed)]
        return (causes or self.failures or [None])[0]


class ThreadCommunicator(Communicator):
    """One rank of a ``run_ranks`` call."""

    backend = "threads"

    def __init__(self, world: _World, rank: int, timeout: float = DEFAULT_TIMEOUT_S):
        super().__init__(rank, world.size, timeout)
        self.xp = world.xp
        self._world = world
        self._collectives_called = 0

    def announce_failure(self, exc: BaseException) -> None:
        self._world.fail(self.rank, exc)

    def _wait_until(self, done: Callable[[], bool], what: str | Callable[[], str], hint: str) -> None:
        """Block (the world's lock held) until ``done()``, another rank fails, or the timeout passes;
        ``what`` says what it waited for (a function when the answer changes while it waits)."""
        deadline = time.monotonic() + self.timeout
        while True:
            failure = self._world.first_failure()
            if failure is not None and failure[0] != self.rank:
                raise self._broken(RankFailed(failure[0], describe_exception(failure[1])))
            if done():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._timed_out(what() if callable(what) else what, hint)
            self._world.changed.wait(left)

    # --- point-to-point: a mailbox per (source, destination, tag) ------------------------------------

    def _post(self, array: np.ndarray, dest: int, tag: int) -> _Letter:
        letter = _Letter(array.copy())
        self._world.mailboxes[self.rank, dest, tag].append(letter)
        self._world.changed.notify_all()
        return letter

    def _take(self, out: np.ndarray, source: int, tag: int, what: str) -> None:
        mailbox = self._world.mailboxes[source, self.rank, tag]
        self._wait_until(lambda: bool(mailbox), what, RECV_HINT)
        letter = mailbox.popleft()
        if letter.data.nbytes != out.nbytes:
            raise ValueError(f"rank {self.rank} received {letter.data.nbytes} bytes from rank {source} (tag {tag}) "
                             f"into a buffer of {out.nbytes} bytes: the receive buffer must match the message")
        as_bytes(out)[:] = as_bytes(letter.data)
        letter.delivered = True
        self._world.changed.notify_all()

    def _send(self, array: np.ndarray, dest: int, tag: int) -> None:
        with self._world.changed:
            letter = self._post(array, dest, tag)
            self._wait_until(lambda: letter.delivered, f"in send to rank {dest} (tag {tag})", SEND_HINT)

    def _recv(self, out: np.ndarray, source: int, tag: int) -> None:
        with self._world.changed:
            self._take(out, source, tag, f"in recv from rank {source} (tag {tag})")

    def _sendrecv(self, array: np.ndarray, dest: int, out: np.ndarray, source: int, tag: int) -> None:
        what = f"in sendrecv (to rank {dest}, from rank {source}, tag {tag})"
        with self._world.changed:
            letter = self._post(array, dest, tag)
            self._take(out, source, tag, what)
            self._wait_until(lambda: letter.delivered, what, SEND_HINT)

    # --- collectives: every rank's contribution in one table ------------------------------------------

    def _contributions(self, kind: str, mine: Any) -> list[Any]:
        """Leave ``mine`` for collective ``kind``; return every rank's contribution once all are there."""
        with self._world.changed:
            number = self._collectives_called
            self._collectives_called += 1
            round_ = self._world.rounds.setdefault(number, _Round(kind))
            if round_.kind != kind:
                raise ValueError(f"rank {self.rank} called {kind} as its collective number {number + 1}, where "
                                 f"rank {min(round_.contributions)} called {round_.kind}: {COLLECTIVE_HINT}")
            round_.contributions[self.rank] = mine
            self._world.changed.notify_all()
            self._wait_until(lambda: len(round_.contributions) == self.size,
                             lambda: f"in {kind} for ranks {self._absent(round_)} to join", COLLECTIVE_HINT)
            round_.readers += 1
            if round_.readers == self.size:
                del self._world.rounds[number]
            return [round_.contributions[rank] for rank in range(self.size)]

    def _absent(self, round_: _Round) -> list[int]:
        return sorted(set(range(self.size)) - set(round_.contributions))

    def _reduced(self, kind: str, array: np.ndarray, op: str) -> np.ndarray:
        parts = self._contributions(f"{kind}(op={op!r})", array.copy())
        return functools.reduce(getattr(self.xp, REDUCE_OPS[op]), parts)  # in rank order: the same bits everywhere

    def _broadcast(self, array: np.ndarray, root: int) -> None:
        parts = self._contributions(f"broadcast from rank {root}", array.copy() if self.rank == root else None)
        array[...] = parts[root]

    def _all_reduce(self, array: np.ndarray, out: np.ndarray, op: str) -> None:
        out[...] = self._reduced("all_reduce", array, op)

    def _reduce_scatter(self, array: np.ndarray, out: np.ndarray, op: str) -> None:
        rows = out.shape[0]
        out[...] = self._reduced("reduce_scatter", array, op)[self.rank * rows:(self.rank + 1) * rows]

    def _all_gather(self, array: np.ndarray, out: np.ndarray) -> None:
        out[...] = self.xp.concatenate(self._contributions("all_gather", array.copy()))

    def _all_to_all(self, array: np.ndarray, send_counts: list[int], out: np.ndarray,
                    recv_counts: list[int]) -> None:
        parts = self._contributions("all_to_all", [rows.copy() for rows in split_rows(array, send_counts, self.size)])
        for source, rows in enumerate(split_rows(out, recv_counts, self.size)):
            rows[...] = parts[source][self.rank]

    def _barrier(self) -> None:
        self._contributions("barrier", None)


def run_ranks(fn: Callable[..., Any], size: int, *args: Any, timeout: float = DEFAULT_TIMEOUT_S,
              xp: ModuleType = np) -> list[Any]:
    """Run ``fn(comm, *args)`` on ``size`` ranks, one thread each; return their results in rank order.

    If a rank raises, the others' pending calls raise ``RankFailed`` and this re-raises the first original
    exception, with a note naming its rank. ``timeout`` bounds each blocking call of each rank. ``xp`` is the
    array module the ranks exchange: NumPy, or ``backend.xp`` for an engine's arrays in either mode.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"run_ranks needs a whole number of ranks >= 1, got {size!r}")
    world = _World(size, xp)
    results: list[Any] = [None] * size

    def rank_main(rank: int) -> None:
        try:
            results[rank] = fn(ThreadCommunicator(world, rank, timeout), *args)
        except BaseException as exc:  # noqa: BLE001 - the caller gets it, and the other ranks wake up
            world.fail(rank, exc)

    threads = [threading.Thread(target=rank_main, args=(rank,), name=f"rank {rank}", daemon=True)
               for rank in range(size)]
    for thread in threads:
        thread.start()
    _join(threads, world, timeout)
    failure = world.first_failure()
    if failure is not None:
        rank, exc = failure
        exc.add_note(f"(raised on rank {rank} of {size}, the first rank to fail)")
        raise exc
    return results


def _join(threads: list[threading.Thread], world: _World, grace: float) -> None:
    """Wait for every thread; once one rank has failed, give the others ``grace`` seconds to notice."""
    failed_at = None
    while any(thread.is_alive() for thread in threads):
        if failed_at is None and world.failures:
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > grace:
            return
        for thread in threads:
            thread.join(0.01)
