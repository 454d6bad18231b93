"""LtMatmul (cuBLASLt through nvmath-python) and its NumPy twin against the float64 reference; its input checks."""

import concurrent.futures
import math

import numpy as np
import pytest

from course_lib import backend, dtypes
from course_lib.check import relative_error, tolerance_for
from course_lib.check.poison import poison_value
from course_lib.kernels import cublaslt

EPILOGUES = (None, *cublaslt.EPILOGUES)
TYPES = cublaslt.ELEMENT_TYPES
# a single decode row, a ragged N (2056 = 2048 + 8), odd sizes everywhere, and an even square
GPU_SHAPES = [(1, 2056, 512), (33, 65, 17), (130, 264, 40), (256, 256, 256), (3, 4096, 1024)]


def operands(m, n, k, dtype, epilogue=None):
    rng = np.random.default_rng()
    a, b = dtypes.random_normal((m, k), dtype, rng), dtypes.random_normal((k, n), dtype, rng)
    bias = dtypes.random_normal((n,), dtype, rng) if epilogue and epilogue.startswith("bias") else None
    return a, b, bias


def assert_matches(c, a, b, dtype, epilogue=None, bias=None):
    error = relative_error(dtypes.to_float32(c, dtype), cublaslt.reference(a, b, epilogue, bias, dtype))
    assert error < tolerance_for(dtype), f"relative error {error:.3g} for {dtype}, epilogue={epilogue!r}"


def poisoned(lt):
    """Fill ``lt.out`` with NaN (0xFFFF, a NaN, in bf16's uint16 storage) so an unwritten element cannot pass."""
    lt.out[...] = poison_value(np.uint16) if lt.out.dtype == np.uint16 else np.nan
    return lt


@pytest.mark.parametrize("dtype", TYPES)
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_product_and_epilogue_match_the_reference(epilogue, dtype):
    a, b, bias = operands(33, 72, 40, dtype, epilogue)
    with poisoned(cublaslt.LtMatmul(a, b, epilogue=epilogue, bias=bias, dtype=dtype)) as lt:
        c = lt()
        assert c is lt.out and c.shape == (33, 72)
        assert_matches(c, a, b, dtype, epilogue, bias)


def test_reference_gelu_is_the_tanh_approximation_cublaslt_uses():
    one = dtypes.to_device(np.ones((1, 1), np.float16))
    tanh_form = 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * 1.044715))
    erf_form = 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    got = cublaslt.reference(one, one, "gelu")[0, 0]
    assert got == pytest.approx(tanh_form, abs=1e-12) and abs(got - erf_form) > 1e-4


def test_reference_adds_one_bias_value_per_output_column():
    rng = np.random.default_rng()
    a, b, bias = operands(5, 7, 3, "float16", "bias")
    expected = cublaslt.reference(a, b) + dtypes.to_float32(bias).astype(np.float64)[None, :]
    np.testing.assert_allclose(cublaslt.reference(a, b, "bias", bias), expected)
    x = rng.standard_normal(11)
    np.testing.assert_allclose(cublaslt.gelu_tanh(x) - cublaslt.gelu_tanh(-x), x)  # GELU(x) - GELU(-x) = x


def test_new_operands_run_through_the_same_plan():
    a, b, _ = operands(16, 64, 32, "bfloat16")
    a2, b2, _ = operands(16, 64, 32, "bfloat16")
    with cublaslt.LtMatmul(a, b, dtype="bfloat16") as lt:
        assert_matches(lt(b=b2), a, b2, "bfloat16")
        assert_matches(lt(a=a2), a2, b2, "bfloat16")
        with pytest.raises(ValueError, match="must keep the planned problem"):
            lt(b=operands(16, 32, 32, "bfloat16")[1])


def test_a_closed_matmul_refuses_to_run():
    a, b, _ = operands(4, 8, 8, "float16")
    lt = cublaslt.LtMatmul(a, b)
    lt.close()
    lt.close()
    with pytest.raises(RuntimeError, match="closed"):
        lt()


@pytest.mark.parametrize(
    ("epilogue", "with_bias", "message"),
    [("swish", False, "epilogue must be None or one of"),
     ("bias_gelu", False, "adds a bias: pass bias="),
     ("gelu", True, "bias is used only by"),
     (None, True, "bias is used only by")],
)
def test_epilogue_and_bias_must_agree(epilogue, with_bias, message):
    a, b, bias = operands(4, 8, 8, "float16", "bias")
    with pytest.raises(ValueError, match=message):
        cublaslt.LtMatmul(a, b, epilogue=epilogue, bias=bias if with_bias else None)
    with pytest.raises(ValueError, match=message):
        cublaslt.reference(a, b, epilogue, bias if with_bias else None)


def test_operand_checks_say_what_was_expected():
    a, b, bias = operands(4, 8, 6, "float16", "bias")
    with pytest.raises(ValueError, match="inner dimensions differ"):
        cublaslt.LtMatmul(a, a)
    with pytest.raises(ValueError, match="C-contiguous"):
        cublaslt.LtMatmul(b.T, a.T)
    with pytest.raises(ValueError, match="2-D"):
        cublaslt.LtMatmul(a[0], b)
    with pytest.raises(ValueError, match=r"shape \(8,\), one value per output column"):
        cublaslt.LtMatmul(a, b, epilogue="bias", bias=bias[:4])
    with pytest.raises(TypeError, match="tensor-core types"):
        cublaslt.LtMatmul(a.astype(np.float32), b.astype(np.float32))
    with pytest.raises(TypeError, match="same element type"):
        cublaslt.LtMatmul(a, b.astype(np.float32))
    with pytest.raises(TypeError, match="must be a"):
        cublaslt.LtMatmul([[1.0]], [[1.0]])


def test_uint16_bits_must_be_declared_bfloat16():
    bits = backend.xp.zeros((4, 4), dtype=np.uint16)
    with pytest.raises(TypeError, match="dtype='bfloat16'"):
        cublaslt.LtMatmul(bits, bits)


@pytest.mark.skipif(backend.has_gpu(), reason="checks what CPU mode says about itself")
def test_cpu_mode_says_numpy_computes_and_refuses_to_tune():
    a, b, _ = operands(4, 8, 8, "bfloat16")
    lt = cublaslt.LtMatmul(a, b, dtype="bfloat16")
    assert "NumPy" in lt.engine and "NumPy" in repr(lt) and lt.algorithms == ()
    for method in (lt.plan, lt.autotune, lambda: lt.choose(0)):
        with pytest.raises(RuntimeError, match="needs cuBLASLt on a GPU"):
            method()


def test_a_matmul_planned_on_one_thread_runs_on_another():
    """A checker runs the learner's code on a worker thread, and run_ranks runs each rank on its own: on a GPU,
    cuda.core must be told the device in each such thread before nvmath can run the plan there."""
    a, b, _ = operands(33, 72, 40, "bfloat16")
    with poisoned(cublaslt.LtMatmul(a, b, dtype="bfloat16")) as lt:
        with concurrent.futures.ThreadPoolExecutor(1) as worker:
            worker.submit(lt).result()  # raises here what the worker's call raised
        backend.synchronize()
        assert_matches(lt.out, a, b, "bfloat16")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", TYPES)
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_gpu_cublaslt_matches_the_reference(shape, epilogue, dtype):
    a, b, bias = operands(*shape, dtype, epilogue)
    with poisoned(cublaslt.LtMatmul(a, b, epilogue=epilogue, bias=bias, dtype=dtype)) as lt:
        assert "cuBLASLt" in lt.engine and lt.algorithms
        assert_matches(lt(), a, b, dtype, epilogue, bias)
        assert lt.out.dtype == (np.uint16 if dtype == "bfloat16" else np.float16)


@pytest.mark.gpu
def test_gpu_every_candidate_and_the_autotuned_order_compute_the_product():
    a, b, bias = operands(64, 4096, 4096, "bfloat16", "bias_gelu")
    with cublaslt.LtMatmul(a, b, epilogue="bias_gelu", bias=bias, dtype="bfloat16") as lt:
        for index in range(min(4, len(lt.algorithms))):
            assert cublaslt.describe(lt.choose(index))["id"] >= 0
            assert_matches(poisoned(lt)(), a, b, "bfloat16", "bias_gelu", bias)
        assert len(lt.autotune(iterations=3)) >= 1
        assert_matches(poisoned(lt)(), a, b, "bfloat16", "bias_gelu", bias)
        with pytest.raises(IndexError):
            lt.choose(len(lt.algorithms))


@pytest.mark.gpu
def test_gpu_calls_replay_in_a_cuda_graph():
    from course_lib.bench.timing import time_graph

    a, b, _ = operands(16, 2048, 2048, "bfloat16")
    _, b2, _ = operands(16, 2048, 2048, "bfloat16")
    with cublaslt.LtMatmul(a, b, dtype="bfloat16") as lt:
        weights = iter([b] + [b2] * 4)  # time_graph runs one call eagerly (with b), then captures four (with b2)
        timing = time_graph(lambda: lt(b=next(weights)), calls=4, repeats=3, warmup=1)
        assert timing.median_s > 0
        assert_matches(lt.out, a, b2, "bfloat16")  # only the replayed calls computed a @ b2
        assert_matches(poisoned(lt)(b=b), a, b, "bfloat16")
