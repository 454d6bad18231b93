"""NVRTC compiles every course kernel for every target with no GPU, and its report is parsed."""

import numpy as np
import pytest

from course_lib import backend
from course_lib import compile as cuda_compile

SOURCES = cuda_compile.course_sources()
pytestmark = pytest.mark.skipif(cuda_compile.nvrtc_problem() is not None, reason=str(cuda_compile.nvrtc_problem()))


def test_the_course_ships_kernels():
    assert SOURCES, "no .cu files found under course_lib/kernels"


@pytest.mark.parametrize("arch", cuda_compile.TARGETS)
@pytest.mark.parametrize("path", SOURCES, ids=[p.name for p in SOURCES])
def test_every_kernel_compiles_for_every_target(path, arch):
    compiled = cuda_compile.compile_file(path, arch)
    assert f".target {arch}" in compiled.ptx
    assert compiled.cubin[:4] == b"\x7fELF"
    assert compiled.kernels, f"ptxas reported no kernels for {path.name}"
    for kernel in compiled.kernels:
        assert kernel.arch == arch and kernel.registers > 0


def test_a_runtime_indexed_array_shows_up_as_stack():
    source = """
    extern "C" __global__ void scratch(const int* idx, float* out, int n) {
        float local[64];
        for (int j = 0; j < 64; ++j) local[j] = out[j * blockDim.x + threadIdx.x];
        for (int j = 0; j < n; ++j) { int k = idx[j]; local[k] = local[k] * 2.0f + local[(k + 1) & 63]; }
        out[threadIdx.x] = local[idx[threadIdx.x]];
    }"""
    (kernel,) = cuda_compile.compile_cuda(source, "sm_90").kernels
    assert kernel.kernel == "scratch" and kernel.stack_bytes >= 256


def test_shared_memory_is_reported():
    source = """
    extern "C" __global__ void tile(float* out) {
        __shared__ float s[1024];
        s[threadIdx.x] = threadIdx.x; __syncthreads(); out[threadIdx.x] = s[1023 - threadIdx.x];
    }"""
    (kernel,) = cuda_compile.compile_cuda(source, "sm_80").kernels
    assert kernel.shared_bytes == 4096 and kernel.barriers == 1


def test_parse_report_reads_spills():
    log = """ptxas info    : Compiling entry function 'k' for 'sm_80'
ptxas info    : Function properties for k
ptxas         .     40 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 2048 bytes smem, 380 bytes cmem[0]"""
    (kernel,) = cuda_compile.parse_ptxas_report(log, "sm_80")
    assert (kernel.registers, kernel.shared_bytes, kernel.stack_bytes) == (255, 2048, 40)
    assert (kernel.spill_store_bytes, kernel.spill_load_bytes) == (8, 12)


def test_standalone_ptxas_gives_the_same_report():
    compiled = cuda_compile.compile_file("vector_add.cu", "sm_90")
    if cuda_compile.find_ptxas() is None:
        pytest.fail("no ptxas found: requirements.txt installs it with the nvidia-cuda-nvcc wheel")
    assert cuda_compile.ptxas_report(compiled.ptx, "sm_90") == compiled.kernels


def test_a_compile_error_carries_the_compiler_log():
    with pytest.raises(cuda_compile.CompileError, match='identifier "undefined_name" is undefined'):
        cuda_compile.compile_cuda('extern "C" __global__ void k() { undefined_name = 1; }', "sm_80")


def test_a_bad_arch_is_rejected_before_compiling():
    with pytest.raises(ValueError, match="sm_90"):
        cuda_compile.compile_cuda("", "hopper")


def test_resource_table_has_a_row_per_kernel_and_arch():
    compiled = [cuda_compile.compile_file("vector_add.cu", arch) for arch in ("sm_80", "sm_90")]
    rows = cuda_compile.resource_table(compiled).splitlines()
    assert len(rows) == 4 and rows[2].startswith("vector_add")


def test_loading_needs_a_gpu():
    if backend.has_gpu():
        pytest.skip("GPU mode: loading is tested below")
    with pytest.raises(RuntimeError, match="needs a GPU"):
        cuda_compile.load_file("vector_add.cu")


@pytest.mark.gpu
@pytest.mark.parametrize("arch", [None, "sm_90a"])
def test_vector_add_runs_on_the_gpu(arch):
    if arch == "sm_90a" and backend.compute_capability() != (9, 0):
        pytest.skip("sm_90a code runs only on Hopper")
    xp = backend.xp
    kernel = cuda_compile.load_file("vector_add.cu", arch=arch).get_function("vector_add")
    rng = np.random.default_rng()
    n = 100_003
    a, b = rng.standard_normal(n, dtype=np.float32), rng.standard_normal(n, dtype=np.float32)
    out = xp.full(n + 64, xp.nan, dtype=xp.float32)
    kernel(((n + 255) // 256,), (256,), (xp.asarray(a), xp.asarray(b), out, np.int32(n)))
    result = backend.to_numpy(out)
    np.testing.assert_allclose(result[:n], a.astype(np.float64) + b, rtol=1e-6)
    assert np.isnan(result[n:]).all(), "the kernel wrote past the end"
