"""How much KV-cache memory holds no token: contiguous pre-allocation against paging, on a synthetic mix.

Before paging, a server gave each request one contiguous slab of KV cache big enough for the longest
context it might reach (``max_context`` slots), because it could not know in advance where the answer
would stop. Paging hands out blocks of ``block_size`` slots as the sequence grows, so the only slots
that hold no token are the unused tail of each request's last block: fewer than one block a request.

The model looks at every request at its final length (prompt plus output), the moment the contiguous
slab is best used. Earlier in a request's life the slab is emptier still, so the contiguous figure
here is a lower bound on its waste.

The synthetic mix. Lengths of prompts and answers are skewed: many short ones, a long tail. The
model draws both from log-normal distributions with a given mean, rounds them to whole tokens (at
least 1) and caps them so that prompt + output fits ``max_context``:

* prompts: log-normal, mean 500 tokens, sigma 1.0 (median about 300), capped at ``max_context - 1``;
* outputs: log-normal, mean 250 tokens, sigma 0.8 (median about 180), capped at what the context has left;
* ``max_context`` 4096 tokens.

These defaults are a plausible chat workload, not a measured trace; change them to see how the
figures move. Every draw comes from ``numpy.random.default_rng(seed)``: the same seed, the same mix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MEAN_PROMPT = 500
SIGMA_PROMPT = 1.0
MEAN_OUTPUT = 250
SIGMA_OUTPUT = 0.8
MAX_CONTEXT = 4096


@dataclass(frozen=True)
class RequestMix:
    """Prompt and output lengths of ``n`` requests, each fitting ``max_context`` tokens."""

    prompt_lens: np.ndarray  # int64 [n], >= 1
    output_lens: np.ndarray  # int64 [n], >= 1
    max_context: int

    @property
    def context_lens(self) -> np.ndarray:
        """Tokens each request holds in the KV cache when it finishes: prompt plus output."""
        return self.prompt_lens + self.output_lens


def lognormal_lengths(rng: np.random.Generator, n: int, mean: float, sigma: float, cap: np.ndarray | int) -> np.ndarray:
    """``n`` whole token counts, log-normal with the given ``mean`` (before capping), in ``[1, cap]``.

    A log-normal with parameters (mu, sigma) has mean ``exp(mu + sigma**2 / 2)``, so mu is chosen as
    ``log(mean) - sigma**2 / 2``; the cap and the rounding move the mean of the result a little.
    """
    if mean <= 0 or sigma < 0:
        raise ValueError(f"a length distribution needs mean > 0 and sigma >= 0, got mean={mean}, sigma={sigma}")
    mu = math.log(mean) - sigma**2 / 2
    lengths = np.rint(rng.lognormal(mu, sigma, size=n)).astype(np.int64)
    return np.clip(lengths, 1, cap)


def request_mix(
    n: int, seed: int, *, mean_prompt: float = MEAN_PROMPT, sigma_prompt: float = SIGMA_PROMPT,
    mean_output: float = MEAN_OUTPUT, sigma_output: float = SIGMA_OUTPUT, max_context: int = MAX_CONTEXT,
) -> RequestMix:
    """``n`` requests with log-normal prompt and output lengths, capped so each fits ``max_context`` tokens."""
    if n < 1:
        raise ValueError(f"a mix needs at least one request, got n={n}")
    if max_context < 2:
        raise ValueError(f"max_context must leave room for a prompt token and an output token, got {max_context}")
    rng = np.random.default_rng(seed)
    prompt_lens = lognormal_lengths(rng, n, mean_prompt, sigma_prompt, cap=max_context - 1)
    output_lens = lognormal_lengths(rng, n, mean_output, sigma_output, cap=max_context - prompt_lens)
    return RequestMix(prompt_lens, output_lens, max_context)


def _checked_lengths(context_lens: np.ndarray) -> np.ndarray:
    lengths = np.asarray(context_lens)
    if lengths.ndim != 1 or lengths.size == 0 or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"context_lens must be a non-empty 1-D array of integers, got {lengths!r}")
    if lengths.min() < 1:
        raise ValueError(f"every context holds at least one token, got {lengths.min()}")
    return lengths.astype(np.int64)


def contiguous_waste(context_lens: np.ndarray, max_context: int) -> float:
    """The fraction of reserved slots that hold no token when every request reserves ``max_context`` slots."""
    lengths = _checked_lengths(context_lens)
    if lengths.max() > max_context:
        raise ValueError(f"a context of {lengths.max()} tokens does not fit the {max_context} slots reserved for it")
    return float(1 - lengths.sum() / (lengths.size * max_context))


def paged_slots(context_lens: np.ndarray, block_size: int) -> np.ndarray:
    """Slots each request holds with paging: whole blocks, ``ceil(context_len / block_size) * block_size``."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return -(-_checked_lengths(context_lens) // block_size) * block_size


def paged_waste(context_lens: np.ndarray, block_size: int) -> float:
    """The fraction of reserved slots that hold no token with paging: the unused tail of each last block."""
    slots = paged_slots(context_lens, block_size)
    return float(1 - np.sum(context_lens) / slots.sum())
