"""One emulated launch in a process of its own, for kernels not yet trusted (a learner's, in a checker).

The emulator runs a kernel's C++ in the Python process that calls it. A kernel that writes far outside its arrays
would crash that process (a notebook's kernel dies), and one that loops forever never gives it back. So
:func:`run_isolated` copies the kernel's arrays into files, runs the launch in a child process that maps them
(``python -m course_lib.emulator.isolated SPEC``), waits at most the time limit, and copies the arrays back only
if the launch finished. A crash or a timeout becomes an :class:`~course_lib.emulator.EmulatorError` that says
what it means on a GPU.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from course_lib.emulator import EmulatedKernel, EmulatorError, EmulatorTimeout

if TYPE_CHECKING:
    from collections.abc import Sequence

CRASH_MEANING = ("it read or wrote memory outside its arrays (on a GPU: an illegal memory access, which stops the "
                 "whole program)")


def _bytes_of(array: np.ndarray) -> np.ndarray:
    """The array's memory as flat bytes (any dtype, bfloat16 included: the kernel sees only an address)."""
    return array.reshape(-1).view(np.uint8)


def run_isolated(kernel: EmulatedKernel, grid: Sequence[int] | int, block: Sequence[int] | int,
                 args: Sequence[Any], shared_mem: int, copies_at_issue: bool, time_limit_s: float) -> None:
    """Run ``kernel`` in a child process over copies of ``args``' arrays; copy them back if it finished."""
    with tempfile.TemporaryDirectory(prefix="course-emulator-") as scratch:
        described = []
        for i, value in enumerate(args):
            if isinstance(value, np.ndarray):
                path = Path(scratch, f"{i}.bin")
                _bytes_of(value).tofile(path)
                described.append({"path": str(path)})
            else:
                described.append({"dtype": value.dtype.str, "value": value.item()})
        spec = Path(scratch, "launch.json")
        spec.write_text(json.dumps({"library": kernel.library_path, "index": kernel.index, "name": kernel.name,
                                    "grid": grid, "block": block, "shared": shared_mem,
                                    "copies_at_issue": copies_at_issue, "args": described}))
        try:
            child = subprocess.run([sys.executable, "-m", "course_lib.emulator.isolated", str(spec)],
                                   capture_output=True, text=True, timeout=time_limit_s)
        except subprocess.TimeoutExpired:
            raise EmulatorTimeout(f"{kernel.name} did not finish within {time_limit_s:g} s on the emulator: a loop "
                                  "that never ends, or threads waiting for a flag that no one sets?") from None
        if child.returncode < 0:
            name = signal.Signals(-child.returncode).name
            raise EmulatorError(f"{kernel.name} crashed the emulator ({name}): {CRASH_MEANING}")
        if child.returncode != 0:
            lines = child.stderr.strip().splitlines() or [f"exit status {child.returncode}"]
            raise EmulatorError(lines[-1])
        for i, value in enumerate(args):
            if isinstance(value, np.ndarray):
                _bytes_of(value)[...] = np.fromfile(Path(scratch, f"{i}.bin"), dtype=np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m course_lib.emulator.isolated",
        description="Run one emulated kernel launch described by a JSON file (written by run_isolated, which "
                    "starts this program: it is not meant to be run by hand). Arrays are files of raw bytes, "
                    "mapped and updated in place.")
    parser.add_argument("spec", type=Path, help="the launch: library, kernel, grid, block, arguments")
    spec = json.loads(parser.parse_args(argv).spec.read_text())
    kernel = EmulatedKernel(ctypes.CDLL(spec["library"]), spec["index"], spec["name"])
    args = [np.memmap(a["path"], dtype=np.uint8, mode="r+") if "path" in a else np.dtype(a["dtype"]).type(a["value"])
            for a in spec["args"]]
    try:
        kernel(tuple(spec["grid"]) if isinstance(spec["grid"], list) else spec["grid"],
               tuple(spec["block"]) if isinstance(spec["block"], list) else spec["block"], tuple(args),
               spec["shared"], copies_at_issue=spec["copies_at_issue"])
    except EmulatorError as error:
        print(error, file=sys.stderr)
        return 3
    for value in args:
        if isinstance(value, np.memmap):
            value.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
