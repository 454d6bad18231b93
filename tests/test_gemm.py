"""GEMM steps 1-4 against the float64 reference, on shapes with ragged edges; and their input checks."""

import numpy as np
import pytest

from course_lib import backend, dtypes
from course_lib import compile as cuda_compile
from course_lib.check import poison, relative_error, tolerance_for
from course_lib.kernels import gemm

DTYPES = ("float32", "float16", "bfloat16")
RAGGED = [(1, 1, 1), (33, 65, 17), (130, 257, 40), (256, 256, 256), (1000, 24, 72)]
PACKED = [(1, 8, 8), (130, 264, 40), (257, 136, 1000), (512, 512, 512)]


def operands(m, n, k, dtype):
    rng = np.random.default_rng()
    return dtypes.random_normal((m, k), dtype, rng), dtypes.random_normal((k, n), dtype, rng)


def assert_product(c, a, b, dtype):
    error = relative_error(dtypes.to_float32(c, dtype), gemm.gemm_reference(a, b, dtype))
    assert error < tolerance_for(dtype), f"relative error {error:.3g} for {dtype}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_mode_product_matches_the_reference(dtype):
    a, b = operands(33, 65, 17, dtype)
    assert_product(gemm.matmul(a, b, step="register_blocked", dtype=dtype), a, b, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("step", ["naive", "smem_tiled", "register_blocked"])
@pytest.mark.parametrize("shape", RAGGED, ids=str)
def test_gpu_steps_match_the_reference(shape, step, dtype):
    a, b = operands(*shape, dtype)
    assert_product(gemm.matmul(a, b, step=step, dtype=dtype), a, b, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("shape", PACKED, ids=str)
def test_gpu_vectorized_step_matches_the_reference(shape, dtype):
    a, b = operands(*shape, dtype)
    assert_product(gemm.matmul(a, b, step="vectorized", dtype=dtype), a, b, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("shape", RAGGED + PACKED, ids=str)
def test_gpu_wmma_step_matches_the_reference(shape, dtype):
    a, b = operands(*shape, dtype)
    assert_product(gemm.matmul(a, b, step="wmma", dtype=dtype), a, b, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("step", gemm.STEPS)
def test_gpu_steps_write_every_element_and_nothing_more(step):
    m, n, k = 130, 136, 48
    a, b = operands(m, n, k, "float16")
    buffer = poison((m * n + 256,), "float16")
    product = gemm.check_inputs(a, b, step, None)
    gemm.launch(step, product, buffer[: m * n].reshape(m, n), a, b)
    host = backend.to_numpy(buffer).astype(np.float32)
    assert not np.isnan(host[: m * n]).any() and np.isnan(host[m * n:]).all()


def test_every_launch_names_an_instantiated_kernel():
    names = set(gemm.kernel_names())
    for dtype in DTYPES:
        for step in gemm.STEPS:
            if step in ("vectorized", *gemm.TENSOR_CORE_STEPS) and dtype == "float32":
                continue
            name, _, _ = gemm.launch_config(step, gemm.Product(dtype, 300, 200, 100))
            assert name in names


def test_wmma_kernels_use_the_tensor_cores():
    for arch in ("sm_80", "sm_90"):
        compiled = cuda_compile.compile_file("gemm.cu", arch, gemm.kernel_names())
        assert "wmma.mma.sync" in compiled.ptx
        assert {k.kernel for k in compiled.kernels} >= {"gemm_wmma<__half>", "gemm_wmma<__nv_bfloat16>"}


def test_register_blocked_kernels_do_not_spill():
    compiled = cuda_compile.compile_file("gemm.cu", "sm_90", gemm.kernel_names())
    blocked = [k for k in compiled.kernels if k.kernel.startswith("gemm_register_blocked")]
    assert len(blocked) == 5 and all(k.spill_store_bytes == 0 and k.stack_bytes == 0 for k in blocked)


@pytest.mark.parametrize("a_shape, b_shape, kwargs, message", [
    ((4, 5), (6, 7), {}, "inner dimensions differ"),
    ((4, 5), (5,), {}, "must be 2-D"),
    ((4, 12), (12, 12), {"step": "fast"}, "step must be one of"),
    ((4, 12), (12, 12), {"step": "vectorized"}, "use float16 or bfloat16"),
    ((4, 12), (12, 12), {"step": "wmma"}, "tensor-core steps take float16 or bfloat16"),
    ((0, 5), (5, 3), {}, "M, N and K must be >= 1"),
])
def test_bad_operands_get_clear_errors(a_shape, b_shape, kwargs, message):
    xp = backend.xp
    with pytest.raises((ValueError, TypeError), match=message):
        gemm.matmul(xp.ones(a_shape, dtype=xp.float32), xp.ones(b_shape, dtype=xp.float32), **kwargs)


def test_vectorized_step_names_the_shapes_it_needs():
    a, b = operands(16, 12, 10, "float16")
    with pytest.raises(ValueError, match="K and N multiples of 8.*K=10, N=12"):
        gemm.matmul(a, b, step="vectorized")


def test_mixed_types_and_layouts_are_rejected():
    a, b = operands(8, 8, 8, "float16")
    with pytest.raises(TypeError, match="same element type"):
        gemm.matmul(a, b.astype(np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        gemm.matmul(a.T, b)
