"""Sampling: greedy, temperature, top-k, top-p, per-request seeds, and the parameter checks."""

import numpy as np
import pytest

from course_lib import backend
from course_lib.engine.sampling import SamplingParams, greedy_tokens, sample, sampling_probabilities

GREEDY = SamplingParams(temperature=0)


def random_logits(batch: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(scale=3.0, size=(batch, vocab))


def sample_rows(logits: np.ndarray, params: SamplingParams, seed: int = 0) -> np.ndarray:
    """Every row of ``logits`` with the same params, each with its own seeded generator."""
    generators = [np.random.default_rng([seed, row]) for row in range(len(logits))]
    return sample(logits, [params] * len(logits), generators)


# --- the filters that make sampling greedy ----------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [GREEDY, SamplingParams(top_k=1), SamplingParams(temperature=2.0, top_p=1e-6)],
    ids=["temperature 0", "top_k 1", "top_p tiny"],
)
def test_these_params_pick_the_argmax(params):
    logits = random_logits(batch=64, vocab=50)
    np.testing.assert_array_equal(sample_rows(logits, params), logits.argmax(axis=1))


def test_greedy_draws_no_random_number():
    generator = np.random.default_rng(7)
    sample(random_logits(1, 10), [GREEDY], [generator])
    assert generator.random() == np.random.default_rng(7).random()


# --- the distribution a row is drawn from ------------------------------------------------------------


def test_temperature_divides_the_logits():
    logits = np.array([1.0, 2.0, 4.0])
    expected = np.exp(logits / 0.5) / np.exp(logits / 0.5).sum()
    np.testing.assert_allclose(sampling_probabilities(logits, SamplingParams(temperature=0.5)), expected)


def test_top_k_keeps_the_k_most_likely_tokens_and_renormalises():
    probabilities = np.array([0.1, 0.4, 0.2, 0.3])
    kept = sampling_probabilities(np.log(probabilities), SamplingParams(top_k=2))
    np.testing.assert_allclose(kept, [0, 4 / 7, 0, 3 / 7])


@pytest.mark.parametrize(("top_p", "num_kept"), [(0.45, 1), (0.75, 2), (0.85, 3), (1.0, 4)])
def test_top_p_keeps_the_smallest_set_that_reaches_p(top_p, num_kept):
    probabilities = np.array([0.05, 0.5, 0.15, 0.3])  # ranked: token 1, 3, 2, 0
    kept = sampling_probabilities(np.log(probabilities), SamplingParams(top_p=top_p))
    ranked = [1, 3, 2, 0]
    assert np.count_nonzero(kept) == num_kept
    np.testing.assert_allclose(
        kept[ranked[:num_kept]], probabilities[ranked[:num_kept]] / probabilities[ranked[:num_kept]].sum()
    )


def test_top_p_applies_to_what_top_k_kept():
    probabilities = np.array([0.4, 0.3, 0.2, 0.1])
    kept = sampling_probabilities(np.log(probabilities), SamplingParams(top_k=2, top_p=0.5))
    np.testing.assert_allclose(kept, [1, 0, 0, 0])  # 0.4 / 0.7 reaches 0.5 on its own


def test_ties_keep_the_lower_token_id():
    logits = np.zeros(6)
    np.testing.assert_allclose(sampling_probabilities(logits, SamplingParams(top_k=2)), [0.5, 0.5, 0, 0, 0, 0])
    np.testing.assert_allclose(sampling_probabilities(logits, SamplingParams(top_p=0.3)), [0.5, 0.5, 0, 0, 0, 0])


def test_masked_tokens_are_never_drawn():
    logits = np.array([[0.0, -np.inf, 1.0, -np.inf]] * 500)
    assert set(sample_rows(logits, SamplingParams())) <= {0, 2}


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=0.6),
        SamplingParams(top_k=3),
        SamplingParams(top_p=0.7, temperature=1.5),
    ],
    ids=["plain", "temperature", "top_k", "top_p"],
)
def test_draws_follow_the_renormalised_probabilities(params):
    row = np.array([1.0, 0.5, 0.0, -0.5, -1.0, 0.8])
    draws = sample_rows(np.tile(row, (20_000, 1)), params, seed=3)
    frequencies = np.bincount(draws, minlength=len(row)) / len(draws)
    expected = sampling_probabilities(row, params)
    np.testing.assert_allclose(frequencies, expected, atol=0.015)
    assert not frequencies[expected == 0].any()


# --- seeds -----------------------------------------------------------------------------------------


def draw_sequence(rows: list[tuple[np.ndarray, SamplingParams]], steps: int) -> list[list[int]]:
    """Sample ``steps`` times from fixed rows, one generator per row seeded by its params: row i's tokens."""
    generators = [np.random.default_rng(params.seed) for _, params in rows]
    logits = np.stack([row for row, _ in rows])
    drawn = [sample(logits, [params for _, params in rows], generators) for _ in range(steps)]
    return np.array(drawn).T.tolist()


def test_a_seeded_request_draws_the_same_tokens_alone_or_in_a_batch():
    logits = random_logits(batch=4, vocab=30, seed=1)
    seeded = (logits[0], SamplingParams(seed=1234, top_p=0.9))
    others = [(logits[1], SamplingParams(seed=5)), (logits[2], GREEDY), (logits[3], SamplingParams(top_k=4))]
    alone = draw_sequence([seeded], steps=40)[0]
    assert draw_sequence([*others[:2], seeded, others[2]], steps=40)[2] == alone
    assert draw_sequence([seeded, *others], steps=40)[0] == alone
    assert len(set(alone)) > 1  # really sampled, not greedy


def test_different_seeds_draw_different_tokens():
    row = np.zeros(1000)
    first, second = draw_sequence([(row, SamplingParams(seed=1)), (row, SamplingParams(seed=2))], steps=20)
    assert first != second


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"max_tokens": -3}, "max_tokens must be >= 1"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"seed": -1}, "seed"),
        ({"stop_token_ids": [3, -2]}, "token ids are >= 0"),
    ],
)
def test_bad_sampling_params_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_stop_token_ids_are_stored_as_a_tuple():
    params = SamplingParams(stop_token_ids=[3, np.int64(4)])
    assert params.stop_token_ids == (3, 4)
    assert hash(params)  # frozen and hashable, lists and all


@pytest.mark.parametrize(
    ("logits", "num_rows", "message"),
    [
        (np.zeros(5), 1, r"\[batch, vocab\]"),
        (np.zeros((2, 5)), 1, "one SamplingParams and one generator per row"),
        (np.array([[0.0, np.nan]]), 1, "finite"),
        (np.array([[-np.inf, -np.inf]]), 1, "at least one finite"),
    ],
)
def test_sample_rejects_bad_inputs(logits, num_rows, message):
    with pytest.raises(ValueError, match=message):
        sample(logits, [SamplingParams()] * num_rows, [np.random.default_rng(0)] * num_rows)


def test_greedy_tokens_on_the_device_equal_greedy_sampling_on_the_host():
    rng = np.random.default_rng()
    logits = rng.standard_normal((6, 50)).astype(np.float32)
    logits[2, [7, 30]] = logits[2].max() + 1  # a tie: the lower token id wins in both
    logits[4, :10] = -np.inf  # masked tokens are never the arg-max
    expected = sample(logits, [SamplingParams(temperature=0.0)] * 6, [np.random.default_rng()] * 6)
    assert np.array_equal(greedy_tokens(backend.xp.asarray(logits)), expected) and expected[2] == 7


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_greedy_tokens_refuse_nan_and_inf(bad):
    logits = np.zeros((2, 5), dtype=np.float32)
    logits[1, 3] = bad
    with pytest.raises(ValueError, match="must be finite"):
        greedy_tokens(backend.xp.asarray(logits))
    with pytest.raises(ValueError, match="must be finite"):
        greedy_tokens(backend.xp.asarray(np.full((2, 5), -np.inf, dtype=np.float32)))
