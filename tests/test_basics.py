"""Chapter 01's kernels against their float64 NumPy references, their input checks, and the coalescing suite.

Inputs are fresh random normals on every run (the seed is printed, and shown when a test fails);
outputs start poisoned with NaN, sit inside a larger poisoned buffer so that a write past the end
shows, and sizes are never multiples of the block size. The Numba kernels run in the simulator on
CPU (small sizes) and compiled on a GPU; the CUDA C kernels run on a GPU, and in CPU mode on the warp
emulator (course_lib.emulator).
"""

import numpy as np
import pytest

from course_lib import backend, emulator
from course_lib.bench import run_suite
from course_lib.bench.suites import coalescing
from course_lib.check.poison import is_poison, poison
from course_lib.check.tolerance import tolerance_for
from course_lib.kernels import basics

SIZE = 1_000_003 if backend.has_gpu() else 1_003  # not a multiple of any block size
SUM_SIZE = 4_000_037 if backend.has_gpu() else 3_001
SPARE = 64  # poisoned elements after each output: they must stay unwritten
needs_cuda_c = pytest.mark.skipif(emulator.cuda_c_problem() is not None, reason=str(emulator.cuda_c_problem()))
IMPLEMENTATIONS = ["numba", pytest.param("cuda_c", marks=needs_cuda_c)]


@pytest.fixture
def rng() -> np.random.Generator:
    seed = np.random.SeedSequence().entropy
    print(f"random inputs from seed {seed}")
    return np.random.default_rng(seed)


def vector(rng: np.random.Generator, size: int):
    """Standard normal float32 values on the device: never zeros, almost never two alike."""
    return backend.xp.asarray(rng.standard_normal(size, dtype=np.float32))


def poisoned_output(size: int, dtype=np.float32):
    """A ``size``-element view at the start of a NaN buffer with ``SPARE`` more elements after it."""
    buffer = poison(size + SPARE, dtype)
    return buffer, buffer[:size]


def assert_matches(buffer, size: int, reference: np.ndarray) -> None:
    out = backend.to_numpy(buffer)
    assert not is_poison(out[:size]).any(), f"{int(is_poison(out[:size]).sum())} elements were never written"
    np.testing.assert_allclose(out[:size], reference, rtol=tolerance_for(np.float32))
    assert is_poison(out[size:]).all(), "the kernel wrote past the end of out"


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_vector_add(rng, implementation):
    a, b = vector(rng, SIZE), vector(rng, SIZE)
    buffer, out = poisoned_output(SIZE)
    assert basics.vector_add(a, b, out, implementation=implementation) is out
    assert_matches(buffer, SIZE, basics.vector_add_reference(a, b))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(("blocks", "threads"), [(1, 64), (3, 96), (None, basics.THREADS)])
def test_vector_add_grid_stride_covers_any_size_with_any_grid(rng, implementation, blocks, threads):
    a, b = vector(rng, SIZE), vector(rng, SIZE)
    buffer, out = poisoned_output(SIZE)
    basics.vector_add_grid_stride(a, b, out, implementation=implementation, blocks=blocks, threads=threads)
    assert_matches(buffer, SIZE, basics.vector_add_reference(a, b))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("stride", [1, 3, 32])
def test_strided_copy(rng, implementation, stride):
    size = stride * (SIZE // stride)  # SIZE // stride rows: not a multiple of the block size
    x = vector(rng, size)
    buffer, out = poisoned_output(size)
    basics.strided_copy(x, stride, out, implementation=implementation)
    assert_matches(buffer, size, basics.strided_copy_reference(x, stride))


def test_strided_copy_reference_is_a_transpose():
    x = np.arange(6, dtype=np.float32)  # [[0, 1], [2, 3], [4, 5]] read column by column
    assert basics.strided_copy_reference(x, 2).tolist() == [0, 2, 4, 1, 3, 5]
    assert basics.strided_copy_reference(x, 1).tolist() == x.tolist()


def assert_sum_close(total, x, accumulate: str) -> None:
    """Summation error is measured against sum(|x|): the sum itself may cancel to almost nothing."""
    value = backend.to_numpy(total)
    assert value.shape == (1,) and value.dtype == np.dtype(accumulate)
    scale = float(np.abs(backend.to_numpy(x)).astype(np.float64).sum())
    assert abs(float(value[0]) - basics.sum_reference(x)) <= tolerance_for(accumulate) * scale


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("accumulate", basics.ACCUMULATORS)
def test_tree_sum(rng, implementation, accumulate):
    x = vector(rng, SUM_SIZE)
    total = poison(1, accumulate)  # the launcher must zero it before the blocks add to it
    blocks = None if backend.has_gpu() else 2  # fewer simulated threads: faster
    basics.tree_sum(x, total, accumulate=accumulate, implementation=implementation, blocks=blocks)
    assert_sum_close(total, x, accumulate)


@needs_cuda_c
@pytest.mark.parametrize("accumulate", basics.ACCUMULATORS)
@pytest.mark.parametrize("blocks", [1, 7, None])
def test_shuffle_sum(rng, accumulate, blocks):
    x = vector(rng, SUM_SIZE)
    total = poison(1, accumulate)
    basics.shuffle_sum(x, total, accumulate=accumulate, blocks=blocks)
    assert_sum_close(total, x, accumulate)


def test_sums_return_a_new_array_without_out(rng):
    x = vector(rng, 300)
    total = basics.tree_sum(x, blocks=1)
    assert_sum_close(total, x, "float64")


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda x: basics.vector_add(x.astype(np.float64), x), TypeError, "a must be float32, got float64"),
        (lambda x: basics.vector_add([1.0], x), TypeError, "a must be a"),
        (lambda x: basics.vector_add(x, x[:-1]), ValueError, "same size"),
        (lambda x: basics.vector_add(x[::2], x[::2]), ValueError, "contiguous"),
        (lambda x: basics.vector_add(x.reshape(3, -1), x.reshape(3, -1)), ValueError, "1-D"),
        (lambda x: basics.vector_add(x[:0], x[:0]), ValueError, "non-empty"),
        (lambda x: basics.vector_add(x, x, x.astype(np.float64)), TypeError, "out must be a float32 array"),
        (lambda x: basics.vector_add(x, x, x[:-1]), ValueError, r"out must be a contiguous array of shape \(600,\)"),
        (lambda x: basics.vector_add(x, x, threads=2048), ValueError, "threads must be between 1 and 1024"),
        (lambda x: basics.vector_add(x, x, implementation="cuda"), ValueError, "implementation must be one of"),
        (lambda x: basics.vector_add_grid_stride(x, x, blocks=0), ValueError, "blocks must be between"),
        (lambda x: basics.strided_copy(x, 7), ValueError, "not a multiple of the stride 7"),
        (lambda x: basics.strided_copy(x, 0), ValueError, "stride must be between 1 and 65535, got 0"),
        (lambda x: basics.strided_copy(x, 2.0), TypeError, "stride must be an integer, got float"),
        (lambda x: basics.tree_sum(x, accumulate="float16"), ValueError, "accumulate must be one of"),
        (lambda x: basics.tree_sum(x, backend.xp.zeros(1, np.float32)), TypeError, "out must be a float64"),
        (lambda x: basics.shuffle_sum(x, blocks=-1), ValueError, "blocks must be between"),
        (lambda x: basics.default_blocks(0), ValueError, "blocks_per_sm must be >= 1"),
    ],
)
def test_bad_inputs_are_rejected_before_a_launch(rng, call, error, message):
    with pytest.raises(error, match=message):
        call(vector(rng, 600))


def test_kernels_with_32_bit_indices_refuse_arrays_they_cannot_index(rng, monkeypatch):
    monkeypatch.setattr(basics, "MAX_INT32", 100)  # instead of allocating 2**31 floats
    x = vector(rng, 600)
    with pytest.raises(ValueError, match="32-bit ints: a may hold at most 100 elements"):
        basics.vector_add(x, x)
    with pytest.raises(ValueError, match="32-bit ints: x may hold at most 100 elements"):
        basics.strided_copy(x, 2)


def test_without_a_gpu_or_the_emulator_the_cuda_c_kernels_say_why(rng, monkeypatch):
    if backend.has_gpu():
        pytest.skip("GPU mode: the CUDA C kernels run in the tests above")
    monkeypatch.setattr(emulator, "emulator_problem", lambda: "no C++ compiler (pretend)")
    basics._cuda_kernel.cache_clear()
    x = vector(rng, 64)
    total = poison(1, np.float64)
    for call in (lambda: basics.vector_add(x, x, implementation="cuda_c"),
                 lambda: basics.tree_sum(x, total, implementation="cuda_c"),
                 lambda: basics.shuffle_sum(x, total)):
        with pytest.raises(RuntimeError, match=r"need a GPU, or the warp emulator .*: no C\+\+ compiler \(pretend\)"):
            call()
    assert is_poison(total).all(), "a launch that cannot run must leave out alone"
    basics._cuda_kernel.cache_clear()


def test_labels_say_where_each_implementation_runs():
    on_cpu = {"numba": "in the simulator", "cuda_c": "on the warp emulator"}
    expected = {"numba": "on the GPU", "cuda_c": "on the GPU"} if backend.has_gpu() else on_cpu
    for implementation, place in expected.items():
        assert basics.where(implementation) == f"{implementation} {place}"


def test_default_blocks_fill_the_gpu():
    per_sm = backend.sm_count() if backend.has_gpu() else 1
    assert basics.default_blocks() == 4 * per_sm
    assert basics.default_blocks(2) == 2 * per_sm


def test_cuda_source_shows_one_function_with_its_comment():
    source = basics.cuda_source("warp_sum")
    assert source.startswith("// Stage 2 within a warp") and "__shfl_down_sync" in source
    assert source.rstrip().endswith("}") and "shuffle_sum" not in source
    assert basics.cuda_source("vector_add", "vector_add.cu").count("__global__") == 1
    with pytest.raises(ValueError, match="defines no function 'nonsense'"):
        basics.cuda_source("nonsense")


def test_coalescing_suite_runs_quick():
    result = run_suite("coalescing", quick=True, progress=False)
    strides, gbps, copy_gbps = coalescing.bandwidth_by_stride(result)
    assert strides == list(coalescing.STRIDES)
    assert copy_gbps > 0 and all(value > 0 for value in gbps)
    assert set(result["headline"]) == {"stride1_vs_copy", "stride32_vs_copy"}
    assert result["headline"]["stride32_vs_copy"] == pytest.approx(gbps[strides.index(32)] / copy_gbps)


@pytest.mark.gpu
def test_strided_reads_cost_bandwidth_on_the_gpu():
    headline = run_suite("coalescing", quick=True, progress=False)["headline"]
    assert headline["stride1_vs_copy"] > 0.5  # a quick run's short kernels pay the launch overhead more
    assert headline["stride32_vs_copy"] < 0.5 * headline["stride1_vs_copy"]
