#!/usr/bin/env python3
"""Set up the course's environment, build the book, run the tests: the README's two commands.

    python3 scripts/course.py book    # set up .venv, build the book, print where the HTML is
    python3 scripts/course.py test    # set up .venv, run every check CI runs

Only the standard library is used here, so this runs with any Python 3.10+ on Linux, macOS and
Windows before anything is installed. The environment lives in ``.venv`` at the repository root
and is reinstalled only when requirements.txt or pyproject.toml change.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".course-installed"


def run(*command: str | Path, **kwargs) -> None:
    """Run a command from the repository root, echoing it; stop everything if it fails."""
    print(f"\n$ {' '.join(str(c) for c in command)}", flush=True)
    subprocess.run([str(c) for c in command], cwd=ROOT, check=True, **kwargs)


def install_fingerprint() -> str:
    return hashlib.sha256(b"".join((ROOT / f).read_bytes() for f in ("requirements.txt", "pyproject.toml"))).hexdigest()


def setup() -> None:
    """Create ``.venv`` and install the pinned requirements and ``course_lib`` (editable) into it."""
    if not PYTHON.exists():
        print(f"Creating the course's virtual environment in {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    if STAMP.exists() and STAMP.read_text() == install_fingerprint():
        print(f"Environment {VENV} is up to date.")
        return
    run(PYTHON, "-m", "pip", "install", "--quiet", "--upgrade", "pip==26.0.1")
    run(PYTHON, "-m", "pip", "install", "--quiet", "-r", "requirements.txt")
    run(PYTHON, "-m", "pip", "install", "--quiet", "--no-deps", "-e", ".")
    STAMP.write_text(install_fingerprint())


def mpiexec() -> Path:
    """The ``mpiexec`` that came with the environment's MPI wheel (or, failing that, the system's)."""
    for name in ("mpiexec", "mpiexec.exe"):
        if (BIN / name).exists():
            return BIN / name
    return Path("mpiexec")


def build_book() -> Path:
    """Execute every chapter and render the book; a failing cell fails the build."""
    jupyter_book = BIN / ("jupyter-book.exe" if os.name == "nt" else "jupyter-book")
    run(jupyter_book, "build", ".", "--warningiserror", "--keep-going")
    return ROOT / "_build" / "html" / "index.html"


def chapters() -> list[str]:
    """The book's notebooks, chapters and labs."""
    notebooks = (ROOT / "book").rglob("*.ipynb")
    return sorted(str(p.relative_to(ROOT)) for p in notebooks if ".ipynb_checkpoints" not in p.parts)


def test_steps() -> list[tuple[str, list[str | Path]]]:
    """Every check CI runs, in the order a failure is cheapest to find."""
    pytest = [PYTHON, "-m", "pytest", "-p", "no:cacheprovider"]
    return [
        ("lint", [PYTHON, "-m", "ruff", "check", "."]),
        ("exercises match solutions, notebooks stored without outputs", [PYTHON, "scripts/exercises.py", "check"]),
        ("unit tests", [*pytest, "tests", "-m", "not mpi", "--ignore=tests/mpi"]),
        ("MPI tests on 2 ranks", [mpiexec(), "-n", "2", *pytest, "tests/mpi", "-m", "mpi", "-q"]),
        ("solutions pass their checks", [*pytest, "--nbval-lax", "solutions/"]),
        ("unsolved exercises fail at their checks", [PYTHON, "scripts/exercises.py", "verify-unsolved"]),
        ("chapters run on CPU within 90 s each", [PYTHON, "scripts/execute_notebook.py", *chapters(),
                                                  "--output-dir", "_build/executed", "--max-seconds", "90"]),
        ("book builds with every chapter executed", [PYTHON, "scripts/course.py", "book", "--no-setup"]),
    ]


def run_tests() -> int:
    """Run every step, even after a failure, and end with one 'N passed, N failed' line."""
    results = []
    for label, command in test_steps():
        print(f"\n==== {label} ====", flush=True)
        started = time.time()
        ok = subprocess.run([str(c) for c in command], cwd=ROOT).returncode == 0
        results.append((label, ok, time.time() - started))
    print("\n==== summary ====")
    for label, ok, seconds in results:
        print(f"  {'PASS' if ok else 'FAIL'}  {label}  ({seconds:.0f} s)")
    failed = sum(not ok for _, ok, _ in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Set up the course's environment (.venv), build the book or run the tests.",
        epilog="Both commands work on a machine with no GPU (CPU mode) and on an NVIDIA GPU (GPU mode).",
    )
    parser.add_argument("command", choices=["setup", "book", "test"],
                        help="setup: only create/update .venv; book: build the HTML book; test: run every check")
    parser.add_argument("--no-setup", action="store_true", help="use .venv as it is (skip the install check)")
    args = parser.parse_args(argv)
    if not args.no_setup:
        setup()
    elif not PYTHON.exists():
        parser.error(f"{VENV} does not exist yet: run without --no-setup first")
    if args.command == "book":
        index = build_book()
        print(f"\nThe book is built. Open {index.as_uri()}")
    elif args.command == "test":
        return run_tests()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as failed:
        print(f"\nFailed (exit {failed.returncode}): {' '.join(map(str, failed.cmd))}", file=sys.stderr)
        sys.exit(failed.returncode or 1)
