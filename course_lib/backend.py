"""GPU or CPU: the one decision every chapter builds on.

At import this module asks the NVIDIA driver, through ``ctypes`` and nothing heavier, whether a
usable GPU is there, then checks that CuPy can use it. The answer is fixed for the whole process:

* **GPU mode**: ``xp`` is CuPy, Numba compiles real CUDA kernels, CuPy RawKernels run.
* **CPU mode**: ``xp`` is NumPy and Numba's CUDA *simulator* runs the same kernels on the CPU
  (``NUMBA_ENABLE_CUDASIM=1`` is set here, before anything imports ``numba.cuda``).

``COURSE_DEVICE=cpu`` or ``COURSE_DEVICE=gpu`` overrides the choice. Nothing here touches
``cuda.core.Device()`` on a machine without a working driver: after a failed driver load it can hang.

Only what code needs in order to run is here: the mode, the array module, the card's compute capability
and SM count. What a report or a results file records about the machine (versions, clocks, memory) is in
``course_lib.device_facts``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import textwrap
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

OLDEST_SUPPORTED_CC = (7, 5)  # CUDA 13 compiles for sm_75 and newer
COURSE_ARCHS = ("sm_75", "sm_80", "sm_90", "sm_90a")
# The widest line a chapter prints: what a code cell's output box shows in the book (a 1400-pixel window) without a
# scrollbar. A longer line is cut off at the box's edge, so the mode line and the environment report wrap at it.
OUTPUT_COLUMNS = 88

# CUresult codes the driver may answer with, and what they mean for a learner.
_DRIVER_ERRORS = {
    35: "the driver is older than the CUDA version the libraries need (CUDA_ERROR_INSUFFICIENT_DRIVER)",
    100: "the driver loaded but sees no CUDA-capable device (CUDA_ERROR_NO_DEVICE)",
    101: "CUDA_VISIBLE_DEVICES names a device that does not exist (CUDA_ERROR_INVALID_DEVICE)",
    999: "the driver failed to initialise (CUDA_ERROR_UNKNOWN): often a driver/kernel-module mismatch",
    3: "the driver is not initialised (CUDA_ERROR_NOT_INITIALIZED)",
    303: "the shared object could not be initialised (CUDA_ERROR_SHARED_OBJECT_INIT_FAILED)",
    804: "the driver does not support this GPU or configuration (CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE)",
}


@dataclass
class DriverProbe:
    """What the NVIDIA driver said, asked directly through its C API."""

    library: str | None = None  # path or name of the driver library that loaded
    error: str | None = None  # why there is no usable GPU, in words; None when all went well
    driver_cuda_version: int | None = None  # e.g. 13000 for CUDA 13.0
    devices: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.devices)


@dataclass
class Decision:
    """The mode this process runs in, and why."""

    mode: str  # "gpu" or "cpu"
    reason: str
    forced: bool  # True when COURSE_DEVICE chose the mode
    probe: DriverProbe
    cupy_error: str | None = None  # why CuPy could not use the GPU, when it could not


def _driver_library_names() -> list[str]:
    if sys.platform == "win32":
        return ["nvcuda.dll"]
    if sys.platform == "darwin":
        return []  # NVIDIA has shipped no CUDA driver for macOS since 2019
    return ["libcuda.so.1", "libcuda.so"]


def probe_driver() -> DriverProbe:
    """Ask the CUDA driver API for its version and devices; never raises, never imports CuPy."""
    probe = DriverProbe()
    lib = None
    for name in _driver_library_names():
        try:
            lib = ctypes.CDLL(name)
            probe.library = name
            break
        except OSError:
            continue
    if lib is None:
        probe.error = "no NVIDIA driver library (libcuda) could be loaded"
        return probe
    try:
        status = lib.cuInit(0)
        version = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(version)) == 0:
            probe.driver_cuda_version = version.value
        if status != 0:
            probe.error = _DRIVER_ERRORS.get(status, f"cuInit failed with CUresult {status}")
            return probe
        count = ctypes.c_int(0)
        status = lib.cuDeviceGetCount(ctypes.byref(count))
        if status != 0:
            probe.error = _DRIVER_ERRORS.get(status, f"cuDeviceGetCount failed with CUresult {status}")
            return probe
        for ordinal in range(count.value):
            probe.devices.append(_describe_device(lib, ordinal))
        if not probe.devices:
            probe.error = _DRIVER_ERRORS[100]
    except AttributeError as exc:  # a library named libcuda that lacks the driver API
        probe.error = f"{probe.library} is not a working CUDA driver ({exc})"
    return probe


def _describe_device(lib: ctypes.CDLL, ordinal: int) -> dict[str, Any]:
    device = ctypes.c_int(0)
    lib.cuDeviceGet(ctypes.byref(device), ordinal)
    name = ctypes.create_string_buffer(256)
    lib.cuDeviceGetName(name, 256, device)

    def attribute(code: int) -> int:
        value = ctypes.c_int(0)
        lib.cuDeviceGetAttribute(ctypes.byref(value), code, device)
        return value.value

    memory = ctypes.c_size_t(0)
    lib.cuDeviceTotalMem_v2(ctypes.byref(memory), device)
    # CUdevice_attribute codes: 75/76 compute capability major/minor, 16 multiprocessor count.
    return {
        "ordinal": ordinal,
        "name": name.value.decode(errors="replace"),
        "compute_capability": (attribute(75), attribute(76)),
        "sm_count": attribute(16),
        "memory_bytes": memory.value,
    }


def _cupy_problem() -> str | None:
    """Import CuPy and touch the GPU once; return what went wrong, or None."""
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
        cupy.arange(4).sum().item()  # allocates, launches a kernel, copies back
    except ImportError as exc:
        return f"CuPy is not installed ({exc})"
    except Exception as exc:  # noqa: BLE001 - any failure here means "do not use the GPU"
        return f"CuPy could not use the GPU: {type(exc).__name__}: {exc}"
    return None


def decide(requested: str | None = None, probe: DriverProbe | None = None) -> Decision:
    """Choose the mode from ``COURSE_DEVICE`` (``requested``) and what the driver answers.

    Raises ``RuntimeError`` only when the learner asked for ``gpu`` and no usable GPU is there.
    """
    requested = (requested or "").strip().lower() or None
    if requested not in (None, "cpu", "gpu"):
        raise ValueError(f"COURSE_DEVICE must be 'cpu' or 'gpu' (or unset), got {requested!r}")
    if requested == "cpu":
        return Decision("cpu", "COURSE_DEVICE=cpu asked for CPU mode", True, probe or DriverProbe())
    probe = probe or probe_driver()
    problem = probe.error
    if problem is None:
        cc = probe.devices[0]["compute_capability"]
        if tuple(cc) < OLDEST_SUPPORTED_CC:
            problem = f"{probe.devices[0]['name']} is sm_{cc[0]}{cc[1]}; the course needs sm_75 or newer"
    cupy_error = None
    if problem is None:
        cupy_error = _cupy_problem()
        problem = cupy_error
    if problem is None:
        name = probe.devices[0]["name"]
        reason = f"COURSE_DEVICE=gpu: {name}" if requested else f"found {name}"
        return Decision("gpu", reason, requested == "gpu", probe)
    if requested == "gpu":
        raise RuntimeError(f"COURSE_DEVICE=gpu, but no usable GPU: {problem}. Run `python -m course_lib.env`.")
    return Decision("cpu", problem, False, probe, cupy_error)


def _switch_numba_to_simulator() -> None:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    if "numba" in sys.modules:  # numba read its configuration at import: make it read it again
        from numba.core import config

        config.reload_config()
    if "numba.cuda" in sys.modules and not simulator_active():
        import warnings

        warnings.warn(
            "numba.cuda was imported before course_lib, so it is not running in the simulator; "
            "restart the kernel and import course_lib first.",
            stacklevel=3,
        )


def simulator_active() -> bool:
    """True when Numba's CUDA kernels run in the CPU simulator."""
    from numba.core import config

    return bool(config.ENABLE_CUDASIM)


DECISION = decide(os.environ.get("COURSE_DEVICE"))
if DECISION.mode == "cpu":
    _switch_numba_to_simulator()
    import numpy as xp
else:
    import cupy as xp  # noqa: F401 - re-exported as course_lib.backend.xp


def has_gpu() -> bool:
    """True when this process runs in GPU mode."""
    return DECISION.mode == "gpu"


def mode_text() -> str:
    """The mode and why, on one line: for error messages, records and captions, which wrap on their own."""
    mode = "GPU" if has_gpu() else "CPU (NumPy + Numba CUDA simulator)"
    return f"Mode: {mode} - {DECISION.reason}"


def mode_line() -> str:
    """The visible line every chapter prints: which mode produced the outputs below it.

    When mode and reason do not fit in ``OUTPUT_COLUMNS``, the reason (a CuPy error can be long) goes on indented
    lines of its own under the mode, so that the book shows all of it instead of cutting it off. Joined back into
    one line, it reads as ``mode_text()``.
    """
    line = mode_text()
    if len(line) <= OUTPUT_COLUMNS:
        return line
    head, _, reason = line.partition(" - ")
    return f"{head} -\n" + textwrap.fill(reason, OUTPUT_COLUMNS, initial_indent="  ", subsequent_indent="  ",
                                         break_on_hyphens=False)


@functools.cache
def compute_capability() -> tuple[int, int]:
    """(major, minor) of the current GPU, e.g. (9, 0) for an H100; asked once (GPU mode only)."""
    props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
    return int(props["major"]), int(props["minor"])


@functools.cache
def sm_count() -> int:
    """Streaming multiprocessors of the current GPU, e.g. 132 on an H100 SXM; asked once (GPU mode only)."""
    return int(xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)["multiProcessorCount"])


def to_numpy(array: Any) -> Any:
    """A NumPy copy of ``array`` whether it lives on the GPU (CuPy) or already on the host."""
    import numpy

    return array.get() if hasattr(array, "get") and not isinstance(array, numpy.ndarray) else numpy.asarray(array)


def synchronize() -> None:
    """Wait for queued GPU work (a no-op on CPU): do this before reading a host clock."""
    if has_gpu():
        xp.cuda.get_current_stream().synchronize()


def numba_cuda() -> ModuleType:
    """``numba.cuda``, imported only after the mode (and so the simulator switch) is settled."""
    from numba import cuda

    return cuda
