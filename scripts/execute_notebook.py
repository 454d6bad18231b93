#!/usr/bin/env python3
"""Execute one notebook top to bottom and save it with its outputs (to look at a chapter's GPU run).

    python scripts/execute_notebook.py book/00_env_check.ipynb /tmp/00_env_check.ipynb

Exits 1 if a cell raises. The notebook runs in its own folder, as the book build runs it.
"""

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path, help="the notebook to run")
    parser.add_argument("output", type=Path, help="where to write the executed copy")
    parser.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell (default 600)")
    args = parser.parse_args()
    notebook = nbformat.read(args.notebook, as_version=4)
    client = NotebookClient(notebook, timeout=args.timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(args.notebook.parent)}})
    started = time.time()
    try:
        client.execute()
    except CellExecutionError as error:
        print(error)
        return 1
    finally:
        nbformat.write(notebook, args.output)
        print(f"{args.notebook}: ran in {time.time() - started:.1f} s; saved to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
