"""The fused steps against float64 references: RoPE with the q/k/v split and the cache write, SwiGLU's activation.
NumPy in CPU mode, the kernels of fused.cu on a GPU; fresh random inputs on every run."""

import numpy as np
import pytest

from course_lib import backend, dtypes
from course_lib.check import relative_error, tolerance_for
from course_lib.checkpoint.rope import Llama3Scaling, inverse_frequencies
from course_lib.kernels import fused

DTYPES = ("float32", "float16", "bfloat16")
HEADS, KV_HEADS, HEAD_DIM = 8, 2, 64
FREQUENCIES = inverse_frequencies(HEAD_DIM, 500000.0, Llama3Scaling(8.0, 1.0, 4.0, 64))  # every branch of llama3


@pytest.fixture
def rng() -> np.random.Generator:
    seed = np.random.SeedSequence().entropy
    print(f"random inputs from seed {seed}")
    return np.random.default_rng(seed)


BLOCKS, BLOCK_SIZE = 6, 8


def random_caches(dtype="float32"):
    """A fresh random key and value cache (never zeros, so a missed write shows)."""
    rng = np.random.default_rng()
    return [dtypes.random_normal((BLOCKS, KV_HEADS, BLOCK_SIZE, HEAD_DIM), dtype, rng) for _ in range(2)]


def rope(qkv, positions, caches=None, slots=None, dtype=None, run=fused.rope_write_kv):
    """``run`` (rope_write_kv or its unchecked twin) into ``caches`` (default: fresh ones); every token at its own
    slot 0, 3, 6, ... unless ``slots``. Returns q."""
    caches = random_caches(dtype or "float32") if caches is None else caches
    slots = np.arange(qkv.shape[0], dtype=np.int32) * 3 if slots is None else slots
    return run(qkv, positions, backend.xp.asarray(FREQUENCIES.astype(np.float32)), HEADS, *caches,
               backend.xp.asarray(slots), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_write_kv_rotates_q_and_stores_rotated_k_and_v_at_their_slots(rng, dtype):
    tokens = 7
    qkv = dtypes.random_normal((tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM), dtype, rng)
    positions = rng.integers(0, 64, tokens).astype(np.int32)
    slots = rng.permutation(BLOCKS * BLOCK_SIZE)[:tokens].astype(np.int32)
    slots[2] = -1  # a padding token: its k and v are not stored
    caches = random_caches(dtype)
    before = [dtypes.to_float32(cache, dtype) for cache in caches]
    q = rope(qkv, backend.xp.asarray(positions), caches, slots, dtype)
    heads = dtypes.to_float32(qkv, dtype).astype(np.float64).reshape(tokens, -1, HEAD_DIM)
    expected = fused.rope_reference(heads, positions, FREQUENCIES)
    assert q.shape == (tokens, HEADS, HEAD_DIM)
    assert relative_error(dtypes.to_float32(q, dtype), expected[:, :HEADS]) < tolerance_for(dtype)
    key_cache, value_cache = (dtypes.to_float32(cache, dtype) for cache in caches)
    for token, slot in enumerate(slots):
        if slot < 0:
            continue
        block, row = divmod(int(slot), BLOCK_SIZE)
        assert relative_error(key_cache[block, :, row], expected[token, HEADS:HEADS + KV_HEADS]) < tolerance_for(dtype)
        assert np.array_equal(value_cache[block, :, row], heads[token, HEADS + KV_HEADS:].astype(np.float32))
    untouched = np.ones((BLOCKS, BLOCK_SIZE), bool)
    untouched[slots[slots >= 0] // BLOCK_SIZE, slots[slots >= 0] % BLOCK_SIZE] = False
    for cache, old in zip((key_cache, value_cache), before, strict=True):
        assert np.array_equal(cache.transpose(0, 2, 1, 3)[untouched], old.transpose(0, 2, 1, 3)[untouched])


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_unchecked_twin_computes_the_same_without_reading_the_slots(rng, dtype, monkeypatch):
    """What an engine calls in every layer, its step's slots checked once on the host."""
    qkv = dtypes.random_normal((3, (HEADS + 2 * KV_HEADS) * HEAD_DIM), dtype, rng)
    positions = backend.xp.asarray(np.array([5, 6, 7], np.int32))
    checked_caches = random_caches(dtype)
    unchecked_caches = [cache.copy() for cache in checked_caches]
    checked = rope(qkv, positions, checked_caches, dtype=dtype)

    def never(*args, **kwargs):
        raise AssertionError("rope_write_kv_unchecked read the slots")

    monkeypatch.setattr(fused.paged_attention, "check_slots", never)
    unchecked = rope(qkv, positions, unchecked_caches, dtype=dtype, run=fused.rope_write_kv_unchecked)
    assert np.array_equal(dtypes.to_float32(unchecked, dtype), dtypes.to_float32(checked, dtype))
    for after_unchecked, after_checked in zip(unchecked_caches, checked_caches, strict=True):
        assert np.array_equal(dtypes.to_float32(after_unchecked, dtype), dtypes.to_float32(after_checked, dtype))


def test_rope_angles_in_float32_lose_precision_with_the_position(rng):
    """Engines compute angles in fp32: at position 30,000 the angle is off by ~1e-3 rad, within bf16's error."""
    qkv = dtypes.random_normal((4, (HEADS + 2 * KV_HEADS) * HEAD_DIM), "float32", rng)
    positions = np.array([29_000, 29_500, 30_000, 32_000], dtype=np.int32)
    q = rope(qkv, backend.xp.asarray(positions))
    heads = dtypes.to_float32(qkv).astype(np.float64).reshape(4, -1, HEAD_DIM)
    assert relative_error(dtypes.to_float32(q), fused.rope_reference(heads, positions, FREQUENCIES)[:, :HEADS]) < \
        tolerance_for("bfloat16")


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_is_silu_of_the_gate_times_up(rng, dtype):
    gate_up = dtypes.random_normal((5, 2 * 96), dtype, rng, scale=3.0)
    values = dtypes.to_float32(gate_up, dtype).astype(np.float64)
    gate, up = values[:, :96], values[:, 96:]
    out = fused.silu_mul(gate_up, dtype)
    assert out.shape == (5, 96)
    assert relative_error(dtypes.to_float32(out, dtype), gate / (1 + np.exp(-gate)) * up) < tolerance_for(dtype)


@pytest.mark.parametrize(("call", "message"), [
    (lambda xp: rope(xp.zeros((3, 100), xp.float32), xp.zeros(3, xp.int32)), "qkv must be"),
    (lambda xp: rope(xp.zeros((3, 768), xp.float32), xp.zeros(3, xp.int64)), "positions must be int32"),
    (lambda xp: rope(xp.zeros((3, 1536), xp.float32)[:, ::2], xp.zeros(3, xp.int32)), "C-contiguous"),
    (lambda xp: rope(xp.zeros((2, 768), xp.float32), xp.zeros(2, xp.int32), slots=np.array([0, 48], np.int32)),
     "slots must lie in"),
    (lambda xp: rope(xp.zeros((2, 768), xp.float32), xp.zeros(2, xp.int32), slots=np.array([4, 4], np.int32)),
     "names one slot twice"),
    (lambda xp: rope(xp.zeros((2, 768), xp.float32), xp.zeros(2, xp.int32), [c[:, :, :4] for c in random_caches()]),
     "C-contiguous"),
    (lambda xp: fused.silu_mul(xp.zeros((3, 7), xp.float32)), "gate_up must be"),
])
def test_bad_inputs_are_refused_before_a_launch(call, message):
    with pytest.raises(ValueError, match=message):
        call(backend.xp)
