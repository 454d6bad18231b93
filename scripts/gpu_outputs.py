#!/usr/bin/env python3
"""The book with a GPU's outputs: keep the chapters a GPU executed as results, and stage a book from them.

The book command executes every chapter on the machine that builds it, which is CPU mode on a laptop or in CI.
A reader should also see what the chapters print and draw on a real GPU, so the GPU check
(``scripts/gpu_check.sh``) keeps its executed copies, stamped by ``scripts/execute_notebook.py --stamp``
with the mode, the card and the date. Committed under ``course_lib/results/<card>/notebooks/``, they are
the GPU edition's outputs:

    python scripts/gpu_outputs.py stage --card nvidia-h100-80gb-hbm3 --to _build/gpu-source
    python3 scripts/course.py book --outputs gpu        # the same, then renders it without executing anything

``stage`` copies the book's sources and, for each chapter, puts the kept outputs into *today's* notebook, cell
by cell: the prose may have changed since the GPU run (the page shows the new text), but if any code cell
differs, the outputs no longer belong to that code, and the chapter is refused with the command that renews
it. Each staged page gains a note, under its title, naming the machine, the mode and the date of its outputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "course_lib" / "results"
STAMP = "course_outputs"  # the notebook metadata key execute_notebook.py --stamp writes
# What a book build reads: the configuration, the pages, the CSS (if any), the exercises the pages offer to download
BOOK_FILES = ("_config.yml", "_toc.yml", "book", "_static", "exercises")


class StageError(Exception):
    """The GPU edition cannot be staged; the message says which chapters and what to run."""


def code_digest(notebook: dict[str, Any]) -> str:
    """SHA-256 of the notebook's code cells, in order: what its outputs depend on (prose does not count)."""
    digest = hashlib.sha256()
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            digest.update("".join(cell["source"]).encode() + b"\0")
    return digest.hexdigest()


def stamp(notebook: dict[str, Any], facts: dict[str, Any], date: str, seconds: float) -> None:
    """Record in ``notebook``'s metadata where its outputs came from: mode, device, versions, date, code digest."""
    notebook["metadata"][STAMP] = {
        "mode": facts["mode"], "device": facts["name"], "date": date, "seconds": round(seconds, 1),
        "driver_cuda_version": facts.get("driver_cuda_version"), "libraries": facts.get("libraries", {}),
        "code_sha256": code_digest(notebook),
    }


def provenance_cell(record: dict[str, Any], kept_at: str) -> dict[str, Any]:
    """A note for the top of a staged page: which machine, in which mode, on which date produced its outputs."""
    libraries = ", ".join(f"{name} {version}" for name, version in sorted(record["libraries"].items())
                          if name in ("cupy-cuda13x", "cupy-cuda12x", "numba-cuda", "cuda-bindings", "torch"))
    text = (f":::{{note}}\nThe outputs on this page were produced in **{record['mode'].upper()} mode on an "
            f"{record['device']}** on {record['date'][:10]} ({libraries}), and kept in `{kept_at}`. "
            "The book's default edition executes every page on the machine that builds it.\n:::\n")
    return {"cell_type": "markdown", "id": "gpu-outputs-provenance", "metadata": {}, "source": text}


def transplant(source: dict[str, Any], executed: dict[str, Any], name: str) -> dict[str, Any]:
    """Today's ``source`` notebook carrying ``executed``'s outputs, if its code cells are the ones that ran."""
    record = executed["metadata"].get(STAMP)
    if record is None:
        raise StageError(f"{name}: the kept copy has no '{STAMP}' stamp (run it with execute_notebook.py --stamp)")
    if record["mode"] != "gpu":
        raise StageError(f"{name}: its kept outputs were produced in {record['mode']} mode, not on a GPU")
    if record["code_sha256"] != code_digest(source) or code_digest(executed) != code_digest(source):
        raise StageError(f"{name}: its code changed since the GPU run of {record['date'][:10]}")
    runs = iter(cell for cell in executed["cells"] if cell["cell_type"] == "code")
    staged = json.loads(json.dumps(source))
    for cell in staged["cells"]:
        if cell["cell_type"] == "code":
            ran = next(runs)
            cell["outputs"], cell["execution_count"] = ran["outputs"], ran["execution_count"]
    staged["metadata"][STAMP] = record
    return staged


def kept_notebooks(card: str) -> Path:
    """The folder of a card's kept notebooks; refuses, saying how to fill it, when there is none."""
    folder = RESULTS / card / "notebooks"
    if not any(folder.glob("*.ipynb")):
        known = sorted(p.parent.name for p in RESULTS.glob("*/notebooks/*.ipynb"))
        raise StageError(f"no GPU outputs are kept for {card} ({folder.relative_to(ROOT)} is empty). Run "
                         f"scripts/gpu_check.sh OUT on that GPU and copy OUT/notebooks/*.ipynb there"
                         + (f"; cards with kept outputs: {', '.join(sorted(set(known)))}" if known else ""))
    return folder


def stage(card: str, to: Path) -> list[str]:
    """Copy the book's sources to ``to`` with every chapter's kept GPU outputs; return one line per chapter.

    Every chapter must have kept outputs that match its code: a GPU edition with some pages from the CPU
    would mislead, so it refuses and lists them all.
    """
    folder = kept_notebooks(card)
    if to.exists():
        shutil.rmtree(to)
    to.mkdir(parents=True)
    for name in BOOK_FILES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, to / name, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
        elif path.exists():
            shutil.copy2(path, to / name)
    config = yaml.safe_load((to / "_config.yml").read_text())
    config["execute"]["execute_notebooks"] = "off"  # the outputs are the GPU's; nothing runs here
    (to / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    lines, problems = [], []
    for path in sorted((to / "book").rglob("*.ipynb")):
        kept = folder / path.name
        try:
            if not kept.exists():
                raise StageError(f"{path.name}: no kept GPU outputs")
            staged = transplant(json.loads(path.read_text()), json.loads(kept.read_text()), path.name)
        except StageError as problem:
            problems.append(str(problem))
            continue
        record = staged["metadata"][STAMP]
        staged["cells"].insert(1, provenance_cell(record, str(kept.relative_to(ROOT))))
        path.write_text(json.dumps(staged, indent=1, ensure_ascii=False) + "\n")
        lines.append(f"{path.relative_to(to)}: outputs of {record['device']}, {record['date'][:10]}")
    if problems:
        raise StageError("cannot stage the GPU edition:\n  " + "\n  ".join(problems)
                         + f"\nRenew them: scripts/gpu_check.sh OUT on the GPU, then copy OUT/notebooks/*.ipynb to "
                         f"{folder.relative_to(ROOT)}/")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    staging = commands.add_parser("stage", help="copy the book's sources with a card's kept GPU outputs",
                                  description="Copy the book's sources to a folder, every chapter carrying the "
                                  "outputs a GPU run kept for CARD, with a note naming the machine and date.")
    staging.add_argument("--card", default="nvidia-h100-80gb-hbm3", help="a folder of course_lib/results/ "
                         "(default: nvidia-h100-80gb-hbm3)")
    staging.add_argument("--to", type=Path, required=True, help="the folder to build the GPU edition from")
    args = parser.parse_args(argv)
    try:
        print("\n".join(stage(args.card, args.to.resolve())))
    except StageError as problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
