"""Known mistakes: when an output is wrong in a way seen before, say what usually causes it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from course_lib import backend
from course_lib.check.tolerance import relative_error


@dataclass(frozen=True)
class Mistake:
    """A known wrong answer and the hint that explains it.

    It is recognised in one of two ways:

    * ``wrong_reference``: computes the wrong answer from the same inputs as the right reference; the
      learner's output matching it (within the tolerance) means they made this mistake.
    * ``symptom``: a test ``symptom(out, ref) -> bool`` on the host output and reference, for mistakes
      that show as a pattern rather than as values (elements never written, a factor of 1000).
    """

    name: str
    hint: str
    wrong_reference: Callable[..., Any] | None = None
    symptom: Callable[[np.ndarray, np.ndarray], bool] | None = None

    def __post_init__(self) -> None:
        if (self.wrong_reference is None) == (self.symptom is None):
            raise ValueError(f"Mistake {self.name!r} needs exactly one of wrong_reference or symptom")

    def explains(self, out: np.ndarray, ref: np.ndarray, inputs: Sequence[Any], tolerance: float) -> bool:
        """True when this mistake accounts for ``out``."""
        if self.symptom is not None:
            return bool(self.symptom(out, ref))
        wrong = np.asarray(backend.to_numpy(self.wrong_reference(*inputs)))
        return wrong.shape == out.shape and relative_error(out, wrong) <= tolerance


def hint_for(
    out: np.ndarray, ref: np.ndarray, mistakes: Sequence[Mistake], inputs: Sequence[Any], tolerance: float
) -> str | None:
    """The hint of the first mistake that explains ``out``, or None when none does."""
    for mistake in mistakes:
        if mistake.explains(out, ref, inputs, tolerance):
            return mistake.hint
    return None
