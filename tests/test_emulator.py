"""The CPU warp emulator (course_lib.emulator): its instructions are the hardware's, and it catches what would hang
or read out of place on a GPU.

Why trust it: the GEMM steps of chapters 02-03 pass their GPU tests on the H100 (``tests/test_gemm.py``), and
between them they use every instruction the emulator models (``cp.async``, ``ldmatrix`` with and without
``.trans``, ``mma.sync`` and WMMA in fp16 and bf16, shared memory and barriers). Run unchanged on the emulator they
must match float64 too; so must the lane formulas chapter 02 teaches (``labs/tensor_core_fragments``).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from course_lib import backend, dtypes, emulator
from course_lib.check import relative_error, tolerance_for
from course_lib.kernels import gemm
from course_lib.labs import tensor_core_fragments as fragments

pytestmark = pytest.mark.skipif(emulator.emulator_problem() is not None, reason=str(emulator.emulator_problem()))

@pytest.mark.skipif(backend.has_gpu(), reason="gemm.emulate is for CPU mode; on a GPU tests/test_gemm.py runs them")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("step", gemm.EMULATED_STEPS)
@pytest.mark.parametrize(("m", "n", "k"), [(256, 128, 64), (130, 200, 72)], ids=["whole-tiles", "edge-tiles"])
def test_the_gpu_checked_gemm_steps_give_the_same_product_on_the_emulator(rng, step, dtype, m, n, k):
    """Every GEMM step of chapters 02-03 but wgmma, unchanged: the mma_sync step covers cp.async, ldmatrix (plain
    and .trans) and mma.sync; the wmma step covers WMMA's fragments."""
    host = dtypes.host_dtype(dtype)
    a, b = rng.standard_normal((m, k)).astype(host), rng.standard_normal((k, n)).astype(host)
    c = gemm.emulate(a, b, step=step, dtype=dtype)
    expected = a.astype(np.float64) @ b.astype(np.float64)
    assert not np.isnan(c.astype(np.float32)).any(), "some outputs were never written"
    assert relative_error(c.astype(np.float32), expected) < tolerance_for(dtype)


@pytest.mark.skipif(backend.has_gpu(), reason="CPU mode's choices")
def test_in_cpu_mode_every_step_but_wgmma_runs_on_the_emulator(rng):
    assert [step for step in gemm.STEPS if gemm.kernel_cannot_run(step, "bfloat16")] == ["wgmma"]
    assert "does not model wgmma" in gemm.kernel_cannot_run("wgmma", "bfloat16")
    a = b = dtypes.random_normal((64, 64), "bfloat16", rng)
    with pytest.raises(ValueError, match="'wgmma' needs a GPU"):
        gemm.emulate(a, b, step="wgmma", dtype="bfloat16")
    c = gemm.run_kernel(a, b, step="mma_sync", dtype="bfloat16")
    assert relative_error(c.astype(np.float32), gemm.gemm_reference(a, b, "bfloat16")) < tolerance_for("bfloat16")


# ---- each instruction, lane by lane, against chapter 02's formulas ---------------------------------------------

FRAGMENT_PROBE = r"""
#include "tensor_core.cuh"
// One warp: ldmatrix (x4, then x4.trans) from a 32 x 8 tile of 16-bit values, row r at address r * 16 bytes, each
// lane giving row `lane`; then one mma.sync of the first load's registers as A with B = 1 everywhere.
__global__ void probe(unsigned* plain, unsigned* transposed, float* product, const __half* tile) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int lane = threadIdx.x;
    reinterpret_cast<uint4*>(smem)[lane] = reinterpret_cast<const uint4*>(tile)[lane];
    __syncwarp();
    unsigned r[4], t[4];
    ldmatrix_x4(r, smem_address(smem + lane * 16));
    ldmatrix_x4_trans(t, smem_address(smem + lane * 16));
    const unsigned one = 0x3c003c00u;  // two fp16 ones
    const unsigned b[2] = {one, one};
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    mma_m16n8k16<__half>(d, r, b);
    for (int i = 0; i < 4; ++i)
        plain[lane * 4 + i] = r[i], transposed[lane * 4 + i] = t[i], product[lane * 4 + i] = d[i];
}
"""


def test_ldmatrix_and_mma_sync_hand_each_lane_what_chapter_02_says(rng):
    tile = rng.standard_normal((32, 8)).astype(np.float16)  # four 8 x 8 matrices, one above the other
    plain, transposed = (np.zeros((32, 4), np.uint32) for _ in range(2))
    product = np.zeros((32, 4), np.float32)
    module = emulator.EmulatedModule(FRAGMENT_PROBE, ("probe",))
    module.get_function("probe")((1,), (32,), (plain, transposed, product, tile), shared_mem=32 * 16)

    def halves(registers: np.ndarray) -> np.ndarray:  # [32 lanes, 4 registers] -> [32, 8] fp16 values
        return registers.astype("<u4").view(np.float16).reshape(32, 8)

    for trans, registers in ((False, plain), (True, transposed)):
        expected = fragments.ldmatrix(tile, [(lane, 0) for lane in range(32)], trans=trans)
        np.testing.assert_array_equal(halves(registers), expected)
    a = np.zeros((16, 16))  # A as mma.sync reads it from the first load's registers (fragments.a_element)
    for lane in range(32):
        for i in range(8):
            a[fragments.a_element(lane, i)] = halves(plain)[lane, i]
    row_sums = a.sum(axis=1)  # A times a B of ones: every column of D is A's row sums
    expected_d = np.array([[row_sums[fragments.c_element(lane, i)[0]] for i in range(4)] for lane in range(32)])
    np.testing.assert_allclose(product, expected_d, rtol=1e-6)


SHUFFLES = r"""
// Each lane's value is its lane number; every shuffle writes one int per lane, then the ballot of odd values.
__global__ void shuffles(int* out) {
    const int lane = threadIdx.x, width = 8;
    out[0 * 32 + lane] = __shfl_sync(0xffffffffu, lane, 3, width);
    out[1 * 32 + lane] = __shfl_up_sync(0xffffffffu, lane, 2, width);
    out[2 * 32 + lane] = __shfl_down_sync(0xffffffffu, lane, 2, width);
    out[3 * 32 + lane] = __shfl_xor_sync(0xffffffffu, lane, 9);
    out[4 * 32 + lane] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 2));
}
"""


def test_shuffles_and_votes_follow_the_cuda_programming_guide():
    out = np.zeros((5, 32), np.int32)
    emulator.EmulatedModule(SHUFFLES, ("shuffles",)).get_function("shuffles")((1,), (32,), (out,))
    lane, width = np.arange(32), 8
    np.testing.assert_array_equal(out[0], lane // width * width + 3)  # lane 3 of each segment of 8
    np.testing.assert_array_equal(out[1], np.where(lane % width >= 2, lane - 2, lane))  # own value at a segment start
    np.testing.assert_array_equal(out[2], np.where(lane % width + 2 < width, lane + 2, lane))
    np.testing.assert_array_equal(out[3], lane ^ 9)
    assert (out[4].view(np.uint32) == 0xAAAAAAAA).all()  # the odd lanes' bits


def test_launches_from_several_python_threads_take_turns():
    """ctypes lets go of the GIL during a launch; the emulator's state is one per library, so launches queue."""
    kernel = emulator.EmulatedModule(r"""
        __global__ void swap_pairs_add_one(float* x) {
            x[threadIdx.x] = __shfl_xor_sync(0xffffffffu, x[threadIdx.x], 1) + 1.0f;
        }""", ("swap_pairs_add_one",)).get_function("swap_pairs_add_one")
    arrays = [np.arange(32, dtype=np.float32) for _ in range(4)]

    def work(x: np.ndarray) -> None:
        for _ in range(20):  # an even number of swaps: every element ends where it began, plus 20
            kernel((1,), (32,), (x,))

    workers = [threading.Thread(target=work, args=(x,)) for x in arrays]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for x in arrays:
        np.testing.assert_array_equal(x, np.arange(32) + 20)


# ---- what a GPU would do wrong silently, the emulator names ----------------------------------------------------

FAULTY = r"""
#include "tensor_core.cuh"
__global__ void half_warp_shuffle(float* out) {  // lanes 16-31 leave; 0-15 wait for them at a full-warp shuffle
    if (threadIdx.x < 16) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}
__global__ void copy_past_the_end(float* out, const float* in) {  // every thread copies 16 bytes, one too many
    extern __shared__ __align__(16) unsigned char smem[];
    cp_async_16(smem_address(smem + threadIdx.x * 16), in + threadIdx.x * 4, true);
    cp_async_commit();
    cp_async_wait<0>();
    out[threadIdx.x] = reinterpret_cast<float*>(smem)[threadIdx.x * 4];
}
__global__ void read_before_wait(float* out, const float* in) {  // the copy may not have landed when read
    extern __shared__ __align__(16) unsigned char smem[];
    cp_async_16(smem_address(smem + threadIdx.x * 16), in + threadIdx.x * 4, true);
    cp_async_commit();
    out[threadIdx.x] = reinterpret_cast<float*>(smem)[threadIdx.x * 4];
    cp_async_wait<0>();
}
__global__ void mixed_instructions(float* out) {  // half a warp shuffles while the other half synchronises
    float v = 1.0f;
    if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1); else __syncwarp();
    out[threadIdx.x] = v;
}
__global__ void exit_mid_copy(const float* in) {
    extern __shared__ __align__(16) unsigned char smem[];
    cp_async_16(smem_address(smem + threadIdx.x * 16), in + threadIdx.x * 4, true);
    cp_async_commit();
}
"""
FAULTY_NAMES = ("half_warp_shuffle", "copy_past_the_end", "read_before_wait", "mixed_instructions", "exit_mid_copy")


@pytest.fixture(scope="module")
def faulty() -> emulator.EmulatedModule:
    return emulator.EmulatedModule(FAULTY, FAULTY_NAMES)


def test_a_shuffle_that_half_the_warp_never_reaches_is_a_deadlock(faulty):
    expected = r"deadlock in block \(0, 0, 0\).*threads 0-15 wait at __shfl_xor_sync; threads 16-31 exited"
    with pytest.raises(emulator.EmulatorError, match=expected):
        faulty.get_function("half_warp_shuffle")((1,), (32,), (np.zeros(32, np.float32),))


def test_a_copy_from_outside_every_array_is_named(faulty):
    data = np.arange(4 * 31, dtype=np.float32)  # 31 threads' worth of 16-byte chunks, for 32 threads
    with pytest.raises(emulator.EmulatorError, match=r"thread \(31, 0, 0\): cp.async reads 16 bytes outside"):
        faulty.get_function("copy_past_the_end")((1,), (32,), (np.zeros(32, np.float32), data), shared_mem=512)


def test_reading_a_copy_before_waiting_for_it_reads_garbage_unless_it_landed_early(faulty):
    data = np.arange(4 * 32, dtype=np.float32)
    out = np.zeros(32, np.float32)
    faulty.get_function("read_before_wait")((1,), (32,), (out, data), shared_mem=512)
    assert np.isnan(out).all(), "copies land at the wait: before it, shared memory holds the 0xff fill"
    faulty.get_function("read_before_wait")((1,), (32,), (out, data), shared_mem=512, copies_at_issue=True)
    np.testing.assert_array_equal(out, data[::4])  # the other extreme a GPU may choose: the bug hides


def test_lanes_at_different_warp_wide_instructions_are_named(faulty):
    with pytest.raises(emulator.EmulatorError, match="reached __syncwarp while others .* wait at __shfl_xor_sync"):
        faulty.get_function("mixed_instructions")((1,), (32,), (np.zeros(32, np.float32),))


def test_a_thread_leaving_with_copies_in_flight_is_named(faulty):
    with pytest.raises(emulator.EmulatorError, match="exits with 1 cp.async copies not waited for"):
        faulty.get_function("exit_mid_copy")((1,), (32,), (np.zeros(128, np.float32),), shared_mem=512)


def test_a_shared_address_past_the_block_s_shared_memory_is_named(faulty):
    with pytest.raises(emulator.EmulatorError, match="cp.async's destination at shared byte 256 .* past"):
        faulty.get_function("copy_past_the_end")((1,), (32,), (np.zeros(32, np.float32), np.zeros(128, np.float32)),
                                                 shared_mem=256)


@pytest.mark.parametrize(("args", "message"), [
    ((np.zeros(32, np.float32), np.zeros(128, np.float32), np.int32(1)), "takes 2 arguments, got 3"),
    ((np.zeros(32, np.float32), 5), "NumPy scalars such as np.int32"),
    ((np.zeros(32, np.float32), np.float32(5)), "is a pointer"),
    ((np.zeros(32, np.float32), np.zeros((16, 16), np.float32)[:, ::2]), "C-contiguous"),
])
def test_arguments_are_checked_against_the_kernel_s_parameters(faulty, args, message):
    with pytest.raises((TypeError, ValueError), match=message):
        faulty.get_function("copy_past_the_end")((1,), (32,), args, shared_mem=512)


def test_an_isolated_launch_keeps_an_array_passed_twice_one_buffer():
    """An in-place kernel given the same array as input and output must see its own writes, as on a GPU."""
    kernel = emulator.EmulatedModule("""__global__ void twice(float* out, const float* in) {
        out[threadIdx.x] = 2.0f * in[threadIdx.x]; }""", ("twice",)).get_function("twice")
    x = np.arange(32, dtype=np.float32)
    kernel((1,), (32,), (x, x), time_limit_s=30)
    np.testing.assert_array_equal(x, 2 * np.arange(32))


def test_an_array_of_the_wrong_element_size_and_a_shared_size_past_the_limit_are_refused(faulty):
    with pytest.raises(TypeError, match="points to 4-byte elements, got an array of float16"):
        faulty.get_function("copy_past_the_end")((1,), (32,), (np.zeros(32, np.float16), np.zeros(128, np.float32)))
    with pytest.raises(ValueError, match="shared_mem must be 0 to 232448 bytes"):
        faulty.get_function("copy_past_the_end")((1,), (32,), (np.zeros(32, np.float32), np.zeros(128, np.float32)),
                                                 shared_mem=-1)


def test_a_name_that_was_not_built_and_a_block_too_large_are_refused(faulty):
    with pytest.raises(KeyError, match="not one of this module's name expressions"):
        faulty.get_function("probe")
    with pytest.raises(ValueError, match="at most 1024 threads"):
        faulty.get_function("half_warp_shuffle")((1,), (1025,), (np.zeros(32, np.float32),))


def test_a_source_the_compiler_refuses_says_why():
    with pytest.raises(emulator.EmulatorError, match="refused the emulated kernel"):
        emulator.EmulatedModule("__global__ void broken(float* x) { x[0] = undefined_name; }", ("broken",))


def test_scalars_of_the_wrong_size_are_refused():
    module = emulator.EmulatedModule("__global__ void scale(float* x, int n) { x[threadIdx.x] *= n; }", ("scale",))
    with pytest.raises(TypeError, match="is a 4-byte value, got int64"):
        module.get_function("scale")((1,), (32,), (np.ones(32, np.float32), np.int64(2)))
    x = np.ones(32, np.float32)
    module.get_function("scale")((1,), (32,), (x, np.int32(3)))
    np.testing.assert_array_equal(x, 3.0)
