"""Chapter 01 checkers: the right kernels pass, and each known mistake is rejected with its hint.

Every kernel here is a real @cuda.jit kernel: in CPU mode it runs in Numba's CUDA simulator, which
runs each CUDA thread as a Python thread, so the checkers keep CPU shapes small.
"""

from __future__ import annotations

import math

import numba
import pytest
from checker_testing import rejected_with, unwritten

from course_lib import backend, emulator
from course_lib.check import check_block_sum, check_rms_norm, check_saxpy

cuda = backend.numba_cuda()



needs_gpu = pytest.mark.gpu  # tests/conftest.py skips these, saying why, where there is no GPU
on_cpu_only = pytest.mark.skipif(backend.has_gpu(), reason="the simulator raises where a GPU goes on silently")
needs_cuda_c = pytest.mark.skipif(emulator.cuda_c_problem() is not None, reason=str(emulator.cuda_c_problem()))


# --- saxpy ---------------------------------------------------------------------------------------


@cuda.jit
def saxpy(a, x, y, out):
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = a * x[i] + y[i]


@cuda.jit
def without_stride_loop(a, x, y, out):
    i = cuda.grid(1)
    if i < out.size:
        out[i] = a * x[i] + y[i]


@cuda.jit
def scales_y(a, x, y, out):
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = a * y[i] + x[i]


@cuda.jit
def strides_by_block(a, x, y, out):
    for i in range(cuda.grid(1), out.size, cuda.blockDim.x):
        out[i] = a * x[i] + y[i]


@cuda.jit
def loops_one_past_the_end(a, x, y, out):
    for i in range(cuda.grid(1), out.size + 1, cuda.gridsize(1)):
        out[i] = a * x[i] + y[i]


@cuda.jit
def saxpy_stub(a, x, y, out):
    raise NotImplementedError


def test_saxpy_accepts_the_solution(capsys):
    assert check_saxpy(saxpy) is None
    line = capsys.readouterr().out
    assert line.startswith("PASSED saxpy: ") and "one run in place" in line and "mode" in line


def test_saxpy_rejects_one_element_per_thread(seed):
    message = rejected_with(check_saxpy, without_stride_loop)
    assert "was never written" in message
    assert "only the first blocks * threads = " in message and "stride of cuda.gridsize(1)" in message


def test_saxpy_rejects_swapped_x_and_y(seed):
    assert "Hint: this is a * y + x" in rejected_with(check_saxpy, scales_y)


def test_saxpy_rejects_a_stride_of_one_block(seed):
    message = rejected_with(check_saxpy, strides_by_block)
    assert "in place (out is y)" in message and "several threads updated them" in message


@on_cpu_only
def test_saxpy_rejects_an_index_past_the_end():
    message = rejected_with(check_saxpy, loops_one_past_the_end)
    assert "IndexError" in message and "stop before out.size" in message


@needs_gpu
def test_gpu_saxpy_catches_a_write_past_the_end(seed):
    message = rejected_with(check_saxpy, loops_one_past_the_end)
    assert "wrote past the end of out" in message and "stop before out.size" in message


def test_saxpy_stub_is_not_written_yet():
    assert unwritten(check_saxpy, saxpy_stub).startswith("saxpy is not written yet")


LAUNCHES_SEEN: list[tuple[int, int]] = []


@cuda.jit
def records_launches(a, x, y, out):
    if cuda.grid(1) == 0:
        LAUNCHES_SEEN.append((out.size, cuda.gridsize(1)))  # plain Python: only the simulator can run this
    saxpy(a, x, y, out)


@on_cpu_only
def test_saxpy_grids_are_smaller_than_the_arrays(seed):
    LAUNCHES_SEEN.clear()
    check_saxpy(records_launches)
    assert all(threads < n for n, threads in LAUNCHES_SEEN)
    assert all(n % 64 for n, _ in LAUNCHES_SEEN)


# --- block_sum: the solution, and wrong versions of how each thread loads its element -----------


def make_block_sum(load):
    """A shared-memory tree reduction whose threads fetch their element with ``load(x, i)``."""

    @cuda.jit
    def block_sum(x, partial):
        cache = cuda.shared.array(128, numba.float32)
        t = cuda.threadIdx.x
        cache[t] = load(x, cuda.grid(1))
        cuda.syncthreads()
        step = cuda.blockDim.x // 2
        while step > 0:
            if t < step:
                cache[t] += cache[t + step]
            cuda.syncthreads()
            step //= 2
        if t == 0:
            partial[cuda.blockIdx.x] = cache[0]

    return block_sum


@cuda.jit(device=True)
def zero_past_the_end(x, i):
    return x[i] if i < x.size else 0.0


@cuda.jit(device=True)
def no_zero_padding(x, i):
    return x[i]


@cuda.jit(device=True)
def zero_from_one_past_the_end(x, i):
    return x[i] if i <= x.size else 0.0


@cuda.jit(device=True)
def zero_from_the_last_element(x, i):
    return x[i] if i < x.size - 1 else 0.0


@cuda.jit
def without_barriers(x, partial):
    cache = cuda.shared.array(128, numba.float32)
    t = cuda.threadIdx.x
    i = cuda.grid(1)
    cache[t] = x[i] if i < x.size else 0.0
    step = cuda.blockDim.x // 2
    while step > 0:
        if t < step:
            cache[t] += cache[t + step]
        step //= 2
    if t == 0:
        partial[cuda.blockIdx.x] = cache[0]


@cuda.jit
def without_the_tree(x, partial):
    cache = cuda.shared.array(128, numba.float32)
    i = cuda.grid(1)
    cache[cuda.threadIdx.x] = x[i] if i < x.size else 0.0
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        partial[cuda.blockIdx.x] = cache[0]


TAIL_HINT = "must put 0 in the shared array"


def test_block_sum_accepts_the_solution(capsys):
    assert check_block_sum(make_block_sum(zero_past_the_end)) is None
    line = capsys.readouterr().out
    assert line.startswith("PASSED block_sum: ") and "n up to" in line and "mode" in line


def test_block_sum_rejects_a_missing_barrier(seed):
    assert "never calls cuda.syncthreads()" in rejected_with(check_block_sum, without_barriers)


def test_block_sum_rejects_thread_zero_alone(seed):
    assert "alone, the first element of block b" in rejected_with(check_block_sum, without_the_tree)


def test_block_sum_rejects_a_tail_without_zeros(seed):
    assert TAIL_HINT in rejected_with(check_block_sum, make_block_sum(no_zero_padding))


def test_block_sum_rejects_one_past_the_end(seed):
    assert "(`<`, not `<=`)" in rejected_with(check_block_sum, make_block_sum(zero_from_one_past_the_end))


def test_block_sum_rejects_a_dropped_last_element(seed):
    message = rejected_with(check_block_sum, make_block_sum(zero_from_the_last_element))
    assert "missing the last element" in message and "not `i < x.size - 1`" in message


@on_cpu_only
def test_block_sum_simulator_reports_where_it_read_past_the_end():
    message = rejected_with(check_block_sum, make_block_sum(no_zero_padding))
    assert "IndexError" in message and "return x[i]" in message


@needs_gpu
def test_gpu_block_sum_names_the_values_read_past_the_end(seed):
    message = rejected_with(check_block_sum, make_block_sum(no_zero_padding))
    assert "added the values that lie past the end of x" in message


# --- rms_norm: the solution and wrong versions, all built on one block-wide sum ----------------


@cuda.jit(device=True)
def block_total(cache):
    """Tree-reduce the block's shared values (one per thread); every thread gets the total."""
    t = cuda.threadIdx.x
    cuda.syncthreads()
    step = cuda.blockDim.x // 2
    while step > 0:
        if t < step:
            cache[t] += cache[t + step]
        cuda.syncthreads()
        step //= 2
    return cache[0]


@cuda.jit(device=True)
def thread_sum_of_squares(x, row):
    total = 0.0
    for j in range(cuda.threadIdx.x, x.shape[1], cuda.blockDim.x):
        total += x[row, j] * x[row, j]
    return total


@cuda.jit(device=True)
def thread_sum(x, row):
    total = 0.0
    for j in range(cuda.threadIdx.x, x.shape[1], cuda.blockDim.x):
        total += x[row, j]
    return total


@cuda.jit
def rms_norm(x, weight, out, eps):
    row, hidden = cuda.blockIdx.x, x.shape[1]
    cache = cuda.shared.array(64, numba.float32)
    cache[cuda.threadIdx.x] = thread_sum_of_squares(x, row)
    inv_rms = 1.0 / math.sqrt(block_total(cache) / hidden + eps)
    for j in range(cuda.threadIdx.x, hidden, cuda.blockDim.x):
        out[row, j] = x[row, j] * inv_rms * weight[j]


@cuda.jit
def without_eps(x, weight, out, eps):
    row, hidden = cuda.blockIdx.x, x.shape[1]
    cache = cuda.shared.array(64, numba.float32)
    cache[cuda.threadIdx.x] = thread_sum_of_squares(x, row)
    inv_rms = 1.0 / math.sqrt(block_total(cache) / hidden)
    for j in range(cuda.threadIdx.x, hidden, cuda.blockDim.x):
        out[row, j] = x[row, j] * inv_rms * weight[j]


@cuda.jit
def mean_of_x(x, weight, out, eps):
    row, hidden = cuda.blockIdx.x, x.shape[1]
    cache = cuda.shared.array(64, numba.float32)
    cache[cuda.threadIdx.x] = thread_sum(x, row)
    inv_rms = 1.0 / math.sqrt(block_total(cache) / hidden + eps)
    for j in range(cuda.threadIdx.x, hidden, cuda.blockDim.x):
        out[row, j] = x[row, j] * inv_rms * weight[j]


@cuda.jit
def sum_not_mean(x, weight, out, eps):
    row, hidden = cuda.blockIdx.x, x.shape[1]
    cache = cuda.shared.array(64, numba.float32)
    cache[cuda.threadIdx.x] = thread_sum_of_squares(x, row)
    inv_rms = 1.0 / math.sqrt(block_total(cache) + eps)
    for j in range(cuda.threadIdx.x, hidden, cuda.blockDim.x):
        out[row, j] = x[row, j] * inv_rms * weight[j]


@cuda.jit
def without_weight(x, weight, out, eps):
    row, hidden = cuda.blockIdx.x, x.shape[1]
    cache = cuda.shared.array(64, numba.float32)
    cache[cuda.threadIdx.x] = thread_sum_of_squares(x, row)
    inv_rms = 1.0 / math.sqrt(block_total(cache) / hidden + eps)
    for j in range(cuda.threadIdx.x, hidden, cuda.blockDim.x):
        out[row, j] = x[row, j] * inv_rms


@cuda.jit
def last_column_unwritten(x, weight, out, eps):
    row, hidden = cuda.blockIdx.x, x.shape[1]
    cache = cuda.shared.array(64, numba.float32)
    cache[cuda.threadIdx.x] = thread_sum_of_squares(x, row)
    inv_rms = 1.0 / math.sqrt(block_total(cache) / hidden + eps)
    for j in range(cuda.threadIdx.x, hidden - 1, cuda.blockDim.x):
        out[row, j] = x[row, j] * inv_rms * weight[j]


@cuda.jit
def one_element_per_thread(x, weight, out, eps):
    row, hidden, j = cuda.blockIdx.x, x.shape[1], cuda.threadIdx.x
    cache = cuda.shared.array(64, numba.float32)
    cache[j] = x[row, j] * x[row, j] if j < hidden else 0.0
    inv_rms = 1.0 / math.sqrt(block_total(cache) / hidden + eps)
    if j < hidden:
        out[row, j] = x[row, j] * inv_rms * weight[j]


def test_rms_norm_accepts_the_solution(capsys):
    assert check_rms_norm(rms_norm) is None
    line = capsys.readouterr().out
    assert line.startswith("PASSED rms_norm: ") and "Numba kernel" in line and "mode" in line


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (without_eps, "RMSNorm without eps"),
        (mean_of_x, "the mean of the squares is never negative"),
        (sum_not_mean, "that sum divided by hidden"),
        (without_weight, "without the weight"),
        (last_column_unwritten, "the last element of each row was never written"),
        (one_element_per_thread, "only the first 64 elements of each row were written"),
    ],
    ids=["no-eps", "mean-of-x", "sum-not-mean", "no-weight", "last-column", "no-row-loop"],
)
def test_rms_norm_rejects_known_mistakes(seed, wrong, hint):
    assert hint in rejected_with(check_rms_norm, wrong)


HIDDEN_SEEN: list[int] = []


@cuda.jit
def records_hidden(x, weight, out, eps):
    if cuda.grid(1) == 0:
        HIDDEN_SEEN.append(x.shape[1])  # plain Python: only the simulator can run this
    rms_norm(x, weight, out, eps)


@on_cpu_only
def test_rms_norm_rows_never_fill_whole_blocks(seed):
    HIDDEN_SEEN.clear()
    check_rms_norm(records_hidden)
    assert min(HIDDEN_SEEN) < 64 < max(HIDDEN_SEEN)
    assert all(hidden % 64 for hidden in HIDDEN_SEEN)


# --- rms_norm as CUDA C: compiled in both modes, run on a GPU only ------------------------------

RMS_NORM_SOURCE = r"""
extern "C" __global__ void rms_norm(const float* x, const float* weight, float* out, float eps, int hidden) {
    __shared__ float partial[128];
    const float* row_in = x + (size_t)blockIdx.x * hidden;
    float* row_out = out + (size_t)blockIdx.x * hidden;
    float sum = 0.0f;
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) sum += row_in[j] * row_in[j];
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int step = blockDim.x / 2; step > 0; step /= 2) {
        if (threadIdx.x < step) partial[threadIdx.x] += partial[threadIdx.x + step];
        __syncthreads();
    }
    const float inv_rms = rsqrtf(partial[0] / hidden + eps);
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) row_out[j] = row_in[j] * inv_rms * weight[j];
}
"""


@on_cpu_only
def test_rms_norm_source_without_the_emulator_compiles_but_is_not_claimed_checked(capsys, monkeypatch):
    monkeypatch.setattr(emulator, "emulator_problem", lambda: "no C++ compiler (pretend)")
    assert check_rms_norm(RMS_NORM_SOURCE) is None
    said = capsys.readouterr().out
    assert said.startswith("COMPILED rms_norm (CUDA C) for sm_80") and "registers" in said
    assert "NOT CHECKED numerically: running CUDA C needs a GPU or the CPU warp emulator" in said
    assert "no C++ compiler (pretend)" in said and "PASSED" not in said


def test_rms_norm_source_that_does_not_compile_shows_the_compiler_log():
    message = rejected_with(check_rms_norm, RMS_NORM_SOURCE.replace("float sum", "float summ"))
    assert "does not compile for sm_80" in message and 'identifier "sum" is undefined' in message


def test_rms_norm_source_needs_an_unmangled_kernel_name():
    message = rejected_with(check_rms_norm, RMS_NORM_SOURCE.replace('extern "C" ', ""))
    assert "no kernel named rms_norm" in message and 'extern "C"' in message


@needs_cuda_c
def test_rms_norm_source_runs_and_passes(capsys):
    check_rms_norm(RMS_NORM_SOURCE)
    line = capsys.readouterr().out
    assert line.startswith("PASSED rms_norm: ") and "CUDA C" in line
    assert ("in GPU mode" in line) if backend.has_gpu() else ("on the CPU warp emulator" in line)


@needs_cuda_c
def test_rms_norm_source_without_eps_is_rejected(seed):
    assert "RMSNorm without eps" in rejected_with(check_rms_norm, RMS_NORM_SOURCE.replace(" + eps", ""))


@on_cpu_only
@needs_cuda_c
def test_an_emulated_source_that_writes_far_outside_its_arrays_is_stopped_and_named():
    wild = RMS_NORM_SOURCE.replace("row_out[j] = row_in[j]", "row_out[j * 100000000LL] = row_in[j]")
    message = rejected_with(check_rms_norm, wild)
    assert "crashed the emulator (SIGSEGV)" in message and "illegal memory access" in message


@on_cpu_only
@needs_cuda_c
def test_an_emulated_source_that_never_finishes_is_stopped_at_the_time_limit(monkeypatch):
    monkeypatch.setenv("COURSE_CHECK_TIME_LIMIT_S", "2")
    endless = RMS_NORM_SOURCE.replace("j += blockDim.x) row_out", "j += 0 * blockDim.x) row_out")
    message = rejected_with(check_rms_norm, endless)
    assert "did not finish within 2 s on the CPU warp emulator" in message
