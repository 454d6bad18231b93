"""Chapter 03 checkers: each right solution passes, and each known mistake is rejected with its hint.

Every kernel is a real @cuda.jit kernel, built from one template with one part changed; in CPU mode
it runs in Numba's CUDA simulator (256 or 16 Python threads per block), so the checkers keep shapes small.
The arithmetic and epilogue exercises are plain functions, each mistake written out as a learner would.
"""

from __future__ import annotations

import math
import operator

import numba
import numpy as np
import pytest
from checker_testing import rejected_with, unwritten

from course_lib import backend
from course_lib.check import check_tiled_gemm
from course_lib.check.ch03 import TILE
from course_lib.check.ch03_arithmetic import check_blocks_per_sm, check_tile_intensity, intensity_as_computed
from course_lib.check.ch03_epilogue import BIAS_GELU_MISTAKES, check_bias_gelu, check_plan_linear_gelu
from course_lib.check.ch03_register_blocked import BK, BM, BN, TM, TN, _barriers, check_register_blocked_gemm
from course_lib.kernels.cublaslt import LtMatmul, gelu_tanh
from course_lib.labs import gemm_steps

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


# --- 03.2 to 03.6: learner code written out, each known mistake one argument away from the solution ------------


@cuda.jit(device=True)
def barrier():
    cuda.syncthreads()


@cuda.jit(device=True)
def no_barrier():
    pass


def make_register_blocked_gemm(rows_from_y=True, k_steps_left_out=0, micro_tile=True,
                               barrier_after_loads=barrier, barrier_after_sums=barrier):
    """The solution's register-blocked GEMM, or a known mistake when one of the arguments is changed.

    The barriers come in as arguments, so the checker's count of syncthreads() in the source sees none here.
    """

    @cuda.jit
    def register_blocked_gemm(a, b, c):
        a_tile = cuda.shared.array((BM, BK), numba.float32)
        b_tile = cuda.shared.array((BK, BN), numba.float32)
        acc = cuda.local.array((TM, TN), numba.float32)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        thread = ty * cuda.blockDim.x + tx
        if rows_from_y:
            row0, col0 = cuda.blockIdx.y * BM, cuda.blockIdx.x * BN
        else:
            row0, col0 = cuda.blockIdx.x * BM, cuda.blockIdx.y * BN
        for i in range(TM):
            for j in range(TN):
                acc[i, j] = 0.0
        for k0 in range(0, a.shape[1] - k_steps_left_out * BK, BK):
            for e in range(thread, BM * BK, 16):
                a_tile[e // BK, e % BK] = a[row0 + e // BK, k0 + e % BK]
                b_tile[e // BN, e % BN] = b[k0 + e // BN, col0 + e % BN]
            barrier_after_loads()
            for kk in range(BK):
                for i in range(TM):
                    for j in range(TN):
                        acc[i, j] += a_tile[ty * TM + i, kk] * b_tile[kk, tx * TN + j]
            barrier_after_sums()
        for i in range(TM):
            for j in range(TN):
                if micro_tile or (i == 0 and j == 0):
                    c[row0 + ty * TM + i, col0 + tx * TN + j] = acc[i, j]

    return register_blocked_gemm


def make_tile_intensity(flops_per_fma=2, with_c=False, per_byte=True, divide=operator.truediv):
    """A learner's tile_intensity, right or with one known mistake."""

    def tile_intensity(bm, bn, bk, item_bytes):
        loaded = (bm * bk + bk * bn + (bm * bn if with_c else 0)) * (item_bytes if per_byte else 1)
        return divide(flops_per_fma * bm * bn * bk, loaded)

    return tile_intensity


def make_blocks_per_sm(warp=32, register_unit=256, left_out=None, guard_shared=True):
    """A learner's blocks_per_sm, written out; each argument changed is a known mistake."""

    def blocks_per_sm(threads, registers_per_thread, shared_bytes, limits):
        warps = math.ceil(threads / warp)
        warp_registers = math.ceil(registers_per_thread * warp / register_unit) * register_unit
        fits = {"registers": limits["registers"] // (warps * warp_registers),
                "threads": limits["threads"] // (warps * warp), "blocks": limits["blocks"]}
        if shared_bytes or not guard_shared:
            fits["shared_bytes"] = limits["shared_bytes"] // shared_bytes
        return min(count for key, count in fits.items() if key != left_out)

    return blocks_per_sm


def bias_gelu(x, bias):
    return gelu_tanh(x + bias)


def bias_gelu_in_place(x, bias):
    x += bias
    return gelu_tanh(x)


def gelu_erf(y):
    return 0.5 * y * (1.0 + np.vectorize(math.erf)(y / math.sqrt(2.0)))


def plan_with(epilogue, with_bias=True):
    return lambda a, b, bias: LtMatmul(a, b, epilogue=epilogue, bias=bias if with_bias else None)


SOLUTIONS = {  # id: (checker, solution, the start of its pass line)
    "03.2": (check_register_blocked_gemm, make_register_blocked_gemm(), "PASSED register_blocked_gemm: "),
    "03.3": (check_tile_intensity, make_tile_intensity(), "PASSED tile_intensity: 4 random cases"),
    "03.4": (check_blocks_per_sm, make_blocks_per_sm(), "PASSED blocks_per_sm: 8 random cases"),
    "03.5": (check_bias_gelu, bias_gelu, "PASSED bias_gelu: 3 random cases"),
    "03.6": (check_plan_linear_gelu, plan_with("bias_gelu"), "PASSED plan_linear_gelu: 2 random cases"),
}
SHORT = f"the last {BK} of K left out"
MISTAKES = {  # id: (checker, wrong code, a piece of its hint)
    "03.2-x-y-swapped": (check_register_blocked_gemm, make_register_blocked_gemm(rows_from_y=False),
                         "the grid's x covers the columns of C"),
    "03.2-k-loop-short": (check_register_blocked_gemm, make_register_blocked_gemm(k_steps_left_out=1), SHORT),
    "03.2-one-element-per-thread": (check_register_blocked_gemm, make_register_blocked_gemm(micro_tile=False),
                                    f"only one element in {TM * TN} of C was written"),
    "03.2-no-barrier-after-loads": (check_register_blocked_gemm,
                                    make_register_blocked_gemm(barrier_after_loads=no_barrier),
                                    "it needs two barriers in each step along K"),
    "03.2-no-barrier-after-sums": (check_register_blocked_gemm,
                                   make_register_blocked_gemm(barrier_after_sums=no_barrier),
                                   "it needs two barriers in each step along K"),
    "03.3-factor-2-dropped": (check_tile_intensity, make_tile_intensity(flops_per_fma=1), "a multiply-add is 2 FLOPs"),
    "03.3-c-counted": (check_tile_intensity, make_tile_intensity(with_c=True), "C's bytes were counted"),
    "03.3-elements-not-bytes": (check_tile_intensity, make_tile_intensity(per_byte=False), "FLOPs per element"),
    "03.3-integer-division": (check_tile_intensity, make_tile_intensity(divide=operator.floordiv),
                              "use / (true division)"),
    "03.4-threads-not-in-warps": (check_blocks_per_sm, make_blocks_per_sm(warp=1, register_unit=8),
                                  "a block takes whole warps"),
    "03.4-registers-not-in-units": (check_blocks_per_sm, make_blocks_per_sm(register_unit=1),
                                    "registers are handed to a warp 256 at a time"),
    "03.4-no-rounding": (check_blocks_per_sm, make_blocks_per_sm(warp=1, register_unit=1),
                         "round its threads up to a multiple of 32, and registers"),
    "03.4-registers-left-out": (check_blocks_per_sm, make_blocks_per_sm(left_out="registers"),
                                "the SM's register limit, limits['registers'], was left out"),
    "03.4-shared-left-out": (check_blocks_per_sm, make_blocks_per_sm(left_out="shared_bytes"),
                             "the SM's shared-memory limit"),
    "03.4-threads-left-out": (check_blocks_per_sm, make_blocks_per_sm(left_out="threads"), "the SM's thread limit"),
    "03.4-block-limit-left-out": (check_blocks_per_sm, make_blocks_per_sm(left_out="blocks"), "the SM's block limit"),
    "03.4-divides-by-no-shared-memory": (check_blocks_per_sm, make_blocks_per_sm(guard_shared=False),
                                         "not limited by it: leave that count out rather than divide by 0"),
    "03.5-bias-after-gelu": (check_bias_gelu, lambda x, bias: gelu_tanh(x) + bias, "the bias was added after GELU"),
    "03.5-no-bias": (check_bias_gelu, lambda x, bias: gelu_tanh(x), "the bias was not added"),
    "03.5-erf-form": (check_bias_gelu, lambda x, bias: gelu_erf(x + bias), "this is the exact GELU"),
    "03.5-bias-on-rows": (check_bias_gelu, lambda x, bias: gelu_tanh(x + bias[:, None]),
                          "bias[:, None] adds it along the wrong axis"),
    "03.5-in-place": (check_bias_gelu, bias_gelu_in_place, "bias_gelu changed x in place"),
    "03.6-no-epilogue": (check_plan_linear_gelu, plan_with(None, with_bias=False), "the plan has no epilogue"),
    "03.6-gelu-without-bias": (check_plan_linear_gelu, plan_with("gelu", with_bias=False),
                               "epilogue 'gelu' applies GELU without the bias"),
    "03.6-bias-without-gelu": (check_plan_linear_gelu, plan_with("bias"),
                               "epilogue 'bias' adds the bias but applies no GELU"),
    "03.6-relu": (check_plan_linear_gelu, plan_with("bias_relu"), "epilogue 'bias_relu' applies ReLU, not GELU"),
    "03.6-bias-with-gelu": (check_plan_linear_gelu, plan_with("gelu"),
                            "LtMatmul(a, b, epilogue='bias_gelu', bias=bias)"),
    "03.6-result-not-plan": (check_plan_linear_gelu,
                             lambda a, b, bias: LtMatmul(a, b, epilogue="bias_gelu", bias=bias)(),
                             "return the plan itself"),
    "03.6-other-bias": (check_plan_linear_gelu,
                        lambda a, b, bias: LtMatmul(a, b, epilogue="bias_gelu", bias=bias.copy()),
                        "the plan's bias is not the bias given"),
}


@cuda.jit
def register_blocked_gemm_stub(a, b, c):
    raise NotImplementedError


def function_stub(*args):
    raise NotImplementedError


@pytest.mark.parametrize(("check", "solution", "line"), SOLUTIONS.values(), ids=SOLUTIONS.keys())
def test_accepts_the_solution(seed, capsys, check, solution, line):
    assert check(solution) is None
    assert capsys.readouterr().out.startswith(line)


@pytest.mark.parametrize(("check", "wrong", "hint"), [  # a warp of 16 threads runs in step: no race shows on a GPU
    pytest.param(*case, id=name, marks=on_cpu_only if "barrier" in name else ()) for name, case in MISTAKES.items()])
def test_rejects_known_mistakes(seed, check, wrong, hint):
    assert hint in rejected_with(check, wrong)


@pytest.mark.parametrize("check", [check[0] for check in SOLUTIONS.values()], ids=SOLUTIONS.keys())
def test_stub_is_not_written_yet(check):
    stub = register_blocked_gemm_stub if check is check_register_blocked_gemm else function_stub
    assert unwritten(check, stub).endswith(" is not written yet: replace `raise NotImplementedError(...)` with your "
                                           "code")


def test_plan_linear_gelu_says_what_was_and_was_not_checked(capsys):
    check_plan_linear_gelu(plan_with("bias_gelu"))
    line = capsys.readouterr().out
    if backend.has_gpu():
        assert "cuBLASLt's C against float64" in line and "GPU mode" in line
    else:
        assert "CPU mode" in line and "cuBLASLt itself was not run: it is checked only on a GPU" in line


def test_register_blocked_gemm_counts_the_barriers_in_the_source():
    assert _barriers(make_register_blocked_gemm()) == 0  # passed in as arguments, not called by name
    assert _barriers(tiled_gemm_stub) == 0 and _barriers(make_tiled_gemm()) == 2


def test_tile_intensity_reference_is_the_labs_and_bk_cancels():
    for bk in (8, 16, 64):
        assert intensity_as_computed(128, 64, bk, 2) == pytest.approx(gemm_steps.tile_intensity(128, 64, 2))


def test_occupancy_rounds_threads_to_warps_and_registers_to_units():
    assert gemm_steps.occupancy(256, 40, 0)["registers"] == 65536 // (40 * 256)  # 40 registers: 1280 a warp
    assert gemm_steps.occupancy(256, 37, 0)["registers"] == 65536 // (40 * 256)  # 37 round up to 40 (256 a warp)
    assert gemm_steps.occupancy(100, 37, 0)["threads"] == 2048 // 128  # 100 threads are 4 warps


def test_bias_gelu_names_the_wrong_axis_on_a_square_x():
    x, bias = np.arange(1.0, 10.0).reshape(3, 3), np.array([1.0, 2.0, 3.0])
    on_rows = next(m for m in BIAS_GELU_MISTAKES if m.name == "bias on the rows")
    assert on_rows.explains(gelu_tanh(x + bias[:, None]), bias_gelu(x, bias), (x, bias), 1e-12)
