"""Which exercise a check belongs to, so that a failure can be found in the notebook.

pytest's nbval numbers a notebook's code cells ("Cell 6"), a number JupyterLab shows nowhere. So each
check cell passes its exercise's number, ``check_slot_mapping(slot_mapping, exercise="04.1")``, and every
failure starts with "Exercise 04.1: slot_mapping", the words of the task's heading and of the check cell's
first line.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from typing import Any

from course_lib.check.failure import CheckFailed, NotWrittenYet

EXERCISE_NUMBER = re.compile(r"\d{2}[a-z]?\.\d+")  # "04.1" or "00b.1": the chapter, a dot, the task in its notebook
Checker = Callable[[Any], None]  # check_x(learner's function): raises CheckFailed or prints a pass


def exercise_title(number: str, name: str) -> str:
    """'Exercise 04.1: slot_mapping': how a heading, a check cell and a message name one exercise."""
    return f"Exercise {number}: {name}"


def _learner_name(learner: Any, checker: Checker) -> str:
    """The learner's function's own name; the checked name (``check_`` dropped) for anything nameless."""
    name = getattr(learner, "__name__", None)
    return name if isinstance(name, str) else checker.__name__.removeprefix("check_")


def checks_an_exercise(checker: Checker) -> Checker:
    """Give ``checker(learner)`` the keyword ``exercise="04.1"``, which names the exercise in its failures.

    A stub still unwritten fails with the one line "Exercise 04.1: slot_mapping is not written yet: ...";
    any other failure starts with "Exercise 04.1: slot_mapping failed: " and goes on with the checker's message.
    """

    @functools.wraps(checker)
    def check(learner: Any, *, exercise: str | None = None) -> None:
        __tracebackhide__ = True
        if exercise is None:
            return checker(learner)
        if not isinstance(exercise, str) or not EXERCISE_NUMBER.fullmatch(exercise):
            raise ValueError(f'exercise must be a number such as "04.1" (chapter.task), got {exercise!r}')
        title = exercise_title(exercise, _learner_name(learner, checker))
        try:
            return checker(learner)
        except NotWrittenYet:
            raise NotWrittenYet(title) from None
        except CheckFailed as failure:
            raise CheckFailed(f"{title} failed: {failure}") from None

    signature = inspect.signature(checker)
    named = inspect.Parameter("exercise", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="str | None")
    check.__signature__ = signature.replace(parameters=[*signature.parameters.values(), named])
    return check
