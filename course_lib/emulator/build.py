"""Build kernels for the warp emulator: the source as C++, compiled once per content by the machine's compiler.

Also what can stop the emulator (no compiler, no ucontext) and the errors it reports.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from course_lib import backend
from course_lib import compile as cuda_compile

INCLUDE_DIR = Path(__file__).parent / "include"
# -fvisibility=hidden: each library keeps its own emulator state and static __shared__ arrays (exported, g++ would
# merge them across libraries, whatever their sizes); -fno-strict-aliasing: CUDA code reads one type through a
# pointer to another (packed halves as unsigned, rows as uint4), which -O2 may otherwise reorder;
# -U_FORTIFY_SOURCE: a fortified _longjmp refuses to jump onto another fiber's stack, which is how fibers switch.
FLAGS = ("-std=c++17", "-O2", "-shared", "-fPIC", "-fvisibility=hidden", "-fno-strict-aliasing", "-U_FORTIFY_SOURCE",
         "-DCOURSE_EMULATOR", "-D__CUDA_ARCH__=800", "-w")
ERROR_LINES = 40  # a compiler's first errors say what is wrong; the rest usually follow from them
# `extern __shared__ __align__(128) unsigned char name[];` declares the block's dynamic shared memory. On the CPU
# it becomes a pointer to the emulator's buffer for the block that is running.
EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?"  # the keyword, an alignment
                           r"([\w:]+(?:\s+[\w:]+)*?)\s+(\w+)\s*\[\s*\]\s*;")  # the element type, the name


class EmulatorError(RuntimeError):
    """The emulated kernel did something that would hang or read out of place on a GPU (the message says what)."""


class EmulatorTimeout(EmulatorError):
    """An isolated launch did not finish within its time limit (its process was stopped)."""


def compiler() -> list[str] | None:
    """The C++ compiler the emulator uses (a command, with any arguments): ``$CXX``, else ``g++``, else ``clang++``;
    None when there is none."""
    chosen = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    return shlex.split(chosen) if chosen else None


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


def emulated_source(source: str, name_expressions: tuple[str, ...], file_name: str = "kernel.cu") -> str:
    """The kernel's source as the C++ compiler sees it: dynamic shared memory as a pointer, and one ``extern "C"``
    launch function and one parameter-description function per name expression (the only names exported)."""
    text = f'#line 1 "{file_name}"\n'  # the compiler's errors then name the kernel's file and lines
    text += EXTERN_SHARED.sub(r"\1* \2 = reinterpret_cast<\1*>(::course_emulator::dynamic_shared());", source)
    export = '\nextern "C" __attribute__((visibility("default")))'
    for i, name in enumerate(name_expressions):
        text += (f"{export} const char* course_launch_{i}(const unsigned* geometry, size_t shared, void* const* "
                 f"args, const void* const* starts, const size_t* bytes, int buffers, int copies_at_issue) {{\n"
                 f"    return ::course_emulator::launch(geometry, shared, starts, bytes, buffers, copies_at_issue != 0,"
                 f" [args] {{ ::course_emulator::call(&{name}, args); }});\n}}"
                 f"{export} int course_parameters_{i}(size_t* sizes, int* pointers, size_t* pointees) {{\n"
                 f"    return ::course_emulator::parameters(&{name}, sizes, pointers, pointees);\n}}\n")
    return text


@functools.cache
def build(text: str) -> Path:
    """Compile ``text`` into a shared library once per content (and headers, flags, compiler); return its path."""
    cxx = compiler()
    headers = [p for pattern in ("*.h", "*.cuh") for folder in (INCLUDE_DIR, cuda_compile.KERNEL_DIR)
               for p in sorted(folder.glob(pattern))]  # the emulator's, and the kernels' own (tensor_core.cuh, ...)
    parts = (text, *(p.read_text() for p in headers), " ".join(FLAGS), str(cxx), sys.platform)
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    library = cache_dir() / f"{key[:24]}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        cpp, built = Path(scratch, "kernel.cpp"), Path(scratch, "kernel.so")
        cpp.write_text(text)
        command = [*cxx, *FLAGS, "-include", "course_emulator.h", f"-I{INCLUDE_DIR}",
                   f"-I{cuda_compile.KERNEL_DIR}", str(cpp), "-o", str(built)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            first = "\n".join(result.stderr.splitlines()[:ERROR_LINES])
            raise EmulatorError(f"the C++ compiler refused the emulated kernel:\n{first}")
        os.replace(built, library)  # atomic: parallel test workers may build the same library
    return library
