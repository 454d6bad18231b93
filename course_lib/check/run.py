"""One run of a checker: a fresh seed, the case being tried, and the verdict line.

Every run draws new random inputs, so passing never rests on one lucky input; the seed goes into the
pass line and into every failure so that a failure can be replayed with COURSE_CHECK_SEED.
"""

from __future__ import annotations

import os
import secrets
from types import TracebackType

import numpy as np

from course_lib import backend
from course_lib.check.failure import CheckFailed, NotWrittenYet

SEED_VARIABLE = "COURSE_CHECK_SEED"


def new_seed() -> int:
    """A random seed from ``secrets``, or the one in COURSE_CHECK_SEED when a failure is being replayed."""
    chosen = os.environ.get(SEED_VARIABLE, "").strip()
    if not chosen:
        return secrets.randbelow(1_000_000)
    try:
        return int(chosen)
    except ValueError:
        raise ValueError(f"{SEED_VARIABLE} must be a whole number, got {chosen!r}") from None


def mode_phrase() -> str:
    """Where the learner's kernels ran: 'in GPU mode (NVIDIA H100 ...)' or 'in CPU mode (...)'."""
    if backend.has_gpu():
        devices = backend.DECISION.probe.devices
        return f"in GPU mode ({devices[0]['name']})" if devices else "in GPU mode"
    return "in CPU mode (Numba CUDA simulator)"


class CheckRun:
    """The context of one checker call; a CheckFailed leaving it gets the case and the seed appended.

    >>> with CheckRun("vector_add") as run:
    ...     n = int(run.rng.integers(1, 100))
    ...     run.case = f"n = {n}"
    ...     ...  # call the learner's code, compare
    ...     run.passed(cases=1)
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.seed = new_seed()
        self.rng = np.random.default_rng(self.seed)
        self.case: str | None = None  # what is being tried now, for the failure message

    def __enter__(self) -> CheckRun:
        return self

    def __exit__(
        self, error_type: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        __tracebackhide__ = True
        if isinstance(error, CheckFailed) and not isinstance(error, NotWrittenYet):  # a stub is the same on any seed
            case = f"case {self.case}; " if self.case else ""
            raise CheckFailed(f"{error}\n({case}seed {self.seed}: rerun with {SEED_VARIABLE}={self.seed})") from None

    def passed(self, cases: int, detail: str = "", show_mode: bool = False) -> None:
        """Print the pass line, e.g. 'PASSED vector_add: 4 random cases (n up to 1900, seed 123456)'."""
        inside = f"{detail}, seed {self.seed}" if detail else f"seed {self.seed}"
        line = f"PASSED {self.name}: {cases} random cases ({inside})"
        print(f"{line} {mode_phrase()}" if show_mode else line)
