"""Random inputs for checkers: fresh every call, and never zero."""

from __future__ import annotations

import numpy as np


def nonzero_float32(rng: np.random.Generator, size: int) -> np.ndarray:
    """Values in ±[0.5, 2): never zero, so a skipped term or a wrong sign always shows."""
    signs = rng.choice(np.array([-1.0, 1.0]), size)
    return (signs * rng.uniform(0.5, 2.0, size)).astype(np.float32)


def size_past(rng: np.random.Generator, low: int, high: int, block: int) -> int:
    """A size in [low, high) that is not a multiple of ``block``: some block is left partly idle."""
    size = int(rng.integers(low, high))
    return size + 1 if size % block == 0 else size
