"""Run the course's CUDA C kernels on the CPU: a warp emulator, for small problems and for tests.

The Numba simulator runs Numba kernels without a GPU, and NVRTC compiles CUDA C without one, but neither runs a
CUDA C kernel. This module does, for the kernels of ``course_lib/kernels``: it compiles the kernel's own source with
the machine's C++ compiler against ``include/course_emulator.h``, where every GPU thread is a fiber and the warp-wide
instructions the course uses (``__shfl_*_sync``, ``ldmatrix``, ``mma.sync`` m16n8k16, ``cp.async``) are written in
C++ from the PTX ISA's description of each. A kernel that has never met a GPU can then be checked against a float64
reference on a laptop, with its shared-memory addresses, copy sources and barriers checked on the way (the header
lists what is checked, and what is not).

The interface is CuPy's, so a launcher reads the same either way::

    module = emulator.load_file("paged_prefill.cu", name_expressions=("paged_prefill<__half, 64, 2, 32>",))
    kernel = module.get_function("paged_prefill<__half, 64, 2, 32>")
    kernel(grid, block, (out, query, ..., np.int32(num_heads), ...), shared_mem=shared_bytes)

Arguments are NumPy arrays (passed as pointers; C-contiguous) and NumPy scalars, whose sizes are checked against
the kernel's parameters. It is slow (a fraction of a microsecond per thread per warp-wide instruction): keep problems
to a few thread blocks. It needs a C++17 compiler (``$CXX``, else ``g++`` or ``clang++``) and POSIX ``ucontext``
(tested on Linux; macOS has it, untested). Compiled kernels are cached in ``~/.cache/course-lib/emulator`` (or
``$COURSE_EMULATOR_CACHE``).
"""

from course_lib.emulator.build import (
    EmulatorError,
    EmulatorTimeout,
    cache_dir,
    compiler,
    cuda_c_problem,
    emulator_problem,
)
from course_lib.emulator.launch import EmulatedKernel, EmulatedModule, load_file

__all__ = ["EmulatedKernel", "EmulatedModule", "EmulatorError", "EmulatorTimeout", "cache_dir", "compiler",
           "cuda_c_problem", "emulator_problem", "load_file"]
