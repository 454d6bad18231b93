"""What a warp does with a branch, and how many warps an SM holds (chapter 01).

* **Divergence.** A warp issues one instruction for its 32 lanes. When lanes of one warp take different sides of
  a branch, the warp runs each side that any lane takes, one after the other, with the other lanes masked off.
  ``branch_kernel`` records which side every thread took (it runs in Numba's simulator in CPU mode, compiled
  on a GPU); :func:`warp_passes` counts the sides each warp had to run: the passes it makes through the branch.
* **Occupancy.** How many blocks of a kernel one SM holds at once, set by whichever runs out first: registers,
  shared memory, threads or the block limit (``course_lib.labs.gemm_steps.occupancy``, with an H100's
  limits), computed from the compiler's report; on a GPU the CUDA driver answers the same question
  (:func:`driver_blocks_per_sm`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from course_lib import backend
from course_lib import compile as cuda_compile
from course_lib.labs.gemm_steps import SM_LIMITS, occupancy

cuda = backend.numba_cuda()

WARP = 32
RULES = {  # what the branch depends on, by the ``rule`` number branch_kernel takes
    0: "lane parity (lane % 2)",
    1: "warp parity (warp % 2)",
    2: "the data (x > 0), random x",
    3: "the data (x > 0), sorted x",
    4: "lane % 4, a four-way branch",
}


@cuda.jit
def branch_kernel(x, out, side, rule):
    """Each thread picks a side from ``rule`` and records it in ``side``.

    ``rule`` is the same for every thread, so branching on it never splits a warp; the side taken may.
    """
    i = cuda.grid(1)
    if i >= x.size:
        return
    lane = cuda.threadIdx.x % 32
    if rule == 0:
        key = lane % 2
    elif rule == 1:
        key = (i // 32) % 2
    elif rule == 4:
        key = lane % 4
    else:  # rules 2 and 3: the data decides
        key = 1 if x[i] > 0 else 0
    if key == 0:
        out[i] = x[i] * 2.0
    elif key == 1:
        out[i] = x[i] + 1.0
    elif key == 2:
        out[i] = x[i] - 1.0
    else:
        out[i] = -x[i]
    side[i] = key


def run_branches(rule: int, n: int, threads: int, rng: np.random.Generator) -> np.ndarray:
    """Launch ``branch_kernel`` on ``n`` inputs and return the side each thread took (host array)."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {sorted(RULES)}, got {rule}")
    if threads % WARP:
        raise ValueError(f"threads must be a multiple of the warp size {WARP}, got {threads}")
    values = rng.standard_normal(n).astype(np.float32)
    if rule == 3:
        values.sort()
    x = backend.xp.asarray(values)
    out = backend.xp.empty_like(x)
    side = backend.xp.full(n, -1, dtype=np.int32)
    branch_kernel[(n + threads - 1) // threads, threads](x, out, side, rule)
    return backend.to_numpy(side)


def warp_passes(side: np.ndarray) -> np.ndarray:
    """For each warp, how many different sides its lanes took: the passes the warp makes through the branch."""
    warps = -(-side.size // WARP)
    padded = np.full(warps * WARP, -1, dtype=side.dtype)  # a last, partial warp: its missing lanes take no side
    padded[: side.size] = side
    by_warp = padded.reshape(warps, WARP)
    return np.array([len(set(row[row >= 0].tolist())) for row in by_warp])


def lane_efficiency(side: np.ndarray) -> float:
    """Useful lane-slots over issued lane-slots: 1.0 when no warp splits, 1 / passes when every warp does."""
    passes = warp_passes(side)
    active = np.count_nonzero(side >= 0)
    return active / (WARP * passes.sum())


# ---- occupancy ----------------------------------------------------------------------------------------------

MAX_WARPS = SM_LIMITS["threads"] // WARP  # 64 resident warps on an H100 SM


def occupancy_row(report: cuda_compile.KernelResources, threads: int, dynamic_shared: int = 0) -> dict[str, Any]:
    """Blocks of ``threads`` per SM by each limit, the resident blocks and warps, and the occupancy they make."""
    limits = occupancy(threads, report.registers, report.shared_bytes + dynamic_shared)
    blocks = min(limits.values())
    warps = blocks * (threads // WARP)
    return {"kernel": report.kernel, "registers": report.registers, "shared": report.shared_bytes + dynamic_shared,
            "threads": threads, "limits": limits, "blocks": blocks, "warps": warps, "occupancy": warps / MAX_WARPS,
            "limited_by": _limited_by(limits)}


def occupancy_table(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`occupancy_row` as text of at most 100 columns."""
    lines = [f"{'kernel':<24}{'regs':>5}{'smem B':>8}{'threads':>8}{'blocks':>7}{'warps':>6}{'occupancy':>10}  limit"]
    for row in rows:
        lines.append(f"{row['kernel']:<24}{row['registers']:>5}{row['shared']:>8,}{row['threads']:>8}"
                     f"{row['blocks']:>7}{row['warps']:>6}{row['occupancy']:>10.0%}  {row['limited_by']}")
    return "\n".join(lines)


def registers_sweep(threads: int, registers: tuple[int, ...] = (32, 40, 64, 96, 128, 168, 255)) -> str:
    """What registers alone do to occupancy at ``threads`` a block (no shared memory), on an H100 SM."""
    lines = [f"{threads} threads a block, no shared memory; an H100 SM: {SM_LIMITS['registers']:,} registers, "
             f"{SM_LIMITS['threads']:,} threads"]
    for count in registers:
        limits = occupancy(threads, count, 0)
        blocks = min(limits.values())
        fit = f"{blocks} block{'s' if blocks > 1 else ''}"
        share = blocks * threads / SM_LIMITS["threads"]
        lines.append(f"  {count:>3} registers a thread: {fit:>9}, {blocks * threads // WARP:>2} warps = {share:>4.0%} "
                     f"occupancy ({_limited_by(limits)})")
    return "\n".join(lines)


def _limited_by(limits: Mapping[str, int]) -> str:
    """The resource, or resources when several tie, that allow the fewest blocks."""
    fewest = min(limits.values())
    return " and ".join(name for name, blocks in limits.items() if blocks == fewest)


def driver_blocks_per_sm(kernel: Any, threads: int, dynamic_shared: int = 0) -> int:
    """The CUDA driver's answer (``cuOccupancyMaxActiveBlocksPerMultiprocessor``) for a loaded CuPy kernel.

    GPU mode only: the driver reads the kernel's real register and shared-memory use and the real SM's limits,
    so it is the check on :func:`occupancy_row`'s arithmetic. CuPy's ``RawKernel`` holds the ``CUfunction``.
    """
    if not backend.has_gpu():
        raise RuntimeError("the occupancy API asks the CUDA driver about a loaded kernel: it needs a GPU")
    from cuda.bindings import driver

    function = getattr(kernel, "kernel", kernel)  # a RawKernel wraps the cupy Function that holds the handle
    error, blocks = driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(driver.CUfunction(function.ptr), threads,
                                                                        dynamic_shared)
    if error != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuOccupancyMaxActiveBlocksPerMultiprocessor failed: {error}")
    return int(blocks)


def resource_reports(compiled: list[cuda_compile.CompiledSource]) -> Mapping[str, cuda_compile.KernelResources]:
    """The compiler's report of every kernel in ``compiled``, by kernel name."""
    return {kernel.kernel: kernel for source in compiled for kernel in source.kernels}
