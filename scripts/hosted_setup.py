#!/usr/bin/env python3
"""Install the course into the running Python of a hosted notebook (Colab, a JupyterHub): what each chapter's
first cell runs when ``course_lib`` cannot be imported.

    python course/scripts/hosted_setup.py            # from the folder the first cell cloned the course into
    python course/scripts/hosted_setup.py --dry-run  # print the requirements it would install, install nothing

A hosted service already runs Jupyter, so only the course's *runtime* requirements are installed: the
sections of ``requirements.txt`` before ``# --- book and notebooks`` (the book, JupyterLab, the kernel and the
test tools would replace the service's own). Then ``course_lib`` itself, editable from the clone.

The CUDA wheels follow the GPU's driver. ``requirements.txt`` pins CUDA 13 builds, which need a driver of
version 580 or newer. A driver that supports only CUDA 12 (``nvidia-smi``'s header says "CUDA Version: 12.x")
gets the CUDA 12 builds of the same packages (``CUDA12``); with no driver at all (a CPU runtime) the CUDA 13
wheels are installed anyway, because CPU mode still compiles every CUDA C kernel with their NVRTC. The
course's CI tests the CUDA 13 set on Linux; the CUDA 12 set is what the README's "What a GPU needs" section
describes, and is not tested by CI.

Only the standard library is used: it runs before anything of the course is installed.
"""

from __future__ import annotations

import argparse
import ctypes
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_END = "# --- book and notebooks"  # requirements.txt's sections from here on are Jupyter's and the tests'
CUDA12 = {  # a CUDA 13 requirement -> its CUDA 12 build (None: folded into another package under CUDA 12)
    "cupy-cuda13x": "cupy-cuda12x==14.2.0",
    "cuda-python": "cuda-python==12.9.10",
    "nvidia-cuda-nvrtc": "nvidia-cuda-nvrtc-cu12==12.9.86",
    "nvidia-cuda-nvcc": "nvidia-cuda-nvcc-cu12==12.9.86",
    "nvidia-cuda-runtime": "nvidia-cuda-runtime-cu12==12.9.79",
    "nvidia-cuda-crt": None,  # part of nvidia-cuda-nvcc-cu12
    "nvidia-nvvm": None,  # part of nvidia-cuda-nvcc-cu12
    "nvidia-nccl-cu13": "nvidia-nccl-cu12==2.28.9",
}


def driver_cuda_major() -> int | None:
    """The CUDA major version the NVIDIA driver supports (12, 13, ...), or None where no driver loads."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            library = ctypes.CDLL(name)
        except OSError:
            continue
        version = ctypes.c_int()
        if library.cuDriverGetVersion(ctypes.byref(version)) == 0:
            return version.value // 1000
    return None


def package_name(requirement: str) -> str:
    """``cupy-cuda13x==14.2.0 ; sys_platform ...`` -> ``cupy-cuda13x``."""
    return re.split(r"[=<>!~;\s\[]", requirement.strip(), maxsplit=1)[0].lower()


def runtime_requirements(text: str, cuda_major: int | None) -> list[str]:
    """The requirement lines before RUNTIME_END, comments dropped, in their CUDA 12 builds for a CUDA 12 driver."""
    if RUNTIME_END not in text:
        raise ValueError(f"requirements.txt has no '{RUNTIME_END}' section: cannot tell runtime from tooling")
    lines = []
    for line in text.split(RUNTIME_END)[0].splitlines():
        requirement = line.split("  #")[0].split(" #")[0].strip()
        if not requirement or requirement.startswith("#"):
            continue
        name = package_name(requirement)
        if cuda_major is not None and cuda_major < 13 and name in CUDA12:
            if CUDA12[name] is None:
                continue
            marker = requirement.partition(";")[2].strip()
            requirement = f"{CUDA12[name]} ; {marker}" if marker else CUDA12[name]
        lines.append(requirement)
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print what would be installed; install nothing")
    args = parser.parse_args(argv)
    cuda_major = driver_cuda_major()
    requirements = runtime_requirements((ROOT / "requirements.txt").read_text(), cuda_major)
    driver = "no NVIDIA driver: CPU mode" if cuda_major is None else f"an NVIDIA driver for CUDA {cuda_major}"
    builds = "CUDA 12 builds" if cuda_major is not None and cuda_major < 13 else "CUDA 13 builds"
    print(f"Found {driver}; installing {len(requirements)} runtime requirements ({builds}) and course_lib.")
    if args.dry_run:
        print("\n".join(requirements))
        return 0
    pip = [sys.executable, "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, *requirements], check=True)
    subprocess.run([*pip, "--no-deps", "--editable", str(ROOT)], check=True)
    print("Installed. If an import now fails over a NumPy version, restart the session (Colab: Runtime > Restart "
          "session) and run the notebook again from the top: the course stays installed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
