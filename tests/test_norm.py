"""The norm kernels (GPU) and their CPU-mode twins against float64 references, and their input checks."""

import numpy as np
import pytest

from course_lib import backend, dtypes
from course_lib import compile as cuda_compile
from course_lib.check import poison, tolerance_for
from course_lib.check import relative_error as rel_error
from course_lib.kernels import norm

DTYPES = ("float32", "float16", "bfloat16")
# hidden sizes: tiny, not a multiple of the 16-byte pack, register-resident, and a long row
SHAPES_CPU = [(1, 8), (3, 7), (5, 4096), (2, 100_001)]
SHAPES_GPU = SHAPES_CPU + [(64, 8192), (33, 5120), (7, 70_000), (2, 3, 2048)]


def inputs(shape, dtype, rng):
    hidden = shape[-1]
    x = dtypes.random_normal(shape, dtype, rng, scale=3.0)
    weight = dtypes.random_normal((hidden,), dtype, rng)
    bias = dtypes.random_normal((hidden,), dtype, rng)
    residual = dtypes.random_normal(shape, dtype, rng)
    return x, weight, bias, residual


def assert_matches(out, reference, dtype):
    error = rel_error(dtypes.to_float32(out, dtype), reference)
    assert error < tolerance_for(dtype), f"relative error {error:.3g} over {tolerance_for(dtype)} for {dtype}"


def run_all(shape, dtype):
    rng = np.random.default_rng()
    x, weight, bias, residual = inputs(shape, dtype, rng)
    eps = 1e-5
    assert_matches(norm.rms_norm(x, weight, eps, dtype=dtype), norm.rms_norm_reference(x, weight, eps, dtype), dtype)
    assert_matches(norm.layer_norm(x, weight, bias, eps, dtype=dtype),
                   norm.layer_norm_reference(x, weight, bias, eps, dtype), dtype)
    expected_out, expected_residual = norm.add_rms_norm_reference(x, residual, weight, eps, dtype)
    out = norm.add_rms_norm(x, residual, weight, eps, dtype=dtype)
    assert_matches(out, expected_out, dtype)
    assert_matches(residual, expected_residual, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES_CPU, ids=str)
def test_norms_match_the_float64_reference(shape, dtype):
    run_all(shape, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES_GPU, ids=str)
def test_gpu_kernels_match_the_float64_reference(shape, dtype):
    run_all(shape, dtype)


@pytest.mark.gpu
def test_every_element_is_written_and_nothing_past_the_end():
    rng = np.random.default_rng()
    x, weight, _, _ = inputs((9, 1000), "float32", rng)
    padded = poison((9 * 1000 + 64,), "float32")
    out = padded[: 9 * 1000].reshape(9, 1000)
    norm.launch_kernel("rms_norm", norm.Rows("float32", 9, 1000), [out, x, weight], 1e-5)
    host = backend.to_numpy(padded)
    assert not np.isnan(host[: 9 * 1000]).any() and np.isnan(host[9 * 1000:]).all()


@pytest.mark.gpu
def test_unaligned_views_take_the_scalar_kernel():
    rng = np.random.default_rng()
    x, weight, _, _ = inputs((4, 1024), "bfloat16", rng)
    buffer = backend.xp.empty(x.size + 1, dtype=x.dtype)
    shifted = buffer[1:].reshape(x.shape)  # C-contiguous, but 2 bytes off a 16-byte boundary
    shifted[...] = x
    assert shifted.data.ptr % 16 != 0
    out = norm.rms_norm(shifted, weight, 1e-6, dtype="bfloat16")
    assert_matches(out, norm.rms_norm_reference(x, weight, 1e-6, "bfloat16"), "bfloat16")


@pytest.mark.parametrize("hidden, dtype, expected", [
    (8192, "bfloat16", ("rms_norm_rows<__nv_bfloat16, 4>", 256)),
    (4096, "float32", ("rms_norm_rows<float, 4>", 256)),
    (8, "float16", ("rms_norm_rows<__half, 1>", 32)),
    (4095, "bfloat16", ("rms_norm_long<__nv_bfloat16, 1>", 1024)),
    (131072, "bfloat16", ("rms_norm_long<__nv_bfloat16, 8>", 1024)),
])
def test_launch_plan(hidden, dtype, expected):
    launch = norm.plan("rms_norm", dtype, hidden)
    assert (launch.kernel, launch.threads) == expected
    assert launch.kernel in norm.kernel_names()


def test_every_planned_kernel_is_instantiated():
    names = set(norm.kernel_names())
    for op in norm.OPS:
        for dtype in DTYPES:
            for hidden in (1, 7, 64, 1000, 4096, 8192, 12288, 65536, 65537, 200_000):
                assert norm.plan(op, dtype, hidden).kernel in names


def test_norm_kernels_compile_with_readable_names_and_no_spills():
    compiled = cuda_compile.compile_file("norm.cu", "sm_90", norm.kernel_names())
    names = {k.kernel for k in compiled.kernels}
    assert "rms_norm_rows<__nv_bfloat16, 4>" in names and len(names) == len(norm.kernel_names())
    assert all(k.spill_store_bytes == 0 and k.stack_bytes == 0 for k in compiled.kernels)


@pytest.mark.parametrize("call, message", [
    (lambda x, w, b: norm.rms_norm(x, w, 0.0), "eps must be a finite number > 0"),
    (lambda x, w, b: norm.rms_norm(x, w, float("nan")), "eps must be a finite number > 0"),
    (lambda x, w, b: norm.rms_norm(x, w[:-1]), r"weight must have shape \(16,\)"),
    (lambda x, w, b: norm.rms_norm(x[:, ::2], w[::2].copy()), "C-contiguous"),
    (lambda x, w, b: norm.rms_norm(x, w.astype("float16")), "weight must hold float32"),
    (lambda x, w, b: norm.layer_norm(x, w, b[:3]), r"bias must have shape \(16,\)"),
    (lambda x, w, b: norm.add_rms_norm(x, x[:1].copy(), w), r"residual must have shape \(4, 16\)"),
    (lambda x, w, b: norm.rms_norm(x.astype("int32"), w), "expected float32, float16 or bfloat16"),
    (lambda x, w, b: norm.rms_norm(x.view("uint16"), w), "dtype='bfloat16'"),
    (lambda x, w, b: norm.rms_norm(x, w, True), "eps must be a finite number > 0"),
    (lambda x, w, b: norm.rms_norm(x.tolist(), w), "x must be a (numpy|cupy) array"),
    (lambda x, w, b: norm.rms_norm(x, list(range(16))), "weight must be a (numpy|cupy) array"),
])
def test_bad_inputs_get_clear_errors(call, message):
    xp = backend.xp
    x = xp.ones((4, 16), dtype=xp.float32)
    w, b = xp.ones(16, dtype=xp.float32), xp.zeros(16, dtype=xp.float32)
    with pytest.raises((ValueError, TypeError), match=message):
        call(x, w, b)


def test_eps_may_be_any_positive_real():
    xp = backend.xp
    x, w = xp.ones((2, 16), dtype=xp.float32), xp.ones(16, dtype=xp.float32)
    assert norm.rms_norm(x, w, np.float32(1e-6)).shape == (2, 16)


@pytest.mark.gpu
def test_host_arrays_on_a_gpu_get_a_clear_error():
    with pytest.raises(TypeError, match="x must be a cupy array in GPU mode, got numpy.ndarray"):
        norm.rms_norm(np.ones((2, 16), dtype=np.float32), backend.xp.ones(16, dtype=np.float32))


def test_no_rows_is_an_empty_result():
    xp = backend.xp
    out = norm.rms_norm(xp.ones((0, 16), dtype=xp.float32), xp.ones(16, dtype=xp.float32))
    assert out.shape == (0, 16)
