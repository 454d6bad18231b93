#!/usr/bin/env python3
"""Hold every chapter of the last book build to the CPU budget, from the build's own record of each run.

    python scripts/book_budget.py --max-seconds 90

The course promises that each chapter runs on a laptop's CPU within 90 seconds. The book build already runs
every chapter, top to bottom in a fresh kernel, and myst-nb records each run (its time, whether it succeeded)
in the environment Sphinx saves with the build. Reading the times there, rather than executing every chapter a
second time, keeps the test command's two guarantees (each chapter within budget; the book built from scratch
from today's sources) at the cost of one execution. A chapter the last build did not execute (an incremental
build that reused it) has no fresh time: it is reported, and ``course.py book --fresh`` gives it one.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENVIRONMENT = ROOT / "_build" / ".doctrees" / "environment.pickle"


def chapter_runs(environment: Path = ENVIRONMENT) -> dict[str, dict | None]:
    """Each notebook page of the book (``book/...``, no suffix) and its last execution record, or None."""
    if not environment.is_file():
        raise FileNotFoundError(f"{environment} is missing: build the book first "
                                "(python3 scripts/course.py book --fresh)")
    with environment.open("rb") as file:
        env = pickle.load(file)  # Sphinx's own saved state; its classes come with the environment's Sphinx
    pages = {path.relative_to(ROOT).with_suffix("").as_posix() for path in (ROOT / "book").rglob("*.ipynb")
             if ".ipynb_checkpoints" not in path.parts}
    metadata = getattr(env, "nb_metadata", {})
    return {page: metadata.get(page, {}).get("exec_data") for page in sorted(pages)}


def verdicts(runs: dict[str, dict | None], max_seconds: float) -> list[tuple[str, bool]]:
    """One line per chapter, and whether it keeps the promise: executed in this build, succeeded, in time."""
    lines = []
    for page, run in runs.items():
        if run is None or run.get("runtime") is None or run.get("method") == "cache":
            lines.append((f"{page}: not executed by the last build (run the book with --fresh)", False))
        elif not run["succeeded"]:
            lines.append((f"{page}: FAILED ({run.get('error')})", False))
        else:
            over = run["runtime"] > max_seconds
            verdict = "TOO SLOW" if over else "ok"
            lines.append((f"{page}: {verdict}, ran in {run['runtime']:.1f} s (budget {max_seconds:.0f} s)", not over))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-seconds", type=float, default=90.0, help="each chapter's budget (default 90)")
    args = parser.parse_args(argv)
    try:
        lines = verdicts(chapter_runs(), args.max_seconds)
    except FileNotFoundError as missing:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    print("\n".join(line for line, _ in lines))
    return 0 if all(ok for _, ok in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
