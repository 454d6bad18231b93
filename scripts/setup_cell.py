#!/usr/bin/env python3
"""Every notebook's first cell: installs the course where it is missing (Colab, a JupyterHub), a no-op elsewhere.

    python scripts/setup_cell.py sync     # write the cell into every chapter, lab and solution notebook
    python scripts/setup_cell.py check    # exit 1, naming them, if any notebook's cell is missing or out of date

The repository the cell clones is ``repository.url`` in ``_config.yml``, the one place the course's address is
set (the book's launch and repository buttons read it too): after changing it, run ``sync``, then
``python scripts/exercises.py generate`` so the exercises carry the new cell. The cell is tagged ``remove-cell``,
so the rendered book does not show it; in JupyterLab the learner sees it first, with a comment saying it does
nothing there.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CELL_ID = "course-setup"
TEMPLATE = '''\
# On Colab or a JupyterHub this cell installs the course (a few minutes, once a session). Where the course is
# installed already, as in the environment `python3 scripts/course.py setup` makes, it does nothing.
import importlib.util
import os
import subprocess
import sys

if importlib.util.find_spec("course_lib") is None:
    REPOSITORY = "{url}"  # _config.yml: repository.url
    if not os.path.isdir("course"):
        subprocess.run(["git", "clone", "--depth", "1", REPOSITORY, "course"], check=True)
    subprocess.run([sys.executable, "course/scripts/hosted_setup.py"], check=True)
    sys.path.insert(0, os.path.abspath("course"))'''


def repository_url(root: Path = ROOT) -> str:
    """``repository.url`` of ``_config.yml``: the address the launch buttons and the setup cell use."""
    url = (yaml.safe_load((root / "_config.yml").read_text()).get("repository") or {}).get("url")
    if not url:
        raise ValueError("_config.yml has no repository.url: set it to the course's repository address")
    return url


def setup_cell(url: str) -> dict[str, Any]:
    return {"cell_type": "code", "execution_count": None, "id": CELL_ID, "metadata": {"tags": ["remove-cell"]},
            "outputs": [], "source": TEMPLATE.format(url=url).splitlines(keepends=True)}


def notebooks(root: Path = ROOT) -> list[Path]:
    """The notebooks a learner opens from the book or the solutions (the exercises are generated from these)."""
    found = [*(root / "book").rglob("*.ipynb"), *(root / "solutions").glob("*.ipynb")]
    return sorted(p for p in found if ".ipynb_checkpoints" not in p.parts)


def with_setup_cell(notebook: dict[str, Any], url: str) -> dict[str, Any]:
    """``notebook`` whose first cell is the current setup cell (replacing an older one, or inserted)."""
    cells = [cell for cell in notebook["cells"] if cell.get("id") != CELL_ID]
    return {**notebook, "cells": [setup_cell(url), *cells]}


def stale(root: Path = ROOT) -> list[str]:
    """The notebooks whose first cell is not the current setup cell."""
    url = repository_url(root)
    return [str(path.relative_to(root)) for path in notebooks(root)
            if json.loads(path.read_text())["cells"][0] != setup_cell(url)]


def sync(root: Path = ROOT) -> list[str]:
    """Put the current setup cell first in every notebook; return the ones that changed."""
    changed, url = stale(root), repository_url(root)
    for name in changed:
        path = root / name
        path.write_text(json.dumps(with_setup_cell(json.loads(path.read_text()), url), indent=1,
                                   ensure_ascii=False) + "\n")
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["sync", "check"],
                        help="sync: write the cell into every notebook; check: fail if one is missing or stale")
    args = parser.parse_args(argv)
    if args.command == "sync":
        changed = sync()
        print("\n".join(f"updated {name}" for name in changed) or "every notebook's setup cell is current")
        return 0
    missing = stale()
    if missing:
        print("the setup cell is missing or out of date in:\n  " + "\n  ".join(missing)
              + "\nrun: python scripts/setup_cell.py sync", file=sys.stderr)
        return 1
    print("every notebook starts with the current setup cell")
    return 0


if __name__ == "__main__":
    sys.exit(main())
