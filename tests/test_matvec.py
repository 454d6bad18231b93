"""One-token matrix-vector products with the norm, activation or residual add fused in, against float64
references. NumPy in CPU mode, the kernels of matvec.cu on a GPU; fresh random inputs on every run."""

import numpy as np
import pytest

from course_lib import backend, dtypes
from course_lib.check import relative_error, tolerance_for
from course_lib.kernels import matvec

DTYPES = ("float32", "float16", "bfloat16")
EPS = 1e-5
# (n, k): a row shorter than a warp's packs with a tail of rows past the last full block of ROWS, a row of one
# batch of packs, rows of several batches, a row whose last batch is partial, the longest fp32 row.
SHAPES = ((37, 64), (258, 512), (64, 2048), (30, 4104), (5, 8192))


@pytest.fixture
def rng() -> np.random.Generator:
    seed = np.random.SeedSequence().entropy
    print(f"random inputs from seed {seed}")
    return np.random.default_rng(seed)


def host64(array, dtype):
    return dtypes.to_float32(array, dtype).astype(np.float64)


def nan_filled(shape, dtype, empty=dtypes.empty):
    """A device array of ``shape`` holding NaNs (bf16's NaN bits on a GPU): what a kernel forgets to write shows."""
    array = empty(shape, dtype)
    array[...] = 0x7FC0 if str(array.dtype) == "uint16" else np.nan
    return array


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every array the functions allocate starts as NaNs."""
    monkeypatch.setattr(matvec.dtypes, "empty", nan_filled)


def rms_norm64(x, weight):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * weight


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_normed_matvec_is_the_product_with_the_normed_row(rng, dtype, n, k):
    if not matvec.supports(k, dtype):
        pytest.skip(f"k={k} is too long for {dtype} rows")
    x, norm_weight, weight = (dtypes.random_normal(shape, dtype, rng) for shape in ((1, k), (k,), (n, k)))
    expected = rms_norm64(host64(x, dtype), host64(norm_weight, dtype)) @ host64(weight, dtype).T
    out = matvec.normed_matvec(x, norm_weight, weight, EPS, dtype=dtype)
    assert out.shape == (1, n)
    assert relative_error(dtypes.to_float32(out, dtype), expected) < tolerance_for(dtype)
    logits = matvec.normed_matvec(x, norm_weight, weight, EPS, dtype=dtype, float32_out=True)
    assert str(logits.dtype) == "float32"
    assert relative_error(backend.to_numpy(logits), expected) < tolerance_for(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_add_matvec_adds_the_product_to_the_residual_in_place(rng, dtype, n, k):
    if not matvec.supports(k, dtype):
        pytest.skip(f"k={k} is too long for {dtype} rows")
    x, weight = (dtypes.random_normal(shape, dtype, rng) for shape in ((1, k), (n, k)))
    stream = nan_filled((1, n + 64), dtype)  # the residual, then 64 spare values that must stay NaN
    stream[:, :n] = dtypes.random_normal((1, n), dtype, rng)
    residual = stream[:, :n]
    expected = host64(residual, dtype) + host64(x, dtype) @ host64(weight, dtype).T
    assert matvec.add_matvec(residual, x, weight, dtype=dtype) is residual
    assert relative_error(dtypes.to_float32(residual, dtype), expected) < tolerance_for(dtype)
    assert np.isnan(dtypes.to_float32(stream, dtype)[0, n:]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_matvec_with_silu_mul_reads_the_stacked_gate_and_up(rng, dtype):
    n, k = 45, 1024
    gate_up, weight, residual = (dtypes.random_normal(shape, dtype, rng) for shape in ((1, 2 * k), (n, k), (1, n)))
    gate, up = np.split(host64(gate_up, dtype), 2, axis=1)
    expected = host64(residual, dtype) + (gate / (1 + np.exp(-gate)) * up) @ host64(weight, dtype).T
    matvec.add_matvec(residual, gate_up, weight, activation="silu_mul", dtype=dtype)
    assert relative_error(dtypes.to_float32(residual, dtype), expected) < tolerance_for(dtype)


def test_bad_inputs_are_refused_before_any_launch(rng):
    x, weight, norm_weight = (dtypes.random_normal(shape, "float32", rng) for shape in ((1, 64), (8, 64), (64,)))
    with pytest.raises(ValueError, match=r"x must have shape \(1, 64\)"):
        matvec.normed_matvec(dtypes.random_normal((2, 64), "float32", rng), norm_weight, weight, EPS)
    with pytest.raises(ValueError, match=r"norm_weight must have shape \(64,\)"):
        matvec.normed_matvec(x, norm_weight[:32], weight, EPS)
    with pytest.raises(TypeError, match="must hold float32 like weight"):
        matvec.normed_matvec(x.astype(np.float16), norm_weight, weight, EPS)
    with pytest.raises(ValueError, match=r"residual must have shape \(1, 8\)"):
        matvec.add_matvec(dtypes.random_normal((1, 9), "float32", rng), x, weight)
    with pytest.raises(ValueError, match=r"x must have shape \(1, 128\)"):
        matvec.add_matvec(dtypes.random_normal((1, 8), "float32", rng), x, weight, activation="silu_mul")
    with pytest.raises(ValueError, match="activation must be one of"):
        matvec.add_matvec(dtypes.random_normal((1, 8), "float32", rng), x, weight, activation="gelu")
    with pytest.raises(ValueError, match=r"weight must be a 2-D \[n, k\] array"):
        matvec.normed_matvec(x, norm_weight, norm_weight, EPS)
    with pytest.raises(ValueError, match="n, k >= 1"):
        matvec.normed_matvec(x, norm_weight, weight[:0], EPS)
    square = dtypes.random_normal((64, 64), "float32", rng)
    with pytest.raises(ValueError, match="must not overlap"):
        matvec.add_matvec(x, x, square)
    odd = dtypes.random_normal((8, 66), "float32", rng)
    with pytest.raises(ValueError, match="use course_lib.engine.linear"):
        matvec.normed_matvec(dtypes.random_normal((1, 66), "float32", rng),
                             dtypes.random_normal((66,), "float32", rng), odd, EPS)


def test_the_longest_rows_fit_in_shared_memory():
    assert matvec.max_row_length("bfloat16") == 16384 and matvec.max_row_length("float32") == 8192
    assert matvec.supports(8192, "bfloat16")  # a 1B Llama's MLP row
    assert not matvec.supports(16392, "bfloat16") and not matvec.supports(12, "bfloat16")
