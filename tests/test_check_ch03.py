"""Chapter 03 checker: the right tiled GEMM passes, and each known mistake is rejected with its hint.

Every kernel is a real @cuda.jit kernel, built from one template with one part changed; in CPU mode
it runs in Numba's CUDA simulator (256 Python threads per block), so the checker keeps shapes small.
"""

from __future__ import annotations

import numba
import pytest
from checker_testing import rejected_with, unwritten

from course_lib import backend
from course_lib.check import check_tiled_gemm
from course_lib.check.ch03 import TILE

cuda = backend.numba_cuda()

needs_gpu = pytest.mark.gpu  # tests/conftest.py skips these, saying why, where there is no GPU
on_cpu_only = pytest.mark.skipif(backend.has_gpu(), reason="the simulator raises where a GPU goes on silently")


@cuda.jit(device=True)
def a_or_zero(a, row, k):
    return a[row, k] if row < a.shape[0] and k < a.shape[1] else 0.0


@cuda.jit(device=True)
def b_or_zero(b, k, col):
    return b[k, col] if k < b.shape[0] and col < b.shape[1] else 0.0


@cuda.jit(device=True)
def a_unguarded(a, row, k):
    return a[row, k]


@cuda.jit(device=True)
def b_unguarded(b, k, col):
    return b[k, col]


def make_tiled_gemm(load_a=a_or_zero, load_b=b_or_zero, whole_k_tiles_only=False, guard_store=True,
                    rows_from_y=True):
    """The solution's tiled GEMM, or a known mistake when one of the arguments is changed."""

    @cuda.jit
    def tiled_gemm(a, b, c):
        a_tile = cuda.shared.array((TILE, TILE), numba.float32)
        b_tile = cuda.shared.array((TILE, TILE), numba.float32)
        if rows_from_y:
            i, j, block_row, block_col = cuda.threadIdx.y, cuda.threadIdx.x, cuda.blockIdx.y, cuda.blockIdx.x
        else:
            i, j, block_row, block_col = cuda.threadIdx.x, cuda.threadIdx.y, cuda.blockIdx.x, cuda.blockIdx.y
        row, col = block_row * TILE + i, block_col * TILE + j
        k_total = a.shape[1]
        k_tiles = k_total // TILE if whole_k_tiles_only else (k_total + TILE - 1) // TILE
        total = numba.float32(0.0)
        for tile in range(k_tiles):
            a_tile[i, j] = load_a(a, row, tile * TILE + j)
            b_tile[i, j] = load_b(b, tile * TILE + i, col)
            cuda.syncthreads()
            for kk in range(TILE):
                total += a_tile[i, kk] * b_tile[kk, j]
            cuda.syncthreads()
        if not guard_store or (row < c.shape[0] and col < c.shape[1]):
            c[row, col] = total

    return tiled_gemm


@cuda.jit
def tiled_gemm_stub(a, b, c):
    raise NotImplementedError


def test_tiled_gemm_accepts_the_solution(capsys):
    assert check_tiled_gemm(make_tiled_gemm()) is None
    line = capsys.readouterr().out
    assert line.startswith("PASSED tiled_gemm: ") and f"none a multiple of {TILE}" in line and "mode" in line


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (make_tiled_gemm(whole_k_tiles_only=True), "K cut down to a multiple of 16"),
        (make_tiled_gemm(rows_from_y=False), "the grid's x covers the columns of C"),
    ],
    ids=["k-loop-short", "x-y-swapped"],
)
def test_tiled_gemm_rejects_known_mistakes(seed, wrong, hint):
    assert hint in rejected_with(check_tiled_gemm, wrong)


@on_cpu_only
def test_tiled_gemm_simulator_names_a_load_past_the_edge():
    message = rejected_with(check_tiled_gemm, make_tiled_gemm(load_a=a_unguarded, load_b=b_unguarded))
    assert "IndexError" in message and "put 0 in the shared tile" in message
    assert "return a[row, k]" in message or "return b[k, col]" in message  # whichever thread got there first


@on_cpu_only
def test_tiled_gemm_simulator_names_a_store_outside_c():
    message = rejected_with(check_tiled_gemm, make_tiled_gemm(guard_store=False))
    assert "IndexError" in message and "c[row, col] = total" in message and "guard the store" in message


@needs_gpu
def test_gpu_tiled_gemm_recognises_reads_past_the_edge(seed):
    message = rejected_with(check_tiled_gemm, make_tiled_gemm(load_a=a_unguarded, load_b=b_unguarded))
    assert "read past the end of the rows of a and b" in message


@needs_gpu
def test_gpu_tiled_gemm_catches_a_store_past_the_end(seed):
    message = rejected_with(check_tiled_gemm, make_tiled_gemm(guard_store=False))
    assert "wrote past the end of c" in message and "must not store it" in message


def test_tiled_gemm_stub_is_not_written_yet():
    assert unwritten(check_tiled_gemm, tiled_gemm_stub).startswith("tiled_gemm is not written")
