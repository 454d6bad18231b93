"""An exercise notebook as the check command reads it: set-up cells, then numbered exercises.

Every notebook in solutions/ and exercises/ has this layout (``scripts/exercises.py check`` enforces it):

* the code cells before the first exercise are the set-up: the imports and constants every exercise needs,
  so that any one exercise runs after the set-up alone;
* an exercise starts at a markdown heading ``## Exercise 04.1 · Slot mapping`` (04 is the notebook's own
  number, the two digits its file name starts with, and the letter after them for a chapter such as 00b;
  1, 2, 3 ... in order) and runs to the next heading of level 1 or 2;
* it holds one code cell tagged ``check``, whose first line is ``# Exercise 04.1: slot_mapping`` (the
  function the learner writes) and which passes ``exercise="04.1"`` to its checker, so that a failure
  names the exercise the way its heading does.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from course_lib.check.exercise import exercise_title

CHECK_TAG = "check"
SOLUTION_TAG = "solution"
CHAPTER = r"\d{2}[a-z]?"  # "04", or "00b" for a chapter that follows 00
HEADING = re.compile(rf"## Exercise (?P<number>{CHAPTER}\.\d+) · (?P<heading>\S.*)")
CHECK_COMMENT = re.compile(rf"# Exercise (?P<number>{CHAPTER}\.\d+): (?P<name>[A-Za-z_]\w*)")
SECTION_END = re.compile(r"#{1,2} ")  # a heading of level 1 or 2 ends an exercise
STUB = re.compile(r"\braise NotImplementedError\b")  # what scripts/exercises.py leaves in a solution cell


class NotebookLayoutError(Exception):
    """A notebook that does not follow the exercise layout; the message says where and how to fix it."""


@dataclass(frozen=True)
class CodeCell:
    index: int  # among all the notebook's cells, markdown included, from 0
    source: str
    tags: tuple[str, ...]


@dataclass(frozen=True)
class Exercise:
    number: str  # "04.1"
    name: str  # "slot_mapping", as the check cell's first line names it
    cells: tuple[CodeCell, ...]  # every code cell under the heading, the check cell among them

    @property
    def title(self) -> str:
        return exercise_title(self.number, self.name)

    @property
    def task(self) -> int:
        """1 for exercise 04.1: its place in the notebook."""
        return int(self.number.split(".")[1])

    def is_written(self) -> bool:
        """False while a cell the learner fills in still holds the generated `raise NotImplementedError`."""
        return not any(SOLUTION_TAG in cell.tags and STUB.search(cell.source) for cell in self.cells)


@dataclass(frozen=True)
class ExerciseNotebook:
    path: Path
    setup: tuple[CodeCell, ...]
    exercises: tuple[Exercise, ...]

    def exercise(self, task: str) -> Exercise:
        """The exercise that ``--task`` names: its place ("2") or its number ("04.2")."""
        for exercise in self.exercises:
            if task.strip() in (str(exercise.task), exercise.number):
                return exercise
        listed = ", ".join(f"{exercise.task} ({exercise.title})" for exercise in self.exercises)
        raise NotebookLayoutError(f"{self.path} has no exercise {task!r}; choose --task {listed}")

    def not_written(self) -> list[Exercise]:
        return [exercise for exercise in self.exercises if not exercise.is_written()]


def read_exercise_notebook(path: Path) -> ExerciseNotebook:
    """Read an .ipynb file (JupyterLab saves what you see) and find its set-up cells and exercises."""
    try:
        notebook = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotebookLayoutError(f"there is no notebook {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise NotebookLayoutError(f"{path} is not a notebook (.ipynb is JSON): {error}") from None
    return exercise_notebook(notebook, path)


def exercise_notebook(notebook: Mapping[str, Any], path: Path) -> ExerciseNotebook:
    """The layout of a notebook already read (as JSON, or by nbformat); NotebookLayoutError if it breaks it."""
    chapter = re.match(rf"{CHAPTER}(?=_)", path.name)
    if not chapter:
        raise NotebookLayoutError(f"{path}: an exercise notebook's name starts with its chapter, e.g. 04_name.ipynb")
    setup: list[CodeCell] = []
    sections: list[tuple[str, list[CodeCell]]] = []  # (number, code cells) of each exercise so far
    in_exercise = False
    for index, cell in enumerate(notebook.get("cells", [])):
        source = _text(cell.get("source", ""))
        first_line = source.split("\n", 1)[0].strip()
        if cell.get("cell_type") == "markdown":
            heading = HEADING.fullmatch(first_line)
            if heading:
                sections.append((heading["number"], []))
            elif first_line.startswith("## Exercise"):
                raise NotebookLayoutError(f"{path} cell {index}: write an exercise's heading as "
                                          f"'## Exercise {chapter[0]}.N · Title', not {first_line!r}")
            in_exercise = bool(heading) or (in_exercise and not SECTION_END.match(first_line))
        elif cell.get("cell_type") == "code":
            code = CodeCell(index, source, tuple(cell.get("metadata", {}).get("tags", [])))
            if in_exercise:
                sections[-1][1].append(code)
            elif CHECK_TAG in code.tags:
                raise NotebookLayoutError(f"{path} cell {index} is tagged {CHECK_TAG} but stands under no "
                                          "'## Exercise' heading")
            elif not sections:
                setup.append(code)
    exercises = tuple(_exercise(path, chapter[0], place, number, cells)
                      for place, (number, cells) in enumerate(sections, start=1))
    if not exercises:
        raise NotebookLayoutError(f"{path} has no '## Exercise {chapter[0]}.1 · Title' heading: no exercises")
    return ExerciseNotebook(path, tuple(setup), exercises)


def _text(source: str | list[str]) -> str:
    """A cell's source: JSON stores it as a list of lines or as one str."""
    return source if isinstance(source, str) else "".join(source)


def _exercise(path: Path, chapter: str, place: int, number: str, cells: list[CodeCell]) -> Exercise:
    """Exercise ``number`` after checking its number and its one check cell."""
    if number != f"{chapter}.{place}":
        raise NotebookLayoutError(f"{path}: exercise {place} of the notebook is numbered {number}; "
                                  f"number it {chapter}.{place}")
    checks = [cell for cell in cells if CHECK_TAG in cell.tags]
    if len(checks) != 1:
        raise NotebookLayoutError(f"{path}: exercise {number} has {len(checks)} cells tagged {CHECK_TAG}; "
                                  "it needs exactly one")
    [check] = checks
    comment = CHECK_COMMENT.fullmatch(check.source.split("\n", 1)[0].strip())
    if not comment or comment["number"] != number:
        raise NotebookLayoutError(f"{path} cell {check.index}: a check cell's first line names its exercise, "
                                  f"'# Exercise {number}: function_name'")
    if not _passes_exercise_number(check.source, number):
        raise NotebookLayoutError(f'{path} cell {check.index}: pass exercise="{number}" to the checker, so that '
                                  "its failures name the exercise")
    return Exercise(number, comment["name"], tuple(cells))


def _passes_exercise_number(source: str, number: str) -> bool:
    """True when some call in ``source`` has the keyword argument exercise="<number>"."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return False
    return any(isinstance(node, ast.Call) and any(
        keyword.arg == "exercise" and isinstance(keyword.value, ast.Constant) and keyword.value.value == number
        for keyword in node.keywords) for node in ast.walk(tree))
