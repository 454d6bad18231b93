"""Chapter 00 checkers: the right answers pass, and each known mistake is rejected with its hint."""

from __future__ import annotations

import pytest
from checker_testing import rejected_with, unwritten

from course_lib import backend
from course_lib.check import check_achieved_gbps, check_roofline_time, check_vector_add

cuda = backend.numba_cuda()



# --- achieved_gbps -----------------------------------------------------------------------------------


def achieved_gbps(bytes_read, bytes_written, seconds):
    return (bytes_read + bytes_written) / seconds / 1e9


def test_achieved_gbps_accepts_the_solution(capsys):
    assert check_achieved_gbps(achieved_gbps) is None
    assert capsys.readouterr().out.startswith("PASSED achieved_gbps: 20 random cases (seed ")


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (lambda r, w, s: r / s / 1e9, "count only the bytes read"),
        (lambda r, w, s: w / s / 1e9, "count only the bytes written"),
        (lambda r, w, s: (r + w) / s / 2**30, "GiB/s"),
        (lambda r, w, s: (r + w) / (s / 1e3) / 1e9, "factor of 1000"),
        (lambda r, w, s: (r + w) / (s * 1e3) / 1e9, "factor of 1000"),
    ],
    ids=["only-read", "only-written", "GiB", "seconds-as-ms", "ms-the-other-way"],
)
def test_achieved_gbps_rejects_known_mistakes(seed, wrong, hint):
    assert hint in rejected_with(check_achieved_gbps, wrong)


def test_achieved_gbps_missing_return():
    assert "forget to `return`" in rejected_with(check_achieved_gbps, lambda r, w, s: None)


# --- roofline_time -----------------------------------------------------------------------------------


def roofline_time(flops, bytes_moved, peak_flops_per_s, peak_bytes_per_s):
    return max(flops / peak_flops_per_s, bytes_moved / peak_bytes_per_s)


def test_roofline_time_accepts_the_solution(capsys):
    assert check_roofline_time(roofline_time) is None
    assert capsys.readouterr().out.startswith("PASSED roofline_time: 20 random cases")


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (lambda f, b, pf, pb: f / pf + b / pb, "compute time + memory time"),
        (lambda f, b, pf, pb: min(f / pf, b / pb), "the smaller of the two times"),
        (lambda f, b, pf, pb: max(pf / f, pb / b), "upside down"),
    ],
    ids=["sum", "min", "inverted"],
)
def test_roofline_time_rejects_known_mistakes(seed, wrong, hint):
    assert hint in rejected_with(check_roofline_time, wrong)


def test_roofline_time_rejects_compute_time_alone(seed):
    message = rejected_with(check_roofline_time, lambda f, b, pf, pb: f / pf)
    assert "roofline_time(" in message and "expected" in message


def test_roofline_time_wrong_signature():
    message = rejected_with(check_roofline_time, lambda flops, bytes_moved: 0.0)
    assert "takes (flops, bytes_moved) but the checker calls it as roofline_time(flops, bytes_moved," in message


# --- vector_add: the solution and wrong kernels, all real @cuda.jit kernels ---------------------------


@cuda.jit
def vector_add(a, b, out):
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if i < out.size:
        out[i] = a[i] + b[i]


@cuda.jit
def without_guard(a, b, out):
    i = cuda.grid(1)
    out[i] = a[i] + b[i]


@cuda.jit
def without_block_offset(a, b, out):
    i = cuda.threadIdx.x
    if i < out.size:
        out[i] = a[i] + b[i]


@cuda.jit
def guard_off_by_one(a, b, out):
    i = cuda.grid(1)
    if i <= out.size:
        out[i] = a[i] + b[i]


@cuda.jit
def subtracts(a, b, out):
    i = cuda.grid(1)
    if i < out.size:
        out[i] = a[i] - b[i]


@cuda.jit
def stub(a, b, out):
    raise NotImplementedError


def not_a_kernel(a, b, out):
    out[:] = a + b


GUARD_HINT = "guard with `if i < out.size`"


def test_vector_add_accepts_the_solution(capsys):
    assert check_vector_add(vector_add) is None
    line = capsys.readouterr().out
    assert line.startswith("PASSED vector_add: ")
    assert "n up to" in line and "seed" in line and "mode" in line


def test_vector_add_rejects_a_missing_guard(seed):
    assert GUARD_HINT in rejected_with(check_vector_add, without_guard)


def test_vector_add_rejects_an_off_by_one_guard(seed):
    message = rejected_with(check_vector_add, guard_off_by_one)
    assert GUARD_HINT in message and "one past the end" in message and "not `<=`" in message


def test_vector_add_rejects_a_missing_block_offset(seed):
    message = rejected_with(check_vector_add, without_block_offset)
    assert "out[128] was never written" in message
    assert "did you forget blockIdx.x * blockDim.x?" in message


def test_vector_add_rejects_subtraction(seed):
    assert "Hint: this is a - b" in rejected_with(check_vector_add, subtracts)


def test_vector_add_stub_is_not_written_yet():
    assert unwritten(check_vector_add, stub).startswith("vector_add is not written yet")


def test_vector_add_needs_a_kernel():
    assert "put @cuda.jit on the line above" in rejected_with(check_vector_add, not_a_kernel)


SIZES_SEEN: list[int] = []


@cuda.jit
def records_sizes(a, b, out):
    if cuda.grid(1) == 0:
        SIZES_SEEN.append(out.size)  # plain Python: only the simulator can run this
    vector_add(a, b, out)


@pytest.mark.skipif(backend.has_gpu(), reason="records sizes from inside a kernel, which only the simulator can")
def test_vector_add_sizes_leave_the_last_block_partly_idle(seed):
    SIZES_SEEN.clear()
    check_vector_add(records_sizes)
    assert min(SIZES_SEEN) < 128 < max(SIZES_SEEN)
    assert all(n % 128 for n in SIZES_SEEN)


# --- on a real GPU nothing bounds-checks: the poisoned padding after out must catch stray writes -----


needs_gpu = pytest.mark.gpu  # tests/conftest.py skips these, saying why, where there is no GPU


@needs_gpu
def test_gpu_vector_add_runs_on_cupy_arrays(capsys):
    import cupy

    assert isinstance(backend.xp.zeros(1), cupy.ndarray)
    check_vector_add(vector_add)
    assert "in GPU mode" in capsys.readouterr().out


@needs_gpu
def test_gpu_catches_a_write_past_the_end(seed):
    message = rejected_with(check_vector_add, without_guard)
    assert "your kernel wrote" in message and "past the end of out" in message and GUARD_HINT in message


@needs_gpu
def test_gpu_catches_a_write_one_past_the_end(seed):
    message = rejected_with(check_vector_add, guard_off_by_one)
    assert "one past the end of out" in message and "not `<=`" in message
