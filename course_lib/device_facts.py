"""Where a number came from: the device, its driver and the libraries, as reports and results files record them.

``course_lib.backend`` decides which mode a process runs in; this module describes the machine for the
reader of a result: the card's name, SMs, memory, clocks and CUDA versions in GPU mode, the processor in
CPU mode, and the versions of the libraries in both. ``course_lib.bench`` writes these facts into every
results file; ``python -m course_lib.env`` (chapter 00) prints them.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

from course_lib import backend

LIBRARIES = (
    "numpy", "numba", "numba-cuda", "cupy-cuda13x", "cupy-cuda12x", "cuda-bindings", "cuda-python",
    "nvidia-cuda-nvrtc", "nvidia-cuda-nvcc", "mpi4py", "mpich", "matplotlib", "torch", "nvmath-python",
)


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries the course depends on (missing ones left out)."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def device_facts() -> dict[str, Any]:
    """Everything a results file needs to say where a number came from.

    In GPU mode: name, compute capability, SM count, memory, clocks, L2, driver and runtime versions.
    In CPU mode: the processor and core count. Library versions in both.
    """
    facts: dict[str, Any] = {
        "mode": backend.DECISION.mode,
        "mode_reason": backend.DECISION.reason,
        "host": {"system": platform.system(), "machine": platform.machine(), "cpu_count": os.cpu_count()},
        "libraries": library_versions(),
    }
    if not backend.has_gpu():
        facts["name"] = cpu_name()
        return facts
    runtime = backend.xp.cuda.runtime
    ordinal = backend.xp.cuda.Device().id
    props = runtime.getDeviceProperties(ordinal)

    def attribute(code: int) -> int | None:
        try:
            return int(runtime.deviceGetAttribute(code, ordinal))
        except Exception:  # noqa: BLE001 - an attribute this driver no longer reports
            return None

    # cudaDeviceAttr codes: 13 SM clock (kHz), 36 memory clock (kHz), 37 bus width (bits), 38 L2 bytes.
    memory_clock_khz, bus_bits = attribute(36), attribute(37)
    facts.update(
        name=props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"]),
        compute_capability=f"{props['major']}.{props['minor']}",
        sm_count=props["multiProcessorCount"],
        memory_bytes=props["totalGlobalMem"],
        l2_bytes=attribute(38),
        shared_memory_per_block_optin=props.get("sharedMemPerBlockOptin"),
        sm_clock_mhz=None if attribute(13) is None else attribute(13) / 1000,
        memory_clock_mhz=None if memory_clock_khz is None else memory_clock_khz / 1000,
        memory_bus_bits=bus_bits,
        driver_cuda_version=runtime.driverGetVersion(),
        runtime_cuda_version=runtime.runtimeGetVersion(),
        nccl_version=nccl_version(),
    )
    if memory_clock_khz and bus_bits:  # double data rate: two transfers a clock
        facts["datasheet_memory_gbps"] = 2 * memory_clock_khz * 1e3 * bus_bits / 8 / 1e9
    return facts


def cuda_version(code: int) -> str:
    """CUDA's integer version as people write it: 13020 -> '13.2'."""
    return f"{code // 1000}.{code % 1000 // 10}"


def nccl_version() -> str | None:
    """NCCL's version as CuPy sees it, or None where NCCL is not available."""
    if not backend.has_gpu():
        return None
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # CuPy warns at length when libnccl is missing
            from cupy.cuda import nccl

            code = nccl.get_version()
    except Exception:  # noqa: BLE001 - no NCCL library, or a CuPy build without it
        return None
    return f"{code // 10000}.{code % 10000 // 100}.{code % 100}"


def cpu_name() -> str:
    """The processor's model name, as /proc/cpuinfo gives it (or what ``platform`` knows elsewhere)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def card_slug(name: str | None = None) -> str:
    """A folder name for a device: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    name = name or device_facts()["name"]
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())
