"""Chapter 04b checkers: the solutions pass, each known mistake is rejected with its hint, and the cases are what
their docstrings say (the max grows, masked keys, every row of a mask case sees a key and hides one)."""

from __future__ import annotations

import numpy as np
import pytest
from checker_testing import rejected_with, unwritten

from course_lib.check.ch04b import (
    check_causal_tile,
    check_online_softmax_update,
    mask_case,
    update_case,
)
from course_lib.kernels.paged_prefill_reference import causal_mask, online_softmax_step

# --- the solutions, as the notebook writes them --------------------------------------------------------------------


def online_softmax_update(running_max, running_sum, acc, logits, values):
    new_max = np.maximum(running_max, logits.max(axis=1))
    alpha = np.exp(running_max - new_max)
    weights = np.exp(logits - new_max[:, None])
    return new_max, alpha * running_sum + weights.sum(axis=1), alpha[:, None] * acc + weights @ values


def causal_tile(logits, query_start, key_start):
    rows, keys = logits.shape
    query_positions = query_start + np.arange(rows)[:, None]
    key_positions = key_start + np.arange(keys)[None, :]
    masked = np.where(key_positions <= query_positions, logits, -np.inf)
    return masked, masked.max(axis=1)


def test_the_solutions_pass(capsys):
    check_online_softmax_update(online_softmax_update, exercise="04b.1")
    check_causal_tile(causal_tile, exercise="04b.2")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("PASSED online_softmax_update: ") and "logits near 1000 included" in lines[0]
    assert lines[1].startswith("PASSED causal_tile: 4 random cases (diagonal tiles after a prefix, seed ")


def test_update_cases_grow_the_max_and_end_on_the_softmax(rng):
    tiles, values, _, count = update_case(rng)
    logits = np.concatenate(tiles, axis=1)
    state = (np.full(logits.shape[0], -np.inf), np.zeros(logits.shape[0]), np.zeros((logits.shape[0], values.shape[1])))
    maxima = []
    for index, tile_logits in enumerate(tiles):
        state = online_softmax_step(*state, tile_logits, values[index * tile_logits.shape[1]:][:tile_logits.shape[1]])
        maxima.append(state[0].copy())
    assert np.all(maxima[1] > maxima[0]) and np.array_equal(maxima[-1], maxima[-2]), "grows, then the last stays"
    assert np.isneginf(logits).any() and np.isfinite(logits.max(axis=1)).all()
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(state[2] / state[1][:, None], weights @ values / weights.sum(axis=1)[:, None],
                               rtol=1e-12)
    assert count == len(tiles)


def test_mask_cases_show_every_row_a_key(rng):
    for _ in range(20):
        logits, query_start, key_start = mask_case(rng)
        visible = causal_mask(np.arange(query_start, query_start + logits.shape[0]), key_start,
                              key_start + logits.shape[1])
        assert visible[:, 0].all() and not visible.all() and query_start > 0


# --- 04b.1 online_softmax_update -------------------------------------------------------------------------------------


def update_with(*, rescale_sum=True, rescale_acc=True, inverted=False, exp_first=False):
    def wrong(running_max, running_sum, acc, logits, values):
        new_max = np.maximum(running_max, logits.max(axis=1))
        alpha = np.exp(new_max - running_max) if inverted else np.exp(running_max - new_max)
        alpha = np.where(np.isfinite(alpha), alpha, 0.0)
        weights = np.exp(logits) / np.exp(new_max)[:, None] if exp_first else np.exp(logits - new_max[:, None])
        new_sum = (alpha if rescale_sum else 1.0) * running_sum + weights.sum(axis=1)
        return new_max, new_sum, (alpha[:, None] if rescale_acc else 1.0) * acc + weights @ values

    return wrong


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (update_with(rescale_acc=False), "the accumulator was not rescaled with the new max"),
        (update_with(rescale_sum=False), "the running sum was not rescaled when the max grew"),
        (update_with(inverted=True), "not exp(new_max - running_max)"),
        (update_with(exp_first=True), "exp(logit) overflows"),
    ],
    ids=["accumulator-not-rescaled", "sum-not-rescaled", "rescale-inverted", "exp-before-max"],
)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the mistakes overflow
def test_online_softmax_update_rejects_known_mistakes(seed, wrong, hint):
    assert hint in rejected_with(check_online_softmax_update, wrong)


def test_online_softmax_update_names_the_exercise_and_a_wrong_return():
    message = rejected_with(lambda f: check_online_softmax_update(f, exercise="04b.1"),
                            lambda m, s, a, x, v: online_softmax_update(m, s, a, x, v)[:2])
    assert message.startswith("Exercise 04b.1: <lambda> failed: ") and "return the three new values" in message


def test_online_softmax_update_stub_is_not_written_yet():
    def online_softmax_update(running_max, running_sum, acc, logits, values):
        raise NotImplementedError("Exercise: write online_softmax_update; see the text above")

    assert unwritten(check_online_softmax_update, online_softmax_update).startswith("online_softmax_update is not")


# --- 04b.2 causal_tile -----------------------------------------------------------------------------------------------


def tile_with(*, offset=0, query_from_zero=False, key_from_zero=False, flipped=False, max_first=False):
    def wrong(logits, query_start, key_start):
        rows, keys = logits.shape
        query_positions = (0 if query_from_zero else query_start) + np.arange(rows)[:, None] + offset
        key_positions = (0 if key_from_zero else key_start) + np.arange(keys)[None, :]
        visible = key_positions > query_positions if flipped else key_positions <= query_positions
        masked = np.where(visible, logits, -np.inf)
        return masked, (logits if max_first else masked).max(axis=1)

    return wrong


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (tile_with(offset=-1), "the diagonal was masked"),
        (tile_with(offset=1), "each query saw the key one after it"),
        (tile_with(query_from_zero=True), "query positions were counted from 0"),
        (tile_with(key_from_zero=True), "key positions were counted from 0"),
        (tile_with(flipped=True), "the mask is the wrong way round"),
        (tile_with(max_first=True), "row_max counted keys the mask hides"),
    ],
    ids=["diagonal-masked", "one-past-diagonal", "prefix-left-out", "key-start-left-out", "flipped", "max-before-mask"],
)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_causal_tile_rejects_known_mistakes(seed, wrong, hint):
    assert hint in rejected_with(check_causal_tile, wrong)


def test_causal_tile_rejects_a_mask_by_zeroing():
    def zeroed(logits, query_start, key_start):
        masked, row_max = causal_tile(logits, query_start, key_start)
        return np.where(np.isneginf(masked), 0.0, masked), row_max

    assert "visible[" in rejected_with(check_causal_tile, zeroed)


def test_causal_tile_stub_is_not_written_yet():
    def causal_tile(logits, query_start, key_start):
        raise NotImplementedError("Exercise: write causal_tile; see the text above")

    assert unwritten(check_causal_tile, causal_tile).startswith("causal_tile is not written")
