"""Paged attention: the float64 references against textbook attention, the CPU-mode (and later GPU) entry
points against the references, the Numba kernel in the simulator, and every input check.

Inputs are fresh random normals on every run (the seed is printed); block tables hand out shuffled,
scattered blocks from a pool with spare blocks, and two sequences share a block, as prefix caching does.
"""

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest

from course_lib import backend, dtypes, emulator
from course_lib.check import is_poison, poison, relative_error, tolerance_for
from course_lib.kernels import paged_attention as pa
from course_lib.kernels import paged_attention_numba, paged_attention_reference

DTYPES = ("float32", "float16", "bfloat16")
HEADS = [(4, 4), (8, 2), (4, 1)]  # (query heads, kv heads): multi-head, 32/8-style GQA scaled down, multi-query


@pytest.fixture
def rng() -> np.random.Generator:
    seed = np.random.SeedSequence().entropy
    print(f"random inputs from seed {seed}")
    return np.random.default_rng(seed)


@dataclass(frozen=True)
class Paged:
    """A decode problem on the device, with the host copies of its tables."""

    query: Any
    key_cache: Any
    value_cache: Any
    block_tables: Any
    context_lens: Any
    tables: np.ndarray
    lens: np.ndarray

    def args(self) -> tuple[Any, ...]:
        return self.query, self.key_cache, self.value_cache, self.block_tables, self.context_lens


def random_tables(rng, lens: np.ndarray, block_size: int, spare_blocks: int = 5, unread: int = -1):
    """(tables, num_blocks): each sequence gets scattered blocks of a shuffled pool; sequence 1 shares
    sequence 0's first block; entries past a sequence's last block hold ``unread``."""
    needed = pa.blocks_for(lens, block_size)
    num_blocks = int(needed.sum()) + spare_blocks
    pool = rng.permutation(num_blocks)
    tables = np.full((lens.size, int(needed.max()) + 1), unread, dtype=np.int32)
    starts = np.concatenate([[0], np.cumsum(needed)])
    for seq, count in enumerate(needed):
        tables[seq, :count] = pool[starts[seq]:starts[seq] + count]
    if lens.size > 1:
        tables[1, 0] = tables[0, 0]
    return tables, num_blocks


def paged_problem(rng, context_lens, *, heads=(8, 2), head_dim=64, block_size=8, dtype="float32",
                  unread=-1) -> Paged:
    num_heads, num_kv_heads = heads
    lens = np.array(context_lens, dtype=np.int32)
    tables, num_blocks = random_tables(rng, lens, block_size, unread=unread)
    cache_shape = (num_blocks, num_kv_heads, block_size, head_dim)
    return Paged(dtypes.random_normal((lens.size, num_heads, head_dim), dtype, rng),
                 dtypes.random_normal(cache_shape, dtype, rng), dtypes.random_normal(cache_shape, dtype, rng),
                 backend.xp.asarray(tables), backend.xp.asarray(lens), tables, lens)


def ragged_lens(block_size: int) -> list[int]:
    """One token, exact multiples of the block size, and lengths that end mid-block."""
    return [1, block_size, 3 * block_size, 2 * block_size + 5, block_size - 1, 4 * block_size + 1]


def by_token(cache: Any, table: np.ndarray, length: int, dtype: str) -> np.ndarray:
    """A sequence's keys or values read one token at a time: token t is in block table[t // bs] at t % bs."""
    host = dtypes.to_float32(cache, dtype).astype(np.float64)
    block_size = host.shape[2]
    return np.stack([host[table[t // block_size], :, t % block_size, :] for t in range(length)])


def textbook_attention(query: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float) -> np.ndarray:
    """softmax(q . k * scale) v for each (row, head) over all the keys, looping as the formula reads."""
    rows, heads, _ = query.shape
    group = heads // keys.shape[1]
    out = np.empty(query.shape)
    for t in range(rows):
        for h in range(heads):
            logits = keys[:, h // group] @ query[t, h] * scale
            weights = np.exp(logits - logits.max())
            out[t, h] = weights @ values[:, h // group] / weights.sum()
    return out


def assert_close(out: Any, reference: np.ndarray, dtype: str) -> None:
    error = relative_error(dtypes.to_float32(out, dtype), reference)
    assert error < tolerance_for(dtype), f"relative error {error:.3g} over {tolerance_for(dtype)} for {dtype}"


# ---- the references --------------------------------------------------------------------------------------


def test_gather_kv_follows_the_table_token_by_token(rng):
    problem = paged_problem(rng, ragged_lens(8))
    for seq, length in enumerate(problem.lens):
        keys, values = pa.gather_kv(problem.key_cache, problem.value_cache, problem.block_tables[seq], int(length))
        assert keys.shape == values.shape == (length, 2, 64)
        np.testing.assert_array_equal(keys, by_token(problem.key_cache, problem.tables[seq], length, "float32"))
        np.testing.assert_array_equal(values, by_token(problem.value_cache, problem.tables[seq], length, "float32"))


@pytest.mark.parametrize("heads", HEADS, ids=str)
def test_decode_reference_is_textbook_attention_over_the_paged_context(rng, heads):
    problem = paged_problem(rng, ragged_lens(16), heads=heads, block_size=16, head_dim=64)
    reference = pa.paged_decode_reference(*problem.args())
    query = dtypes.to_float32(problem.query).astype(np.float64)
    for seq, length in enumerate(problem.lens):
        keys, values = (by_token(cache, problem.tables[seq], length, "float32")
                        for cache in (problem.key_cache, problem.value_cache))
        expected = textbook_attention(query[seq:seq + 1], keys, values, 1 / np.sqrt(64))
        np.testing.assert_allclose(reference[seq], expected[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("partition_size", [8, 24, pa.DEFAULT_PARTITION_SIZE])
def test_v2_partitions_merged_by_log_sum_exp_equal_v1(rng, partition_size):
    problem = paged_problem(rng, ragged_lens(8) + [70], heads=(4, 2))
    v1 = pa.paged_decode_reference(*problem.args(), scale=0.3)
    v2 = pa.split_partitions_reference(*problem.args(), scale=0.3, partition_size=partition_size)
    np.testing.assert_allclose(v2, v1, rtol=1e-12, atol=1e-12)


def test_partials_hold_each_partitions_own_softmax(rng):
    problem = paged_problem(rng, [40], heads=(4, 2))
    keys, values = pa.gather_kv(problem.key_cache, problem.value_cache, problem.block_tables[0], 40)
    query = dtypes.to_float32(problem.query)[0].astype(np.float64)
    partials = paged_attention_reference.partition_partials(query, keys, values, 0.5, 16)
    assert partials.max_logits.shape == partials.exp_sums.shape == (3, 4)  # 16 + 16 + 8 tokens
    assert partials.outputs.shape == (3, 4, 64)
    last = textbook_attention(query[None], keys[32:], values[32:], 0.5)[0]
    np.testing.assert_allclose(partials.outputs[2], last, rtol=1e-12)


# ---- the entry points (NumPy in fp32 in CPU mode; the CUDA kernels on a GPU) --------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("version", pa.VERSIONS)
@pytest.mark.parametrize("heads", HEADS, ids=str)
@pytest.mark.parametrize("block_size", pa.BLOCK_SIZES)
def test_decode_matches_the_reference(rng, dtype, version, heads, block_size):
    problem = paged_problem(rng, ragged_lens(block_size), heads=heads, head_dim=64, block_size=block_size, dtype=dtype)
    out = pa.paged_attention_decode(*problem.args(), version=version, partition_size=2 * block_size, dtype=dtype)
    assert out.shape == problem.query.shape and dtypes.element_type(out, dtype) == dtype
    assert_close(out, pa.paged_decode_reference(*problem.args(), dtype=dtype), dtype)


@pytest.mark.parametrize("version", pa.VERSIONS)
def test_decode_with_long_contexts_and_the_default_partition(rng, version):
    problem = paged_problem(rng, [1300, 513, 512, 77], heads=(8, 2), head_dim=128, block_size=16, dtype="bfloat16")
    out = pa.paged_attention_decode(*problem.args(), version=version, dtype="bfloat16")
    assert_close(out, pa.paged_decode_reference(*problem.args(), dtype="bfloat16"), "bfloat16")


@pytest.mark.parametrize("heads", [(32, 8), (8, 8)], ids=str)
def test_auto_partitions_give_small_steps_more_blocks_and_the_same_result(rng, heads):
    problem = paged_problem(rng, [512], heads=heads, head_dim=64, block_size=16, dtype="bfloat16")
    out = pa.paged_attention_decode(*problem.args(), partition_size="auto", dtype="bfloat16")
    assert_close(out, pa.paged_decode_reference(*problem.args(), dtype="bfloat16"), "bfloat16")


@pytest.mark.parametrize(("rows", "context", "expected"), [(1, 512, 64), (8, 512, 128), (64, 640, 512),
                                                           (1, 32_768, 512), (1, 16, 64)])
def test_auto_partition_size_halves_until_the_grid_is_busy(rows, context, expected):
    cache = pa.Cache("bfloat16", num_blocks=100, num_kv_heads=8, block_size=16, head_dim=64)
    problem = pa.Attention(cache, num_heads=32, rows=rows, max_blocks_per_seq=64, max_context_len=context, scale=0.125)
    assert pa.auto_partition_size(problem) == expected
    assert pa.plan_decode(problem, partition_size="auto").partition_size == expected


def test_decode_writes_into_out(rng):
    problem = paged_problem(rng, [9, 17])
    out = poison(problem.query.shape, np.float32)
    assert pa.paged_attention_decode(*problem.args(), scale=0.1, out=out) is out
    assert_close(out, pa.paged_decode_reference(*problem.args(), scale=0.1), "float32")


@pytest.mark.parametrize("unread", [-1, 10**6])
def test_table_entries_past_a_sequences_blocks_are_never_read(rng, unread):
    problem = paged_problem(rng, ragged_lens(8), unread=unread)
    assert (problem.tables == unread).any()
    out = pa.paged_attention_decode(*problem.args(), version="v1")
    assert_close(out, pa.paged_decode_reference(*problem.args()), "float32")


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_stores_each_token_at_its_slot_and_skips_padding(rng, dtype):
    num_blocks, num_kv_heads, block_size, head_dim = 6, 2, 8, 64  # a head size the CUDA kernels are built for
    key_cache, value_cache = (dtypes.random_normal((num_blocks, num_kv_heads, block_size, head_dim), dtype, rng)
                              for _ in range(2))
    before_keys, before_values = dtypes.to_float32(key_cache, dtype), dtypes.to_float32(value_cache, dtype)
    slots = rng.permutation(num_blocks * block_size)[:7].astype(np.int32)
    slots[[2, 5]] = -1  # padding tokens
    key, value = (dtypes.random_normal((7, num_kv_heads, head_dim), dtype, rng) for _ in range(2))
    expected_keys, expected_values = pa.write_kv_reference(key, value, key_cache, value_cache,
                                                           backend.xp.asarray(slots), dtype=dtype)
    assert pa.write_kv(key, value, key_cache, value_cache, backend.xp.asarray(slots), dtype=dtype) is None
    np.testing.assert_array_equal(dtypes.to_float32(key_cache, dtype), expected_keys)
    np.testing.assert_array_equal(dtypes.to_float32(value_cache, dtype), expected_values)
    key32 = dtypes.to_float32(key, dtype)
    for token, slot in enumerate(slots):
        if slot >= 0:
            np.testing.assert_array_equal(expected_keys[slot // block_size, :, slot % block_size], key32[token])
    untouched = np.ones(num_blocks * block_size, dtype=bool)
    untouched[slots[slots >= 0]] = False
    blocks, offsets = np.divmod(np.flatnonzero(untouched), block_size)
    np.testing.assert_array_equal(expected_keys[blocks, :, offsets], before_keys[blocks, :, offsets])
    np.testing.assert_array_equal(expected_values[blocks, :, offsets], before_values[blocks, :, offsets])


# ---- the CUDA kernels on the CPU: the launchers unchanged, the warp emulator's kernels in place of CuPy's -------

needs_emulator = pytest.mark.skipif(emulator.emulator_problem() is not None, reason=str(emulator.emulator_problem()))
on_cpu_only = pytest.mark.skipif(backend.has_gpu(), reason="on a GPU the tests above run the kernels themselves")


@needs_emulator
@on_cpu_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("version", "heads"), [("v1", (8, 2)), ("v2", (8, 2)), ("v2", (4, 4)), ("v2", (4, 1))],
                         ids=["v1", "v2-grouped", "v2-mha", "v2-mqa"])
def test_the_decode_kernels_run_by_the_warp_emulator_match_the_reference(rng, dtype, version, heads):
    problem = paged_problem(rng, ragged_lens(16), heads=heads, head_dim=64, block_size=16, dtype=dtype)
    out = pa.emulate_decode(*problem.args(), version=version, partition_size=32, dtype=dtype)
    assert not np.isnan(dtypes.to_float32(out, dtype)).any(), "some outputs were never written"
    assert_close(out, pa.paged_decode_reference(*problem.args(), dtype=dtype), dtype)


@needs_emulator
@on_cpu_only
def test_the_write_kernel_run_by_the_warp_emulator_stores_each_token_at_its_slot(rng):
    cache = pa.Cache("bfloat16", num_blocks=6, num_kv_heads=2, block_size=8, head_dim=64)
    key_cache, value_cache = (dtypes.random_normal((6, 2, 8, 64), "bfloat16", rng) for _ in range(2))
    slots = rng.permutation(48)[:7].astype(np.int32)
    slots[[2, 5]] = -1  # padding tokens
    key, value = (dtypes.random_normal((7, 2, 64), "bfloat16", rng) for _ in range(2))
    expected = pa.write_kv_reference(key, value, key_cache, value_cache, slots, dtype="bfloat16")
    pa.launch_write_kv(cache, key_cache, value_cache, key, value, slots, kernel=pa.emulated_kernel)
    for written, wanted in zip((key_cache, value_cache), expected, strict=True):
        np.testing.assert_array_equal(dtypes.to_float32(written, "bfloat16"), wanted)


# ---- the Numba kernel, in the simulator in CPU mode ----------------------------------------------------------


def test_numba_kernel_matches_the_reference(rng):
    problem = paged_problem(rng, [1, 8, 13], heads=(4, 2), head_dim=16, block_size=8)
    out = poison(problem.query.shape, np.float32)
    assert paged_attention_numba.paged_decode_numba(*problem.args(), out=out) is out
    assert not is_poison(out).any(), "some outputs were never written"
    assert_close(out, pa.paged_decode_reference(*problem.args()), "float32")


def test_numba_kernel_takes_float32_and_contexts_that_fit_shared_memory(rng):
    half = paged_problem(rng, [3], head_dim=16, dtype="float16")
    with pytest.raises(TypeError, match="float32"):
        paged_attention_numba.paged_decode_numba(*half.args())
    long = paged_problem(rng, [paged_attention_numba.MAX_CONTEXT_LEN + 1], head_dim=8, block_size=32)
    with pytest.raises(ValueError, match="shared memory"):
        paged_attention_numba.paged_decode_numba(*long.args())


# ---- input checks: all on the host, before any launch --------------------------------------------------------


def small_problem() -> Paged:
    return paged_problem(np.random.default_rng(), [5, 16, 9], heads=(4, 2), head_dim=16, block_size=8)


def part(array: Any, index: Any) -> Any:
    """A contiguous copy of a slice: the shape is what is wrong, not the memory layout."""
    return backend.xp.ascontiguousarray(array[index])


def with_table_entry(problem: Paged, seq: int, index: int, value: int) -> Paged:
    tables = problem.tables.copy()
    tables[seq, index] = value
    return replace(problem, block_tables=backend.xp.asarray(tables))


def with_lens(problem: Paged, lens: list[int]) -> Paged:
    return replace(problem, context_lens=backend.xp.asarray(np.array(lens, dtype=np.int32)))


def decode(problem: Paged, **options) -> Any:
    return pa.paged_attention_decode(*problem.args(), **options)


def num_blocks(problem: Paged) -> int:
    return problem.key_cache.shape[0]


DECODE_ERRORS = [
    pytest.param(lambda p: decode(with_table_entry(p, 0, 0, num_blocks(p))), ValueError, "outside the pool",
                 id="index-past-the-pool"),
    pytest.param(lambda p: decode(with_table_entry(p, 1, 1, -1)), ValueError, r"block_tables\[1, 1\] is -1",
                 id="negative-index-in-the-covered-part"),
    pytest.param(lambda p: decode(with_lens(p, [5, 16, p.tables.shape[1] * 8 + 1])), ValueError,
                 "max_blocks_per_seq", id="context-beyond-the-table"),
    pytest.param(lambda p: decode(with_lens(p, [5, 0, 9])), ValueError, "between 1", id="empty-context"),
    pytest.param(lambda p: decode(with_lens(p, [5, 16])), ValueError, "must agree", id="lens-length"),
    pytest.param(lambda p: decode(replace(p, query=part(p.query, np.s_[:, :3]))), ValueError,
                 "multiple of the cache's 2 kv heads", id="wrong-gqa-ratio"),
    pytest.param(lambda p: decode(replace(p, query=p.query[:2])), ValueError, "3 rows", id="query-vs-table-rows"),
    pytest.param(lambda p: decode(replace(p, query=p.query.astype(np.float64))), TypeError, "float32",
                 id="float64-query"),
    pytest.param(lambda p: decode(replace(p, query=p.query.astype(np.float16))), TypeError, "like the cache",
                 id="query-type-differs-from-cache"),
    pytest.param(lambda p: decode(replace(p, value_cache=p.value_cache.astype(np.float16))), TypeError,
                 "same element type", id="cache-types-differ"),
    pytest.param(lambda p: decode(replace(p, block_tables=p.block_tables.astype(np.int64))), TypeError, "int32",
                 id="int64-tables"),
    pytest.param(lambda p: decode(replace(p, context_lens=p.context_lens.astype(np.int64))), TypeError, "int32",
                 id="int64-lens"),
    pytest.param(lambda p: decode(replace(p, query=part(p.query, np.s_[..., :8]))), ValueError, "head_dim=16",
                 id="query-head-dim"),
    pytest.param(lambda p: decode(replace(p, key_cache=part(p.key_cache, np.s_[:, :, :4]),
                                          value_cache=part(p.value_cache, np.s_[:, :, :4]))),
                 ValueError, "block_size", id="block-size-4"),
    pytest.param(lambda p: decode(replace(p, query=part(p.query, np.s_[..., :12]),
                                          key_cache=part(p.key_cache, np.s_[..., :12]),
                                          value_cache=part(p.value_cache, np.s_[..., :12]))),
                 ValueError, "multiple of 8", id="head-dim-12"),
    pytest.param(lambda p: decode(replace(p, value_cache=p.value_cache[:-1])), ValueError, "key_cache's shape",
                 id="cache-shapes-differ"),
    pytest.param(lambda p: decode(replace(p, key_cache=p.key_cache[0], value_cache=p.value_cache[0])), ValueError,
                 "num_blocks, num_kv_heads", id="3-D-cache"),
    pytest.param(lambda p: decode(replace(p, query=p.query.tolist())), TypeError, "array", id="list-query"),
    pytest.param(lambda p: decode(replace(p, query=p.query[:, ::2])), ValueError, "C-contiguous",
                 id="strided-query"),
    pytest.param(lambda p: decode(p, scale=0.0), ValueError, "scale", id="zero-scale"),
    pytest.param(lambda p: decode(p, scale=float("nan")), ValueError, "scale", id="nan-scale"),
    pytest.param(lambda p: decode(p, version="v3"), ValueError, "version", id="version"),
    pytest.param(lambda p: decode(p, partition_size=12), ValueError, "multiple of block_size", id="partition-size"),
    pytest.param(lambda p: decode(p, out=backend.xp.empty((3, 4, 8), np.float32)), ValueError, "out must have shape",
                 id="out-shape"),
    pytest.param(lambda p: decode(p, out=backend.xp.empty((3, 4, 16), np.float16)), TypeError, "out must hold",
                 id="out-type"),
    pytest.param(lambda p: pa.paged_decode_reference(*with_table_entry(p, 2, 1, 99).args()), ValueError,
                 "outside the pool", id="reference-checks-too"),
    pytest.param(lambda p: pa.gather_kv(p.key_cache, p.value_cache, p.block_tables[0], p.tables.shape[1] * 8 + 1),
                 ValueError, "max_blocks_per_seq", id="gather-beyond-the-table"),
]


def write(problem: Paged, slots: list[int], heads: int = 2, dtype: Any = np.float32, tokens: int | None = None,
          slot_dtype: Any = np.int32):
    tokens = len(slots) if tokens is None else tokens
    key = backend.xp.ones((tokens, heads, 16), dtype=dtype)
    return pa.write_kv(key, key, problem.key_cache, problem.value_cache,
                       backend.xp.asarray(np.array(slots, dtype=slot_dtype)))


WRITE_ERRORS = [
    pytest.param(lambda p: write(p, [0, num_blocks(p) * 8]), ValueError, "slots must lie in", id="slot-past-the-pool"),
    pytest.param(lambda p: write(p, [0, -2]), ValueError, "slots must lie in", id="slot-below-minus-one"),
    pytest.param(lambda p: write(p, [3, -1, 3]), ValueError, "twice", id="duplicate-slot"),
    pytest.param(lambda p: write(p, [1, 2], tokens=3), ValueError, "one slot per token", id="slot-count"),
    pytest.param(lambda p: write(p, [1, 2], heads=4), ValueError, "2 kv heads", id="write-heads"),
    pytest.param(lambda p: write(p, [1, 2], dtype=np.float16), TypeError, "like the cache", id="write-type"),
    pytest.param(lambda p: write(p, [1, 2], slot_dtype=np.int64), TypeError, "int32", id="int64-slots"),
]


@pytest.mark.parametrize(("call", "error", "message"), DECODE_ERRORS + WRITE_ERRORS)
def test_bad_inputs_are_refused_with_what_was_expected(call, error, message):
    with pytest.raises(error, match=message):
        call(small_problem())


@pytest.fixture
def launches(monkeypatch) -> list[tuple[str, Any]]:
    """Pretend to be on a GPU and record what would be launched, instead of launching."""
    recorded: list[tuple[str, Any]] = []
    monkeypatch.setattr(backend, "has_gpu", lambda: True)
    monkeypatch.setattr(pa, "launch_decode", lambda plan, *arrays: recorded.append((plan.version, plan)))
    monkeypatch.setattr(pa, "launch_write_kv", lambda cache, *arrays: recorded.append(("write_kv", cache)))
    return recorded


@pytest.mark.parametrize(("call", "error", "message"), DECODE_ERRORS[:6] + WRITE_ERRORS[:3])
def test_bad_inputs_never_reach_a_launch(launches, call, error, message):
    with pytest.raises(error, match=message):
        call(small_problem())
    assert launches == []


def test_valid_inputs_reach_the_launch_with_their_validated_shape(launches):
    problem = small_problem()
    decode(problem, version="v1")
    decode(problem, partition_size=16)
    write(problem, [4, -1, 40])
    assert [name for name, _ in launches] == ["v1", "v2", "write_kv"]
    (_, v1), (_, v2), (_, cache) = launches
    shape = v1.problem
    assert (shape.rows, shape.num_heads, shape.queries_per_kv, shape.max_context_len) == (3, 4, 2, 16)
    assert v1.partition_size is None and v1.scratch is None
    assert v2.partition_size == 16 and v2.problem.scale == pytest.approx(0.25)
    assert v2.scratch.out.shape == (3, 4, 1, 16)  # a GPU's v2 gets its scratch: 16 tokens in one partition
    assert cache == pa.Cache("float32", num_blocks(problem), 2, 8, 16)


def test_decode_grids_spread_a_long_context_over_partitions_and_group_gqa_heads():
    assert pa.decode_grids("v1", 1, 32, 8, 32768) == {"decode": (1, 32, 1)}
    assert pa.decode_grids("v2", 1, 32, 8, 32768, 512) == {"decode": (64, 8, 1), "merge": (32, 1, 1)}
    assert pa.decode_grids("v2", 3, 8, 4, 1000, 512)["decode"] == (2, 8, 3)  # 2 query heads a KV head: no grouping


def test_launcher_sizes_shared_memory_with_the_kernels_own_constants():
    """ring_bytes() must describe the rings the .cu file indexes, or a launch would read past its shared memory."""
    from course_lib import compile as cuda_compile

    source = cuda_compile.kernel_path(pa.SOURCE).read_text()
    assert f"constexpr int THREADS = {pa.THREADS}," in source
    assert f"constexpr int TILE = {pa.TILE_TOKENS};" in source
    assert f"constexpr int STAGES = {pa.STAGES};" in source
    assert pa.ring_bytes(128, "bfloat16") == 4 * pa.STAGES * 2 * pa.TILE_TOKENS * 128 * 2


# ---- checked once, run many times: what an engine step and a benchmark do ----------------------------------


def test_a_plan_checked_once_runs_on_another_layers_arrays_without_reading_indices(rng, monkeypatch):
    """decode_unchecked trusts the plan's indices: a new query and caches of the same layouts reuse them."""
    first = paged_problem(rng, [13, 30], heads=(8, 2), head_dim=64, block_size=8)
    second = replace(first, query=dtypes.random_normal(first.query.shape, "float32", rng),
                     key_cache=dtypes.random_normal(first.key_cache.shape, "float32", rng),
                     value_cache=dtypes.random_normal(first.value_cache.shape, "float32", rng))
    plan = pa.plan_decode(pa.check_decode_inputs(*first.args()), partition_size=16)
    expected = [pa.paged_decode_reference(*problem.args()) for problem in (first, second)]

    def never(*args, **kwargs):
        raise AssertionError("decode_unchecked read the indices")

    monkeypatch.setattr(pa, "validate_block_tables", never)
    assert_close(pa.decode_unchecked(plan, *first.args()), expected[0], "float32")
    out = poison(first.query.shape, np.float32)
    assert pa.decode_unchecked(plan, *second.args(), out=out) is out
    assert_close(out, expected[1], "float32")


def test_decode_problem_takes_the_longest_context_from_the_caller(rng):
    """An engine knows its longest context on the host: decode_problem checks layouts, not indices."""
    problem = paged_problem(rng, [13, 30], heads=(8, 2), head_dim=64, block_size=8)
    checked = pa.check_decode_inputs(*problem.args())
    assert pa.decode_problem(*problem.args()[:4], 30) == checked
    with pytest.raises(ValueError, match="needs more than the tables"):
        pa.decode_problem(*problem.args()[:4], problem.tables.shape[1] * 8 + 1)
    with pytest.raises(ValueError, match="max_context_len must be"):
        pa.decode_problem(*problem.args()[:4], 0)
    with pytest.raises(ValueError, match="block_tables must be 2-D"):
        pa.decode_problem(*problem.args()[:3], problem.block_tables[0], 30)


def test_each_v2_plan_owns_its_partials_workspace(rng, monkeypatch):
    """A captured graph keeps using its plan's scratch: every plan gets its own, never a shared cache's."""
    problem = paged_problem(rng, [40, 9], heads=(8, 2), head_dim=64, block_size=8)
    attention = pa.check_decode_inputs(*problem.args())
    scratch = pa.workspace(attention, 16)
    assert scratch.out.shape == (2, 8, 3, 64) and scratch.max.shape == scratch.sum.shape == (2, 8, 3)
    assert pa.workspace(attention, 16).out is not scratch.out
    monkeypatch.setattr(backend, "has_gpu", lambda: False)
    assert pa.plan_decode(attention, partition_size=16).scratch is None  # CPU mode: NumPy needs no scratch
    monkeypatch.setattr(backend, "has_gpu", lambda: True)
    plans = [pa.plan_decode(attention, partition_size=16) for _ in range(2)]
    assert plans[0].scratch.out.shape == (2, 8, 3, 64) and plans[0].scratch.out is not plans[1].scratch.out
    assert pa.plan_decode(attention, "v1").scratch is None
