"""The child process of an isolated launch: ``python -m course_lib.emulator.child SPEC`` runs the one launch that
``course_lib.emulator.launch.run_isolated`` described in SPEC, over arrays kept in files, and exits.

Exit status 0: the launch finished and the files hold the arrays it wrote. 3: the emulator stopped it (the reason
is the last line of stderr). A signal: the kernel crashed this process.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

import numpy as np

from course_lib.emulator.build import EmulatorError
from course_lib.emulator.launch import EmulatedKernel


def _array(path: str, itemsize: int) -> np.ndarray:
    """The file's bytes as an array the kernel may update in place, of elements as wide as the parent's."""
    if Path(path).stat().st_size == 0:
        return np.zeros(0, dtype=f"V{itemsize}")  # nothing to map; the kernel gets a pointer it must not follow
    return np.memmap(path, dtype=f"V{itemsize}", mode="r+")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m course_lib.emulator.child",
        description="Run one emulated kernel launch described by a JSON file (written by run_isolated, which "
                    "starts this program: it is not meant to be run by hand). Arrays are files of raw bytes, "
                    "mapped and updated in place.")
    parser.add_argument("spec", type=Path, help="the launch: library, kernel, grid, block, arguments")
    spec = json.loads(parser.parse_args(argv).spec.read_text())
    kernel = EmulatedKernel(ctypes.CDLL(spec["library"]), spec["index"], spec["name"])
    args = [_array(a["path"], a["itemsize"]) if "path" in a else np.dtype(a["dtype"]).type(a["value"])
            for a in spec["args"]]
    geometry = spec["geometry"]
    try:
        kernel(tuple(geometry[:3]), tuple(geometry[3:]), tuple(args), spec["shared"],
               copies_at_issue=spec["copies_at_issue"])
    except EmulatorError as error:
        print(error, file=sys.stderr)
        return 3
    for value in args:
        if isinstance(value, np.memmap):
            value.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
