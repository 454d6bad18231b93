"""Checkers for lab 30: a linear layer split over ranks, column-wise and row-wise, and the collective each needs.

The layer is ``y = x @ weight + bias`` with ``weight`` of shape ``[in, out]``. Every rank is handed the whole
``weight`` as a checkpoint stores it, but the checker fills the parts the rank does not own with NaN: the other
ranks' columns (column-parallel) or rows (row-parallel), and, column-parallel, their part of the bias. A rank that
reads what is not its own, or splits the wrong axis, gets NaN or a shape error and is told so; a rank that keeps to
its own slice gets finite numbers and must then combine them with the right collective. The ranks run on the
threads backend (``course_lib.distributed.run_ranks``), 2 to 4 of them, under a short timeout per blocking call, in
float64 and float32; the reference is the unsharded product in float64. The communicator records which collectives
each rank called, so that an all-reduce where an all-gather belongs is named even when it happens to give the
right shape.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from course_lib.check.compare import assert_close
from course_lib.check.exercise import checks_an_exercise
from course_lib.check.failure import CheckFailed
from course_lib.check.learner import _require_signature, run_with_time_limit
from course_lib.check.mistakes import Mistake, hint_for
from course_lib.check.run import CheckRun
from course_lib.check.tolerance import tolerance_for
from course_lib.distributed import CollectiveTimeout, Communicator, run_ranks

CASES = ((2, "float64"), (3, "float32"), (4, "float64"), (2, "float32"), (4, "float32"))
TIMEOUT_S = 2.0  # each blocking call of each rank; these products take microseconds
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all", "send", "recv", "sendrecv",
               "barrier")
SAME_CALLS_HINT = ("a collective waited for ranks that never joined it: every rank must call the same collectives, in "
                   "the same order")
COLUMN_RULE = ("column-parallel: rank r owns columns r * n to (r + 1) * n of weight and of bias (n = out // size), "
               "computes those columns of y from the whole x, and an all_gather collects every rank's columns")
ROW_RULE = ("row-parallel: rank r owns rows r * n to (r + 1) * n of weight (n = in // size), the ones that read its "
            "x_shard; x_shard @ its rows is a partial sum of every output, and an all_reduce adds the partial sums; "
            "the bias is added once, after the all_reduce (or as bias / size on every rank before it)")


class RecordingComm:
    """The learner's ``comm``: a real communicator that writes down each collective a rank calls."""

    def __init__(self, comm: Communicator, calls: list[str]):
        self._comm, self.calls = comm, calls
        self.rank, self.size, self.xp = comm.rank, comm.size, comm.xp

    def __repr__(self) -> str:
        return f"<communicator: rank {self.rank} of {self.size}>"

    def __getattr__(self, name: str) -> Any:
        found = getattr(self._comm, name)
        if name not in COLLECTIVES:
            return found

        def recorded(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return found(*args, **kwargs)

        return recorded


@dataclass(frozen=True)
class LinearCase:
    """One layer split over ``size`` ranks: x [tokens, in], weight [in, out], bias [out], in ``dtype``."""

    x: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    size: int

    def expected(self) -> np.ndarray:
        return self.x.astype(np.float64) @ self.weight.astype(np.float64) + self.bias.astype(np.float64)

    def describe(self) -> str:
        (tokens, width_in), width_out = self.x.shape, self.bias.shape[0]
        return f"{self.size} ranks, x [{tokens}, {width_in}], weight [{width_in}, {width_out}], {self.x.dtype}"

    def owned(self, axis_length: int, rank: int) -> slice:
        share = axis_length // self.size
        return slice(rank * share, (rank + 1) * share)

    def column_inputs(self, rank: int) -> tuple[np.ndarray, ...]:
        """x whole; weight and bias with every column but rank's own NaN."""
        weight, bias = np.full_like(self.weight, np.nan), np.full_like(self.bias, np.nan)
        mine = self.owned(self.bias.shape[0], rank)
        weight[:, mine], bias[mine] = self.weight[:, mine], self.bias[mine]
        return self.x.copy(), weight, bias

    def row_inputs(self, rank: int) -> tuple[np.ndarray, ...]:
        """x's columns that rank owns; weight with every row but rank's own NaN; bias whole."""
        mine = self.owned(self.weight.shape[0], rank)
        weight = np.full_like(self.weight, np.nan)
        weight[mine] = self.weight[mine]
        return self.x[:, mine].copy(), weight, self.bias.copy()

    def partial(self, rank: int) -> np.ndarray:
        """Rank's row-parallel partial sum, float64."""
        mine = self.owned(self.weight.shape[0], rank)
        return self.x[:, mine].astype(np.float64) @ self.weight[mine].astype(np.float64)


def linear_case(rng: np.random.Generator, size: int, dtype: str) -> LinearCase:
    """Random values of both signs; in and out different multiples of ``size``, so a swapped axis does not fit."""
    tokens = int(rng.integers(1, 8))
    width_in, width_out = (size * int(k) for k in rng.choice(np.arange(2, 9), size=2, replace=False))
    x, weight, bias = (rng.standard_normal(s).astype(dtype) for s in ((tokens, width_in), (width_in, width_out),
                                                                        width_out))
    return LinearCase(x, weight, bias, size)


def run_layer(learner: Callable[..., Any], inputs: Callable[[int], tuple[np.ndarray, ...]],
              size: int) -> tuple[list[Any], list[list[str]]]:
    """Each rank's result of ``learner(comm, *inputs(rank))`` and the collectives it called, in rank order."""
    calls: list[list[str]] = [[] for _ in range(size)]

    def rank_main(comm: Communicator) -> Any:
        return learner(RecordingComm(comm, calls[comm.rank]), *inputs(comm.rank))

    before = set(threading.enumerate())
    try:
        return run_ranks(rank_main, size, timeout=TIMEOUT_S), calls
    finally:  # a rank still running after another failed is waited for, so the time limit stops it
        for thread in set(threading.enumerate()) - before:
            if thread.name.startswith("rank "):
                thread.join()


def _explainer(split_hint: str) -> Callable[[BaseException], str | None]:
    def explain(error: BaseException) -> str | None:
        if isinstance(error, CollectiveTimeout):
            return SAME_CALLS_HINT
        if isinstance(error, ValueError) and ("mismatch" in str(error) or "shapes" in str(error)):
            return split_hint
        return None

    return explain


def _not_finite(out: np.ndarray, ref: np.ndarray) -> bool:
    return not np.isfinite(out).all()


def _require_finite(result: Any, expected: np.ndarray, what: str) -> None:
    """NaN in a result of the right shape: a rank read a part of the weight that the checker filled with NaN."""
    __tracebackhide__ = True
    if isinstance(result, np.ndarray) and result.shape == expected.shape and not np.isfinite(result).all():
        first = tuple(int(i) for i in np.argwhere(~np.isfinite(result))[0])
        raise CheckFailed(f"{what} holds NaN at {int((~np.isfinite(result)).sum())} of {result.size} elements, "
                          f"the first at {list(first)}")


def _check_ranks(name: str, learner: Callable[..., Any], case: LinearCase, inputs: Callable[[int], tuple],
                 mistakes: Callable[[list[list[str]]], tuple[Mistake, ...]], split_hint: str) -> list[list[str]]:
    """Run the layer on every rank and compare each rank's y with the unsharded float64 product."""
    __tracebackhide__ = True
    _require_signature(learner, (None,) * 4, name, f"{name}(comm, ...)")
    results, calls = run_with_time_limit(lambda: run_layer(learner, inputs, case.size), name,
                                         explain_error=_explainer(split_hint))
    expected = case.expected()
    for rank, result in enumerate(results):
        try:
            _require_finite(result, expected, f"rank {rank}'s y")
            assert_close(result, expected, dtype=case.x.dtype, what=f"rank {rank}'s y")
        except CheckFailed as failure:
            out = np.asarray(result) if isinstance(result, np.ndarray) else None
            tolerance = 100 * tolerance_for(case.x.dtype)  # the mistakes' answers are float64
            hint = hint_for(out, expected, mistakes(calls), (), tolerance) if out is not None else None
            raise CheckFailed(f"{failure}\nHint: {hint}" if hint else str(failure)) from None
    return calls


# --- column_parallel_linear --------------------------------------------------------------------------------------


def _column_mistakes(case: LinearCase, calls: list[list[str]]) -> tuple[Mistake, ...]:
    size, expected = case.size, case.expected()
    blocks = np.split(expected, size, axis=1)
    reduced = any("all_reduce" in rank_calls for rank_calls in calls)
    return (
        Mistake("read another rank's part", f"NaN: this rank read columns of weight or bias that another rank owns "
                f"(the checker fills them with NaN; splitting rows instead of columns reads them too). {COLUMN_RULE}",
                symptom=_not_finite),
        Mistake("all-reduce", "after a column-parallel layer each rank holds DIFFERENT columns of y: there is "
                f"nothing to add, everything to collect. Use all_gather, not all_reduce. {COLUMN_RULE}",
                symptom=lambda out, ref: reduced),
        Mistake("own columns only", f"these are this rank's own columns of y only: collect every rank's. "
                f"{COLUMN_RULE}", symptom=lambda out, ref: out.shape == blocks[0].shape),
        Mistake("stacked rows", "comm.all_gather stacks the ranks' [tokens, out // size] blocks along axis 0; y needs "
                "them side by side: np.concatenate(np.split(gathered, comm.size), axis=1), or gather y_local.T and "
                "transpose back", wrong_reference=lambda: np.concatenate(blocks, axis=0)),
        Mistake("reshaped", "reshape does not move the gathered blocks side by side, it re-reads their numbers in "
                "order: np.concatenate(np.split(gathered, comm.size), axis=1), or gather y_local.T and transpose back",
                wrong_reference=lambda: np.concatenate(blocks, axis=0).reshape(expected.shape)),
    )


COLUMN_SPLIT_HINT = f"the shapes do not fit: {COLUMN_RULE} (x @ weight[:, mine] + bias[mine])"


@checks_an_exercise
def check_column_parallel_linear(column_parallel_linear: Callable[..., Any]) -> None:
    """Check ``column_parallel_linear(comm, x, weight, bias)``: on every rank, ``x @ weight + bias``, each rank
    computing only its own columns and an all-gather collecting them."""
    __tracebackhide__ = True
    _check_every_case("column_parallel_linear", column_parallel_linear, "column")


# --- row_parallel_linear -----------------------------------------------------------------------------------------


def _row_mistakes(case: LinearCase, calls: list[list[str]]) -> tuple[Mistake, ...]:
    size, expected = case.size, case.expected()
    product = expected - case.bias
    gathered = any("all_gather" in rank_calls for rank_calls in calls)
    return (
        Mistake("read another rank's rows", "NaN: this rank read rows of weight that another rank owns (the checker "
                f"fills them with NaN; splitting columns instead of rows reads them too). {ROW_RULE}",
                symptom=_not_finite),
        Mistake("all-gather", "after a row-parallel layer every rank holds a partial sum of ALL of y: they must be "
                f"added, not collected. Use all_reduce, not all_gather. {ROW_RULE}",
                symptom=lambda out, ref: gathered),
        Mistake("bias on every rank", f"y + (size - 1) * bias: every rank added the whole bias before the all_reduce, "
                f"which adds it size times. {ROW_RULE}", wrong_reference=lambda: product + size * case.bias),
        Mistake("no bias", f"y without the bias. {ROW_RULE}", wrong_reference=lambda: product),
        Mistake("bias divided twice", f"y with bias / size: divide the bias only when every rank adds it before the "
                f"all_reduce. {ROW_RULE}", wrong_reference=lambda: product + case.bias / size),
        Mistake("partial sum", f"a partial sum only (this rank's slice of the input): add every rank's. {ROW_RULE}",
                symptom=lambda out, ref: out.shape == ref.shape and any(
                    np.allclose(out, case.partial(rank) + extra, rtol=1e-4, atol=1e-4)
                    for rank in range(size) for extra in (0, case.bias))),
    )


ROW_SPLIT_HINT = f"the shapes do not fit: {ROW_RULE} (x_shard @ weight[mine])"


@checks_an_exercise
def check_row_parallel_linear(row_parallel_linear: Callable[..., Any]) -> None:
    """Check ``row_parallel_linear(comm, x_shard, weight, bias)``: on every rank, ``x @ weight + bias`` from each
    rank's slice of x's columns and its rows of weight, the partial sums added by an all-reduce."""
    __tracebackhide__ = True
    _check_every_case("row_parallel_linear", row_parallel_linear, "row")


def _check_every_case(name: str, learner: Callable[..., Any], split: str) -> None:
    """Run every case of one split ('column' or 'row'); a column-parallel layer must not sum through an all-reduce."""
    __tracebackhide__ = True
    column = split == "column"
    with CheckRun(name) as run:
        for size, dtype in CASES:
            case = linear_case(run.rng, size, dtype)
            run.case = case.describe()
            mistakes = _column_mistakes if column else _row_mistakes
            calls = _check_ranks(name, learner, case, case.column_inputs if column else case.row_inputs,
                                 lambda calls, case=case, mistakes=mistakes: mistakes(case, calls),
                                 COLUMN_SPLIT_HINT if column else ROW_SPLIT_HINT)
            if column and any("all_reduce" in rank_calls for rank_calls in calls):
                raise CheckFailed("y is right, but it came through an all_reduce: summing zero-padded outputs moves "
                                  f"size times the bytes an all_gather of each rank's columns does. {COLUMN_RULE}")
        run.passed(len(CASES), detail="2 to 4 ranks, float64 and float32")
