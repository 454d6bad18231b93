"""GEMM steps 1-7 against the float64 reference, on shapes with ragged edges; and their input checks."""

import numpy as np
import pytest

from course_lib import backend, dtypes
from course_lib import compile as cuda_compile
from course_lib.check import poison, relative_error, tolerance_for
from course_lib.kernels import gemm

DTYPES = ("float32", "float16", "bfloat16")
RAGGED = [(1, 1, 1), (33, 65, 17), (130, 257, 40), (256, 256, 256), (1000, 24, 72)]
PACKED = [(1, 8, 8), (130, 264, 40), (257, 136, 1000), (512, 512, 512)]
# K and N multiples of 8 (16-byte rows), tails in every dimension against the 128 x 128/256 tiles, K
# tails against BK = 32 and 64, and a wide one.
ALIGNED = PACKED + [(1, 4096, 4096), (300, 520, 72), (1024, 2048, 72)]


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
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("step", ["mma_sync", "wgmma"])
@pytest.mark.parametrize("shape", ALIGNED, ids=str)
def test_gpu_mma_sync_and_wgmma_steps_match_the_reference(shape, step, dtype):
    a, b = operands(*shape, dtype)
    assert_product(gemm.matmul(a, b, step=step, dtype=dtype), a, b, dtype)


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
    for dtype in DTYPES:
        for step in gemm.STEPS:
            if step in ("vectorized", *gemm.TENSOR_CORE_STEPS) and dtype == "float32":
                continue
            name, _, _, _ = gemm.launch_config(step, gemm.Product(dtype, 300, 200, 64))
            assert name in gemm.kernel_names(gemm.source_of(step))


def test_every_source_compiles_with_its_instantiations():
    compiled = gemm.compile_all("sm_90a")
    assert [c.name for c in compiled] == list(gemm.SOURCES)
    for source in compiled:
        assert {k.kernel for k in source.kernels} == set(gemm.kernel_names(source.name))
        assert all(k.spill_store_bytes == 0 and k.stack_bytes == 0 for k in source.kernels), source.name


def test_mma_sync_kernels_use_ldmatrix_and_cp_async():
    for arch in ("sm_80", "sm_90"):
        ptx = cuda_compile.compile_file("gemm_mma_sync.cu", arch, gemm.kernel_names("gemm_mma_sync.cu")).ptx
        assert all(word in ptx for word in ("mma.sync.aligned.m16n8k16", "ldmatrix", "cp.async.cg"))


def test_wgmma_kernel_uses_wgmma_and_tma_on_sm_90a_only():
    names = gemm.kernel_names("gemm_wgmma.cu")
    ptx = cuda_compile.compile_file("gemm_wgmma.cu", "sm_90a", names).ptx
    assert all(word in ptx for word in ("wgmma.mma_async", "cp.async.bulk.tensor", "mbarrier", "setmaxnreg"))
    assert "wgmma.mma_async" not in cuda_compile.compile_file("gemm_wgmma.cu", "sm_90", names).ptx


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


@pytest.mark.parametrize("step", gemm.ALIGNED_STEPS)
def test_aligned_steps_name_the_shapes_they_need(step):
    a, b = operands(16, 12, 10, "float16")
    with pytest.raises(ValueError, match="K and N multiples of 8.*K=10, N=12"):
        gemm.matmul(a, b, step=step)


def test_unknown_steps_are_rejected_by_the_support_question():
    with pytest.raises(ValueError, match="step must be one of"):
        gemm.unsupported_reason("tcgen05")


def test_mixed_types_and_layouts_are_rejected():
    a, b = operands(8, 8, 8, "float16")
    with pytest.raises(TypeError, match="same element type"):
        gemm.matmul(a, b.astype(np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        gemm.matmul(a.T, b)
