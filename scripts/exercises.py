#!/usr/bin/env python3
"""Generate the exercise notebooks from the solution notebooks, and keep both honest.

The notebooks in solutions/ are the source of truth; exercises/ is generated from them and never
edited by hand. In a solution notebook:

  * a code cell tagged `solution` holds what the learner will write. In the exercise it keeps its
    imports and, for each top-level function, the decorators, the signature and the docstring; the
    body becomes `raise NotImplementedError(...)`. Everything else in the cell is dropped.
  * a code cell tagged `check` calls a checker from course_lib.check. In the unsolved exercise it
    must fail, and it must be the first place that fails, with the one line every unsolved exercise
    prints: "Exercise 04.1: slot_mapping is not written yet: ...".
  * the cells follow the layout that `python -m course_lib.check` reads (course_lib/check/notebook.py):
    set-up cells, then one "## Exercise 04.1 · Title" heading per exercise, whose check cell starts
    with "# Exercise 04.1: slot_mapping" and passes exercise="04.1" to its checker.

Notebooks are stored without outputs (the book is executed when it is built), so a diff shows only
what an author changed. Cells are numbered from 0, as nbval numbers them.

Typical use, from any directory:

  python scripts/exercises.py generate            after editing a notebook in solutions/
  python scripts/exercises.py strip book/01_x.ipynb   before committing a notebook you ran
  python scripts/exercises.py check               CI: exercises up to date, no stored outputs
  python scripts/exercises.py verify-unsolved     CI: each exercise fails at its checks, only there
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellTimeoutError, DeadKernelError

from course_lib.check.failure import NotWrittenYet
from course_lib.check.notebook import CHECK_TAG, SOLUTION_TAG, NotebookLayoutError, exercise_notebook

REPO_ROOT = Path(__file__).resolve().parent.parent
UNSOLVED_ERROR = NotWrittenYet.__name__  # how every check cell of an unsolved exercise fails
STUB = 'raise NotImplementedError("Exercise: write {name}; see the text above")'
VOLATILE_CELL_METADATA = ("execution", "ExecuteTime")  # timings written by JupyterLab and extensions
STRIP_COMMAND = "python scripts/exercises.py strip"

Command = Callable[[argparse.Namespace], int]  # what runs one subcommand; returns the exit status
Subcommands = argparse._SubParsersAction  # what add_subparsers returns


class ExerciseError(Exception):
    """A solution notebook that cannot be turned into an exercise."""


# Reading, writing and stripping notebooks


def shown(path: Path) -> str:
    """The path as a reader would type it: relative to the repository root when it is inside."""
    path = path.resolve()
    return path.relative_to(REPO_ROOT).as_posix() if path.is_relative_to(REPO_ROOT) else str(path)


def notebook_text(notebook: nbformat.NotebookNode) -> str:
    """The notebook as nbformat writes it (sorted keys, indent 1) plus a final newline: byte-stable."""
    return nbformat.writes(notebook).rstrip("\n") + "\n"


def write_notebook(path: Path, text: str) -> None:
    """Write with '\\n' line ends on every platform, so the bytes do not depend on who ran it."""
    path.write_text(text, encoding="utf-8", newline="\n")


def notebooks_under(folder: Path) -> list[Path]:
    """Every notebook below folder, skipping checkpoints, hidden folders and the book's _build."""
    return sorted(
        path
        for path in folder.rglob("*.ipynb")
        if not any(part.startswith(".") or part == "_build" for part in path.relative_to(folder).parts)
    )


def strip_run_state(notebook: nbformat.NotebookNode) -> None:
    """Remove what running a notebook leaves behind: outputs, execution counts, timing metadata."""
    for cell in notebook.cells:
        for key in VOLATILE_CELL_METADATA:
            cell.metadata.pop(key, None)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None


def run_state_of(cell: nbformat.NotebookNode) -> str | None:
    """What a run left in this cell ('outputs', 'an execution count', or both), None if clean."""
    if cell.cell_type != "code":
        return None
    left = ["outputs"] if cell.outputs else []
    left += ["an execution count"] if cell.execution_count is not None else []
    return " and ".join(left) or None


def counted(number: int, noun: str) -> str:
    """'1 notebook', '3 notebooks': counts in messages read as sentences."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def is_tagged(cell: nbformat.NotebookNode, tag: str) -> bool:
    return tag in cell.metadata.get("tags", [])


# Turning a solution cell into a stub


def stub_solution_source(source: str, where: str) -> str:
    """The exercise version of a solution cell: its imports, then each function with a stub body.

    `where` names the cell in error messages, e.g. "cell 4 of solutions/01_rmsnorm.ipynb".
    """
    try:
        tree = ast.parse(source)
    except SyntaxError as error:
        raise ExerciseError(f"{where} is tagged solution but is not valid Python: {error.msg} "
                            f"(line {error.lineno})") from error
    lines = source.splitlines()
    imports = [ast.get_source_segment(source, node) for node in tree.body
               if isinstance(node, (ast.Import, ast.ImportFrom))]
    functions = [function_stub(node, lines, where) for node in tree.body
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if not functions:
        raise ExerciseError(f"solution cells must define functions; {where} has none")
    blocks = (["\n".join(imports)] if imports else []) + functions
    return "\n\n\n".join(blocks)


def function_stub(function: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str], where: str) -> str:
    """Decorators, signature and docstring of `function` as written, then a body that raises."""
    first_body_line = function.body[0].lineno
    if shares_line_with_signature(function.body[0], lines):
        raise ExerciseError(f"{where}: put the body of {function.name} on its own line, below the signature")
    start = min([function.lineno] + [decorator.lineno for decorator in function.decorator_list])
    if ast.get_docstring(function) is not None:
        kept = lines[start - 1 : function.body[0].end_lineno]
    else:
        kept = without_trailing_comments(lines[start - 1 : first_body_line - 1])
    body_line = lines[first_body_line - 1]
    indent = body_line[: len(body_line) - len(body_line.lstrip())]
    return "\n".join([*kept, indent + STUB.format(name=function.name)])


def shares_line_with_signature(statement: ast.stmt, lines: list[str]) -> bool:
    """True for `def f(x): return x`, whose body cannot be cut off by whole lines."""
    line = lines[statement.lineno - 1].encode()  # col_offset counts UTF-8 bytes
    return bool(line[: statement.col_offset].strip())


def without_trailing_comments(lines: list[str]) -> list[str]:
    """Drop comment and blank lines between the signature and the body: they belong to the solution."""
    while lines and (not lines[-1].strip() or lines[-1].lstrip().startswith("#")):
        lines = lines[:-1]
    return lines


# generate and check


def exercise_from_solution(path: Path) -> nbformat.NotebookNode:
    """The exercise notebook for one solution notebook: stripped, solution cells stubbed, ids kept."""
    notebook = nbformat.read(path, as_version=4)
    strip_run_state(notebook)
    for index, cell in enumerate(notebook.cells):
        if is_tagged(cell, SOLUTION_TAG):
            cell.source = stub_solution_source(cell.source, f"cell {index} of {shown(path)}")
    return notebook


def expected_exercises(solutions: Path) -> dict[str, str]:
    """File name -> text of every exercise notebook that `generate` writes."""
    if not solutions.is_dir():
        raise ExerciseError(f"there is no folder {solutions}")
    solution_paths = sorted(solutions.glob("*.ipynb"))
    return {path.name: notebook_text(exercise_from_solution(path)) for path in solution_paths}


def generate(solutions: Path, exercises: Path) -> list[str]:
    """Write every exercise notebook and remove those without a solution; returns what changed."""
    expected = expected_exercises(solutions)  # every solution is stubbed before anything is written
    exercises.mkdir(parents=True, exist_ok=True)
    changes = []
    for name, text in expected.items():
        target = exercises / name
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            write_notebook(target, text)
            changes.append(f"wrote {shown(target)}")
    for orphan in sorted(set(path.name for path in exercises.glob("*.ipynb")) - expected.keys()):
        (exercises / orphan).unlink()
        changes.append(f"removed {shown(exercises / orphan)}: there is no {shown(solutions / orphan)}")
    return changes


def exercise_drift(solutions: Path, exercises: Path) -> list[str]:
    """One line per exercise notebook that differs from what `generate` would write."""
    expected = expected_exercises(solutions)
    present = {path.name for path in exercises.glob("*.ipynb")}
    problems = []
    for name in sorted(expected.keys() | present):
        target, source = shown(exercises / name), shown(solutions / name)
        if name not in present:
            problems.append(f"{target} is missing")
        elif name not in expected:
            problems.append(f"{target} has no {source}: exercises come only from solutions")
        elif (exercises / name).read_text(encoding="utf-8") != expected[name]:
            problems.append(f"{target} is stale: it differs from what generate writes from {source}")
    return problems


def layout_problems(solutions: Path) -> list[str]:
    """One line per solution notebook that breaks the exercise layout (its exercise inherits the break)."""
    problems = []
    for path in sorted(solutions.glob("*.ipynb")):
        try:
            exercise_notebook(nbformat.read(path, as_version=4), Path(shown(path)))
        except NotebookLayoutError as error:
            problems.append(str(error))
    return problems


def stored_run_state(paths: Iterable[Path]) -> list[str]:
    """One line per notebook stored with outputs or execution counts, naming its first such cell."""
    problems = []
    for path in paths:
        dirty = [(index, state) for index, cell in enumerate(nbformat.read(path, as_version=4).cells)
                 if (state := run_state_of(cell))]
        if dirty:
            index, state = dirty[0]
            more = f" (and {len(dirty) - 1} more cells)" if len(dirty) > 1 else ""
            problems.append(f"{shown(path)} cell {index} has {state}{more}: notebooks are stored without "
                            f"outputs; run `{STRIP_COMMAND} {shown(path)}`")
    return problems


# verify-unsolved


@dataclass
class UnsolvedRun:
    """What executing one unsolved exercise notebook showed."""

    notebook: str
    check_failures: list[str] = field(default_factory=list)  # e.g. "cell 5 NotImplementedError"
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line that shows a human each check cell fails, and with which error."""
        count = len(self.check_failures)
        verdict = (
            "1 check cell fails as it should" if count == 1 else f"{count} check cells fail as they should"
        )
        return f"{self.notebook}: {verdict} ({', '.join(self.check_failures)})"


def execute_notebook(path: Path, timeout: int) -> nbformat.NotebookNode:
    """Run every cell in a fresh python3 kernel started in the notebook's folder; errors are kept."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, kernel_name="python3", timeout=timeout, allow_errors=True,
                            interrupt_on_timeout=True, resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    return notebook


def first_error(cell: nbformat.NotebookNode) -> nbformat.NotebookNode | None:
    """The error output a cell left when it raised, None if it ran through."""
    return next((output for output in cell.get("outputs", []) if output.output_type == "error"), None)


def describe(error: nbformat.NotebookNode) -> str:
    """'NameError: name 'x' is not defined': the error's name and the first line of its message."""
    return f"{error.ename}: {error.evalue.splitlines()[0]}" if error.evalue else error.ename


def judge_unsolved_run(notebook: nbformat.NotebookNode, name: str) -> UnsolvedRun:
    """Each check cell must fail with its exercise's one line NotWrittenYet; no other cell may fail at all."""
    run = UnsolvedRun(name)
    try:
        layout = exercise_notebook(notebook, Path(name))
    except NotebookLayoutError as error:
        return UnsolvedRun(name, problems=[str(error)])
    expected = {cell.index: str(NotWrittenYet(exercise.title))
                for exercise in layout.exercises for cell in exercise.cells if CHECK_TAG in cell.tags}
    for index, cell in enumerate(notebook.cells):
        error = first_error(cell)
        if index not in expected:
            if error:
                run.problems.append(f"{name} cell {index} raised {describe(error)}, but it is not a check "
                                    "cell: an exercise may fail only at its check cells")
        elif not error:
            run.problems.append(f"{name} cell {index} is a check cell but did not fail: "
                                "the unsolved exercise must fail there")
        elif (error.ename, error.evalue) != (UNSOLVED_ERROR, expected[index]):
            run.problems.append(f"{name} cell {index} is a check cell that failed with {describe(error)}; an "
                                f"unsolved exercise must fail with the one line {UNSOLVED_ERROR}: {expected[index]}")
        else:
            run.check_failures.append(f"cell {index} {error.ename}")
    return run


def verify_unsolved(exercises: Path, timeout: int) -> list[UnsolvedRun]:
    """Execute every exercise notebook as a learner first opens it, and judge where it fails."""
    runs = []
    for path in sorted(exercises.glob("*.ipynb")):
        try:
            runs.append(judge_unsolved_run(execute_notebook(path, timeout), shown(path)))
        except (CellTimeoutError, DeadKernelError) as error:
            runs.append(UnsolvedRun(shown(path), problems=[f"{shown(path)} did not run to the end: {error}"]))
    return runs


# The command line


def run_generate(args: argparse.Namespace) -> int:
    """Write exercises/NN_name.ipynb for every solutions/NN_name.ipynb and delete exercises without
    a solution. Nothing is written if any solution cell cannot be stubbed. Running it twice changes
    nothing the second time."""
    changes = generate(args.solutions, args.exercises)
    for change in changes:
        print(change)
    print(f"{shown(args.exercises)} is up to date with {shown(args.solutions)} "
          f"({counted(len(changes), 'change')})")
    return 0


def run_check(args: argparse.Namespace) -> int:
    """Fail if exercises/ is not exactly what `generate` would write, if a solution notebook breaks
    the exercise layout, or if any notebook under the solutions, exercises or book folders is stored
    with outputs or execution counts."""
    folders = [args.solutions, args.exercises, args.book]
    stored = [path for folder in folders if folder.is_dir() for path in notebooks_under(folder)]
    drift = exercise_drift(args.solutions, args.exercises)
    problems = drift + layout_problems(args.solutions) + stored_run_state(stored)
    for problem in problems:
        print(problem, file=sys.stderr)
    if drift:
        print("exercises/ is generated: run `python scripts/exercises.py generate`", file=sys.stderr)
    if problems:
        print(f"check failed: {counted(len(problems), 'problem')}", file=sys.stderr)
        return 1
    exercise_count = len(list(args.exercises.glob("*.ipynb")))
    print(f"OK: exercises match {shown(args.solutions)} ({counted(exercise_count, 'exercise notebook')}); "
          f"{counted(len(stored), 'notebook')} stored without outputs")
    return 0


def run_strip(args: argparse.Namespace) -> int:
    """Remove outputs, execution counts and timing metadata from notebooks, in place. A folder
    stands for every notebook below it."""
    paths = [found for path in args.paths for found in (notebooks_under(path) if path.is_dir() else [path])]
    for path in paths:
        notebook = nbformat.read(path, as_version=4)
        strip_run_state(notebook)
        text = notebook_text(notebook)
        if path.read_text(encoding="utf-8") != text:
            write_notebook(path, text)
            print(f"stripped {shown(path)}")
    print(f"{counted(len(paths), 'notebook')} stored without outputs")
    return 0


def run_verify_unsolved(args: argparse.Namespace) -> int:
    """Execute every exercise notebook unsolved (kernel python3, in the notebook's folder) and
    require that each cell tagged check fails with its exercise's one line NotWrittenYet ("Exercise
    04.1: slot_mapping is not written yet: ..."), and that no other cell fails: an earlier error
    would mean the exercise is broken, not unsolved."""
    runs = verify_unsolved(args.exercises, args.timeout)
    for run in runs:
        for problem in run.problems:
            print(problem, file=sys.stderr)
        if not run.problems:
            print(run.summary())
    broken = [run for run in runs if run.problems]
    if broken:
        print(f"verify-unsolved failed: {len(broken)} of {len(runs)} exercise notebooks are broken",
              file=sys.stderr)
        return 1
    verified = counted(len(runs), "exercise notebook")
    print(f"OK: {verified} verified: each fails at its checks and nowhere else")
    return 0


def add_command(commands: Subcommands, name: str, run: Command, summary: str) -> argparse.ArgumentParser:
    """A subcommand whose --help shows the docstring of the function that runs it."""
    command = commands.add_parser(name, help=summary, description=run.__doc__)
    command.set_defaults(run=run)
    return command


def add_folder_option(command: argparse.ArgumentParser, name: str) -> None:
    """--NAME DIR, defaulting to NAME/ in the repository whatever the current directory."""
    command.add_argument(f"--{name}", type=Path, default=REPO_ROOT / name, metavar="DIR",
                         help=f"the {name} folder (default: {name}/ in the repository)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scripts/exercises.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate_command = add_command(commands, "generate", run_generate, "write exercises/ from solutions/")
    for name in ("solutions", "exercises"):
        add_folder_option(generate_command, name)

    check_command = add_command(commands, "check", run_check, "fail on drifted exercises or stored outputs")
    for name in ("solutions", "exercises", "book"):
        add_folder_option(check_command, name)

    strip_command = add_command(commands, "strip", run_strip, "remove outputs and execution counts, in place")
    strip_command.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="notebooks or folders")

    verify_command = add_command(commands, "verify-unsolved", run_verify_unsolved,
                                 "run each exercise unsolved: it must fail at its checks and only there")
    add_folder_option(verify_command, "exercises")
    verify_command.add_argument("--timeout", type=int, default=600, metavar="SECONDS",
                                help="the longest one cell may run (default: 600)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ExerciseError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
