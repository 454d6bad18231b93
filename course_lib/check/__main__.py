"""Check one exercise of a notebook, or list every exercise with its status.

  python -m course_lib.check exercises/04_paged_attention.ipynb --task 2   check exercise 04.2 alone
  python -m course_lib.check exercises/04_paged_attention.ipynb            check each exercise, one line each

It reads the notebook as last saved (save it in JupyterLab first), runs its set-up cells and the chosen
exercise's cells in a fresh namespace, and prints one line: passed, not written yet, or what failed with the
checker's hint. Unlike `pytest --nbval-lax`, the exercises you have not reached yet do not report failures.
The exit status is 0 when the exercises checked pass, 1 when one does not, 2 when the notebook or --task is wrong.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from course_lib.check.attempt import Attempt, Status, attempt
from course_lib.check.notebook import ExerciseNotebook, NotebookLayoutError, read_exercise_notebook


def verdict(result: Attempt) -> str:
    """'Exercise 04.1: slot_mapping passed.'; a failure is the checker's message, which names the exercise."""
    title = result.exercise.title
    if result.status is Status.PASSED:
        return f"{title} passed."
    if result.status is Status.NOT_CHECKED_HERE:
        return f"{title} compiles, but was not checked here:\n{result.message}"
    if result.status is Status.BROKEN:
        return f"{title} could not run: {result.message}"
    return result.message  # NotWrittenYet and CheckFailed start with the title already


def still_to_write(notebook: ExerciseNotebook) -> str:
    """'2 of 3 exercises in this notebook are not written yet: 04.2, 04.3.'"""
    unwritten, total = notebook.not_written(), len(notebook.exercises)
    if not unwritten:
        return f"All {total} exercises in this notebook are written."
    numbers = ", ".join(exercise.number for exercise in unwritten)
    verb = "is" if len(unwritten) == 1 else "are"
    return f"{len(unwritten)} of {total} exercises in this notebook {verb} not written yet: {numbers}."


def check_one(notebook: ExerciseNotebook, task: str) -> int:
    result = attempt(notebook, notebook.exercise(task))
    print(verdict(result))
    print(still_to_write(notebook))
    return 0 if result.done else 1


def check_all(notebook: ExerciseNotebook, shown: str) -> int:
    results = [attempt(notebook, exercise) for exercise in notebook.exercises]
    width = max(len(result.exercise.title) for result in results)
    for result in results:
        first_line = result.message.split("\n", 1)[0].removeprefix(f"{result.exercise.title} failed: ")
        detail = f": {first_line}" if result.status in (Status.FAILED, Status.BROKEN) else ""
        print(f"{result.exercise.title:<{width}}  {result.status.value}{detail}")
    passed = sum(result.done for result in results)
    print(f"{passed} of {len(results)} done. Check one, with its hint: "
          f"python -m course_lib.check {shown} --task N")
    return 0 if passed == len(results) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m course_lib.check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebook", type=Path, help="an exercise notebook, e.g. exercises/04_paged_attention.ipynb")
    parser.add_argument("--task", metavar="N", help="the exercise to check: its place (2) or its number (04.2); "
                        "without it, every exercise is checked and listed")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        notebook = read_exercise_notebook(args.notebook)
        return check_one(notebook, args.task) if args.task else check_all(notebook, str(args.notebook))
    except NotebookLayoutError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
