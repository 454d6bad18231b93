"""Tests of scripts/exercises.py: solutions/ in, exercises/ out, and the checks CI runs on both.

Every test builds its own small course in a temporary folder; the real solutions/ and exercises/
are never read or written. Only the verify-unsolved tests start Jupyter kernels (4 notebooks).
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

TOOL_PATH = Path(__file__).resolve().parent.parent / "scripts" / "exercises.py"


def load_tool() -> ModuleType:
    """Import scripts/exercises.py, which is a script and not part of a package."""
    spec = importlib.util.spec_from_file_location("exercise_tool", TOOL_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


tool = load_tool()

SOLUTION_SOURCE = '''\
import functools

SCALE = 2.0


def square(x):
    # a hint that belongs to the solution
    return x * x


@functools.lru_cache(
    maxsize=None,
)
def scaled_norm(
    a: float,
    b: float = 0.0,
) -> float:
    """Length of (a, b), times SCALE."""
    return SCALE * math.hypot(a, b)
'''

EXPECTED_STUB = '''\
import functools


def square(x):
    raise NotImplementedError("Exercise: write square; see the text above")


@functools.lru_cache(
    maxsize=None,
)
def scaled_norm(
    a: float,
    b: float = 0.0,
) -> float:
    """Length of (a, b), times SCALE."""
    raise NotImplementedError("Exercise: write scaled_norm; see the text above")'''

SETUP_SOURCE = '''\
import math

from course_lib.check import CheckFailed, call_learner
from course_lib.check.exercise import checks_an_exercise


@checks_an_exercise
def check_norms(square):
    if call_learner(square, 3) != 9 or scaled_norm(3.0, 4.0) != 10.0:
        raise CheckFailed("square(3) must be 9 and scaled_norm(3.0, 4.0) 10.0")'''
CHECK_SOURCE = '# Exercise 10.1: square\ncheck_norms(square, exercise="10.1")'
SETUP_CELL, SOLUTION_CELL, CHECK_CELL = 1, 3, 4  # where solution_notebook puts them
UNWRITTEN = "Exercise 10.1: square is not written yet: replace `raise NotImplementedError(...)` with your code"


def solution_notebook(setup_source: str = SETUP_SOURCE, solution_source: str = SOLUTION_SOURCE):
    """A chapter in miniature: text, the set-up, one exercise (a solution cell with two functions, a check cell)."""
    notebook = new_notebook()
    notebook.cells = [
        new_markdown_cell("# Exercises 10 · Norms\nWrite `square` and `scaled_norm`."),
        new_code_cell(setup_source),
        new_markdown_cell("## Exercise 10.1 · Two norms"),
        new_code_cell(solution_source, metadata={"tags": ["solution"]}),
        new_code_cell(CHECK_SOURCE, metadata={"tags": ["check"]}),
    ]
    return notebook


def mark_as_run(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Leave in every code cell what running it in JupyterLab would: output, count, timing."""
    for count, cell in enumerate(cell for cell in notebook.cells if cell.cell_type == "code"):
        cell.execution_count = count + 1
        cell.outputs = [new_output("stream", name="stdout", text="ran\n")]
        cell.metadata["execution"] = {"iopub.execute_input": "2025-01-01T00:00:00Z"}
    return notebook


def write(notebook: nbformat.NotebookNode, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, path)
    return path


@pytest.fixture
def course(tmp_path: Path) -> Path:
    """A course folder with one clean solution notebook and its freshly generated exercise."""
    write(solution_notebook(), tmp_path / "solutions" / "10_norms.ipynb")
    (tmp_path / "book").mkdir()
    tool.generate(tmp_path / "solutions", tmp_path / "exercises")
    return tmp_path


def run_check(course: Path) -> int:
    folders = [f"--{name}={course / name}" for name in ("solutions", "exercises", "book")]
    return tool.main(["check", *folders])


# Stubbing a solution cell


def test_stub_keeps_imports_decorators_signatures_and_docstrings() -> None:
    assert tool.stub_solution_source(SOLUTION_SOURCE, "cell 2 of test") == EXPECTED_STUB


def test_stubbed_functions_keep_their_interface_and_raise() -> None:
    namespace: dict = {}
    exec(tool.stub_solution_source(SOLUTION_SOURCE, "cell 2 of test"), namespace)
    scaled_norm = namespace["scaled_norm"]
    assert list(inspect.signature(scaled_norm).parameters) == ["a", "b"]
    assert scaled_norm.__doc__ == "Length of (a, b), times SCALE."
    with pytest.raises(NotImplementedError, match="Exercise: write scaled_norm; see the text above"):
        scaled_norm(3.0, 4.0)
    with pytest.raises(NotImplementedError, match="write square"):
        namespace["square"](3)


def test_stub_of_a_cuda_kernel_keeps_its_decorator_and_indentation() -> None:
    kernel = "from numba import cuda\n\n\n@cuda.jit\ndef add_one(x):\n  i = cuda.grid(1)\n  x[i] += 1\n"
    assert tool.stub_solution_source(kernel, "cell 0 of test") == (
        "from numba import cuda\n\n\n@cuda.jit\ndef add_one(x):\n"
        '  raise NotImplementedError("Exercise: write add_one; see the text above")'
    )


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("import math\nx = math.pi\n", "solution cells must define functions; cell 3 of .* has none"),
        ("def f(x): return x\n", "put the body of f on its own line"),
        ("def f(x:\n", "cell 3 of .*10_bad.ipynb is tagged solution but is not valid Python"),
    ],
)
def test_solution_cells_that_cannot_be_stubbed_are_rejected(tmp_path: Path, source: str, message: str):
    write(solution_notebook(solution_source=source), tmp_path / "solutions" / "10_bad.ipynb")
    with pytest.raises(tool.ExerciseError, match=message):
        tool.generate(tmp_path / "solutions", tmp_path / "exercises")
    assert not (tmp_path / "exercises").exists(), "nothing is written when a solution cannot be stubbed"


# generate


def test_generated_exercise_is_stripped_stubbed_and_keeps_ids_and_tags(tmp_path: Path) -> None:
    solution = write(mark_as_run(solution_notebook()), tmp_path / "solutions" / "10_norms.ipynb")
    tool.generate(tmp_path / "solutions", tmp_path / "exercises")
    exercise = nbformat.read(tmp_path / "exercises" / "10_norms.ipynb", as_version=4)
    source = nbformat.read(solution, as_version=4)
    for cell in (cell for cell in exercise.cells if cell.cell_type == "code"):
        assert (cell.outputs, cell.execution_count) == ([], None)
        assert "execution" not in cell.metadata
    assert [cell.id for cell in exercise.cells] == [cell.id for cell in source.cells]
    assert [cell.metadata.get("tags") for cell in exercise.cells] == [None, None, None, ["solution"], ["check"]]
    assert exercise.cells[SOLUTION_CELL].source == EXPECTED_STUB
    assert exercise.cells[SETUP_CELL].source == SETUP_SOURCE


def test_generate_is_idempotent(tmp_path: Path) -> None:
    write(mark_as_run(solution_notebook()), tmp_path / "solutions" / "10_norms.ipynb")
    exercise = tmp_path / "exercises" / "10_norms.ipynb"
    tool.generate(tmp_path / "solutions", tmp_path / "exercises")
    first = exercise.read_bytes()
    exercise.unlink()
    tool.generate(tmp_path / "solutions", tmp_path / "exercises")
    assert exercise.read_bytes() == first, "a fresh write gives the same bytes"
    assert tool.generate(tmp_path / "solutions", tmp_path / "exercises") == [], "nothing left to change"
    assert first.endswith(b"}\n")


def test_generate_removes_exercises_without_a_solution(course: Path) -> None:
    orphan = course / "exercises" / "99_orphan.ipynb"
    write(solution_notebook(), orphan)
    changes = tool.generate(course / "solutions", course / "exercises")
    assert not orphan.exists()
    assert len(changes) == 1
    assert changes[0].startswith(f"removed {orphan}: there is no ")


# check and strip


def test_check_passes_on_a_fresh_course(course: Path, capsys: pytest.CaptureFixture) -> None:
    write(mark_as_run(solution_notebook()), course / "book" / "_build" / "jupyter_execute" / "built.ipynb")
    assert run_check(course) == 0
    assert capsys.readouterr().out.startswith("OK: exercises match")


def edit_exercise_by_hand(course: Path) -> None:
    exercise = course / "exercises" / "10_norms.ipynb"
    notebook = nbformat.read(exercise, as_version=4)
    notebook.cells[0].source += "\nEdited by hand."
    write(notebook, exercise)


def delete_exercise(course: Path) -> None:
    (course / "exercises" / "10_norms.ipynb").unlink()


def add_exercise_without_solution(course: Path) -> None:
    write(solution_notebook(), course / "exercises" / "11_extra.ipynb")


def add_book_notebook_with_outputs(course: Path) -> None:
    write(mark_as_run(solution_notebook()), course / "book" / "labs" / "20_lab.ipynb")


@pytest.mark.parametrize(
    ("break_course", "message"),
    [
        (edit_exercise_by_hand, r"10_norms.ipynb is stale: it differs from what generate writes"),
        (delete_exercise, r"10_norms.ipynb is missing\n"),
        (add_exercise_without_solution, r"11_extra.ipynb has no .*solutions/11_extra.ipynb"),
        (
            add_book_notebook_with_outputs,
            r"20_lab.ipynb cell 1 has outputs and an execution count \(and 2 more cells\): notebooks are "
            r"stored without outputs; run `python scripts/exercises.py strip .*20_lab.ipynb`",
        ),
    ],
)
def test_check_reports_each_kind_of_drift(course: Path, capsys: pytest.CaptureFixture, break_course, message):
    break_course(course)
    assert run_check(course) == 1
    assert re.search(message, capsys.readouterr().err)


def test_strip_cleans_notebooks_in_place(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    notebook = write(mark_as_run(solution_notebook()), tmp_path / "book" / "00_env_check.ipynb")
    assert tool.main(["strip", str(tmp_path / "book")]) == 0
    assert f"stripped {notebook}" in capsys.readouterr().out
    assert tool.stored_run_state([notebook]) == []
    assert "execution" not in nbformat.read(notebook, as_version=4).cells[1].metadata
    assert tool.main(["strip", str(notebook)]) == 0
    assert "stripped" not in capsys.readouterr().out, "a clean notebook is left untouched"


def test_command_line_works_from_any_directory(course: Path) -> None:
    help_text = subprocess.run([sys.executable, TOOL_PATH, "--help"], cwd=course, capture_output=True,
                               text=True, check=True).stdout
    for command in ("generate", "check", "strip", "verify-unsolved"):
        assert command in help_text
    check = subprocess.run([sys.executable, TOOL_PATH, "check", "--solutions", "solutions", "--exercises",
                            "exercises", "--book", "book"], cwd=course, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert tool.build_parser().parse_args(["generate"]).solutions == TOOL_PATH.parent.parent / "solutions"


# verify-unsolved


@pytest.fixture(scope="module")
def unsolved_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Execute three exercise notebooks once: a good one, one broken before its check, one solved."""
    folder = tmp_path_factory.mktemp("verify")
    write(solution_notebook(), folder / "solutions" / "10_good.ipynb")
    tool.generate(folder / "solutions", folder / "exercises")
    broken = nbformat.read(folder / "exercises" / "10_good.ipynb", as_version=4)
    broken.cells[SETUP_CELL].source = "import a_module_that_does_not_exist"
    write(broken, folder / "exercises" / "10_broken.ipynb")
    write(solution_notebook(), folder / "exercises" / "10_solved.ipynb")
    runs = tool.verify_unsolved(folder / "exercises", timeout=60)
    return {Path(run.notebook).stem: run for run in runs}


def test_verify_unsolved_passes_a_generated_exercise(unsolved_runs: dict) -> None:
    run = unsolved_runs["10_good"]
    assert run.problems == []
    assert run.summary().endswith("10_good.ipynb: 1 check cell fails as it should (cell 4 NotWrittenYet)")


def test_verify_unsolved_flags_an_error_outside_the_check_cells(unsolved_runs: dict) -> None:
    problems = unsolved_runs["10_broken"].problems
    assert "cell 1 raised ModuleNotFoundError: No module named 'a_module_that_does_not_exist'" in problems[0]
    assert problems[0].endswith("but it is not a check cell: an exercise may fail only at its check cells")


def test_verify_unsolved_flags_a_check_cell_that_does_not_fail(unsolved_runs: dict) -> None:
    [problem] = unsolved_runs["10_solved"].problems
    assert "cell 4 is a check cell but did not fail" in problem


def failed_with(ename: str, evalue: str) -> list[nbformat.NotebookNode]:
    return [new_output("error", ename=ename, evalue=evalue, traceback=[])]


@pytest.mark.parametrize(
    ("ename", "evalue"),
    [
        ("NameError", "name 'squre' is not defined"),
        ("NotImplementedError", "Exercise: write square; see the text above"),
        ("CheckFailed", "Exercise 10.1: square failed: square(3) must be 9"),
        ("NotWrittenYet", UNWRITTEN.replace("10.1", "10.2")),
    ],
)
def test_a_check_cell_must_fail_with_its_exercises_one_line(ename: str, evalue: str) -> None:
    notebook = solution_notebook()
    notebook.cells[CHECK_CELL].outputs = failed_with(ename, evalue)
    [problem] = tool.judge_unsolved_run(notebook, "10_wrong.ipynb").problems
    assert problem.startswith(f"10_wrong.ipynb cell 4 is a check cell that failed with {ename}: ")
    assert problem.endswith(f"an unsolved exercise must fail with the one line NotWrittenYet: {UNWRITTEN}")
    notebook.cells[CHECK_CELL].outputs = failed_with("NotWrittenYet", UNWRITTEN)
    assert tool.judge_unsolved_run(notebook, "10_unsolved.ipynb").check_failures == ["cell 4 NotWrittenYet"]


def test_a_notebook_that_breaks_the_exercise_layout_is_a_problem(course: Path, capsys: pytest.CaptureFixture) -> None:
    notebook = solution_notebook()
    notebook.cells = notebook.cells[:CHECK_CELL]
    assert tool.judge_unsolved_run(notebook, "10_unchecked.ipynb").problems == [
        "10_unchecked.ipynb: exercise 10.1 has 0 cells tagged check; it needs exactly one"
    ]
    write(notebook, course / "solutions" / "10_norms.ipynb")
    tool.generate(course / "solutions", course / "exercises")
    assert run_check(course) == 1
    assert "exercise 10.1 has 0 cells tagged check; it needs exactly one" in capsys.readouterr().err


def test_verify_unsolved_command_line(course: Path, capsys: pytest.CaptureFixture) -> None:
    assert tool.main(["verify-unsolved", "--exercises", str(course / "exercises"), "--timeout", "60"]) == 0
    out = capsys.readouterr().out
    assert "10_norms.ipynb: 1 check cell fails as it should (cell 4 NotWrittenYet)" in out
    assert out.endswith("OK: 1 exercise notebook verified: each fails at its checks and nowhere else\n")
