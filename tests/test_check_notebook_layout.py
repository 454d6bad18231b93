"""The exercise layout that `python -m course_lib.check` reads: set-up cells, then numbered exercises."""

from __future__ import annotations

from pathlib import Path

import pytest

from course_lib.check.notebook import NotebookLayoutError, exercise_notebook

SETUP = "import math"
SOLUTION = "def square(x):\n    return x * x"
STUB = 'def square(x):\n    raise NotImplementedError("Exercise: write square; see the text above")'
CHECK = '# Exercise 10.1: square\ncheck_square(square, exercise="10.1")'


def markdown(text: str) -> dict:
    return {"cell_type": "markdown", "metadata": {}, "source": text}


def code(text: str, tag: str | None = None) -> dict:
    return {"cell_type": "code", "metadata": {"tags": [tag]} if tag else {}, "source": text.splitlines(True)}


def notebook(*cells: dict) -> dict:
    return {"cells": list(cells)}


def one_exercise(heading: str = "## Exercise 10.1 · Square", check: str = CHECK, solution: str = SOLUTION) -> dict:
    return notebook(markdown("# Exercises 10"), code(SETUP), markdown(heading), code(solution, "solution"),
                    code(check, "check"))


def layout_error(cells: dict, name: str = "10_norms.ipynb") -> str:
    with pytest.raises(NotebookLayoutError) as error:
        exercise_notebook(cells, Path(name))
    return str(error.value)


def test_set_up_cells_come_before_the_first_exercise_and_an_exercise_ends_at_the_next_heading():
    layout = exercise_notebook(notebook(
        markdown("# Exercises 10"), code(SETUP),
        markdown("## Exercise 10.1 · Square"), code(SOLUTION, "solution"), code(CHECK, "check"),
        markdown("## When the check fails"), code("print('not part of any exercise')"),
        markdown("## Exercise 10.2 · Cube"), code("def cube(x):\n    return x ** 3", "solution"),
        markdown("### A detail"), code('# Exercise 10.2: cube\ncheck_cube(cube, exercise="10.2")', "check"),
    ), Path("10_norms.ipynb"))
    assert [cell.source for cell in layout.setup] == [SETUP]
    assert [(exercise.number, exercise.name, exercise.task) for exercise in layout.exercises] == [
        ("10.1", "square", 1), ("10.2", "cube", 2)]
    assert [cell.index for cell in layout.exercises[0].cells] == [3, 4]
    assert [cell.index for cell in layout.exercises[1].cells] == [8, 10], "a ### heading does not end it"
    assert layout.exercises[0].title == "Exercise 10.1: square"


def test_an_exercise_is_found_by_its_place_or_its_number_and_a_wrong_one_names_the_choices():
    layout = exercise_notebook(one_exercise(), Path("10_norms.ipynb"))
    assert layout.exercise("1") is layout.exercise("10.1") is layout.exercises[0]
    with pytest.raises(NotebookLayoutError) as error:
        layout.exercise("2")
    assert str(error.value) == "10_norms.ipynb has no exercise '2'; choose --task 1 (Exercise 10.1: square)"


def test_an_exercise_still_holding_the_stub_is_not_written():
    assert exercise_notebook(one_exercise(solution=STUB), Path("10_norms.ipynb")).not_written()
    assert not exercise_notebook(one_exercise(), Path("10_norms.ipynb")).not_written()


@pytest.mark.parametrize(
    ("cells", "message"),
    [
        (one_exercise(heading="## Exercise 10.2 · Square"), "exercise 1 of the notebook is numbered 10.2; number it"),
        (one_exercise(heading="## Exercise 1 · Square"), "write an exercise's heading as '## Exercise 10.N · Title'"),
        (one_exercise(check="check_square(square)"), "a check cell's first line names its exercise, '# Exercise 10.1:"),
        (one_exercise(check="# Exercise 10.1: square\ncheck_square(square)"), 'pass exercise="10.1" to the checker'),
        (notebook(code(SETUP), code(CHECK, "check")), "cell 1 is tagged check but stands under no '## Exercise'"),
        (notebook(markdown("## Exercise 10.1 · Square"), code(SOLUTION)), "exercise 10.1 has 0 cells tagged check"),
        (notebook(code(SETUP)), "has no '## Exercise 10.1 · Title' heading: no exercises"),
    ],
)
def test_a_notebook_that_breaks_the_layout_is_refused_with_what_to_fix(cells: dict, message: str):
    assert message in layout_error(cells)


def test_a_notebook_name_starts_with_its_chapter():
    assert "an exercise notebook's name starts with its chapter, e.g. 04_name.ipynb" in layout_error(
        one_exercise(), "norms.ipynb")
