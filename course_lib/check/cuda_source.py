"""Learner kernels written in CUDA C: compiled with NVRTC in both modes, run on a GPU or on the warp emulator.

NVRTC ships as a wheel, so a CUDA C string compiles on a laptop: a checker can quote the compiler's
errors, read the PTX and show the resource report there. In CPU mode the kernel then runs on the
course's warp emulator (``course_lib.emulator``), in a process of its own, so that a kernel that
loops forever or writes outside its arrays is stopped and named instead of taking the notebook down.
Where the emulator cannot run (no C++ compiler), a checker says so plainly ("NOT CHECKED
numerically") instead of printing a pass.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from course_lib import backend, emulator
from course_lib.check.failure import CheckFailed, describe_learner_error
from course_lib.check.learner import (
    TIME_LIMIT_VARIABLE,
    call_learner,
    default_time_limit_s,
    is_cuda_kernel,
    run_with_time_limit,
)
from course_lib.check.run import mode_phrase
from course_lib.compile import CompiledSource, CompileError, compile_cuda, load_module, nvrtc_problem

MAX_LOG_LINES = 12  # a compiler's first errors say what is wrong; the rest usually follow from them
COMMENTS = re.compile(r"//[^\n]*|/\*.*?\*/", re.DOTALL)
COMPILED, NOT_CHECKED = "COMPILED", "NOT CHECKED"  # how a CPU-mode report starts, where a pass says PASSED
RUN_ON_A_GPU = "On this machine the check stops at compilation: run it on a GPU to check the results."


class CannotRunHere(Exception):
    """CPU mode, and the warp emulator cannot run this kernel here (the message says why)."""


def builds_source(candidate: Any) -> bool:
    """True for what a learner hands in as CUDA C: a str, or a plain function of no arguments that returns one."""
    if isinstance(candidate, str):
        return True
    if not callable(candidate) or is_cuda_kernel(candidate):
        return False
    try:
        return not inspect.signature(candidate).parameters
    except (TypeError, ValueError):  # a built-in that does not describe its parameters builds no source
        return False


def learner_source(source: Any, kernel: str) -> str:
    """The learner's CUDA C for ``kernel``: the str itself, or what the function that builds it returns.

    The function is called like any learner code, so an unwritten one fails as NotWrittenYet, in the checker,
    rather than with a traceback in the check cell. None usually means a function that forgot to return.
    """
    __tracebackhide__ = True
    if callable(source):
        name = getattr(source, "__name__", "your function")
        source = call_learner(source, name=name, expected_signature=f"{name}()")
    if not isinstance(source, str):
        raise CheckFailed(f"expected the CUDA C source of {kernel} as a str, got {type(source).__name__}: "
                          "does the function that builds it `return` the string?")
    return source


def code_without_comments(source: str) -> str:
    """The source with its // and /* */ comments removed, so a commented-out call does not count."""
    return COMMENTS.sub("", source)


def cannot_compile_here(kernel: str) -> bool:
    """True, after saying so, where NVRTC is missing: the check then stops without claiming anything."""
    problem = nvrtc_problem()
    if problem:
        print(f"{NOT_CHECKED} {kernel} (CUDA C): it cannot even be compiled here: {problem}")
    return problem is not None


def compile_learner_source(source: str, kernel: str, arch: str, signature: str) -> CompiledSource:
    """Compile with NVRTC for ``arch``; a CheckFailed quotes the compiler's first lines or names a missing kernel."""
    __tracebackhide__ = True
    try:
        compiled = compile_cuda(source, arch, name=f"{kernel}.cu")
    except CompileError as error:
        log = "\n".join(str(error).splitlines()[1 : MAX_LOG_LINES + 1]).strip()  # line 0 is NVRTC's status
        raise CheckFailed(f"your CUDA C source does not compile for {arch}:\n{log}") from None
    if not re.search(rf"\.entry\s+{kernel}\s*\(", compiled.ptx):
        raise CheckFailed(f"your CUDA C source compiles but has no kernel named {kernel}; declare it as\n"
                          f"  {signature}\n(extern \"C\" keeps the name from being mangled)")
    return compiled


def resource_summary(compiled: CompiledSource, kernel: str) -> str:
    """'(32 registers, 0 B shared memory, no spills)' from ptxas' report, or '' where there is none."""
    report = next((k for k in compiled.kernels if k.kernel == kernel), None)
    if report is None:
        return ""
    spills = report.spill_store_bytes + report.spill_load_bytes
    spilled = f"{spills} B of spills" if spills else "no spills"
    return f" ({report.registers} registers, {report.shared_bytes} B shared memory, {spilled})"


def report_compiled_only(compiled: CompiledSource, kernel: str, finding: str = "", next_step: str = RUN_ON_A_GPU,
                         why: str = "") -> None:
    """CPU mode without the emulator: say what compiling showed, that the numerical check did not run, and why."""
    found = f"; {finding}" if finding else ""
    print(f"{COMPILED} {kernel} (CUDA C) for {compiled.arch}{resource_summary(compiled, kernel)}{found}.\n"
          f"{NOT_CHECKED} numerically: running CUDA C needs a GPU or the CPU warp emulator, this runs "
          f"{mode_phrase()}, and {why or 'the emulator cannot run here'}. {next_step}")


def load_learner_kernel(source: str, kernel: str) -> Any:
    """The learner's kernel, ready to launch: a CuPy RawKernel on a GPU, the warp emulator's kernel in CPU mode.

    On a GPU, CuPy's compile or load errors become a CheckFailed. In CPU mode a CannotRunHere says why the emulator
    cannot run it (no C++ compiler, or an instruction it does not model), and the caller reports the compile only.
    """
    __tracebackhide__ = True
    if not backend.has_gpu():
        if problem := emulator.emulator_problem():
            raise CannotRunHere(problem)
        try:
            return emulator.EmulatedModule(source, (kernel,)).get_function(kernel)
        except emulator.EmulatorError as error:
            raise CannotRunHere(f"the warp emulator cannot build it (it models the instructions the course uses, "
                                f"not all of CUDA): {str(error).splitlines()[-1]}") from None
    try:
        return load_module(source).get_function(kernel)
    except Exception as error:  # noqa: BLE001 - CuPy's compile or load errors, reported as the learner's
        raise CheckFailed(describe_learner_error(kernel, error)) from None


def where_it_runs() -> str:
    """"" on a GPU; " on the CPU warp emulator" in CPU mode, for a checker's report."""
    return "" if backend.has_gpu() else " on the CPU warp emulator"


def launch_learner_source_kernel(
    function: Any, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...], name: str
) -> None:
    """Launch a RawKernel as ``function(grid, block, args)`` and wait for it, under the checker's time limit.

    An emulated kernel runs in a process of its own, stopped at the time limit; what went wrong there (a crash, a
    deadlock, an address outside shared memory) becomes a CheckFailed that names it.
    """
    __tracebackhide__ = True
    if isinstance(function, emulator.EmulatedKernel):
        limit = default_time_limit_s()
        try:
            function(grid, block, args, time_limit_s=limit)
        except emulator.EmulatorTimeout:
            raise CheckFailed(f"{name} did not finish within {limit:g} s on the CPU warp emulator: an infinite loop, "
                              f"or threads waiting for each other outside __syncthreads()? (If it is only slow, set "
                              f"{TIME_LIMIT_VARIABLE} to allow more.)") from None
        except emulator.EmulatorError as error:
            raise CheckFailed(f"{name} failed on the CPU warp emulator: {error}") from None
        return

    def run_and_wait() -> None:
        function(grid, block, args)
        backend.synchronize()  # a launch returns at once: wait, so errors and hangs show here

    run_with_time_limit(run_and_wait, name)
