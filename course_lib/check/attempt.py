"""Checking one exercise of a notebook outside Jupyter: its set-up cells, then its own cells, then the verdict.

The cells run in this process, in a fresh namespace per exercise, as a fresh kernel would run them: nothing
from another exercise is defined, so an exercise passes here only if the set-up cells import all it needs.
What the cells print is kept, not shown: the verdict is one line (plus the checker's hint when it fails).
"""

from __future__ import annotations

import contextlib
import io
import linecache
from dataclasses import dataclass
from enum import Enum
from typing import Any

from course_lib.check.cuda_source import COMPILED, NOT_CHECKED
from course_lib.check.failure import CheckFailed, NotWrittenYet, describe_learner_error
from course_lib.check.notebook import CodeCell, Exercise, ExerciseNotebook


class Status(Enum):
    PASSED = "passed"
    NOT_CHECKED_HERE = "compiled, not checked here"  # CUDA C on a machine without a GPU
    NOT_WRITTEN = "not written yet"
    FAILED = "failed"
    BROKEN = "could not run"  # an error outside the checker: a typo in the learner's cell, a failing set-up


@dataclass(frozen=True)
class Attempt:
    exercise: Exercise
    status: Status
    message: str  # the checker's message (it names the exercise), or what stopped the cells

    @property
    def done(self) -> bool:
        """As far as this machine can tell, nothing is left to fix."""
        return self.status in (Status.PASSED, Status.NOT_CHECKED_HERE)


def attempt(notebook: ExerciseNotebook, exercise: Exercise) -> Attempt:
    """Run the set-up cells and ``exercise``'s cells in a fresh namespace and judge how they ended."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        try:
            _run(notebook.setup, "set-up", namespace)
        except Exception as error:  # noqa: BLE001 - whatever stops the set-up is reported, not raised
            return Attempt(exercise, Status.BROKEN, describe_learner_error("the set-up cells", error))
        try:
            _run(exercise.cells, f"exercise {exercise.number}", namespace)
        except NotWrittenYet as unwritten:
            return Attempt(exercise, Status.NOT_WRITTEN, str(unwritten))
        except CheckFailed as failure:
            return Attempt(exercise, Status.FAILED, str(failure))
        except Exception as error:  # noqa: BLE001 - the learner's own cells may raise anything
            return Attempt(exercise, Status.BROKEN, describe_learner_error("its cells", error))
    reported = [line for line in printed.getvalue().splitlines() if line.startswith((COMPILED, NOT_CHECKED))]
    if any(line.startswith(NOT_CHECKED) for line in reported):
        return Attempt(exercise, Status.NOT_CHECKED_HERE, "\n".join(reported))
    return Attempt(exercise, Status.PASSED, "")


def _run(cells: tuple[CodeCell, ...], where: str, namespace: dict[str, Any]) -> None:
    """Execute cells in order; a traceback shows 'exercise 04.1 cell 2, line 5' and the line itself."""
    for count, cell in enumerate(cells, start=1):
        filename = f"{where} cell {count}"
        lines = cell.source.splitlines(keepends=True)
        linecache.cache[filename] = (len(cell.source), None, lines, filename)  # no file: mtime None keeps it
        exec(compile(cell.source, filename, "exec"), namespace)  # noqa: S102 - running the notebook is the point
