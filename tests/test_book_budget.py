"""scripts/book_budget.py: each chapter's time in the last book build, against the CPU budget."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("book_budget", ROOT / "scripts" / "book_budget.py")
book_budget = importlib.util.module_from_spec(spec)
spec.loader.exec_module(book_budget)


def run(seconds: float, succeeded: bool = True, method: str = "force") -> dict:
    return {"mtime": 0.0, "runtime": seconds, "method": method, "succeeded": succeeded, "error": None}


def test_chapters_in_time_pass_and_a_slow_one_fails():
    lines = book_budget.verdicts({"book/a": run(12.5), "book/b": run(91.0)}, 90)
    assert lines == [("book/a: ok, ran in 12.5 s (budget 90 s)", True),
                     ("book/b: TOO SLOW, ran in 91.0 s (budget 90 s)", False)]


def test_a_chapter_the_build_did_not_run_has_no_time_to_trust():
    lines = book_budget.verdicts({"book/a": None, "book/b": run(3.0, method="cache"), "book/c": run(3.0, False)}, 90)
    assert [ok for _, ok in lines] == [False, False, False]
    assert "--fresh" in lines[0][0] and "--fresh" in lines[1][0] and "FAILED" in lines[2][0]


def test_a_missing_build_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="build the book first"):
        book_budget.chapter_runs(tmp_path / "environment.pickle")
