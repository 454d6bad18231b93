"""Random inputs for checkers: fresh every call, and never zero."""

from __future__ import annotations

import numpy as np


def nonzero_float32(rng: np.random.Generator, size: int) -> np.ndarray:
    """Values in ±[0.5, 2): never zero, so a skipped term or a wrong sign always shows."""
    signs = rng.choice(np.array([-1.0, 1.0]), size)
    return (signs * rng.uniform(0.5, 2.0, size)).astype(np.float32)
