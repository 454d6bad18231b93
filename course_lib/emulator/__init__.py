"""Run the course's CUDA C kernels on the CPU: a warp emulator, for small problems and for tests.

The Numba simulator runs Numba kernels without a GPU, and NVRTC compiles CUDA C without one, but neither runs a
CUDA C kernel. This module does, for the kernels of ``course_lib/kernels``: it compiles the kernel's own source with
the machine's C++ compiler against ``include/course_emulator.h``, where every GPU thread is a fiber and the warp-wide
instructions the course uses (``__shfl_*_sync``, ``ldmatrix``, ``mma.sync`` m16n8k16, ``cp.async``) are written in
C++ from the PTX ISA's description of each. A kernel that has never met a GPU can then be checked against a float64
reference on a laptop, with its shared-memory addresses, copy sources and barriers checked on the way (the header
lists what is checked, and what is not).

The interface is CuPy's, so a launcher reads the same either way::

    module = emulator.load_file("paged_prefill.cu", name_expressions=("paged_prefill<__half, 64>",))
    kernel = module.get_function("paged_prefill<__half, 64>")
    kernel(grid, block, (out, query, ..., np.int32(num_heads), ...), shared_mem=shared_bytes)

Arguments are NumPy arrays (passed as pointers; C-contiguous) and NumPy scalars, whose sizes are checked against
the kernel's parameters. It is slow (about a microsecond per thread per warp-wide instruction): keep problems to a
few thread blocks. It needs a C++17 compiler (``$CXX``, else ``g++`` or ``clang++``) and POSIX ``ucontext``
(tested on Linux; macOS has it, untested). Compiled kernels are cached in ``~/.cache/course-lib/emulator`` (or
``$COURSE_EMULATOR_CACHE``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from course_lib import backend
from course_lib import compile as cuda_compile

INCLUDE_DIR = Path(__file__).parent / "include"
FLAGS = ("-std=c++17", "-O2", "-shared", "-fPIC", "-DCOURSE_EMULATOR", "-D__CUDA_ARCH__=800", "-w")
# `extern __shared__ __align__(128) unsigned char name[];` declares the block's dynamic shared memory. On the CPU
# it becomes a pointer to the emulator's buffer for the block that is running.
EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?"  # the keyword, an alignment
                           r"([\w:]+(?:\s+[\w:]+)*?)\s+(\w+)\s*\[\s*\]\s*;")  # the element type, the name
SCALAR_TYPES = {np.dtype(np.int32): ctypes.c_int32, np.dtype(np.uint32): ctypes.c_uint32,
                np.dtype(np.int64): ctypes.c_int64, np.dtype(np.uint64): ctypes.c_uint64,
                np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}


class EmulatorError(RuntimeError):
    """The emulated kernel did something that would hang or read out of place on a GPU (the message says what)."""


class EmulatorTimeout(EmulatorError):
    """An isolated launch did not finish within its time limit (its process was stopped)."""


def compiler() -> str | None:
    """The C++ compiler the emulator uses: ``$CXX``, else ``g++``, else ``clang++``; None when there is none."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


def emulator_problem() -> str | None:
    """Why the emulator cannot run here, or None when it can."""
    if os.name != "posix":
        return "the warp emulator switches threads with POSIX ucontext, which this system lacks"
    if compiler() is None:
        return "the warp emulator needs a C++17 compiler (set $CXX, or install g++ or clang++)"
    return None


def cuda_c_problem() -> str | None:
    """Why this process cannot run a CUDA C kernel (None on a GPU, or in CPU mode with the emulator)."""
    if backend.has_gpu():
        return None
    problem = emulator_problem()
    return f"no GPU, and no warp emulator: {problem}" if problem else None


def cache_dir() -> Path:
    return Path(os.environ.get("COURSE_EMULATOR_CACHE", Path.home() / ".cache" / "course-lib" / "emulator"))


def emulated_source(source: str, name_expressions: tuple[str, ...]) -> str:
    """The kernel's source as the C++ compiler sees it: dynamic shared memory as a pointer, and one ``extern "C"``
    launch function and one parameter-size function per name expression."""
    text = EXTERN_SHARED.sub(r"\1* \2 = reinterpret_cast<\1*>(::course_emulator::dynamic_shared());", source)
    for i, name in enumerate(name_expressions):
        text += (f'\nextern "C" const char* course_launch_{i}(const unsigned* geometry, size_t shared, void* const* '
                 f"args, const void* const* starts, const size_t* bytes, int buffers, int copies_at_issue) {{\n"
                 f"    return ::course_emulator::launch(geometry, shared, starts, bytes, buffers, copies_at_issue != 0,"
                 f" [args] {{ ::course_emulator::call(&{name}, args); }});\n}}\n"
                 f'extern "C" int course_parameters_{i}(size_t* sizes, int* pointers) {{\n'
                 f"    return ::course_emulator::parameters(&{name}, sizes, pointers);\n}}\n")
    return text


@functools.cache
def _build(text: str) -> Path:
    """Compile ``text`` into a shared library once per content (and header, flags, compiler); return its path."""
    cxx = compiler()
    headers = "".join(p.read_text() for p in sorted(INCLUDE_DIR.glob("*.h")))
    key = hashlib.sha256("\0".join((text, headers, " ".join(FLAGS), str(cxx), sys.platform)).encode()).hexdigest()
    library = cache_dir() / f"{key[:24]}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        cpp, built = Path(scratch, "kernel.cpp"), Path(scratch, "kernel.so")
        cpp.write_text(text)
        command = [cxx, *FLAGS, "-include", "course_emulator.h", f"-I{INCLUDE_DIR}",
                   f"-I{cuda_compile.KERNEL_DIR}", str(cpp), "-o", str(built)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise EmulatorError(f"the C++ compiler refused the emulated kernel:\n{result.stderr[-4000:]}")
        os.replace(built, library)  # atomic: parallel test workers may build the same library
    return library


@dataclass(frozen=True)
class Parameter:
    size: int
    pointer: bool


class EmulatedKernel:
    """One kernel instantiation, called like a ``cupy.RawKernel``: ``kernel(grid, block, args, shared_mem=0)``."""

    def __init__(self, library: ctypes.CDLL, index: int, name: str) -> None:
        self.name, self.library_path, self.index = name, library._name, index
        self._launch = getattr(library, f"course_launch_{index}")
        self._launch.restype = ctypes.c_char_p
        sizes, pointers = (ctypes.c_size_t * 64)(), (ctypes.c_int * 64)()
        count = getattr(library, f"course_parameters_{index}")(sizes, pointers)
        self.parameters = tuple(Parameter(sizes[i], bool(pointers[i])) for i in range(count))

    def __call__(self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...], shared_mem: int = 0,
                 *, copies_at_issue: bool = False, time_limit_s: float | None = None) -> None:
        """Run the kernel over ``grid`` x ``block``; arrays are updated in place. ``copies_at_issue`` lands each
        ``cp.async`` at once instead of at its wait (the two extremes a GPU may choose between).

        With ``time_limit_s`` the launch runs in a process of its own (:mod:`course_lib.emulator.isolated`), for
        code not yet trusted: a kernel that loops forever is stopped after the limit, and one that writes outside
        its arrays crashes that process, not this one. Either way an :class:`EmulatorError` says what happened.
        """
        if len(args) != len(self.parameters):
            raise TypeError(f"{self.name} takes {len(self.parameters)} arguments, got {len(args)}")
        values = [self._argument(i, value) for i, value in enumerate(args)]
        if time_limit_s is not None:
            from course_lib.emulator.isolated import run_isolated  # the child process imports this module

            run_isolated(self, grid, block, args, shared_mem, copies_at_issue, time_limit_s)
            return
        arrays = [value for value in args if isinstance(value, np.ndarray)]
        geometry = (ctypes.c_uint * 6)(*_extent(grid, "grid"), *_extent(block, "block"))
        if geometry[3] * geometry[4] * geometry[5] > 1024:
            raise ValueError(f"a block has at most 1024 threads, got {tuple(geometry[3:])}")
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

    def __init__(self, source: str, name_expressions: tuple[str, ...]) -> None:
        if problem := emulator_problem():
            raise RuntimeError(problem)
        self.library = ctypes.CDLL(str(_build(emulated_source(source, name_expressions))))
        self.names = name_expressions

    def get_function(self, name: str) -> EmulatedKernel:
        if name not in self.names:
            raise KeyError(f"{name!r} is not one of this module's name expressions: {', '.join(self.names)}")
        return EmulatedKernel(self.library, self.names.index(name), name)


def load_file(path: str | Path, name_expressions: tuple[str, ...]) -> EmulatedModule:
    """:class:`EmulatedModule` of a ``.cu`` file (relative paths are looked up in ``course_lib/kernels``)."""
    return EmulatedModule(cuda_compile.kernel_path(path).read_text(), tuple(name_expressions))


def _extent(value: int | tuple[int, ...], what: str) -> tuple[int, int, int]:
    dims = (value,) if isinstance(value, int) else tuple(value)
    if not 1 <= len(dims) <= 3 or any(int(d) < 1 for d in dims):
        raise ValueError(f"{what} must be 1 to 3 positive extents, got {value!r}")
    return tuple(int(d) for d in dims) + (1,) * (3 - len(dims))
