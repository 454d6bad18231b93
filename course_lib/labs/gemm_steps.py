"""The arithmetic of the seven GEMM steps, computed from their sources and ptxas' reports (chapters 02, 03).

Everything here is the same in CPU and GPU mode: tile sizes come from the ``constexpr int`` lines of the
``.cu`` files, register and shared-memory counts from NVRTC's compile for sm_90a, and the SM's limits from
the H100 (sm_90). From them follow the numbers the chapters reason with:

* **intensity**: FLOPs per byte of global memory, for the whole problem (A and B read once, C written once)
  or for one block's tile, ``B_M B_N / (B_M + B_N)`` in bf16;
* **occupancy**: how many blocks of a kernel one SM holds, and which resource stops it;
* **the feed**: how many copy instructions and barriers each step spends per 16 of K;
* **block order**: how many distinct slices of A and B the blocks that run at once read, row by row or grouped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from course_lib import compile as cuda_compile
from course_lib import dtypes
from course_lib.kernels import gemm
from course_lib.labs.gemm_sources import cuda_constants, wgmma_shape

SM_LIMITS = {"registers": 65536, "shared_bytes": 228 * 1024, "threads": 2048, "blocks": 32}  # one sm_90 SM
ELEMENT_BYTES = dtypes.ITEM_BYTES["bfloat16"]


def problem_intensity(m: int, n: int, k: int, item_bytes: int = 2) -> float:
    """FLOPs of ``[m, k] @ [k, n]`` over the bytes of A and B read once and C written once."""
    return 2 * m * n * k / (item_bytes * (m * k + k * n + m * n))


def tile_intensity(bm: int, bn: int, item_bytes: int = 2) -> float:
    """FLOPs over the bytes a ``bm x bn`` block tile loads from global memory, per unit of K."""
    return 2 * bm * bn / (item_bytes * (bm + bn))


def knee(h: int, ridge: float) -> float:
    """The batch size M at which ``[M, h] @ [h, h]`` reaches the ridge intensity: compute-bound from there on.

    ``I(M) = M h^2 / (2 M h + h^2)`` (bf16, in FLOP/byte) equals ``ridge`` at ``M = ridge h / (h - 2 ridge)``.
    """
    return ridge * h / (h - 2 * ridge)


WARP = 32  # threads are scheduled, and counted against an SM's limits, a warp at a time
REGISTER_UNIT = 256  # registers are handed to a warp in units of 256 (8 per thread)


def occupancy(threads: int, registers_per_thread: int, shared_bytes: int, limits: Mapping[str, int] = SM_LIMITS,
              *, warp: int = WARP, register_unit: int = REGISTER_UNIT) -> dict[str, int]:
    """How many blocks each resource lets one SM with ``limits`` (``SM_LIMITS``' keys) hold; the minimum is the
    occupancy, its key the resource that sets it.

    A block takes whole warps, so its threads round up to a multiple of ``warp``, and each warp takes its registers
    in units of ``register_unit``; a block without shared memory is not limited by it. (``warp=1`` or
    ``register_unit=1`` model an SM that did not round: what an occupancy estimate that forgets it computes.)
    """
    warps = math.ceil(threads / warp)
    warp_registers = math.ceil(registers_per_thread * warp / register_unit) * register_unit
    fits = {"registers": limits["registers"] // (warp_registers * warps),
            "threads": limits["threads"] // (warps * warp), "the block limit": limits["blocks"]}
    if shared_bytes:
        fits["shared memory"] = limits["shared_bytes"] // shared_bytes
    return fits


def resident_blocks(step: str, resources: Mapping[str, cuda_compile.KernelResources], n: int) -> int | None:
    """Blocks of ``step``'s bf16 kernel (on an n^3 product) that one SM holds at once; None without a report."""
    kernel, _, block, dynamic = gemm.launch_config(step, gemm.Product("bfloat16", n, n, n))
    if kernel not in resources:
        return None
    report = resources[kernel]
    return min(occupancy(math.prod(block), report.registers, report.shared_bytes + dynamic).values())


def resource_lines(step: str, resources: Mapping[str, cuda_compile.KernelResources]) -> list[str]:
    """ptxas' report for the bf16 kernel the launcher runs at 4096^3, and how many of its blocks fit on an SM.

    Shared memory that the launcher sizes at launch (dynamic) is not in ptxas' report, so it is added here.
    """
    kernel, _, block, dynamic = gemm.launch_config(step, gemm.Product("bfloat16", 4096, 4096, 4096))
    if kernel not in resources:
        return [f"{kernel}: no compiler report on this machine"]
    report, threads = resources[kernel], math.prod(block)
    shared = report.shared_bytes + dynamic
    spilled = report.spill_store_bytes + report.spill_load_bytes
    limits = occupancy(threads, report.registers, shared)
    blocks = min(limits.values())
    fits = ", ".join(f"{count} by {why}" for why, count in limits.items())
    return [f"{kernel}: {report.registers} registers a thread, {shared:,} B of shared memory a block, "
            f"{'no spills' if not spilled else f'{spilled} B of spills'}",
            f"  {threads} threads a block; one SM fits {fits}: {blocks} block{'s' if blocks > 1 else ''}, "
            f"{blocks * threads // 32} warps"]


def step_tiles() -> dict[str, tuple[tuple[int, int], tuple[int, int] | None]]:
    """For each step: (block tile of C, the piece one thread / warp / warpgroup computes), from the sources.

    The naive kernel has no tile (every thread reads its own operands), so its inner piece is None.
    """
    steps_1_to_5, step6, step7 = (cuda_constants(f) for f in ("gemm.cu", "gemm_mma_sync.cu", "gemm_wgmma.cu"))
    wgmma_m, wgmma_n, _ = wgmma_shape()
    register_blocked = ((steps_1_to_5["BM"], steps_1_to_5["BN"]), (steps_1_to_5["TM"], steps_1_to_5["TN"]))
    return {
        "naive": ((1, 1), None),
        "smem_tiled": ((steps_1_to_5["TILE"], steps_1_to_5["TILE"]), (1, 1)),
        "register_blocked": register_blocked,
        "vectorized": register_blocked,
        "wmma": ((steps_1_to_5["WB"], steps_1_to_5["WB"]), (steps_1_to_5["WARP_TILE"], steps_1_to_5["WARP_TILE"])),
        "mma_sync": ((step6["BM"], step6["BN"]), (step6["WARP_M"], step6["WARP_N"])),
        "wgmma": ((step7["BM"], step7["BN"]), (wgmma_m, wgmma_n)),  # one wgmma per consumer warpgroup
    }


def feed_table() -> str:
    """How steps 4 to 7 fill shared memory for their multiply units, per 16 of K, as the sources are written.

    For each step: its C tile, the K one stage holds, the bytes one copy instruction moves (TMA copies whole
    tiles from one thread), the copy instructions each thread issues and the block-wide barriers it meets per
    16 of K, its stages of shared memory, and the FLOPs it does per byte copied into shared memory.
    """
    gemm_cu, step6, step7 = (cuda_constants(f) for f in ("gemm.cu", "gemm_mma_sync.cu", "gemm_wgmma.cu"))
    # step: (C tile, K per stage, threads that copy, bytes per copy instruction (None: TMA), stages, barriers/stage)
    feeds = {
        "vectorized": ((gemm_cu["BM"], gemm_cu["BN"]), gemm_cu["BK"],
                       (gemm_cu["BM"] // gemm_cu["TM"]) * (gemm_cu["BN"] // gemm_cu["TN"]), 16, 1, 2),
        "wmma": ((gemm_cu["WB"], gemm_cu["WB"]), gemm_cu["WK"], gemm_cu["WMMA_THREADS"], ELEMENT_BYTES, 1, 2),
        "mma_sync": ((step6["BM"], step6["BN"]), step6["BK"], step6["THREADS"], 16, step6["STAGES"], 1),
        "wgmma": ((step7["BM"], step7["BN"]), step7["BK"], 1, None, step7["STAGES"], 0),
    }
    lines = [f"{'step':<12}{'C tile':>10}{'K/stage':>9}{'bytes/copy':>13}{'copies/thread':>15}{'stages':>8}"
             f"{'barriers':>13}{'FLOP/byte':>11}",
             f"{'':<12}{'':>10}{'':>9}{'instruction':>13}{'per 16 of K':>15}{'':>8}{'per 16 of K':>13}{'copied':>11}"]
    for step, ((tile_m, tile_n), k_stage, threads, copy_bytes, stages, barriers) in feeds.items():
        staged = (tile_m + tile_n) * k_stage * ELEMENT_BYTES  # bytes of A and B copied per stage
        copies = "TMA" if copy_bytes is None else f"{staged / (copy_bytes * threads) * 16 / k_stage:g}"
        lines.append(f"{step:<12}{f'{tile_m} x {tile_n}':>10}{k_stage:>9}{copy_bytes or 'a tile':>13}{copies:>15}"
                     f"{stages:>8}{barriers * 16 / k_stage:>13g}{2 * tile_m * tile_n * k_stage / staged:>11.1f}")
    lines.append("FLOP/byte copied: 2 x tile M x tile N x K / bytes of A and B copied into shared memory for that K.")
    return "\n".join(lines)


def distinct_slices(order: str, blocks: int, tiles_n: int, group_m: int) -> tuple[int, int]:
    """Distinct row panels of A and column panels of B read by the first ``blocks`` tiles of C in ``order``.

    ``order`` is "row by row" (sweep C's tile rows left to right) or anything else for ``grouped_tile``'s order:
    ``group_m`` tile rows down, then one column right (away from the last group's edge).
    """
    if order == "row by row":
        cells = [(i // tiles_n, i % tiles_n) for i in range(blocks)]
    else:
        cells = [(i % group_m, i // group_m) for i in range(blocks)]
    return len({row for row, _ in cells}), len({col for _, col in cells})
