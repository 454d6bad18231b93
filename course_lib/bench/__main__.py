"""``python -m course_lib.bench NAME``: measure a benchmark suite and write its results file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from course_lib import backend
from course_lib.bench.results import save_result
from course_lib.bench.runner import run_suite, suite
from course_lib.bench.suites import SUITES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m course_lib.bench",
        description="Measure a benchmark suite on this device and write course_lib/results/<card>/<NAME>.json "
        "(CPU-mode runs go to a cpu-<processor> folder and are never shown as GPU figures).",
    )
    parser.add_argument("name", nargs="?", help=f"suite to run: {', '.join(sorted(SUITES))}")
    parser.add_argument("--list", action="store_true", help="list the suites and exit")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (a smoke test)")
    parser.add_argument("--out", type=Path, help="folder for the JSON file (default: course_lib/results/<card>/)")
    args = parser.parse_args(argv)
    if args.list or not args.name:
        for name in sorted(SUITES):
            print(f"{name:<20}{suite(name).DESCRIPTION}")
        return 0
    if args.name not in SUITES:
        parser.error(f"unknown suite {args.name!r}; choose from: {', '.join(sorted(SUITES))}")
    print(backend.mode_line())
    result = run_suite(args.name, quick=args.quick)
    if not writes_results():
        return 0
    path = save_result(result, args.out)
    width = max((len(key) for key in result["headline"]), default=0) + 2
    for key, value in result["headline"].items():  # a figure, or None and a note where one could not be measured
        print(f"  {key:<{width}}" + (f"{value:,.4g}" if isinstance(value, int | float) else str(value)))
    print(f"wrote {path}")
    return 0


def writes_results() -> bool:
    """Under ``mpiexec -n N`` every rank runs a suite and rank 0 writes its file; a run without MPI is rank 0."""
    mpi = sys.modules.get("mpi4py.MPI")
    return mpi is None or mpi.COMM_WORLD.Get_rank() == 0


if __name__ == "__main__":
    sys.exit(main())
