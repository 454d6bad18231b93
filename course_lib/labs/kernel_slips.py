"""Slips in ``paged_prefill.cu``, one line each, of the kinds that are easy to make and hard to see.

Each is a pair (the line as the kernel has it, the line with the slip). Chapter 04b runs a slipped copy of the
kernel on the CPU warp emulator to show what the float64 check reports, and the kernel's tests check that the
emulated check rejects every one: a check that could not fail would prove nothing.
"""

from __future__ import annotations

PREFILL_SLIPS = {
    # FlashAttention's rescale: what was accumulated against the old max must be scaled down to the new one.
    "accumulator not rescaled by the new max": (
        "o[i][d][0] *= rescale[0], o[i][d][1] *= rescale[0], o[i][d][2] *= rescale[1], o[i][d][3] *= rescale[1];",
        ";"),
    # P V needs V k-major: ldmatrix.trans hands out the transpose of the [key][dim] rows in shared memory.
    "V read without .trans": ("ldmatrix_x4_trans(b, smem_address(v_tile", "ldmatrix_x4(b, smem_address(v_tile"),
    # Without the mask, each query also attends to the keys after it in its diagonal tile.
    "causal mask never applied": ("const bool diagonal = tile_start + KEY_TILE - 1 > query_start;",
                                  "const bool diagonal = false;"),
    # The copies store plain rows while ldmatrix reads swizzled addresses: the fragments hold the wrong chunks.
    "no swizzle on the K/V copies": (
        "const int row = c / ROW_CHUNKS, chunk = c % ROW_CHUNKS, at = swizzled<HEAD_DIM>(row, chunk);",
        "const int row = c / ROW_CHUNKS, chunk = c % ROW_CHUNKS, at = (row * ROW_CHUNKS + chunk) * CHUNK;"),
}


def with_slip(source: str, slip: str) -> str:
    """``source`` (paged_prefill.cu's text) with one of :data:`PREFILL_SLIPS` made."""
    if slip not in PREFILL_SLIPS:
        raise KeyError(f"no slip named {slip!r}; the slips are: {', '.join(PREFILL_SLIPS)}")
    original, slipped = PREFILL_SLIPS[slip]
    if source.count(original) != 1:
        raise ValueError(f"the line {slip!r} changes is not in the source exactly once (was the kernel edited?): "
                         f"{original!r}")
    return source.replace(original, slipped)
