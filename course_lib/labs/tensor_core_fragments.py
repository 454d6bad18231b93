"""Who holds what in ``mma.sync m16n8k16``, what ``ldmatrix`` delivers, and how the swizzle spreads the banks.

The PTX ISA documents each fragment's layout as formulas of the lane (0-31), split into a **group** of four
lanes, ``groupID = lane >> 2``, and the lane's place in it, ``threadID_in_group = lane % 4``. ``a_element``,
``b_element`` and ``c_element`` are those formulas for fp16/bf16 inputs and fp32 accumulators; chapter 02
prints them, draws them, and checks them against a NumPy model of ``ldmatrix``.

The second half is shared memory: 32 banks of 4 bytes, read by ``ldmatrix`` as 8 rows of 16 bytes. One
pass needs those 8 chunks in 8 different groups of 4 banks; ``swizzle_128b`` (the XOR of ``tensor_core.cuh``)
is what puts them there, and ``bank_groups`` shows where each chunk lands with and without it.
"""

from __future__ import annotations

from collections.abc import Callable

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

# (interface, m, n, k, input formats, threads that issue it, first architecture)
INSTRUCTION_SHAPES = (
    ("wmma", 16, 16, 16, "fp16, bf16", 32, "sm_70 (bf16: sm_80)"),
    ("wmma", 32, 8, 16, "fp16, bf16", 32, "sm_70 (bf16: sm_80)"),
    ("wmma", 8, 32, 16, "fp16, bf16", 32, "sm_70 (bf16: sm_80)"),
    ("mma.sync", 16, 8, 16, "fp16, bf16", 32, "sm_80"),
    ("mma.sync", 16, 8, 8, "tf32", 32, "sm_80"),
    ("mma.sync", 16, 8, 32, "fp8 e4m3, e5m2", 32, "sm_89"),
    ("wgmma", 64, 256, 16, "fp16, bf16", 128, "sm_90a"),
    ("wgmma", 64, 256, 8, "tf32", 128, "sm_90a"),
    ("wgmma", 64, 256, 32, "fp8 e4m3, e5m2", 128, "sm_90a"),
)
ElementOf = Callable[[int, int], tuple[int, int]]  # (lane, i) -> (row, column) of the lane's i-th element


def held(interface: str, elements: int, threads: int, in_shared_memory: bool = False) -> str:
    """How many elements of a tile each thread holds: "opaque" for WMMA's fragments, "smem" for an operand
    that ``wgmma`` reads from shared memory through a descriptor."""
    if interface == "wmma":
        return "opaque"
    return "smem" if in_shared_memory else str(elements // threads)


def instruction_table() -> str:
    """One row per instruction shape: multiply-adds per instruction and per thread, and what each thread holds.

    wgmma's B always comes from shared memory; its A may come from registers, but the course's kernel reads it
    from shared memory too (marked *).
    """
    lines = [f"{'interface':<10}{'shape':<12}{'inputs':<16}{'threads':>8}{'FMAs':>8}{'FMAs/thread':>13}"
             f"{'A/thread':>10}{'B/thread':>10}{'C/thread':>10}   first arch"]
    for interface, m, n, k, inputs, threads, arch in INSTRUCTION_SHAPES:
        from_smem = interface == "wgmma"
        lines.append(f"{interface:<10}{f'm{m}n{n}k{k}':<12}{inputs:<16}{threads:>8}{m * n * k:>8}"
                     f"{m * n * k // threads:>13}"
                     f"{held(interface, m * k, threads, from_smem) + ('*' if from_smem else ''):>10}"
                     f"{held(interface, k * n, threads, from_smem):>10}"
                     f"{held(interface, m * n, threads):>10}   {arch}")
    return "\n".join(lines)


def a_element(lane: int, i: int) -> tuple[int, int]:
    """(row, column) of a_i, i = 0..7, in mma.sync m16n8k16's A fragment (16 x 16, fp16/bf16)."""
    group, thread = lane >> 2, lane % 4
    row = group + 8 * ((i // 2) % 2)          # a0 a1 a4 a5: rows 0-7;  a2 a3 a6 a7: rows 8-15
    col = 2 * thread + (i & 1) + 8 * (i // 4)  # a4..a7: columns 8-15
    return row, col


def b_element(lane: int, i: int) -> tuple[int, int]:
    """(row k, column n) of b_i, i = 0..3, in the B fragment (16 x 8)."""
    group, thread = lane >> 2, lane % 4
    return 2 * thread + (i & 1) + 8 * (i // 2), group


def c_element(lane: int, i: int) -> tuple[int, int]:
    """(row, column) of c_i, i = 0..3, in the C and D fragments (16 x 8, fp32)."""
    group, thread = lane >> 2, lane % 4
    return group + 8 * (i // 2), 2 * thread + (i & 1)


# name: (the element formula, the tile's shape, elements each lane holds)
FRAGMENTS: dict[str, tuple[ElementOf, tuple[int, int], int]] = {
    "A": (a_element, (16, 16), 8), "B": (b_element, (16, 8), 4), "C, D": (c_element, (16, 8), 4)}


def owners(element: ElementOf, shape: tuple[int, int], per_lane: int) -> np.ndarray:
    """The lane that holds each element of a tile; raises unless every element is held by exactly one lane."""
    lane_of = np.full(shape, -1)
    for lane in range(32):
        for i in range(per_lane):
            row, col = element(lane, i)
            if lane_of[row, col] != -1:
                raise AssertionError(f"element ({row}, {col}) held by lanes {lane_of[row, col]} and {lane}")
            lane_of[row, col] = lane
    if (lane_of < 0).any():
        raise AssertionError("an element is held by no lane")
    return lane_of


def draw_fragment(ax: plt.Axes, name: str, lane_of: np.ndarray, marked_lane: int) -> None:
    """One tile, each element labelled with the lane that holds it, coloured by lane % 4, one lane framed."""
    rows, cols = lane_of.shape
    ax.imshow(lane_of % 4, cmap="Pastel1", vmin=0, vmax=8)
    for (row, col), lane in np.ndenumerate(lane_of):
        ax.text(col, row, str(lane), ha="center", va="center", fontsize=6.5,
                fontweight="bold" if lane == marked_lane else "normal")
        if lane == marked_lane:
            ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.5))
    ax.set_xticks(range(cols))
    ax.set_yticks(range(rows))
    ax.tick_params(labelsize=6, length=0)
    ax.set_xlabel("k" if name == "A" else "n", fontsize=8)
    ax.set_ylabel("k" if name == "B" else "m", fontsize=8)
    ax.set_title(f"{name} ({rows} x {cols})", fontsize=10)


def plot_fragments(marked_lane: int) -> plt.Figure:
    """The A, B and C fragments side by side, from the layout formulas (checked by ``owners``)."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 5.2), layout="constrained", gridspec_kw={"width_ratios": [16, 8, 8]})
    for ax, (name, (element, shape, count)) in zip(axes, FRAGMENTS.items(), strict=True):
        draw_fragment(ax, name, owners(element, shape, count), marked_lane)
    fig.suptitle(f"mma.sync m16n8k16: the lane holding each element (colour: lane % 4; lane {marked_lane} framed)")
    return fig


def ldmatrix(memory: np.ndarray, row_starts: list[tuple[int, int]], trans: bool = False) -> np.ndarray:
    """What each lane receives from ``ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16``, in NumPy.

    ``row_starts[l]`` is the (row, column) address lane ``l`` gives: lanes 8j..8j+7 point at the eight
    8-element rows of matrix j. Lane l receives, from every matrix, the pair at row l // 4, columns 2 (l % 4)
    and 2 (l % 4) + 1, of the transposed matrix with ``trans``. Returns, per lane, register 0's pair,
    register 1's pair, and so on.
    """
    received = np.empty((32, len(row_starts) // 8, 2), dtype=memory.dtype)
    for j in range(len(row_starts) // 8):
        tile = np.array([memory[row, col:col + 8] for row, col in row_starts[8 * j:8 * j + 8]])
        if trans:
            tile = tile.T
        for lane in range(32):
            received[lane, j] = tile[lane // 4, 2 * (lane % 4):2 * (lane % 4) + 2]
    return received.reshape(32, -1)


def swizzle_128b(chunk: int | np.ndarray) -> int | np.ndarray:
    """``swizzle_128b`` of ``tensor_core.cuh``: a 16-byte chunk's place in its 128-byte line XOR the line's index."""
    return chunk ^ ((chunk >> 3) & 7)


def bank_groups(chunks_per_row: int, swizzled: bool, rows: int = 8) -> np.ndarray:
    """Which 16-byte group of banks (0-7) each logical chunk (row, chunk) of a tile lands in."""
    index = np.arange(rows)[:, None] * chunks_per_row + np.arange(chunks_per_row)[None, :]
    return (swizzle_128b(index) if swizzled else index) % 8


def ldmatrix_passes(groups: np.ndarray, column: int) -> int:
    """Passes an 8 x 8 ``ldmatrix`` matrix takes to read one chunk column: as many as share a bank group."""
    return int(np.bincount(groups[:, column], minlength=8).max())


def plot_bank_groups(layouts: dict[str, int]) -> plt.Figure:
    """For each tile (name: 16-byte chunks per row), the bank group of every chunk, plain and swizzled."""
    fig, axes = plt.subplots(2, len(layouts), figsize=(8, 7), layout="constrained",
                             gridspec_kw={"width_ratios": list(layouts.values())})
    for column_axes, (name, chunks) in zip(axes.T, layouts.items(), strict=True):
        for ax, swizzled in zip(column_axes, (False, True), strict=True):
            groups = bank_groups(chunks, swizzled)
            ax.imshow(groups, cmap="Set3", vmin=0, vmax=12, aspect="equal")
            for (r, c), g in np.ndenumerate(groups):
                ax.text(c, r, str(g), ha="center", va="center", fontsize=8)
            ax.add_patch(Rectangle((-0.5, -0.5), 1, 8, fill=False, edgecolor="black", linewidth=2))
            passes = max(ldmatrix_passes(groups, c) for c in range(chunks))
            ax.set_title(f"{name}, {'swizzled' if swizzled else 'plain'}:\none ldmatrix matrix takes {passes} "
                         f"pass{'es' if passes > 1 else ''}", fontsize=9)
            ax.set_xticks(range(chunks))
            ax.set_yticks(range(8))
            ax.set_xlabel("16-byte chunk within the row (logical)", fontsize=8)
            ax.set_ylabel("row", fontsize=8)
    fig.suptitle("Bank group (4 banks, 16 bytes) of each chunk; framed: the 8 chunks one ldmatrix 8x8 matrix reads")
    return fig
