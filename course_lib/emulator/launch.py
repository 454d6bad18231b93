"""Launch an emulated kernel as CuPy launches a RawKernel: arguments checked against the kernel's parameters and
passed as cuLaunchKernel takes them, the launch run in this process or, for code not yet trusted, in a child.

Why a child: the emulator runs a kernel's C++ in the Python process that calls it. A kernel that writes far outside
its arrays would crash that process (a notebook's kernel dies), and one that loops forever never gives it back. So
:func:`run_isolated` copies the kernel's arrays into files, runs the launch in a child process that maps them
(``python -m course_lib.emulator.child SPEC``), waits at most the time limit, and copies the arrays back only if the
launch finished. A crash or a timeout becomes an :class:`EmulatorError` that says what it means on a GPU.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from course_lib import compile as cuda_compile
from course_lib.emulator.build import EmulatorError, EmulatorTimeout, build, emulated_source, emulator_problem

SCALAR_TYPES = {np.dtype(np.int32): ctypes.c_int32, np.dtype(np.uint32): ctypes.c_uint32,
                np.dtype(np.int64): ctypes.c_int64, np.dtype(np.uint64): ctypes.c_uint64,
                np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}


MAX_SHARED_BYTES = 227 * 1024  # the most dynamic shared memory a block may have (an H100's limit)


@dataclass(frozen=True)
class Parameter:
    size: int
    pointer: bool
    pointee: int  # bytes of what a pointer points to; 0 for void * and for values


class EmulatedKernel:
    """One kernel instantiation, called like a ``cupy.RawKernel``: ``kernel(grid, block, args, shared_mem=0)``."""

    def __init__(self, library: ctypes.CDLL, index: int, name: str) -> None:
        self.name, self.library_path, self.index = name, library._name, index
        self._launch = getattr(library, f"course_launch_{index}")
        self._launch.restype = ctypes.c_char_p
        describe = getattr(library, f"course_parameters_{index}")
        count = describe(None, None, None)
        sizes, pointers, pointees = (ctypes.c_size_t * count)(), (ctypes.c_int * count)(), (ctypes.c_size_t * count)()
        describe(sizes, pointers, pointees)
        self.parameters = tuple(Parameter(sizes[i], bool(pointers[i]), pointees[i]) for i in range(count))

    def __call__(self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...], shared_mem: int = 0,
                 *, copies_at_issue: bool = False, time_limit_s: float | None = None) -> None:
        """Run the kernel over ``grid`` x ``block``; arrays are updated in place. ``copies_at_issue`` lands each
        ``cp.async`` at once instead of at its wait (the two extremes a GPU may choose between).

        With ``time_limit_s`` the launch runs in a process of its own (:func:`run_isolated`), for
        code not yet trusted: a kernel that loops forever is stopped after the limit, and one that writes outside
        its arrays crashes that process, not this one. Either way an :class:`EmulatorError` says what happened.
        """
        if len(args) != len(self.parameters):
            raise TypeError(f"{self.name} takes {len(self.parameters)} arguments, got {len(args)}")
        values = [self._argument(i, value) for i, value in enumerate(args)]
        geometry = (ctypes.c_uint * 6)(*_extent(grid, "grid"), *_extent(block, "block"))
        if geometry[3] * geometry[4] * geometry[5] > 1024:
            raise ValueError(f"a block has at most 1024 threads, got {tuple(geometry[3:])}")
        if not 0 <= int(shared_mem) <= MAX_SHARED_BYTES:
            raise ValueError(f"shared_mem must be 0 to {MAX_SHARED_BYTES} bytes (an H100's limit), got {shared_mem}")
        if time_limit_s is not None:
            run_isolated(self, tuple(geometry), args, shared_mem, copies_at_issue, time_limit_s)
            return
        arrays = [value for value in args if isinstance(value, np.ndarray)]
        pointers = (ctypes.c_void_p * len(values))(*(ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values))
        starts = (ctypes.c_void_p * max(1, len(arrays)))(*(a.ctypes.data for a in arrays))
        sizes = (ctypes.c_size_t * max(1, len(arrays)))(*(a.nbytes for a in arrays))
        error = self._launch(geometry, ctypes.c_size_t(shared_mem), pointers, starts, sizes, len(arrays),
                             int(copies_at_issue))
        if error is not None:
            raise EmulatorError(f"{self.name}: {error.decode()}")

    def _argument(self, index: int, value: Any) -> Any:
        expected = self.parameters[index]
        if isinstance(value, np.ndarray):
            if not expected.pointer:
                raise TypeError(f"argument {index} of {self.name} is a {expected.size}-byte value, got an array")
            if not value.flags.c_contiguous:
                raise ValueError(f"argument {index} of {self.name}: arrays must be C-contiguous")
            if expected.pointee > 1 and value.itemsize != expected.pointee:
                raise TypeError(f"argument {index} of {self.name} points to {expected.pointee}-byte elements, got "
                                f"an array of {value.dtype} ({value.itemsize}-byte elements)")
            return ctypes.c_void_p(value.ctypes.data)
        if not isinstance(value, np.generic) or value.dtype not in SCALAR_TYPES:
            raise TypeError(f"argument {index} of {self.name}: pass NumPy arrays and NumPy scalars such as "
                            f"np.int32(...) or np.float32(...), so the C type is explicit; got {type(value).__name__}")
        if expected.pointer or value.dtype.itemsize != expected.size:
            what = "a pointer (pass an array)" if expected.pointer else f"a {expected.size}-byte value"
            raise TypeError(f"argument {index} of {self.name} is {what}, got {value.dtype}")
        return SCALAR_TYPES[value.dtype](value.item())


class EmulatedModule:
    """The kernels of one source, like a ``cupy.RawModule`` built with ``name_expressions``."""

    def __init__(self, source: str, name_expressions: tuple[str, ...], file_name: str = "kernel.cu") -> None:
        if problem := emulator_problem():
            raise RuntimeError(problem)
        self.library = ctypes.CDLL(str(build(emulated_source(source, name_expressions, file_name))))
        self.names = name_expressions

    def get_function(self, name: str) -> EmulatedKernel:
        if name not in self.names:
            raise KeyError(f"{name!r} is not one of this module's name expressions: {', '.join(self.names)}")
        return EmulatedKernel(self.library, self.names.index(name), name)


def load_file(path: str | Path, name_expressions: tuple[str, ...]) -> EmulatedModule:
    """:class:`EmulatedModule` of a ``.cu`` file (relative paths are looked up in ``course_lib/kernels``)."""
    path = cuda_compile.kernel_path(path)
    return EmulatedModule(path.read_text(), tuple(name_expressions), path.name)


def _extent(value: int | tuple[int, ...], what: str) -> tuple[int, int, int]:
    dims = (value,) if isinstance(value, int) else tuple(value)
    if not 1 <= len(dims) <= 3 or any(int(d) < 1 for d in dims):
        raise ValueError(f"{what} must be 1 to 3 positive extents, got {value!r}")
    return tuple(int(d) for d in dims) + (1,) * (3 - len(dims))


MEMORY_FAULT = ("it read or wrote memory outside its arrays, or overflowed a thread's 256 KiB stack (on a GPU: an "
                "illegal memory access, which stops the whole program)")
SIGNAL_MEANINGS = {"SIGSEGV": MEMORY_FAULT, "SIGBUS": MEMORY_FAULT,
                   "SIGFPE": "an integer division by zero (on a GPU: no error, an undefined result)",
                   "SIGABRT": "the emulator or an assert in the kernel stopped it"}


def _bytes_of(array: np.ndarray) -> np.ndarray:
    """The array's memory as flat bytes (any dtype, bfloat16 included: the kernel sees only an address)."""
    return array.reshape(-1).view(np.uint8)


def run_isolated(kernel: EmulatedKernel, geometry: Sequence[int], args: Sequence[Any], shared_mem: int,
                 copies_at_issue: bool, time_limit_s: float) -> None:
    """Run ``kernel`` in a child process over copies of ``args``' arrays; copy them back if it finished.

    One file per distinct buffer: an array passed twice (an in-place kernel) stays one buffer. What the kernel
    prints comes back on this process's stdout. The time limit counts the child's start (a fraction of a second).
    """
    with tempfile.TemporaryDirectory(prefix="course-emulator-") as scratch:
        files: dict[tuple[int, int], Path] = {}
        described = []
        for value in args:
            if isinstance(value, np.ndarray):
                buffer = (value.ctypes.data, value.nbytes)
                if buffer not in files:
                    files[buffer] = Path(scratch, f"{len(files)}.bin")
                    _bytes_of(value).tofile(files[buffer])
                described.append({"path": str(files[buffer]), "itemsize": value.itemsize})
            else:
                described.append({"dtype": value.dtype.str, "value": value.item()})
        spec = Path(scratch, "launch.json")
        spec.write_text(json.dumps({"library": kernel.library_path, "index": kernel.index, "name": kernel.name,
                                    "geometry": list(geometry), "shared": int(shared_mem),
                                    "copies_at_issue": copies_at_issue, "args": described}))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))  # this process's course_lib
        try:
            child = subprocess.run([sys.executable, "-m", "course_lib.emulator.child", str(spec)],
                                   capture_output=True, text=True, timeout=time_limit_s, env=env)
        except subprocess.TimeoutExpired:
            raise EmulatorTimeout(f"{kernel.name} did not finish within {time_limit_s:g} s on the emulator: a loop "
                                  "that never ends, or threads waiting for a flag that no one sets?") from None
        print(child.stdout, end="")  # the kernel's printf
        if child.returncode < 0:
            name = signal.Signals(-child.returncode).name
            raise EmulatorError(f"{kernel.name} crashed the emulator ({name}): "
                                f"{SIGNAL_MEANINGS.get(name, 'the process was stopped by this signal')}")
        if child.returncode != 0:
            lines = child.stderr.strip().splitlines() or [f"exit status {child.returncode}"]
            raise EmulatorError(lines[-1])
        for value in args:
            if isinstance(value, np.ndarray) and value.flags.writeable:
                _bytes_of(value)[...] = np.fromfile(files[(value.ctypes.data, value.nbytes)], dtype=np.uint8)
