"""Lab 30 checkers: tensor-parallel linear layers pass when each rank keeps to its slice and combines with the right
collective, and each known mistake is rejected with its hint."""

from __future__ import annotations

import numpy as np
import pytest
from checker_testing import rejected_with, unwritten

from course_lib.check.lab30 import check_column_parallel_linear, check_row_parallel_linear, linear_case


def own(comm, length):
    """This rank's block of an axis of ``length``."""
    share = length // comm.size
    return slice(comm.rank * share, (comm.rank + 1) * share)


def column_parallel_linear(comm, x, weight, bias):
    mine = own(comm, weight.shape[1])
    return comm.all_gather((x @ weight[:, mine] + bias[mine]).T.copy()).T


def row_parallel_linear(comm, x_shard, weight, bias):
    return comm.all_reduce(x_shard @ weight[own(comm, weight.shape[0])]) + bias


def test_the_solutions_pass(capsys):
    check_column_parallel_linear(column_parallel_linear)
    check_row_parallel_linear(row_parallel_linear)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("PASSED column_parallel_linear: 5 random cases (2 to 4 ranks, float64 and float32")
    assert lines[1].startswith("PASSED row_parallel_linear: 5 random cases")


def test_other_right_answers_pass():
    def split_after_gather(comm, x, weight, bias):
        mine = own(comm, weight.shape[1])
        gathered = comm.all_gather(x @ weight[:, mine] + bias[mine])
        return np.concatenate(np.split(gathered, comm.size), axis=1)

    def bias_shared_before(comm, x_shard, weight, bias):
        return comm.all_reduce(x_shard @ weight[own(comm, weight.shape[0])] + bias / comm.size)

    check_column_parallel_linear(split_after_gather)
    check_row_parallel_linear(bias_shared_before)


def column_with(collect):
    def wrong(comm, x, weight, bias):
        mine = own(comm, weight.shape[1])
        return collect(comm, x @ weight[:, mine] + bias[mine])

    return wrong


def padded_all_reduce(comm, x, weight, bias):
    mine = own(comm, weight.shape[1])
    y = np.zeros((x.shape[0], weight.shape[1]), x.dtype)
    y[:, mine] = x @ weight[:, mine] + bias[mine]
    return comm.all_reduce(y)


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (column_with(lambda comm, y: comm.all_reduce(y)), "Use all_gather, not all_reduce"),
        (column_with(lambda comm, y: y), "this rank's own columns of y only"),
        (column_with(lambda comm, y: comm.all_gather(y)), "blocks along axis 0"),
        (column_with(lambda comm, y: comm.all_gather(y).reshape(y.shape[0], -1)), "reshape does not move"),
        (lambda comm, x, w, b: comm.all_reduce(x[:, own(comm, w.shape[0])] @ w[own(comm, w.shape[0])]) + b,
         "splitting rows instead of columns"),
        (lambda comm, x, w, b: comm.all_gather((x @ w + b).T.copy()).T, "another rank owns"),
        (padded_all_reduce, "size times the bytes an all_gather"),
    ],
    ids=["all-reduce", "no-collective", "stacked-rows", "reshaped", "wrong-axis", "whole-weight", "padded-all-reduce"],
)
def test_column_rejects_known_mistakes(seed, wrong, hint):
    message = rejected_with(check_column_parallel_linear, wrong)
    assert hint in message and "case " in message and "ranks, x [" in message


def row_with(before=lambda comm, partial, bias: partial, after=lambda comm, y, bias: y + bias,
             collect=lambda comm, partial: comm.all_reduce(partial)):
    def wrong(comm, x_shard, weight, bias):
        partial = x_shard @ weight[own(comm, weight.shape[0])]
        return after(comm, collect(comm, before(comm, partial, bias)), bias)

    return wrong


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (row_with(before=lambda comm, p, b: p + b, after=lambda comm, y, b: y), "which adds it size times"),
        (row_with(after=lambda comm, y, b: y), "y without the bias"),
        (row_with(after=lambda comm, y, b: y + b / comm.size), "divide the bias only when"),
        (row_with(collect=lambda comm, p: p), "a partial sum only"),
        (row_with(collect=lambda comm, p: comm.all_gather(p)), "Use all_reduce, not all_gather"),
        (lambda comm, x, w, b: comm.all_reduce(x @ w[:, own(comm, w.shape[1])]) + b, "the shapes do not fit"),
        (lambda comm, x, w, b: comm.all_reduce(x @ w[: x.shape[1]]) + b, "another rank owns"),
    ],
    ids=["bias-on-every-rank", "no-bias", "bias-divided-after", "partial-sum", "all-gather", "wrong-axis",
         "first-rows"],
)
def test_row_rejects_known_mistakes(seed, wrong, hint):
    message = rejected_with(check_row_parallel_linear, wrong)
    assert hint in message and "case " in message


def test_ranks_that_disagree_on_the_collective_are_told():
    def mixed(comm, x_shard, weight, bias):
        partial = x_shard @ weight[own(comm, weight.shape[0])]
        return (comm.all_reduce(partial) if comm.rank == 0 else comm.all_gather(partial)) + bias

    assert "the same collectives in the same order" in rejected_with(check_row_parallel_linear, mixed)


def test_unwritten_and_wrong_signature():
    def stub(comm, x, weight, bias):
        raise NotImplementedError("Exercise: write column_parallel_linear; see the text above")

    assert unwritten(check_column_parallel_linear, stub).startswith("column_parallel_linear is not written yet")
    assert "takes (comm, x)" in rejected_with(check_row_parallel_linear, lambda comm, x: x)


def test_cases_poison_what_a_rank_does_not_own(rng):
    case = linear_case(rng, 3, "float32")
    x, weight, bias = case.column_inputs(1)
    third = weight.shape[1] // 3
    assert np.isnan(weight[:, :third]).all() and np.isfinite(weight[:, third : 2 * third]).all()
    assert np.isnan(bias).sum() == 2 * bias.size // 3
    x_shard, weight, bias = case.row_inputs(2)
    assert x_shard.shape[1] == case.x.shape[1] // 3 and np.isfinite(bias).all()
    assert np.isnan(weight).sum() == 2 * weight.size // 3
    assert case.weight.shape[0] != case.weight.shape[1]  # a swapped axis never fits by accident
