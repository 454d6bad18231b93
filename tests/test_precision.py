"""The emulated tensor-core formats round as the hardware does, and their errors order as expected."""

import ml_dtypes
import numpy as np
import pytest

from course_lib.kernels import precision


def test_tf32_keeps_ten_mantissa_bits_with_ties_to_even():
    one_ulp = 2.0**-10  # tf32's spacing just above 1.0
    values = np.array([1.0, 1.0 + one_ulp / 2, 1.0 + 1.5 * one_ulp, 1.0 + one_ulp / 4, -3.0], dtype=np.float32)
    expected = np.array([1.0, 1.0, 1.0 + 2 * one_ulp, 1.0, -3.0], dtype=np.float32)
    np.testing.assert_array_equal(precision.round_to(values, "tf32"), expected)


def test_tf32_leaves_inf_and_nan_alone():
    values = np.array([np.inf, -np.inf, np.nan], dtype=np.float32)
    out = precision.round_to(values, "tf32")
    assert np.isinf(out[:2]).all() and np.isnan(out[2])


@pytest.mark.parametrize("fmt", ["float16", "bfloat16", "float8_e4m3", "float8_e5m2", "tf32"])
def test_rounding_is_idempotent_and_close(fmt):
    values = np.random.default_rng().standard_normal(10_000).astype(np.float32)
    once = precision.round_to(values, fmt)
    np.testing.assert_array_equal(precision.round_to(once, fmt), once)
    relative_step = 2.0 ** -precision.MANTISSA_BITS[fmt]
    assert np.all(np.abs(once - values) <= relative_step * np.abs(values) + 1e-3)  # fp8's subnormals: the 1e-3


def test_matches_ml_dtypes_for_bfloat16():
    values = np.random.default_rng().standard_normal(1000).astype(np.float32) * 100
    expected = values.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(precision.round_to(values, "bfloat16"), expected)


def test_float16_overflows_where_bfloat16_does_not():
    big = np.array([70000.0], dtype=np.float32)
    assert np.isinf(precision.round_to(big, "float16")).all()
    assert np.isfinite(precision.round_to(big, "bfloat16")).all()


def test_errors_grow_as_mantissas_shrink():
    errors = precision.error_by_format(64, 64, 256, np.random.default_rng())
    assert errors["float32"] < 1e-6
    # the same 10-bit mantissa; they differ only on the rare input below fp16's normal range
    assert errors["tf32"] == pytest.approx(errors["float16"], rel=1e-2)
    assert errors["float8_e5m2"] > errors["float8_e4m3"] > errors["bfloat16"] > errors["float16"]


def test_an_unknown_format_is_rejected():
    with pytest.raises(ValueError, match="fmt must be one of"):
        precision.round_to(np.ones(3), "int4")
