"""Checkers for chapter 05: a ring all-reduce written over send and recv, and the dispatch of an expert-parallel
mixture-of-experts layer.

The ring runs on the threads backend (``course_lib.distributed.run_ranks``) on 2 to 5 ranks, odd and even, with
lengths that are not a multiple of the rank count and one shorter than it, under a short timeout per blocking call:
a send/send deadlock ends in a ``CollectiveTimeout`` within seconds and is named. The learner's ``comm`` offers
``send``, ``recv`` and ``sendrecv`` only; the library's collectives (and the course's own hand ring) raise. When the
sums are wrong, a second run on *probe* inputs, where rank ``j``'s input is the constant ``base**j``, reads every
element's result as digits: how many times each rank's input went into it. That tells an all-gather left out (one
right segment per rank), a remainder left out (the last ``n % p`` elements), an input returned unchanged and a
contribution added twice or into the wrong place (a chunk index off by one) apart.

The dispatch's routings are skewed (a few experts popular, as real routers are) and leave some ranks without a row,
the last rank among them once; every case has more than 16 (token, expert) pairs, past the length up to which
NumPy's default sort happens to keep equal keys in order.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from course_lib.check.compare import assert_close
from course_lib.check.exercise import checks_an_exercise
from course_lib.check.failure import CheckFailed
from course_lib.check.inputs import size_past
from course_lib.check.learner import _require_signature, call_learner, run_with_time_limit
from course_lib.check.mistakes import Mistake, hint_for
from course_lib.check.run import CheckRun
from course_lib.distributed import CollectiveTimeout, Communicator, run_ranks

# --- ring_all_reduce: the sum over ranks, by send and recv alone ---------------------------------------------------

RING_SIGNATURE = "ring_all_reduce(comm, x)"
RING_CASES = (  # (ranks, lengths, dtype): the first cases catch most mistakes, the later ones the edges
    (3, "uneven", "float64"),
    (2, "uneven", "float64"),
    (5, "uneven", "float64"),
    (4, "multiple", "float64"),
    (5, "shorter", "float64"),
    (3, "uneven", "float32"),
)
RING_TIMEOUT_S = 2.0  # each blocking call of each rank; a right ring on these lengths takes milliseconds
LIBRARY_COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "broadcast", "barrier")
SEGMENT_RULES = ("At step s of the reduce-scatter rank r sends segment (r - s) mod p to rank r + 1 and adds the one "
                 "arriving from rank r - 1 into segment (r - s - 1) mod p; at step s of the all-gather it sends "
                 "segment (r + 1 - s) mod p and overwrites segment (r - s) mod p")
DEADLOCK_HINT = ("a send/send deadlock: every rank is in comm.send, waiting for its right neighbour to receive, while "
                 "that neighbour is sending too (send returns only once the message is received). Do each step's "
                 "send and receive together: comm.sendrecv(segment, right, buffer, left)")
NO_MESSAGE_HINT = ("a message this rank waited for never came: at every step each rank must send to rank + 1 and "
                   "receive from rank - 1 (mod p), and every rank must take the same steps, p - 1 in each phase")
BUFFER_HINT = ("the buffer you received into is not the size of the segment that arrived. " + SEGMENT_RULES
               + "; size the buffer from the segment (np.empty_like(segment) also keeps x's dtype)")
UNEVEN_HINT = ("segments of len(x) // p elements leave the remainder out when the length is not a multiple of p: "
               "cut x at bounds[i] = i * len(x) // p, i = 0..p (lengths differ by at most one; some are empty when "
               "len(x) < p)")
UNCHANGED_HINT = ("every rank returned its own input unchanged: return the sum over the ranks of their x, built by "
                  "a reduce-scatter and an all-gather around the ring")
ALL_GATHER_HINT = ("each rank has one segment right (a different one on each rank) and partial sums elsewhere, as "
                   "where the reduce-scatter ends: the all-gather is missing, or passes on the wrong segments. It "
                   "takes p - 1 steps; at step s rank r sends its complete segment (r + 1 - s) mod p and overwrites "
                   "segment (r - s) mod p with the one arriving")


class CollectiveNotAllowed(RuntimeError):
    """The exercise's ring called a collective it is meant to build from point-to-point calls."""


class PointToPointOnly:
    """The ``comm`` the learner's ring gets: ``rank``, ``size``, ``xp``, ``send``, ``recv`` and ``sendrecv`` of a real
    communicator. The library's collectives raise ``CollectiveNotAllowed``, and so does the course's own hand ring
    (``course_lib.distributed.algorithms``) when it calls send or recv through this object."""

    def __init__(self, comm: Communicator):
        self._comm = comm
        self.rank, self.size, self.xp = comm.rank, comm.size, comm.xp

    def __repr__(self) -> str:
        return f"<communicator: rank {self.rank} of {self.size}; send, recv and sendrecv>"

    def send(self, array: Any, dest: int, tag: int = 0) -> None:
        _refuse_course_algorithms()
        self._comm.send(array, dest, tag)

    def recv(self, out: Any, source: int, tag: int = 0) -> Any:
        _refuse_course_algorithms()
        return self._comm.recv(out, source, tag)

    def sendrecv(self, array: Any, dest: int, out: Any, source: int, tag: int = 0) -> Any:
        _refuse_course_algorithms()
        return self._comm.sendrecv(array, dest, out, source, tag)

    def __getattr__(self, name: str) -> Any:
        if name in LIBRARY_COLLECTIVES:
            raise CollectiveNotAllowed(f"comm.{name} is the library's collective, the answer your ring is checked "
                                       "against: build the sum from comm.send, comm.recv and comm.sendrecv")
        raise AttributeError(f"the exercise's comm has rank, size, xp, send, recv and sendrecv; it has no {name!r}")


def _refuse_course_algorithms() -> None:
    """Raise when the caller of send/recv (two frames up) is the course's own collectives module."""
    caller = sys._getframe(2).f_globals.get("__name__", "")
    if caller.startswith("course_lib.distributed"):
        raise CollectiveNotAllowed(f"{caller} is the course's own implementation: write your ring yourself, from "
                                   "comm.send, comm.recv and comm.sendrecv")


def ring_length(rng: np.random.Generator, ranks: int, lengths: str) -> int:
    """A length that is not a multiple of ``ranks`` ('uneven'), one that is ('multiple'), or below it ('shorter')."""
    if lengths == "uneven":
        return size_past(rng, 2 * ranks, 12 * ranks, ranks)
    if lengths == "multiple":
        return ranks * int(rng.integers(2, 10))
    return int(rng.integers(1, ranks))


def run_ring(ring_all_reduce: Callable[[Any, np.ndarray], Any], inputs: np.ndarray) -> list[Any]:
    """Rank ``r`` calls ``ring_all_reduce(comm, inputs[r])`` on a thread of its own; every rank's result, in rank
    order. A rank still running after the others failed (a loop of its own) is waited for, so that the checker's
    time limit stops it rather than leaving it to spin."""

    def rank_main(comm: Communicator) -> Any:
        return ring_all_reduce(PointToPointOnly(comm), inputs[comm.rank].copy())

    before = set(threading.enumerate())
    try:
        return run_ranks(rank_main, len(inputs), timeout=RING_TIMEOUT_S)
    finally:
        for thread in set(threading.enumerate()) - before:
            if thread.name.startswith("rank "):
                thread.join()


def _explain_ring_error(error: BaseException) -> str | None:
    text = str(error)
    if isinstance(error, CollectiveTimeout):
        return DEADLOCK_HINT if " in send to " in text else NO_MESSAGE_HINT
    if isinstance(error, ValueError) and "into a buffer of" in text:
        return BUFFER_HINT
    if isinstance(error, ValueError) and "could not be broadcast" in text:
        return f"a segment was added into one of another length. {SEGMENT_RULES}"
    if isinstance(error, ValueError) and ("reshape" in text or "equal division" in text):
        return UNEVEN_HINT
    return None


def _probe_counts(ring_all_reduce: Callable[[Any, np.ndarray], Any], ranks: int, length: int,
                  dtype: np.dtype) -> np.ndarray | None:
    """counts[r, i, j]: how many times rank j's input went into rank r's result[i], read from a run where rank j's
    input is the constant base**j (exact in ``dtype``); None when that run fails or its results are not such sums."""
    base = 2 ** (np.finfo(dtype).nmant // ranks)
    inputs = np.stack([np.full(length, float(base) ** j, dtype) for j in range(ranks)])
    try:
        results = run_with_time_limit(lambda: run_ring(ring_all_reduce, inputs), "ring_all_reduce")
        values = np.stack([np.asarray(result, np.float64) for result in results])
    except (CheckFailed, ValueError, TypeError):
        return None
    if values.shape != (ranks, length) or not np.isfinite(values).all() or (values != np.round(values)).any():
        return None
    if (values < 0).any() or (values >= float(base) ** ranks).any():
        return None
    whole = values.astype(np.int64)
    return np.stack([whole // base**j % base for j in range(ranks)], axis=-1)


def _terms(counts: np.ndarray) -> str:
    """'x0 + 2 x2': a sum of the ranks' inputs, xj standing for rank j's."""
    terms = [f"x{j}" if count == 1 else f"{count} x{j}" for j, count in enumerate(counts.tolist()) if count]
    return " + ".join(terms) or "0"


def _ring_hint(ring_all_reduce: Callable[[Any, np.ndarray], Any], inputs: np.ndarray,
               results: Sequence[Any]) -> str | None:
    """The likely mistake behind results that hold the wrong numbers (arrays of the right shape and dtype)."""
    ranks, length = inputs.shape
    if all(np.array_equal(result, x) for result, x in zip(results, inputs, strict=True)):
        return UNCHANGED_HINT
    counts = _probe_counts(ring_all_reduce, ranks, length, inputs.dtype)
    if counts is None:
        return None
    complete = (counts == 1).all(axis=-1)  # [rank, element]: the sum of every rank's input, each once
    whole_segments = ranks * (length // ranks)  # the elements that segments of length // ranks cover
    own_input = np.eye(ranks, dtype=np.int64)[:, None, :]
    if 0 < whole_segments < length and complete[:, :whole_segments].all() and (
            counts[:, whole_segments:] == own_input).all():
        left_out = length - whole_segments
        elements = "element holds" if left_out == 1 else f"{left_out} elements hold"
        return f"the last {elements} each rank's own input: {UNEVEN_HINT}"
    if counts.max() <= 1 and (complete.sum(axis=0) == 1).all():
        return ALL_GATHER_HINT
    if complete.all():
        return ("in a probe run (every rank's x a constant) every element sums every rank's input, yet the sums of "
                f"the random inputs are wrong: segments ended up in another segment's place. {SEGMENT_RULES}")
    rank, element = np.argwhere(~complete)[0]
    twice = " (some input counted more than once)" if counts.max() > 1 else ""
    return (f"in a probe run (every rank's x a constant, xj for rank j) rank {rank}'s result[{element}] = "
            f"{_terms(counts[rank, element])}{twice}, not x0 + ... + x{ranks - 1}: a chunk index (or the number of "
            f"steps, p - 1 a phase) is off. {SEGMENT_RULES}")


@checks_an_exercise
def check_ring_all_reduce(ring_all_reduce: Callable[[Any, np.ndarray], Any]) -> None:
    """Check ``ring_all_reduce(comm, x)``: on every rank, a new array holding the element-wise sum of every rank's
    ``x`` (1-D), built from ``comm.send``, ``comm.recv`` and ``comm.sendrecv`` alone.

    Runs on the threads backend on 2 to 5 ranks, lengths that are not a multiple of the rank count and one shorter
    than it, float64 and float32 inputs; every blocking call gives up after ``RING_TIMEOUT_S`` seconds.
    """
    __tracebackhide__ = True
    with CheckRun("ring_all_reduce") as run:
        if not callable(ring_all_reduce):
            raise CheckFailed(f"ring_all_reduce should be a function, got {type(ring_all_reduce).__name__}")
        _require_signature(ring_all_reduce, (None, None), "ring_all_reduce", RING_SIGNATURE)
        for ranks, lengths, dtype in RING_CASES:
            length = ring_length(run.rng, ranks, lengths)
            run.case = f"ranks={ranks}, length={length}, {dtype}"
            inputs = run.rng.standard_normal((ranks, length)).astype(dtype)
            results = run_with_time_limit(lambda inputs=inputs: run_ring(ring_all_reduce, inputs), "ring_all_reduce",
                                          explain_error=_explain_ring_error)
            expected = inputs.astype(np.float64).sum(axis=0)
            for rank, result in enumerate(results):
                try:
                    assert_close(result, expected, dtype=dtype, what=f"rank {rank}'s result")
                except CheckFailed as failure:
                    shaped = all(isinstance(r, np.ndarray) and r.shape == (length,) for r in results)
                    hint = _ring_hint(ring_all_reduce, inputs, results) if shaped else None
                    raise CheckFailed(f"{failure}\nHint: {hint}" if hint else str(failure)) from None
        run.passed(len(RING_CASES), detail="2 to 5 ranks, lengths not a multiple of the ranks and below them")


# --- dispatch_order: which rows go to which rank, in what order -----------------------------------------------------

DISPATCH_SIGNATURE = "dispatch_order(expert_ids, experts_per_rank, size)"
DISPATCH_CASES = (  # (ranks, experts per rank, top_k, ranks that no token chooses)
    (4, 2, 2, 0),
    (3, 3, 1, 1),
    (2, 4, 2, "last"),
    (5, 2, 1, 2),
    (4, 1, 2, 1),
    (3, 2, 2, 0),
    (5, 3, 2, 1),
)
MAPPING_RULE = "rank r holds experts r * experts_per_rank to (r + 1) * experts_per_rank - 1: expert e is on rank " \
               "e // experts_per_rank"
STABLE_HINT = ("rows for the same expert must keep the order of their positions in expert_ids.reshape(-1): "
               "np.argsort sorts with quicksort unless told kind='stable', and quicksort reorders equal keys")


def dispatch_order_reference(expert_ids: np.ndarray, experts_per_rank: int, size: int) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
    """The positions of ``expert_ids.reshape(-1)`` sorted by expert, equal experts in position order, and the rows
    for each rank: the order and counts ``course_lib.distributed.moe.moe_forward`` sends its rows in."""
    flat = np.asarray(expert_ids).reshape(-1)
    return np.argsort(flat, kind="stable"), np.bincount(flat // experts_per_rank, minlength=size)


def routing(rng: np.random.Generator, ranks: int, per_rank: int, top_k: int, idle: int | str) -> np.ndarray:
    """expert_ids [tokens, top_k]: each token's ``top_k`` distinct experts, a few experts popular, and ``idle`` ranks
    ('last': the last rank) whose experts no token chooses."""
    unused = [ranks - 1] if idle == "last" else rng.choice(ranks, size=idle, replace=False).tolist()
    chosen = [e for e in range(ranks * per_rank) if e // per_rank not in unused]
    popularity = rng.dirichlet(np.full(len(chosen), 0.7))
    popularity = (popularity + 0.02) / (popularity + 0.02).sum()  # every allowed expert has a chance
    tokens = int(rng.integers(20, 48))
    return np.array([rng.choice(chosen, size=top_k, replace=False, p=popularity) for _ in range(tokens)],
                    dtype=np.int64).reshape(tokens, top_k)


def _counts_by(rank_of: Callable[[np.ndarray, int, int], np.ndarray], minlength: bool = True) -> Callable[..., Any]:
    """The counts a learner gets by mapping expert ``e`` to ``rank_of(e, experts_per_rank, size)``."""

    def counts(expert_ids: np.ndarray, per_rank: int, size: int) -> np.ndarray:
        return np.bincount(rank_of(expert_ids.reshape(-1), per_rank, size), minlength=size if minlength else 0)

    return counts


COUNT_MISTAKES = (
    Mistake("by expert",
            "these are the rows for each expert; all_to_all needs one count per destination rank: add up the "
            f"counts of each rank's experts ({MAPPING_RULE})",
            wrong_reference=lambda ids, per_rank, size: np.bincount(ids.reshape(-1), minlength=size * per_rank)),
    Mistake("round robin",
            f"these count expert e on rank e % size, as if experts were dealt out in turn; {MAPPING_RULE}",
            wrong_reference=_counts_by(lambda e, per_rank, size: e % size)),
    Mistake("divided by size",
            f"these count expert e on rank e // size: divide by experts_per_rank, not by the rank count; "
            f"{MAPPING_RULE}",
            wrong_reference=_counts_by(lambda e, per_rank, size: e // size)),
    Mistake("ranks from 1",
            f"these are the counts one rank too far (ranks are numbered from 0); {MAPPING_RULE}",
            wrong_reference=_counts_by(lambda e, per_rank, size: e // per_rank + 1)),
    Mistake("expert + 1",
            f"these count expert e on rank (e + 1) // experts_per_rank; {MAPPING_RULE}",
            wrong_reference=_counts_by(lambda e, per_rank, size: (e + 1) // per_rank)),
    Mistake("no minlength",
            "a rank that no token chooses still needs its count, 0: np.bincount(..., minlength=size) gives one "
            "count for every rank, the last ones included",
            wrong_reference=_counts_by(lambda e, per_rank, size: e // per_rank, minlength=False)),
)


def _order_mistakes(expert_ids: np.ndarray, per_rank: int, expected: np.ndarray) -> tuple[Mistake, ...]:
    """The known wrong orders for this routing (compared exactly)."""
    flat, top_k = expert_ids.reshape(-1), expert_ids.shape[1]
    grouped_like_expected = flat[expected]

    def unstable(out: np.ndarray, ref: np.ndarray) -> bool:
        is_permutation = np.array_equal(np.sort(out), np.arange(len(flat)))
        return is_permutation and np.array_equal(flat[out], grouped_like_expected)

    return (
        Mistake("values", "order holds the experts themselves, sorted: it must hold positions, where each row comes "
                "from (np.argsort gives them), or the combine cannot put the outputs back",
                wrong_reference=lambda: np.sort(flat)),
        Mistake("tokens", "order holds token numbers: it must hold positions in expert_ids.reshape(-1), one per "
                f"(token, expert) pair, token * top_k + slot (the row sent is x[order // {top_k}]), or the combine "
                "cannot tell a token's experts apart",
                wrong_reference=lambda: expected // top_k),
        Mistake("by rank only", "within a rank the rows must be grouped by expert, as the receiver takes them: it "
                "knows only how many rows of each of its experts come from each rank. Sort by expert id (experts "
                "are numbered rank by rank, so that sorts by rank too)",
                wrong_reference=lambda: np.argsort(flat // per_rank, kind="stable")),
        Mistake("unstable", STABLE_HINT, symptom=unstable),
    )


def _integers(value: Any, what: str) -> np.ndarray:
    """``value`` as a NumPy array of integers, or a CheckFailed saying what it is."""
    __tracebackhide__ = True
    array = np.asarray(value)
    if array.dtype.kind not in "iu":
        raise CheckFailed(f"{what} is {value!r:.60} (dtype {array.dtype}), expected integers: positions and counts "
                          "are whole numbers (np.zeros(n, dtype=np.int64) makes integer counts)")
    return array


def _unpack(out: Any) -> tuple[np.ndarray, np.ndarray]:
    __tracebackhide__ = True
    if out is None:
        raise CheckFailed("dispatch_order returned None: did you forget to `return order, send_counts`?")
    if not isinstance(out, tuple | list) or len(out) != 2:
        raise CheckFailed(f"dispatch_order returned {out!r:.60} (a {type(out).__name__}): return the pair "
                          "order, send_counts")
    return _integers(out[0], "order"), _integers(out[1], "send_counts")


def _compare_exactly(out: np.ndarray, expected: np.ndarray, what: str, mistakes: Sequence[Mistake],
                     inputs: Sequence[Any], describe: Callable[[int], str] = str) -> None:
    """Raise CheckFailed, with the first difference and a hint, unless ``out`` equals ``expected``."""
    __tracebackhide__ = True
    if out.shape == expected.shape and np.array_equal(out, expected):
        return
    if out.shape != expected.shape:
        message = f"{what} has shape {out.shape}, expected {expected.shape}"
    elif out.size <= 8:
        message = f"{what} = {out.tolist()}, expected {expected.tolist()}"
    else:
        wrong = np.flatnonzero(out != expected)
        first = int(wrong[0])
        message = (f"{what} is wrong at {len(wrong)} of {out.size} positions. First: {what}[{first}] = "
                   f"{describe(int(out[first]))}, expected {describe(int(expected[first]))}")
    hint = hint_for(out, expected, mistakes, inputs, 0.0)
    raise CheckFailed(f"{message}\nHint: {hint}" if hint else message)


def _explain_dispatch_error(error: BaseException) -> str | None:
    if isinstance(error, IndexError):
        return f"a rank index past the end? {MAPPING_RULE}, from 0 to size - 1"
    return None


@checks_an_exercise
def check_dispatch_order(dispatch_order: Callable[[np.ndarray, int, int], Any]) -> None:
    """Check ``dispatch_order(expert_ids, experts_per_rank, size) -> (order, send_counts)``.

    ``expert_ids`` [tokens, top_k] holds each token's experts; expert ``e`` lives on rank ``e // experts_per_rank``.
    ``order``: the positions of ``expert_ids.reshape(-1)`` sorted by expert, equal experts in position order;
    ``send_counts[d]``: how many of those rows go to rank ``d``.
    """
    __tracebackhide__ = True
    with CheckRun("dispatch_order") as run:
        for ranks, per_rank, top_k, idle in DISPATCH_CASES:
            expert_ids = routing(run.rng, ranks, per_rank, top_k, idle)
            expected_order, expected_counts = dispatch_order_reference(expert_ids, per_rank, ranks)
            receiving_nothing = np.flatnonzero(expected_counts == 0).tolist()
            run.case = (f"{len(expert_ids)} tokens, top_k={top_k}, {ranks} ranks of {per_rank} experts, "
                        f"ranks receiving nothing: {receiving_nothing or 'none'}")
            out = call_learner(dispatch_order, expert_ids.copy(), per_rank, ranks, name="dispatch_order",
                               expected_signature=DISPATCH_SIGNATURE, explain_error=_explain_dispatch_error)
            order, send_counts = _unpack(out)
            _compare_exactly(send_counts, expected_counts, "send_counts", COUNT_MISTAKES, (expert_ids, per_rank, ranks))
            flat = expert_ids.reshape(-1)

            def position(index: int, flat: np.ndarray = flat, top_k: int = top_k) -> str:
                if not 0 <= index < len(flat):
                    return f"{index} (no such position: there are {len(flat)})"
                return f"{index} (token {index // top_k}'s expert {flat[index]})"

            _compare_exactly(order, expected_order, "order", _order_mistakes(expert_ids, per_rank, expected_order),
                             (), describe=position)
        run.passed(len(DISPATCH_CASES), detail="top_k 1 and 2, 2 to 5 ranks, some receiving nothing")
