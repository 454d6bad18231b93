"""`python -m course_lib.check NOTEBOOK --task N`, and what it shows about every real exercise notebook.

The real notebooks are read, never written: a learner's edits are made to a copy in a temporary folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from course_lib.check.__main__ import main
from course_lib.check.attempt import Status, attempt
from course_lib.check.notebook import SOLUTION_TAG, read_exercise_notebook

REPO = Path(__file__).resolve().parent.parent
ENV_CHECK = REPO / "exercises" / "00_env_check.ipynb"
PAGED = REPO / "exercises" / "04_paged_attention.ipynb"


def every_exercise(folder: str) -> list:
    """One pytest parameter per exercise of every notebook in ``folder``, named like 'Exercise 04.1: slot_mapping'."""
    return [pytest.param(path, exercise.number, id=exercise.title)
            for path in sorted((REPO / folder).glob("*.ipynb"))
            for exercise in read_exercise_notebook(path).exercises]


@pytest.mark.parametrize(("path", "number"), every_exercise("exercises"))
def test_every_unsolved_exercise_fails_with_the_same_one_line(path: Path, number: str):
    notebook = read_exercise_notebook(path)
    exercise = notebook.exercise(number)
    result = attempt(notebook, exercise)
    assert result.status is Status.NOT_WRITTEN
    assert result.message == (f"Exercise {number}: {exercise.name} is not written yet: "
                              "replace `raise NotImplementedError(...)` with your code")
    assert not exercise.is_written()


@pytest.mark.parametrize(("path", "number"), every_exercise("solutions"))
def test_every_solved_exercise_passes_after_the_set_up_cells_alone(path: Path, number: str):
    """A fresh namespace per exercise, as in a fresh kernel: the set-up cells must import all an exercise needs."""
    notebook = read_exercise_notebook(path)
    result = attempt(notebook, notebook.exercise(number))
    assert result.done, result.message


def learner_copy(tmp_path: Path, original: Path, **written: str) -> Path:
    """A copy of ``original`` with the solution cell of each exercise named (by its place, as 'task_1') rewritten."""
    notebook = json.loads(original.read_text(encoding="utf-8"))
    layout = read_exercise_notebook(original)
    for task, source in written.items():
        exercise = layout.exercise(task.removeprefix("task_"))
        [cell] = [cell for cell in exercise.cells if SOLUTION_TAG in cell.tags]
        notebook["cells"][cell.index]["source"] = source
    copy = tmp_path / original.name
    copy.write_text(json.dumps(notebook, indent=1), encoding="utf-8")
    return copy


GBPS = "def achieved_gbps(bytes_read, bytes_written, seconds):\n    return "
ACHIEVED_GBPS = GBPS + "(bytes_read + bytes_written) / seconds / 1e9"
ONLY_BYTES_READ = GBPS + "bytes_read / seconds / 1e9"
TYPO = GBPS + "(bytes_red + bytes_written) / seconds / 1e9"
ROOFLINE_SUM = ("def roofline_time(flops, bytes_moved, peak_flops_per_s, peak_bytes_per_s):\n"
                "    return flops / peak_flops_per_s + bytes_moved / peak_bytes_per_s")
UNFINISHED = "@cuda.jit\ndef vector_add(a, b, out):\n    i = cuda.grid(1\n"


def test_a_solved_exercise_passes_and_the_rest_are_counted(tmp_path: Path, capsys: pytest.CaptureFixture):
    notebook = learner_copy(tmp_path, ENV_CHECK, task_1=ACHIEVED_GBPS)
    assert main([str(notebook), "--task", "1"]) == 0
    assert capsys.readouterr().out == ("Exercise 00.1: achieved_gbps passed.\n"
                                       "2 of 3 exercises in this notebook are not written yet: 00.2, 00.3.\n")


def test_an_unsolved_exercise_prints_one_line(capsys: pytest.CaptureFixture):
    assert main([str(ENV_CHECK), "--task", "00.2"]) == 1
    assert capsys.readouterr().out == (
        "Exercise 00.2: roofline_time is not written yet: replace `raise NotImplementedError(...)` with your code\n"
        "3 of 3 exercises in this notebook are not written yet: 00.1, 00.2, 00.3.\n")


def test_a_wrong_answer_prints_the_hint(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert main([str(learner_copy(tmp_path, ENV_CHECK, task_1=ONLY_BYTES_READ)), "--task", "1"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("Exercise 00.1: achieved_gbps failed: ")
    assert "Hint: this is what you get when you count only the bytes read" in out
    assert "rerun with COURSE_CHECK_SEED=" in out


def test_an_error_in_the_learners_cell_names_its_line(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert main([str(learner_copy(tmp_path, ENV_CHECK, task_1=TYPO)), "--task", "1"]) == 1
    out = capsys.readouterr().out
    assert "Exercise 00.1: achieved_gbps failed: achieved_gbps raised NameError: name 'bytes_red' is not defined" in out
    assert "at exercise 00.1 cell 1, line 2: return (bytes_red + bytes_written) / seconds / 1e9" in out


def test_the_set_up_cells_import_numpy_for_slot_mapping(tmp_path: Path, capsys: pytest.CaptureFixture):
    with_numpy = ("def slot_mapping(block_table, positions, block_size):\n"
                  "    return np.asarray(block_table)[positions // block_size] * block_size + positions % block_size")
    assert main([str(learner_copy(tmp_path, PAGED, task_1=with_numpy)), "--task", "1"]) == 0
    assert capsys.readouterr().out.startswith("Exercise 04.1: slot_mapping passed.\n")


def test_a_wrong_task_names_the_valid_ones(capsys: pytest.CaptureFixture):
    assert main([str(PAGED), "--task", "7"]) == 2
    assert capsys.readouterr().err == (
        f"error: {PAGED} has no exercise '7'; choose --task 1 (Exercise 04.1: slot_mapping), "
        "2 (Exercise 04.2: paged_decode), 3 (Exercise 04.3: block_hashes), 4 (Exercise 04.4: merge_partials), "
        "5 (Exercise 04.5: online_decode)\n")


def test_a_missing_notebook_is_named(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert main([str(tmp_path / "04_missing.ipynb")]) == 2
    assert capsys.readouterr().err == f"error: there is no notebook {tmp_path / '04_missing.ipynb'}\n"


def test_without_a_task_every_exercise_is_listed_with_its_status(tmp_path: Path, capsys: pytest.CaptureFixture):
    notebook = learner_copy(tmp_path, ENV_CHECK, task_1=ACHIEVED_GBPS, task_2=ROOFLINE_SUM, task_3=UNFINISHED)
    assert main([str(notebook)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Exercise 00.1: achieved_gbps  passed"
    assert lines[1].startswith("Exercise 00.2: roofline_time  failed: roofline_time(")
    assert lines[2] == ("Exercise 00.3: vector_add     could not run: its cells raised SyntaxError: '(' was never "
                        "closed (exercise 00.3 cell 1, line 3)")
    assert lines[3] == f"1 of 3 done. Check one, with its hint: python -m course_lib.check {notebook} --task N"


def test_help_shows_the_task_option():
    result = subprocess.run([sys.executable, "-m", "course_lib.check", "--help"], capture_output=True, text=True,
                            check=True, cwd=REPO)
    assert "--task N" in result.stdout and "exercises/04_paged_attention.ipynb --task 2" in result.stdout
