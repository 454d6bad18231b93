"""Where a loop's wall time goes: time named methods of live objects, each call ended by a device synchronisation.

A serving loop alternates host work (scheduling, sampling, bookkeeping) with GPU work it only launches. A host
clock around a launch measures the launch, so each timed call here waits for the device at its end: the time of a
phase is then its host work plus the GPU work it launched. The waits themselves change the loop (the host can no
longer run ahead of the GPU), so a phase breakdown is a separate run from the timed one, and its total is at least
the loop's undisturbed time.

    with PhaseTimer() as phases:
        phases.wrap(llm.scheduler, "schedule", "scheduling")
        llm.generate(prompts)
    phases.seconds  # {"scheduling": ..., ...}
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from course_lib import backend


class PhaseTimer:
    """Accumulates seconds per phase over every call of the wrapped methods; unwraps them on exit."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._wrapped: list[tuple[Any, str, Any]] = []  # owner, method, what its instance held before (or None)

    def wrap(self, owner: Any, method: str, phase: str) -> None:
        """Time every call of ``owner.method`` as ``phase`` (an instance attribute shadows the class's method)."""
        original: Callable[..., Any] = getattr(owner, method)
        self.seconds.setdefault(phase, 0.0)
        self.calls.setdefault(phase, 0)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                backend.synchronize()
                self.seconds[phase] += time.perf_counter() - start
                self.calls[phase] += 1

        self._wrapped.append((owner, method, vars(owner).get(method)))
        setattr(owner, method, timed)

    def __enter__(self) -> PhaseTimer:
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, method, before in reversed(self._wrapped):
            if before is None:
                delattr(owner, method)  # the class's method shows through again
            else:
                setattr(owner, method, before)
        self._wrapped.clear()
