"""Compile CUDA C with NVRTC, no GPU needed, and read what the compiler says about each kernel.

A kernel's register count, shared memory, stack frame and spills decide how many of its threads fit
on a multiprocessor and whether it stalls on local memory. NVRTC (the runtime compiler, shipped as a
pip wheel) produces PTX and, through ptxas, a cubin for a named architecture on any machine; its
``-Xptxas -v`` log carries ptxas' resource report, which this module parses.

On a GPU, :func:`load_module` hands the same source to CuPy as a ``RawModule`` to run it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from course_lib import backend

KERNEL_DIR = Path(__file__).parent / "kernels"
TARGETS = backend.COURSE_ARCHS  # sm_75 (Turing), sm_80 (Ampere), sm_90 (Hopper), sm_90a (Hopper + wgmma)


class CompileError(RuntimeError):
    """NVRTC rejected the source; the message carries the compiler's log."""


@dataclass(frozen=True)
class KernelResources:
    """ptxas' report for one kernel on one architecture."""

    kernel: str
    arch: str
    registers: int  # per thread: more registers, fewer resident threads
    shared_bytes: int  # static shared memory per block
    stack_bytes: int  # local-memory stack frame per thread (arrays indexed at run time land here)
    spill_store_bytes: int  # registers spilled to local memory: slow
    spill_load_bytes: int
    barriers: int


@dataclass
class CompiledSource:
    """NVRTC's output for one source and one architecture."""

    name: str
    arch: str
    ptx: str
    cubin: bytes
    log: str
    kernels: list[KernelResources] = field(default_factory=list)


def nvrtc_problem() -> str | None:
    """Why NVRTC cannot compile on this machine, or None when it can.

    NVIDIA ships NVRTC wheels for Linux and Windows only: on macOS the chapters say so and show
    the resource reports in the text instead.
    """
    try:
        from cuda.bindings import nvrtc

        status, *_ = nvrtc.nvrtcVersion()
    except Exception as exc:  # noqa: BLE001 - no cuda-python, or no libnvrtc it can load
        return f"NVRTC is not available ({type(exc).__name__}: {exc}); it ships for Linux and Windows"
    return None if status == nvrtc.nvrtcResult.NVRTC_SUCCESS else f"NVRTC does not answer ({status.name})"


def cuda_include_dirs() -> list[str]:
    """Folders holding the CUDA headers (cuda_fp16.h, mma.h, crt/, ...) and the course's own.

    NVIDIA's wheels put their headers in ``site-packages/nvidia/cu13/include``. When packages come
    from more than one site-packages folder (a virtual environment over a system one), the headers
    are split between them, so every such folder on ``sys.path`` is listed, then a toolkit's.
    """
    dirs = [str(KERNEL_DIR)]
    for entry in sys.path:
        for include in sorted(Path(entry or ".").glob("nvidia/cu1[2-9]/include")):
            if str(include) not in dirs and any(include.joinpath(h).exists() for h in ("cuda_fp16.h", "crt")):
                dirs.append(str(include))
    try:
        from cuda.pathfinder import find_nvidia_header_directory

        found = find_nvidia_header_directory("cudart")
    except Exception:  # noqa: BLE001 - an older cuda-pathfinder, or no CUDA headers installed
        found = None
    for candidate in (found, os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if not candidate:
            continue
        include = Path(candidate) if Path(candidate, "cuda_fp16.h").exists() else Path(candidate, "include")
        if include.joinpath("cuda_fp16.h").exists() and str(include) not in dirs:
            dirs.append(str(include))
            break
    return dirs


def _check(result: tuple, what: str, log: str = "") -> Any:
    from cuda.bindings import nvrtc

    status, *values = result
    if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise CompileError(f"{what} failed ({status.name})\n{log}".rstrip())
    return values[0] if values else None


def compile_cuda(
    source: str,
    arch: str = "sm_90",
    *,
    name: str = "kernel.cu",
    options: tuple[str, ...] = (),
    name_expressions: tuple[str, ...] = (),
) -> CompiledSource:
    """Compile CUDA C ``source`` for ``arch`` (e.g. ``"sm_90a"``) to PTX and cubin with NVRTC.

    ``name_expressions`` (``"rms_norm_rows<__nv_bfloat16, 4>"``) name template kernels: they are
    instantiated if need be, and the report uses these names instead of the mangled ones.
    Raises :class:`CompileError` with the compiler's log when the source does not compile.
    """
    if arch not in TARGETS and not re.fullmatch(r"sm_\d+a?", arch):
        raise ValueError(f"arch must look like 'sm_90' or 'sm_90a' (course targets: {TARGETS}), got {arch!r}")
    problem = nvrtc_problem()
    if problem:
        raise RuntimeError(f"compiling CUDA C needs cuda-python and the NVRTC wheel: {problem}")
    from cuda.bindings import nvrtc

    flags = [f"--gpu-architecture={arch}", "--std=c++17", "-Xptxas", "-v", *options]
    flags += [f"-I{d}" for d in cuda_include_dirs()]
    program = _check(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []), "nvrtcCreateProgram")
    try:
        for expression in name_expressions:
            _check(nvrtc.nvrtcAddNameExpression(program, expression.encode()), "nvrtcAddNameExpression")
        encoded = [flag.encode() for flag in flags]
        status = nvrtc.nvrtcCompileProgram(program, len(encoded), encoded)
        log = _read(nvrtc.nvrtcGetProgramLogSize, nvrtc.nvrtcGetProgramLog, program).decode(errors="replace")
        _check(status + (None,), f"compiling {name} for {arch}", log)
        ptx = _read(nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX, program).decode()
        cubin = _read(nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN, program, text=False)
        readable = {
            _check(nvrtc.nvrtcGetLoweredName(program, expression.encode()), "nvrtcGetLoweredName").decode(): expression
            for expression in name_expressions
        }
    finally:
        nvrtc.nvrtcDestroyProgram(program)
    kernels = parse_ptxas_report(log, arch) or ptxas_report(ptx, arch)
    kernels = [dataclasses.replace(k, kernel=readable.get(k.kernel, k.kernel)) for k in kernels]
    return CompiledSource(name, arch, ptx, cubin, log, kernels)


def _read(size_fn: Any, data_fn: Any, program: Any, *, text: bool = True) -> bytes:
    """One of NVRTC's outputs. The log's and the PTX's sizes count a closing NUL, which is dropped; a cubin is
    an ELF file that may end in zero bytes of its own, so it is returned whole."""
    size = _check(size_fn(program), size_fn.__name__)
    buffer = b" " * size
    _check(data_fn(program, buffer), data_fn.__name__)
    return buffer.rstrip(b"\x00") if text else buffer


_ENTRY = re.compile(r"Compiling entry function '(?P<kernel>[^']+)' for '(?P<arch>\w+)'")
_FRAME = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads"
)
_USED = re.compile(r"Used (?P<registers>\d+) registers")


def parse_ptxas_report(log: str, arch: str) -> list[KernelResources]:
    """Turn ptxas' ``-v`` lines into one :class:`KernelResources` per kernel."""
    kernels: list[KernelResources] = []
    current: dict[str, Any] | None = None
    for line in log.splitlines():
        if match := _ENTRY.search(line):
            current = {"kernel": match["kernel"], "arch": match["arch"] or arch}
        elif current is not None and (match := _FRAME.search(line)):
            current.update(stack=int(match["stack"]), stores=int(match["stores"]), loads=int(match["loads"]))
        elif current is not None and (match := _USED.search(line)):
            smem = re.search(r"(\d+) bytes smem", line)
            barriers = re.search(r"used (\d+) barriers", line)
            kernels.append(
                KernelResources(
                    kernel=current["kernel"],
                    arch=current["arch"],
                    registers=int(match["registers"]),
                    shared_bytes=int(smem.group(1)) if smem else 0,
                    stack_bytes=current.get("stack", 0),
                    spill_store_bytes=current.get("stores", 0),
                    spill_load_bytes=current.get("loads", 0),
                    barriers=int(barriers.group(1)) if barriers else 0,
                )
            )
            current = None
    return kernels


def find_ptxas() -> str | None:
    """The ``ptxas`` assembler: from the nvidia-cuda-nvcc wheel, a CUDA toolkit, or the PATH."""
    try:
        from cuda.pathfinder import find_nvidia_binary_utility

        found = find_nvidia_binary_utility("ptxas")
    except Exception:  # noqa: BLE001 - an older cuda-pathfinder, or no nvcc wheel
        found = None
    toolkit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    in_toolkit = Path(toolkit, "bin", "ptxas")
    return found or (str(in_toolkit) if in_toolkit.exists() else shutil.which("ptxas"))


def ptxas_report(ptx: str, arch: str) -> list[KernelResources]:
    """Assemble ``ptx`` with ``ptxas -v`` and parse its report.

    Some NVRTC builds leave ptxas' report out of the program log even when asked for it; the
    standalone assembler gives the same report. Returns [] when no ptxas is installed.
    """
    ptxas = find_ptxas()
    if ptxas is None:
        return []
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder, "kernel.ptx")
        source.write_text(ptx)
        command = [ptxas, f"-arch={arch}", "-v", str(source), "-o", str(Path(folder, "kernel.cubin"))]
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise CompileError(f"ptxas failed for {arch}\n{done.stderr}")
    return parse_ptxas_report(done.stdout + done.stderr, arch)


def course_sources() -> list[Path]:
    """Every ``.cu`` file the course ships (the test suite compiles each for every target)."""
    return sorted(KERNEL_DIR.rglob("*.cu"))


def kernel_path(path: str | Path) -> Path:
    """``path`` as given if it exists, else the file of that name in ``course_lib/kernels``."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    return KERNEL_DIR / path


def compile_file(path: str | Path, arch: str = "sm_90", name_expressions: tuple[str, ...] = ()) -> CompiledSource:
    """Compile a ``.cu`` file; ``path`` may be relative to ``course_lib/kernels``."""
    path = kernel_path(path)
    return compile_cuda(path.read_text(), arch, name=path.name, name_expressions=name_expressions)


def resource_table(compiled: list[CompiledSource]) -> str:
    """A plain-text table of registers, shared memory, stack and spills, one row per kernel and arch."""
    width = max([28] + [len(k.kernel) + 2 for source in compiled for k in source.kernels])
    header = f"{'kernel':<{width}}{'arch':<8}{'regs':>6}{'smem B':>9}{'stack B':>9}{'spill st/ld B':>15}"
    rows = [header, "-" * len(header)]
    for source in compiled:
        for k in source.kernels:
            spills = f"{k.spill_store_bytes}/{k.spill_load_bytes}"
            rows.append(f"{k.kernel:<{width}}{k.arch:<8}{k.registers:>6}{k.shared_bytes:>9}{k.stack_bytes:>9}{spills:>15}")
    return "\n".join(rows)


def load_module(source: str, *, arch: str | None = None, options: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """Compile ``source`` for the current GPU and load it as a ``cupy.RawModule`` (GPU mode only).

    ``arch="sm_90a"`` is needed for Hopper-only instructions such as ``wgmma``; by default CuPy
    compiles for the GPU it runs on. Extra keyword arguments go to ``RawModule`` (``name_expressions``).
    """
    if not backend.has_gpu():
        raise RuntimeError(
            f"running a CUDA C kernel needs a GPU ({backend.mode_text()}); "
            "compile_cuda() checks the same source on this machine"
        )
    import cupy

    flags = ("--std=c++17", *(f"-I{d}" for d in cuda_include_dirs()), *options)
    if arch:
        flags += (f"-arch={arch}",)
    return cupy.RawModule(code=source, options=flags, backend="nvrtc", **kwargs)


def allow_shared_memory(kernel: Any, shared_bytes: int) -> Any:
    """``kernel`` (a CuPy function) allowed ``shared_bytes`` of dynamic shared memory: above 48 KiB a kernel
    must opt in. Set once per kernel, not on every launch."""
    if shared_bytes > kernel.max_dynamic_shared_size_bytes:
        kernel.max_dynamic_shared_size_bytes = shared_bytes
    return kernel


def load_file(path: str | Path, **kwargs: Any) -> Any:
    """:func:`load_module` for a ``.cu`` file (relative paths are looked up in ``course_lib/kernels``)."""
    return load_module(kernel_path(path).read_text(), **kwargs)
