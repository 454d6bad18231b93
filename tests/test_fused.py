"""The fused elementwise steps against float64 references: RoPE with the q/k/v split, and SwiGLU's activation.
NumPy in CPU mode, the kernels of fused.cu on a GPU; fresh random inputs on every run."""

import numpy as np
import pytest

from course_lib import backend, dtypes
from course_lib.check import relative_error, tolerance_for
from course_lib.kernels import fused

DTYPES = ("float32", "float16", "bfloat16")
HEADS, KV_HEADS, HEAD_DIM, THETA = 8, 2, 64, 10000.0


@pytest.fixture
def rng() -> np.random.Generator:
    seed = np.random.SeedSequence().entropy
    print(f"random inputs from seed {seed}")
    return np.random.default_rng(seed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_split_rotates_q_and_k_and_copies_v(rng, dtype):
    tokens = 7
    qkv = dtypes.random_normal((tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM), dtype, rng)
    positions = rng.integers(0, 64, tokens).astype(np.int32)
    q, k, v = fused.rope_split(qkv, backend.xp.asarray(positions), fused.inverse_frequencies(HEAD_DIM, THETA),
                               HEADS, KV_HEADS, dtype)
    heads = dtypes.to_float32(qkv, dtype).astype(np.float64).reshape(tokens, -1, HEAD_DIM)
    expected = fused.rope_reference(heads, positions, THETA)
    assert q.shape == (tokens, HEADS, HEAD_DIM) and k.shape == v.shape == (tokens, KV_HEADS, HEAD_DIM)
    for got, want in ((q, expected[:, :HEADS]), (k, expected[:, HEADS:HEADS + KV_HEADS])):
        assert relative_error(dtypes.to_float32(got, dtype), want) < tolerance_for(dtype)
    assert np.array_equal(dtypes.to_float32(v, dtype), heads[:, HEADS + KV_HEADS:].astype(np.float32))


def test_rope_angles_in_float32_lose_precision_with_the_position(rng):
    """Engines compute angles in fp32: at position 30,000 the angle is off by ~1e-3 rad, within bf16's error."""
    qkv = dtypes.random_normal((4, (HEADS + 2 * KV_HEADS) * HEAD_DIM), "float32", rng)
    positions = np.array([29_000, 29_500, 30_000, 32_000], dtype=np.int32)
    q, _, _ = fused.rope_split(qkv, backend.xp.asarray(positions), fused.inverse_frequencies(HEAD_DIM, THETA),
                               HEADS, KV_HEADS)
    heads = dtypes.to_float32(qkv).astype(np.float64).reshape(4, -1, HEAD_DIM)
    assert relative_error(dtypes.to_float32(q), fused.rope_reference(heads, positions, THETA)[:, :HEADS]) < \
        tolerance_for("bfloat16")


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_is_silu_of_the_gate_times_up(rng, dtype):
    gate_up = dtypes.random_normal((5, 2 * 96), dtype, rng, scale=3.0)
    values = dtypes.to_float32(gate_up, dtype).astype(np.float64)
    gate, up = values[:, :96], values[:, 96:]
    out = fused.silu_mul(gate_up, dtype)
    assert out.shape == (5, 96)
    assert relative_error(dtypes.to_float32(out, dtype), gate / (1 + np.exp(-gate)) * up) < tolerance_for(dtype)


def rope(xp, qkv, positions):
    return fused.rope_split(qkv, positions, fused.inverse_frequencies(HEAD_DIM, THETA), HEADS, KV_HEADS)


@pytest.mark.parametrize(("call", "message"), [
    (lambda xp: rope(xp, xp.zeros((3, 100), xp.float32), xp.zeros(3, xp.int32)), "qkv must be"),
    (lambda xp: rope(xp, xp.zeros((3, 768), xp.float32), xp.zeros(3, xp.int64)), "positions must be int32"),
    (lambda xp: rope(xp, xp.zeros((3, 1536), xp.float32)[:, ::2], xp.zeros(3, xp.int32)), "C-contiguous"),
    (lambda xp: fused.silu_mul(xp.zeros((3, 7), xp.float32)), "gate_up must be"),
])
def test_bad_inputs_are_refused_before_a_launch(call, message):
    with pytest.raises(ValueError, match=message):
        call(backend.xp)
