#!/usr/bin/env python3
"""Execute notebooks top to bottom, save them with their outputs, and hold them to a time budget.

    python scripts/execute_notebook.py book/00_env_check.ipynb --output-dir /tmp/executed
    python scripts/execute_notebook.py book/*.ipynb --output-dir /tmp/executed --max-seconds 90
    python scripts/execute_notebook.py book/*.ipynb book/labs/*.ipynb --output-dir OUT/notebooks --stamp

Exits 1 if a cell raises or a notebook runs longer than --max-seconds (the course promises each
chapter runs on a laptop's CPU within its budget). Each notebook runs in its own folder, as the
book build runs it. ``--stamp`` records in each executed copy the mode, device, versions and date that
produced its outputs (the GPU check keeps such copies for the book's GPU edition: scripts/gpu_outputs.py).
"""

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def execute(notebook_path: Path, output_dir: Path, timeout: int, stamped: bool = False) -> tuple[bool, float]:
    """Run one notebook; save the executed copy (stamped with where it ran); return (no cell failed, seconds)."""
    notebook = nbformat.read(notebook_path, as_version=4)
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(notebook_path.parent)}})
    started = time.time()
    try:
        client.execute()
        ok = True
    except CellExecutionError as error:
        print(error)
        ok = False
    seconds = time.time() - started
    if stamped and ok:
        from gpu_outputs import stamp

        from course_lib.device_facts import device_facts  # this process decides the mode as the kernel did

        stamp(notebook, device_facts(), dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), seconds)
    nbformat.write(notebook, output_dir / notebook_path.name)
    return ok, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path, help="the notebooks to run")
    parser.add_argument("--output-dir", type=Path, required=True, help="where to write the executed copies")
    parser.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell (default 600)")
    parser.add_argument("--max-seconds", type=float, help="fail a notebook that takes longer than this in all")
    parser.add_argument("--stamp", action="store_true",
                        help="record the mode, device, versions and date in each executed copy's metadata")
    args = parser.parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    for path in args.notebooks:
        ok, seconds = execute(path, args.output_dir, args.timeout, args.stamp)
        over = args.max_seconds is not None and seconds > args.max_seconds
        verdict = "FAILED" if not ok else ("TOO SLOW" if over else "ok")
        budget = f" (budget {args.max_seconds:.0f} s)" if args.max_seconds else ""
        print(f"{path}: {verdict}, ran in {seconds:.1f} s{budget}; saved to {args.output_dir / path.name}")
        failures += (not ok) or over
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
