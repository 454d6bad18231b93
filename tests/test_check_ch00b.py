"""Chapter 00b checkers: the right solutions pass, each known mistake is rejected with its hint, and the references
(the engine's own sampler and log-softmax) are what the cases say they are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from checker_testing import rejected_with, unwritten

from course_lib.check.ch00b import (
    LOGPROB_KINDS,
    SMOLLM2_VOCAB,
    check_temperature_softmax,
    check_token_logprobs,
    check_top_p_filter,
    logprob_case,
    softmax_cases,
    temperature_reference,
    token_logprobs_reference,
    top_p_cases,
    top_p_reference,
)
from course_lib.check.notebook import read_exercise_notebook

ROOT = Path(__file__).resolve().parent.parent


# --- the solutions, as the notebook writes them --------------------------------------------------------------------


def temperature_softmax(logits, temperature):
    if temperature == 0:
        probabilities = np.zeros(logits.shape)
        probabilities[np.argmax(logits)] = 1.0
        return probabilities
    scaled = logits / temperature
    exponentials = np.exp(scaled - scaled.max())
    return exponentials / exponentials.sum()


def top_p_filter(probabilities, p):
    order = np.argsort(-probabilities)
    ranked = probabilities[order]
    before = np.cumsum(ranked) - ranked
    kept = order[before < p]
    filtered = np.zeros_like(probabilities)
    filtered[kept] = probabilities[kept]
    return filtered / filtered.sum()


def token_logprobs(logits, tokens):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_sums = np.log(np.exp(shifted).sum(axis=-1))
    return shifted[np.arange(len(tokens)), tokens] - log_sums


def test_the_solutions_pass(capsys):
    check_temperature_softmax(temperature_softmax, exercise="00b.1")
    check_top_p_filter(top_p_filter, exercise="00b.2")
    check_token_logprobs(token_logprobs, exercise="00b.3")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("PASSED temperature_softmax: 4 random cases (temperatures 0 to 2.5, logits near 1000")
    assert lines[1].startswith("PASSED top_p_filter: 4 random cases (a nucleus of one token included, seed ")
    assert lines[2].startswith("PASSED token_logprobs: 4 random cases (logits near 1000, mixed scales and a token")


def test_other_right_solutions_pass():
    def shifted_first(logits, temperature):
        if temperature == 0:
            return (np.arange(logits.size) == np.argmax(logits)).astype(int)  # one-hot as integers is fine
        weights = np.exp((logits - logits.max()) / temperature)
        return list(weights / weights.sum())

    def with_searchsorted(probabilities, p):
        order = np.argsort(-probabilities, kind="stable")
        count = int(np.searchsorted(np.cumsum(probabilities[order]), p)) + 1
        filtered = np.zeros_like(probabilities)
        filtered[order[:count]] = probabilities[order[:count]]
        return filtered / filtered.sum()

    def row_by_row_in_float64(logits, tokens):
        out = []
        for row, token in zip(logits.astype(np.float64), tokens, strict=True):
            largest = row.max()
            out.append(row[token] - largest - np.log(np.sum(np.exp(row - largest))))
        return out

    check_temperature_softmax(shifted_first)
    check_top_p_filter(with_searchsorted)
    check_token_logprobs(row_by_row_in_float64)


# --- 00b.1 temperature_softmax ---------------------------------------------------------------------------------------


def softmax_of(z):
    exponentials = np.exp(z - z.max())
    return exponentials / exponentials.sum()


def greedy_then(wrong):
    """A learner who gets temperature 0 right, and the rest wrong the way ``wrong(logits, temperature)`` does."""
    return lambda logits, t: temperature_softmax(logits, 0) if t == 0 else wrong(logits, t)


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (greedy_then(lambda x, t: softmax_of(x) / t), "dividing the probabilities afterwards"),
        (greedy_then(lambda x, t: softmax_of(x * t)), "multiplied by the temperature"),
        (greedy_then(lambda x, t: softmax_of(x)), "the temperature was left out"),
        (greedy_then(lambda x, t: np.exp(x / t - (x / t).max())), "divide the exponentials by their sum"),
        (greedy_then(lambda x, t: np.exp(x / t) / np.exp(x / t).sum()), "exp(logit) overflows"),
        (greedy_then(lambda x, t: softmax_of(x / t).astype(np.float32)), "compute in float64"),
        (lambda x, t: softmax_of(x / t), "dividing by 0 gives inf and NaN"),
        (lambda x, t: softmax_of(x / (t or 1.0)), "not the softmax of the logits"),
        (lambda x, t: int(np.argmax(x)) if t == 0 else softmax_of(x / t), "a single number"),
        (lambda x, t: softmax_of(x * (1 / t)), "do not divide by it"),
    ],
    ids=["divided-after", "multiplied", "no-temperature", "not-normalised", "no-max", "float32", "divide-by-zero",
         "greedy-as-softmax", "greedy-index", "zero-division-error"],
)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the mistakes overflow, divide by 0
def test_temperature_softmax_rejects_known_mistakes(seed, wrong, hint):
    message = rejected_with(check_temperature_softmax, wrong)
    assert hint in message and "temperature" in message


# --- 00b.2 top_p_filter ----------------------------------------------------------------------------------------------


def nucleus_with(*, order="descending", extra=0, normalise="sum", scatter=True):
    """The solution with one part done the way a known mistake does it."""

    def wrong(probabilities, p):
        ranked = {"descending": np.argsort(-probabilities), "ascending": np.argsort(probabilities),
                  "none": np.arange(probabilities.size)}[order]
        count = int(np.searchsorted(np.cumsum(probabilities[ranked]), p)) + 1 + extra
        filtered = np.zeros_like(probabilities)
        filtered[ranked[:count]] = probabilities[ranked[:count]]
        filtered = {"sum": filtered / filtered.sum(), "p": filtered / p, "none": filtered}[normalise]
        return filtered if scatter else filtered[np.argsort(-probabilities)]

    return wrong


def strictly_below(probabilities, p):
    order = np.argsort(-probabilities)
    kept = order[np.cumsum(probabilities[order]) < p]
    filtered = np.zeros_like(probabilities)
    filtered[kept] = probabilities[kept]
    return filtered / filtered.sum()


def own_probability_reaches_p(probabilities, p):
    filtered = np.where(probabilities >= p, probabilities, 0.0)
    return filtered / filtered.sum()


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (strictly_below, "one token too few"),
        (nucleus_with(extra=1), "one token too many"),
        (nucleus_with(normalise="none"), "were not renormalised"),
        (nucleus_with(normalise="p"), "divided by p"),
        (nucleus_with(order="ascending"), "LEAST likely tokens"),
        (nucleus_with(order="none"), "token-id order"),
        (nucleus_with(scatter=False), "in sorted order"),
        (own_probability_reaches_p, "no token was kept"),
    ],
    ids=["strict", "one-too-many", "not-renormalised", "divided-by-p", "ascending", "unsorted", "sorted-result",
         "empty"],
)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the mistakes overflow, divide by 0
def test_top_p_filter_rejects_known_mistakes(seed, wrong, hint):
    message = rejected_with(check_top_p_filter, wrong)
    assert hint in message and "p = " in message


def test_strictly_below_p_is_empty_on_a_nucleus_of_one(rng):
    """The case that shows why the token reaching p is kept: below the top probability nothing else would be."""
    [*_, (logits, probabilities, p), _] = top_p_cases(rng)
    assert np.count_nonzero(top_p_reference(logits, p)) == 1 and p < probabilities.max()
    with np.errstate(invalid="ignore"):
        assert not np.isfinite(strictly_below(probabilities, p)).all()


# --- 00b.3 token_logprobs -------------------------------------------------------------------------------------------


def log_softmax_rows(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def picked(values, tokens):
    return values[np.arange(len(tokens)), tokens]


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (lambda z, t: picked(z - np.log(np.exp(z).sum(axis=-1, keepdims=True)), t), "exp(logit) overflows"),
        (lambda z, t: picked(z - z.max() - np.log(np.exp(z - z.max()).sum(axis=-1, keepdims=True)), t),
         "subtract each row's OWN max"),
        (lambda z, t: np.log(picked(np.exp(log_softmax_rows(z)), t)), "log(softmax) gives log(0)"),
        (lambda z, t: np.exp(picked(log_softmax_rows(z), t)), "these are probabilities"),
        (lambda z, t: picked(z - z.max(axis=-1, keepdims=True), t), "only the logit minus the row's max"),
        (lambda z, t: picked(z, t) - np.log(np.exp(z - z.max(axis=-1, keepdims=True)).sum(axis=-1)),
         "not from the logit itself"),
        (lambda z, t: log_softmax_rows(z).max(axis=-1), "each row's likeliest token"),
        (lambda z, t: picked(z - z.max(axis=-1, keepdims=True), t) - np.log(np.exp(z - z.max(axis=-1,
                                                                                           keepdims=True)).sum()),
         "summed over the whole batch"),
        (lambda z, t: log_softmax_rows(z)[:, t], "picks every token in every row"),
        (lambda z, t: log_softmax_rows(z), "the log-probabilities of every token"),
        (lambda z, t: log_softmax_rows(z)[t], "tokens[i] is a column of row i"),
    ],
    ids=["no-max", "global-max", "log-of-softmax", "probabilities", "no-log-sum", "max-not-subtracted", "likeliest",
         "batch-sum", "every-token-every-row", "whole-log-softmax", "tokens-as-rows"],
)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the mistakes overflow, divide by 0
def test_token_logprobs_rejects_known_mistakes(seed, wrong, hint):
    message = rejected_with(check_token_logprobs, wrong)
    assert hint in message and "rows of" in message


# --- unwritten exercises, and the notebook's numbers -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("check", "name", "number"),
    [(check_temperature_softmax, "temperature_softmax", "00b.1"), (check_top_p_filter, "top_p_filter", "00b.2"),
     (check_token_logprobs, "token_logprobs", "00b.3")],
)
def test_an_unwritten_exercise_fails_with_its_one_line(check, name, number):
    def stub(first, second):
        raise NotImplementedError(f"Exercise: write {name}; see the text above")

    stub.__name__ = name
    message = unwritten(lambda learner: check(learner, exercise=number), stub)
    assert message.startswith(f"Exercise {number}: {name} is not written yet")


def test_a_wrong_signature_is_named():
    assert "calls it as top_p_filter(probabilities, p)" in rejected_with(check_top_p_filter, lambda probabilities: 0)


def test_the_notebook_numbers_its_exercises_00b():
    for folder in ("solutions", "exercises"):
        layout = read_exercise_notebook(ROOT / folder / "00b_chat_with_smollm2.ipynb")
        assert [(e.number, e.name) for e in layout.exercises] == [
            ("00b.1", "temperature_softmax"), ("00b.2", "top_p_filter"), ("00b.3", "token_logprobs")]
        assert layout.exercise("00b.2").task == 2


# --- the references and the cases ----------------------------------------------------------------------------------


def test_the_softmax_cases_cover_greedy_and_overflow(rng):
    cases = softmax_cases(rng)
    temperatures = [t for _, t, _ in cases]
    assert temperatures[0] < 1 < temperatures[1] and temperatures[2] == 0
    logits, t, large = cases[3]
    assert large and logits.size == SMOLLM2_VOCAB and (logits / t).max() > 710  # past float64's exp
    for logits, t, _ in cases:
        reference = temperature_reference(logits, t)
        assert reference.dtype == np.float64 and np.isclose(reference.sum(), 1.0)
        assert int(np.argmax(reference)) == int(np.argmax(logits))
    assert temperature_reference(cases[2][0], 0.0).max() == 1.0


def test_the_top_p_cases_sit_well_inside_a_nucleus(rng):
    for _ in range(10):
        for logits, probabilities, p in top_p_cases(rng):
            reference = top_p_reference(logits, p)
            ranked = np.sort(probabilities)[::-1]
            count = np.count_nonzero(reference)
            cumulative = np.cumsum(ranked)
            below = cumulative[count - 2] if count > 1 else 0.0
            assert below + 1e-7 < p < cumulative[count - 1] - 1e-7  # the last kept token carries the total past p
            assert np.allclose(reference[reference > 0], probabilities[reference > 0] / cumulative[count - 1])
            assert np.isclose(reference.sum(), 1.0)


def test_the_engines_float32_log_softmax_agrees_with_float64(rng):
    """The reference of 00b.3 is the engine's float32 log_softmax: within 2e-6 of a float64 log-sum-exp."""
    for kind in LOGPROB_KINDS:
        logits, tokens, _ = logprob_case(rng, kind)
        exact = picked(log_softmax_rows(logits.astype(np.float64)), tokens)
        reference = token_logprobs_reference(logits, tokens)
        assert reference.dtype == np.float32 and np.isfinite(reference).all()
        assert np.linalg.norm(reference - exact) <= 2e-6 * np.linalg.norm(exact)
        assert tokens[0] == np.argmax(logits[0])
    logits, tokens, _ = logprob_case(rng, "unlikely")
    assert (token_logprobs_reference(logits, tokens) < -790).sum() == 1
