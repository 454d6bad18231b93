"""Log-probabilities as vLLM returns them: for each token, the k likeliest tokens' and the chosen one's.

A row of logits becomes log-probabilities through ``log_softmax``: ``x - max(x) - log(sum(exp(x - max(x))))``.
Subtracting the maximum first keeps ``exp`` from overflowing (a logit of 100 is common; ``exp(100)`` is
not a float32); the result is the same function. It is computed in float32 from the float32 logits, as
vLLM does, so values agree with a float64 reference to about 1e-6 of the row's largest magnitude.

Each token then gets a dict ``{token_id: logprob}`` holding the ``k`` likeliest ids of its row (ties: the
lower id first) and the token that was actually chosen, which may or may not be among them. The chosen token
is the one sampled (``logprobs``) or the prompt's next token (``prompt_logprobs``, which scores how likely
the model found the prompt itself, one position at a time).
"""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities of ``logits`` [rows, vocab], in float32."""
    values = np.asarray(logits, dtype=np.float32)
    shifted = values - values.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True, dtype=np.float32))


def top_logprobs(logits: np.ndarray, chosen: np.ndarray, k: int) -> list[dict[int, float]]:
    """For each row: ``{token_id: logprob}`` of its ``k`` likeliest tokens and of ``chosen[row]``.

    The dicts are ordered as vLLM's: likeliest first, then the chosen token if it is not among them.
    """
    logprobs = log_softmax(logits)
    chosen = np.asarray(chosen, dtype=np.int64)
    if logprobs.ndim != 2 or chosen.shape != (logprobs.shape[0],):
        raise ValueError(f"need logits [rows, vocab] and one chosen token per row, got {logprobs.shape} and "
                         f"{chosen.shape}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    outside = np.flatnonzero((chosen < 0) | (chosen >= logprobs.shape[1]))
    if outside.size:
        raise ValueError(f"chosen[{outside[0]}] = {chosen[outside[0]]} is outside the vocabulary [0, "
                         f"{logprobs.shape[1]})")
    k = min(k, logprobs.shape[1])
    rows = []
    for values, token in zip(logprobs, chosen, strict=True):
        entry = {int(t): float(values[t]) for t in _likeliest(values, k)}
        entry.setdefault(int(token), float(values[token]))
        rows.append(entry)
    return rows


def _likeliest(values: np.ndarray, k: int) -> np.ndarray:
    """The ids of the ``k`` largest ``values``, largest first, ties to the lower id, without sorting all of them.

    ``argpartition`` finds the k-th largest value in linear time; every id at least that large is a candidate
    (more than k where values tie at the boundary), and only the candidates are sorted.
    """
    if k == 0:
        return np.empty(0, dtype=np.int64)
    threshold = values[np.argpartition(-values, k - 1)[k - 1]]
    candidates = np.flatnonzero(values >= threshold)
    return candidates[np.lexsort((candidates, -values[candidates]))][:k]
