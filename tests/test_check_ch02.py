"""Chapter 02 checker: the WMMA GEMM in CUDA C passes, and each known mistake is rejected with its hint.

CUDA C compiles without a GPU, so compile errors, a kernel without tensor cores and an accumulator
never zeroed are rejected in both modes. Running needs a GPU: there each wrong kernel below is one
change to the right one. On CPU, the hints are tested on what those kernels would write, computed
tile by tile in plain Python, so that the checker's own model of them is checked too.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from checker_testing import SEEDS, rejected_with

from course_lib import backend, emulator
from course_lib.check import check_wmma_gemm
from course_lib.check.ch02 import FRAGMENT, case_shapes, judge_case, padding, product_as_loaded
from course_lib.check.ch02_fragments import (
    check_fp8_block_quantize,
    check_fragment_element,
    check_ldmatrix_x4_row,
    check_swizzle,
    fragment_map,
    ldmatrix_wavefronts,
)
from course_lib.check.inputs import nonzero_float32
from course_lib.check.run import CheckRun
from course_lib.compile import nvrtc_problem
from course_lib.labs.tensor_core_fragments import FRAGMENTS

needs_cuda_c = pytest.mark.skipif(emulator.cuda_c_problem() is not None, reason=str(emulator.cuda_c_problem()))
on_cpu_only = pytest.mark.skipif(backend.has_gpu(), reason="on a GPU the checker runs the kernel")
NVRTC_PROBLEM = nvrtc_problem()
needs_nvrtc = pytest.mark.skipif(NVRTC_PROBLEM is not None, reason=f"compiling CUDA C needs NVRTC: {NVRTC_PROBLEM}")

SOURCE = r"""
#include <mma.h>
using namespace nvcuda;

extern "C" __global__ void wmma_gemm(const half* a, const half* b, float* c, int M, int N, int K) {
    const int tile_row = 16 * blockIdx.y, tile_col = 16 * blockIdx.x;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> a_tile;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::row_major> b_tile;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int k0 = 0; k0 < K; k0 += 16) {
        wmma::load_matrix_sync(a_tile, a + (size_t)tile_row * K + k0, K);
        wmma::load_matrix_sync(b_tile, b + (size_t)k0 * N + tile_col, N);
        wmma::mma_sync(acc, a_tile, b_tile, acc);
    }
    wmma::store_matrix_sync(c + (size_t)tile_row * N + tile_col, acc, N, wmma::mem_row_major);
}
"""

CUDA_CORES_ONLY = r"""
#include <cuda_fp16.h>

extern "C" __global__ void wmma_gemm(const half* a, const half* b, float* c, int M, int N, int K) {
    for (int e = threadIdx.x; e < 16 * 16; e += 32) {  // right, but on the CUDA cores: 8 elements per thread
        const int row = 16 * blockIdx.y + e / 16, col = 16 * blockIdx.x + e % 16;
        float sum = 0.0f;
        for (int i = 0; i < K; ++i) sum += __half2float(a[(size_t)row * K + i]) * __half2float(b[(size_t)i * N + col]);
        c[(size_t)row * N + col] = sum;
    }
}
"""


def variant(*changes: tuple[str, str]) -> str:
    """SOURCE with each (old, new) replaced; every ``old`` must be there, so no variant is silently the solution."""
    source = SOURCE
    for old, new in changes:
        assert old in source, old
        source = source.replace(old, new)
    return source


# --- both modes: what compiling shows --------------------------------------------------------------


@on_cpu_only
@needs_nvrtc
def test_without_the_emulator_cpu_mode_says_the_solution_compiled_and_was_not_run(capsys, monkeypatch):
    monkeypatch.setattr(emulator, "emulator_problem", lambda: "no C++ compiler (pretend)")
    assert check_wmma_gemm(SOURCE) is None
    said = capsys.readouterr().out
    assert said.startswith("COMPILED wmma_gemm (CUDA C) for sm_75 (") and "registers" in said
    assert "tensor cores (mma.sync)" in said and "no C++ compiler (pretend)" in said
    assert "NOT CHECKED numerically: running CUDA C needs a GPU or the CPU warp emulator" in said
    assert "stops at compilation" in said and "PASSED" not in said


@needs_nvrtc
def test_a_compile_error_shows_the_compiler_log():
    message = rejected_with(check_wmma_gemm, variant(("acc, a_tile, b_tile", "accumulator, a_tile, b_tile")))
    assert "does not compile for sm_75" in message and 'identifier "accumulator" is undefined' in message
    assert "NVRTC_ERROR" not in message


@needs_nvrtc
def test_the_kernel_needs_an_unmangled_name():
    message = rejected_with(check_wmma_gemm, variant(('extern "C" ', "")))
    assert "no kernel named wmma_gemm" in message and 'extern "C"' in message


@needs_nvrtc
def test_a_kernel_on_the_cuda_cores_is_rejected():
    message = rejected_with(check_wmma_gemm, CUDA_CORES_ONLY)
    assert "this kernel does not use the tensor cores" in message and "wmma::mma_sync" in message


@needs_nvrtc
@pytest.mark.parametrize(
    "unzeroed",
    [
        variant(("    wmma::fill_fragment(acc, 0.0f);\n", "")),
        variant(("wmma::fill_fragment", "// wmma::fill_fragment")),
    ],
    ids=["no-fill-fragment", "fill-fragment-commented-out"],
)
def test_an_accumulator_never_zeroed_is_rejected_without_running(unzeroed):
    message = rejected_with(check_wmma_gemm, unzeroed)
    assert "never calls wmma::fill_fragment" in message and "fill_fragment(acc, 0.0f)" in message


def test_the_source_must_be_a_string():
    assert "does the function that builds it `return` the string?" in rejected_with(check_wmma_gemm, None)


@pytest.mark.parametrize("seed_value", SEEDS)
def test_shapes_are_multiples_of_16_all_different_and_m_below_n_first(seed_value):
    cases = case_shapes(np.random.default_rng(int(seed_value)))
    for m, n, k in cases:
        assert m % FRAGMENT == n % FRAGMENT == k % FRAGMENT == 0
        assert len({m, n, k}) == 3 and min(m, n, k) > FRAGMENT
    m, n, _ = cases[0]
    assert m < n


# --- CPU: the hints, on what each wrong kernel would write ----------------------------------------

SHAPE = (32, 64, 48)  # M < N, all different, as the checker's first case


def tile_by_tile(a_buffer, b_buffer, shape, a_at, b_at, lda, ldb, a_col_major=False, b_col_major=False, k_end=None):
    """What a one-warp-per-tile WMMA kernel computes, one fragment at a time in plain Python.

    ``a_at(tile_row, k0)`` and ``b_at(k0, tile_col)`` are the kernel's pointer offsets; a fragment
    element (r, s) is read from pointer + r * ldm + s (row-major) or pointer + r + s * ldm (col-major).
    """
    m, n, k = shape
    c = np.zeros((m, n))
    for tile_row in range(0, m, FRAGMENT):
        for tile_col in range(0, n, FRAGMENT):
            for k0 in range(0, k if k_end is None else k_end, FRAGMENT):
                a_tile = [[a_buffer[a_at(tile_row, k0) + (r + s * lda if a_col_major else r * lda + s)]
                           for s in range(FRAGMENT)] for r in range(FRAGMENT)]
                b_tile = [[b_buffer[b_at(k0, tile_col) + (r + s * ldb if b_col_major else r * ldb + s)]
                           for s in range(FRAGMENT)] for r in range(FRAGMENT)]
                block = np.array(a_tile, dtype=np.float64) @ np.array(b_tile, dtype=np.float64)
                c[tile_row : tile_row + FRAGMENT, tile_col : tile_col + FRAGMENT] += block
    return c


def right_a(tile_row, k0):
    return tile_row * SHAPE[2] + k0


def right_b(k0, tile_col):
    return k0 * SHAPE[1] + tile_col


def sample_b(k0, tile_col):
    """NVIDIA's WMMA sample stores B column-major: its tile starts at b + k0 + tile_col * K."""
    return k0 + tile_col * SHAPE[2]


M, N, K = SHAPE
WRONG_LOADS = [  # (how the kernel loads, the same for product_as_loaded or None, the hint)
    ({"lda": K, "ldb": N, "b_col_major": True}, {"b_col_major": True}, "each 16 x 16 tile of B was used transposed"),
    ({"lda": K, "ldb": N, "a_col_major": True}, {"a_col_major": True}, "each 16 x 16 tile of A was used transposed"),
    ({"lda": K, "ldb": K, "b_col_major": True, "b_at": sample_b}, None, "B read as a column-major matrix"),
    ({"lda": 16, "ldb": N}, {"lda": 16}, "the tiles of A were loaded with the wrong ldm"),
    ({"lda": N, "ldb": N}, {"lda": N}, "the tiles of A were loaded with the wrong ldm"),
    ({"lda": K, "ldb": 16}, {"ldb": 16}, "the tiles of B were loaded with the wrong ldm"),
    ({"lda": K, "ldb": K}, {"ldb": K}, "the tiles of B were loaded with the wrong ldm"),
    ({"lda": N, "ldb": K}, {"lda": N, "ldb": K}, "the ldm of A and B are swapped"),
    ({"lda": K, "ldb": N, "k_end": K - 16}, {"k_extent": K - 16}, "stops one step early"),
    ({"lda": K, "ldb": N, "k_end": K + 16}, {"k_extent": K + 16}, "one step too far"),
]
WRONG_LOAD_IDS = ["b-col-major", "a-col-major", "b-as-in-nvidia-sample", "lda-16", "lda-n", "ldb-16", "ldb-k",
                  "ldm-swapped", "k-one-step-short", "k-one-step-too-far"]


@pytest.fixture
def buffers():
    """fp16 A and B buffers for SHAPE, each going on past its matrix as the checker's do."""
    rng = np.random.default_rng(2024)
    pad = padding(SHAPE)
    return tuple(nonzero_float32(rng, size + pad).astype(np.float16) for size in (M * K, K * N))


def judged(c_values, buffers, written_past_the_end=0):
    """Hand judge_case a C buffer holding ``c_values`` (NaN stays never written), as the checker would."""
    c_buffer = np.full(M * N + padding(SHAPE), np.nan, dtype=np.float32)
    c_buffer[: M * N] = np.asarray(c_values, dtype=np.float32).ravel()
    c_buffer[M * N : M * N + written_past_the_end] = 1.0
    with CheckRun("wmma_gemm"):
        judge_case(c_buffer, *buffers, SHAPE)


def test_the_right_loads_are_the_product(buffers):
    by_tiles = tile_by_tile(*buffers, SHAPE, right_a, right_b, lda=K, ldb=N)
    a, b = buffers[0][: M * K].reshape(M, K), buffers[1][: K * N].reshape(K, N)
    np.testing.assert_allclose(by_tiles, a.astype(np.float64) @ b.astype(np.float64), rtol=1e-12)
    np.testing.assert_allclose(product_as_loaded(*buffers, SHAPE), by_tiles, rtol=1e-12)
    judged(by_tiles, buffers)  # passes: no exception


@pytest.mark.parametrize(("loads", "modelled", "hint"), WRONG_LOADS, ids=WRONG_LOAD_IDS)
def test_wrong_loads_are_named(buffers, loads, modelled, hint):
    loads = {"a_at": right_a, "b_at": right_b, **loads}
    written = tile_by_tile(*buffers, SHAPE, **loads)
    if modelled is not None:  # the checker's vectorised model of the same kernel
        np.testing.assert_allclose(product_as_loaded(*buffers, SHAPE, **modelled), written, rtol=1e-12)
    assert hint in rejected_with(lambda c: judged(c, buffers), written)


def test_parts_of_tiles_never_written_are_named(buffers):
    c = product_as_loaded(*buffers, SHAPE).reshape(M // 16, 16, N // 16, 16)
    c[:, 2:] = np.nan  # one element per thread: 32 of a tile's 256, its first two rows
    message = rejected_with(lambda values: judged(values, buffers), c.reshape(M, N))
    assert "c[2, 0] was never written" in message and "parts of the 16 x 16 tiles of C" in message


def test_whole_tiles_never_written_are_named(buffers):
    c = product_as_loaded(*buffers, SHAPE)
    c[:, N // 2 :] = np.nan
    message = rejected_with(lambda values: judged(values, buffers), c)
    assert "whole 16 x 16 tiles of C were never written" in message and "16 * blockIdx.y" in message


def test_a_write_past_the_end_of_c_is_named(buffers):
    message = rejected_with(lambda values: judged(values, buffers, written_past_the_end=16),
                            product_as_loaded(*buffers, SHAPE))
    assert "wrote past the end of c" in message and "row 16 * blockIdx.y" in message


# --- the real kernels, on the GPU or the warp emulator ---------------------------------------------

ONE_ELEMENT_PER_THREAD = (
    "    wmma::store_matrix_sync(c + (size_t)tile_row * N + tile_col, acc, N, wmma::mem_row_major);\n",
    "    __shared__ __align__(32) float tile[16 * 16];\n"
    "    wmma::store_matrix_sync(tile, acc, 16, wmma::mem_row_major);\n"
    "    __syncwarp();\n"
    "    c[(size_t)(tile_row + threadIdx.x / 16) * N + tile_col + threadIdx.x % 16] = tile[threadIdx.x];\n",
)


@needs_nvrtc
@needs_cuda_c
def test_the_solution_passes(capsys):
    assert check_wmma_gemm(SOURCE) is None
    line = capsys.readouterr().out
    assert line.startswith("PASSED wmma_gemm: 2 random cases")
    assert ("in GPU mode" in line) if backend.has_gpu() else ("on the CPU warp emulator" in line)


@needs_nvrtc
@needs_cuda_c
@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (variant(("half, wmma::row_major> b_tile", "half, wmma::col_major> b_tile")),
         "each 16 x 16 tile of B was used transposed"),
        (variant(("half, wmma::row_major> b_tile", "half, wmma::col_major> b_tile"),
                 ("b + (size_t)k0 * N + tile_col, N);", "b + k0 + (size_t)tile_col * K, K);")),
         "B read as a column-major matrix"),
        (variant(("+ k0, K);", "+ k0, 16);")), "the tiles of A were loaded with the wrong ldm"),
        (variant(("+ tile_col, N);", "+ tile_col, K);")), "the tiles of B were loaded with the wrong ldm"),
        (variant(("k0 < K;", "k0 + 16 < K;")), "stops one step early"),
        (variant(("k0 < K;", "k0 <= K;")), "one step too far"),
        (variant(("acc, N, wmma::mem_row_major", "acc, 16, wmma::mem_row_major")), "parts of the 16 x 16 tiles"),
        (variant(ONE_ELEMENT_PER_THREAD), "parts of the 16 x 16 tiles"),
        (variant(("16 * blockIdx.y, tile_col = 16 * blockIdx.x", "16 * blockIdx.x, tile_col = 16 * blockIdx.y")),
         "wrote past the end of c"),
    ],
    ids=["b-col-major", "b-as-in-nvidia-sample", "lda-16", "ldb-k", "k-one-step-short", "k-one-step-too-far",
         "store-ldm-16", "one-element-per-thread", "x-and-y-swapped"],
)
def test_known_mistakes_are_rejected_with_their_hint(seed, wrong, hint):
    assert hint in rejected_with(check_wmma_gemm, wrong)


# --- the exercises below WMMA (ch02_fragments): fragments, ldmatrix, the swizzle, fp8 -----------------


def fragment_element(operand, lane, i):
    group, thread = lane >> 2, lane % 4
    if operand == "A":
        return group + 8 * ((i // 2) % 2), 2 * thread + (i % 2) + 8 * (i // 4)
    if operand == "B":
        return 2 * thread + (i % 2) + 8 * (i // 2), group
    return group + 8 * (i // 2), 2 * thread + (i % 2)


def only(operand, wrong):
    """fragment_element with ``wrong(lane, i)`` for one operand."""
    return lambda name, lane, i: wrong(lane, i) if name == operand else fragment_element(name, lane, i)


def test_fragment_element_accepts_the_solution(capsys):
    assert check_fragment_element(fragment_element) is None
    assert capsys.readouterr().out.startswith("PASSED fragment_element: 3 random cases (A, B and C")


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (lambda name, lane, i: fragment_element(name, (lane % 4) * 8 + (lane >> 2), i), "group and place were swapped"),
        (only("A", lambda lane, i: fragment_element("A", lane, [0, 1, 4, 5, 2, 3, 6, 7][i])),
         "the row moves before the column"),
        (only("B", lambda lane, i: fragment_element("B", lane, i)[::-1]), "B is K x N = 16 x 8, so its row is k"),
        (only("C", lambda lane, i: ((lane >> 2) + 8 * (i % 2), 2 * (lane % 4) + i // 2)), "c0 c1 are neighbours"),
        (only("C", lambda lane, i: (lane >> 2, 2 * (lane % 4) + i % 2)), "is held by 2 registers of the warp"),
        (only("B", lambda lane, i: (lane, i)), "outside the 16 x 8 tile of B"),
    ],
    ids=["groups-swapped", "a-registers-in-column-order", "b-transposed", "c-row-from-i", "c-twice", "outside"],
)
def test_fragment_element_rejects_known_mistakes(seed, wrong, hint):
    assert hint in rejected_with(check_fragment_element, wrong)


def test_fragment_element_rejects_what_is_not_a_pair():
    assert "return the pair (row, col)" in rejected_with(check_fragment_element, lambda name, lane, i: lane)


def test_fragment_maps_cover_each_element_once():
    for element, shape, per_lane in FRAGMENTS.values():
        held = fragment_map(element, per_lane).reshape(-1, 2)
        assert len({tuple(place) for place in held}) == held.shape[0] == shape[0] * shape[1]


def test_ldmatrix_x4_row_accepts_the_solution(capsys):
    assert check_ldmatrix_x4_row(lambda lane: (lane % 16, 8 * (lane // 16))) is None
    assert capsys.readouterr().out.startswith("PASSED ldmatrix_x4_row: 1 random cases")


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (lambda lane: (lane % 8 + 8 * (lane // 16), 8 * (lane // 8 % 2)), "lanes 8-15 point at rows 8-15"),
        (lambda lane: (lane % 16, 0), "lanes 16-31 supply matrices 2 and 3"),
        (lambda lane: (lane, 0), "row is 0-15 and col is 0 or 8"),
        (lambda lane: lane, "return (row, col)"),
    ],
    ids=["matrices-in-reading-order", "columns-8-15-never-read", "row-is-lane", "not-a-pair"],
)
def test_ldmatrix_x4_row_rejects_known_mistakes(seed, wrong, hint):
    assert hint in rejected_with(check_ldmatrix_x4_row, wrong)


def test_ldmatrix_wavefronts_counts_bank_conflicts():
    assert ldmatrix_wavefronts(np.arange(8) * 16) == 1  # 128 contiguous bytes: 32 banks, one pass
    assert ldmatrix_wavefronts(np.arange(8) * 128) == 8  # one chunk column of 128-byte rows: the same 4 banks
    assert ldmatrix_wavefronts(np.zeros(8, dtype=np.int64)) == 1  # the same 16 bytes eight times: a broadcast


def swizzle(offsets):
    return offsets ^ (((offsets >> 7) & 7) << 4)


def test_swizzle_accepts_the_solution(capsys):
    assert check_swizzle(swizzle) is None
    assert "every ldmatrix read in one pass, 8 without a swizzle" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (lambda offsets: offsets, "8 passes (8-way bank conflicts"),
        (lambda offsets: offsets ^ (((offsets >> 7) & 3) << 4), "2 passes (2-way bank conflicts"),
        (lambda offsets: offsets ^ ((offsets >> 7) << 4), "into row"),
        (lambda offsets: offsets ^ ((offsets >> 7) & 7), "splits a 16-byte chunk"),
        (lambda offsets: offsets & ~np.int64(16), "must be a permutation of the tile"),
        (lambda offsets: offsets / 1, "return whole numbers"),
    ],
    ids=["no-swizzle", "two-bits", "whole-row-index", "xor-into-the-bytes", "not-a-permutation", "floats"],
)
def test_swizzle_rejects_known_mistakes(seed, wrong, hint):
    message = rejected_with(check_swizzle, wrong)
    assert hint in message


def fp8_block_quantize(x, block):
    blocks = x.reshape(x.shape[0], -1, block)
    scales = (np.abs(blocks).max(axis=-1) / 448).astype(np.float32)
    return (blocks / scales[..., None]).astype(ml_dtypes.float8_e4m3fn).reshape(x.shape), scales


def with_scales(scales_of, quantise=lambda blocks, scales: blocks / scales[..., None]):
    """A quantiser whose scales (and quantise step) are another function of the blocks."""
    def wrong(x, block):
        blocks = x.reshape(x.shape[0], -1, block)
        scales = np.asarray(scales_of(blocks), dtype=np.float32)
        return quantise(blocks, scales).astype(ml_dtypes.float8_e4m3fn).reshape(x.shape), scales

    return wrong


def test_fp8_block_quantize_accepts_the_solution(capsys):
    assert check_fp8_block_quantize(fp8_block_quantize) is None
    assert capsys.readouterr().out.startswith("PASSED fp8_block_quantize: 3 random cases (blocks of 16, 32, 128")


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (with_scales(lambda b: np.broadcast_to(np.abs(b).max() / 448, b.shape[:2])), "one scale for the whole"),
        (with_scales(lambda b: b.max(axis=-1) / 448), "largest |x| of the block (np.abs first)"),
        (with_scales(lambda b: 448 / np.abs(b).max(axis=-1)), "not 448 / amax"),
        (with_scales(lambda b: np.abs(b).max(axis=-1) / 127), "the largest value of int8"),
        (with_scales(lambda b: np.abs(b).max(axis=-1) / 240), "the largest value of e4m3fnuz"),
        (with_scales(lambda b: np.abs(b).max(axis=-1) / 448, lambda b, s: b * s[..., None]), "(x / scale)"),
        (with_scales(lambda b: np.abs(b).max(axis=-1) / 448, lambda b, s: np.round(b / s[..., None] / 4) * 4),
         "further than e4m3's rounding allows"),
    ],
    ids=["one-scale", "max-not-amax", "inverted", "int8-range", "fnuz-range", "multiplied", "rounded-coarsely"],
)
def test_fp8_block_quantize_rejects_known_mistakes(seed, wrong, hint):
    assert hint in rejected_with(check_fp8_block_quantize, wrong)


def test_fp8_block_quantize_needs_fp8_values_and_float32_scales():
    assert "expected float8_e4m3fn" in rejected_with(check_fp8_block_quantize, lambda x, block: (
        x, fp8_block_quantize(x, block)[1]))
    assert "expected float32 of shape" in rejected_with(check_fp8_block_quantize, lambda x, block: (
        fp8_block_quantize(x, block)[0], fp8_block_quantize(x, block)[1].astype(np.float64)))
