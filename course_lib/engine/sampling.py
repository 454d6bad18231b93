"""Turning a row of logits into the next token: greedy, temperature, top-k and top-p (nucleus) sampling.

The model gives one row of logits per sequence that samples this step. Each row is sampled on its own,
with the request's own ``numpy.random.Generator``: a request with a seed draws the same tokens whether
it runs alone or in a batch with others, because no other request ever touches its random stream.
The order of the filters is vLLM's: divide by the temperature, keep the top-k tokens, then keep the
nucleus, the smallest set of most likely tokens whose probability reaches ``top_p``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from course_lib import backend


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops; ``temperature=0`` means greedy.

    ``top_k=0`` and ``top_p=1.0`` switch those filters off. ``seed=None`` draws from fresh entropy.
    ``stop_token_ids`` end the request when sampled; the model's end-of-sequence token does too,
    unless ``ignore_eos`` is set (benchmarks use it to generate exactly ``max_tokens`` tokens).
    ``logprobs=k`` returns, for every generated token, the log-probabilities of the k likeliest tokens and of
    the one sampled; ``prompt_logprobs=k`` the same for every prompt token after the first (as vLLM does;
    ``None`` returns none). They describe the model's distribution, before temperature, top-k or top-p.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_tokens: int = 16
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature}")
        if operator.index(self.top_k) < 0:
            raise ValueError(f"top_k must be >= 0 (0 switches it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 switches it off), got {self.top_p}")
        if operator.index(self.max_tokens) <= 0:
            raise ValueError(f"max_tokens must be >= 1: a request generates at least one token, got {self.max_tokens}")
        if self.seed is not None and operator.index(self.seed) < 0:
            raise ValueError(f"seed must be None or an integer >= 0, got {self.seed}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or operator.index(value) < 0):
                raise ValueError(f"{name} must be None or an integer >= 0 (how many likeliest tokens), got {value!r}")
        object.__setattr__(self, "stop_token_ids", _token_ids(self.stop_token_ids))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


def sampling_probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution one row is drawn from, over the whole vocabulary (zeros where filtered out).

    Tokens are ranked by probability, ties broken by the lower token id, so top-k and top-p keep the
    same tokens on every run. Greedy gives all the probability to the arg-max.
    """
    if params.is_greedy:
        probabilities = np.zeros(logits.shape[-1])
        probabilities[np.argmax(logits)] = 1.0
        return probabilities
    probabilities = _softmax(np.asarray(logits, dtype=np.float64) / params.temperature)
    ranked = np.argsort(-probabilities, kind="stable")  # most likely first; ties: lower token id first
    kept = ranked[: _num_kept(probabilities[ranked], params)]
    filtered = np.zeros_like(probabilities)
    filtered[kept] = probabilities[kept]
    return filtered / filtered.sum()


def sample(
    logits: np.ndarray, params: Sequence[SamplingParams], generators: Sequence[np.random.Generator]
) -> np.ndarray:
    """The next token of every row of ``logits`` [batch, vocab]; row i uses ``params[i]`` and ``generators[i]``.

    A greedy row draws no random number; any other row draws exactly one, so a request's stream of
    random numbers depends only on its own tokens.
    """
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be [batch, vocab] with vocab >= 1, got shape {logits.shape}")
    if not len(params) == len(generators) == logits.shape[0]:
        raise ValueError(
            f"one SamplingParams and one generator per row: {logits.shape[0]} rows, "
            f"{len(params)} params, {len(generators)} generators"
        )
    if np.isnan(logits).any() or np.isposinf(logits).any() or np.isneginf(logits).all(axis=1).any():
        raise ValueError("logits must be finite or -inf (a masked token), with at least one finite value per row")
    return np.array(
        [_sample_row(row, p, g) for row, p, g in zip(logits, params, generators, strict=True)], dtype=np.int64
    )


def greedy_tokens(logits: Any) -> np.ndarray:
    """The arg-max of every row of ``logits`` [batch, vocab], computed where the logits are.

    When every row of a step is greedy, an engine needs ``batch`` integers, not the whole logits matrix:
    on a GPU this copies 8 bytes a row to the host instead of the vocabulary's 4 bytes a token. Ties go to
    the lower token id, as in :func:`sample`.
    """
    xp = backend.xp
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be [batch, vocab] with vocab >= 1, got shape {logits.shape}")
    if not bool(xp.isfinite(logits.max(axis=1)).all()):  # a NaN, a +inf, or a row of -inf only
        raise ValueError("logits must be finite or -inf (a masked token), with at least one finite value per row")
    return backend.to_numpy(xp.argmax(logits, axis=1)).astype(np.int64)


def _sample_row(logits: np.ndarray, params: SamplingParams, generator: np.random.Generator) -> int:
    if params.is_greedy:
        return int(np.argmax(logits))
    probabilities = sampling_probabilities(logits, params)
    return int(generator.choice(len(probabilities), p=probabilities))  # one uniform draw, inverse CDF


def _num_kept(ranked_probabilities: np.ndarray, params: SamplingParams) -> int:
    """How many of the most likely tokens survive top-k and then top-p (at least one)."""
    num_kept = min(params.top_k, len(ranked_probabilities)) if params.top_k else len(ranked_probabilities)
    if params.top_p < 1:
        kept = ranked_probabilities[:num_kept]
        cumulative = np.cumsum(kept / kept.sum())
        num_kept = min(int(np.searchsorted(cumulative, params.top_p, side="left")) + 1, num_kept)
    return num_kept


def _softmax(logits: np.ndarray) -> np.ndarray:
    exponentials = np.exp(logits - logits.max())
    return exponentials / exponentials.sum()


def _token_ids(tokens: Iterable[int]) -> tuple[int, ...]:
    token_ids = tuple(operator.index(token) for token in tokens)
    if any(token < 0 for token in token_ids):
        raise ValueError(f"token ids are >= 0, got {token_ids}")
    return token_ids
