"""The tensor-core prefill kernel (paged_prefill.cu) and its launcher.

On any machine: the kernel compiles for sm_80 and sm_90 in both types and head sizes without spilling, the launcher's
numbers match the kernel's, every bad input is refused before a launch could happen, CPU mode computes the tiles in
NumPy, and the kernel's fragment plan (its ldmatrix addresses, swizzle and register packing, copied from the .cu file)
computes attention when run lane by lane on the course's NumPy model of ldmatrix and mma.sync.
On the CPU warp emulator (course_lib.emulator): the kernel's own source on the GPU tests' batches against the float64
reference, with copies landing early or late, and the slips of ``labs/kernel_slips`` that the check must reject.
On a GPU (marked ``gpu``): the kernel against ``prefill_reference`` in float64, in the tiling launches use on every
batch, and in each of its tilings on a few (the benchmark times them all).
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from course_lib import backend, dtypes, emulator
from course_lib import compile as cuda_compile
from course_lib.check import is_poison, poison, relative_error, tolerance_for
from course_lib.kernels import paged_prefill as pp
from course_lib.kernels.paged_prefill_reference import PrefillBatch, prefill_reference, random_prefill_batch
from course_lib.labs import kernel_slips
from course_lib.labs import tensor_core_fragments as fragments

KERNEL_ARCHS = ("sm_80", "sm_90")
MAX_REGISTERS = 255  # what one thread can address; more would spill
SHARED_PER_BLOCK_SM80 = 163 * 1024  # the most an A100 block may opt in to


def device_batch(batch: PrefillBatch, dtype: str) -> tuple[Any, ...]:
    """The batch's arrays on the current device, queries and caches rounded to ``dtype``."""
    return tuple(dtypes.to_device(a.astype(dtypes.host_dtype(dtype)) if a.dtype.kind == "f" else a)
                 for a in batch.arrays())


def small_batch(rng: np.random.Generator, dtype: str = "float16") -> PrefillBatch:
    """Two sequences, the second after a prefix that ends mid-block; 4 query heads over 2 kv heads."""
    batch = random_prefill_batch(rng, [5, 9], [0, 20], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16)
    return replace(batch, **{name: getattr(batch, name).astype(dtypes.host_dtype(dtype))
                             for name in ("query", "key_cache", "value_cache")})


# ---- compiles, and fits ----------------------------------------------------------------------------------------

needs_nvrtc = pytest.mark.skipif(cuda_compile.nvrtc_problem() is not None, reason=str(cuda_compile.nvrtc_problem()))


@needs_nvrtc
@pytest.mark.parametrize("arch", KERNEL_ARCHS)
def test_every_instantiation_compiles_without_spilling(arch):
    compiled = cuda_compile.compile_file(pp.SOURCE, arch, name_expressions=pp.kernel_names())
    print(cuda_compile.resource_table([compiled]))
    assert sorted(k.kernel for k in compiled.kernels) == sorted(pp.kernel_names())
    for kernel in compiled.kernels:
        assert 0 < kernel.registers <= MAX_REGISTERS, kernel
        assert (kernel.stack_bytes, kernel.spill_store_bytes, kernel.spill_load_bytes) == (0, 0, 0), kernel
        assert kernel.shared_bytes == 0, "all shared memory is dynamic, sized by the launcher"


def test_the_launcher_sizes_grid_and_shared_memory_with_the_kernels_own_constants():
    """shared_bytes() must describe the buffers the .cu file indexes, or a launch would read past its shared memory."""
    source = cuda_compile.kernel_path(pp.SOURCE).read_text()
    assert f"constexpr int THREADS = {pp.THREADS}," in source
    assert re.search(rf"constexpr int STAGES = {pp.STAGES};", source)
    assert "constexpr int ROWS = WARPS * M_TILES * 16;" in source  # Tiling.rows
    assert pp.shared_bytes(128, "bfloat16") == (128 + 2 * 2 * 32) * 128 * 2 == 64 * 1024
    assert pp.shared_bytes(128, "bfloat16", pp.TILINGS["v1: 16 rows a warp"]) == (64 + 2 * 2 * 64) * 128 * 2
    assert all(pp.shared_bytes(d, kind, tiling) <= SHARED_PER_BLOCK_SM80
               for d in pp.HEAD_DIMS for kind in pp.ELEMENT_TYPES for tiling in pp.TILINGS.values())
    tilings = re.search(r"#define PREFILL_TILINGS\(T, D\) (.*)", source).group(1)
    assert tilings == " ".join(f"PREFILL_KERNEL(T, D, {t.m_tiles}, {t.key_tile})" for t in pp.TILINGS.values())
    for kind in pp.ELEMENT_TYPES:
        for head_dim in pp.HEAD_DIMS:
            assert f"PREFILL_TILINGS({dtypes.CUDA_TYPES[kind]}, {head_dim})" in source


def test_the_grid_covers_the_longest_sequences_rows_for_each_kv_head(rng):
    problem = pp.check_prefill_problem(*small_batch(rng).arrays(), on_host=True)  # shapes only: host arrays do
    assert (problem.num_heads, problem.group, problem.max_query_len, problem.total_tokens) == (4, 2, 9, 14)
    assert pp.prefill_grid(problem) == (1, 2, 2)  # 9 positions x 2 heads = 18 rows: one tile of 128
    assert pp.prefill_grid(replace(problem, max_query_len=300)) == (5, 2, 2)  # 600 rows
    assert pp.prefill_grid(replace(problem, max_query_len=300), pp.TILINGS["v1: 16 rows a warp"]) == (10, 2, 2)
    assert problem.scale == pytest.approx(1 / 8)


# ---- bad inputs are refused before any launch --------------------------------------------------------------


def prefill(b: PrefillBatch, **kwargs: Any) -> Any:
    return pp.paged_prefill(*b.arrays(), **kwargs)


def with_(b: PrefillBatch, **arrays: Any) -> PrefillBatch:
    return replace(b, **arrays)


def table_entry(b: PrefillBatch, seq: int, index: int, value: int) -> PrefillBatch:
    tables = b.block_tables.copy()
    tables[seq, index] = value
    return with_(b, block_tables=tables)


def _i32(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.int32)


BAD_INPUTS = [
    pytest.param(lambda b: prefill(with_(b, query=b.query.astype(np.float32), key_cache=b.key_cache.astype(np.float32),
                                         value_cache=b.value_cache.astype(np.float32))),
                 TypeError, "float16 or bfloat16", id="float32"),
    pytest.param(lambda b: prefill(with_(b, query=b.query[..., :32].copy(), key_cache=b.key_cache[..., :32].copy(),
                                         value_cache=b.value_cache[..., :32].copy())),
                 ValueError, r"head_dim in \(64, 128\)", id="head-dim-32"),
    pytest.param(lambda b: prefill(with_(b, query=b.query[:, :3].copy())), ValueError, "multiple of the cache's 2 kv",
                 id="heads-not-a-multiple-of-kv-heads"),
    pytest.param(lambda b: prefill(with_(b, query=b.query[..., :56].copy())), ValueError, "head_dim=64",
                 id="query-head-dim"),
    pytest.param(lambda b: prefill(with_(b, query=b.query.astype(dtypes.bfloat16))), TypeError, "like the cache",
                 id="query-type-differs"),
    pytest.param(lambda b: prefill(with_(b, value_cache=b.value_cache[:-1].copy())), ValueError, "key_cache's shape",
                 id="cache-shapes-differ"),
    pytest.param(lambda b: prefill(with_(b, query=b.query[0])), ValueError, "rows >= 1, heads, head_dim",
                 id="2-D-query"),
    pytest.param(lambda b: prefill(with_(b, query=b.query.tolist())), TypeError, "array", id="list-query"),
    pytest.param(lambda b: prefill(with_(b, query=b.query[:, ::2])), ValueError, "C-contiguous", id="strided-query"),
    pytest.param(lambda b: prefill(with_(b, query_start_loc=b.query_start_loc.astype(np.int64))), TypeError, "int32",
                 id="int64-query-start-loc"),
    pytest.param(lambda b: prefill(with_(b, block_tables=b.block_tables.astype(np.int64))), TypeError, "int32",
                 id="int64-block-tables"),
    pytest.param(lambda b: prefill(with_(b, context_lens=b.context_lens.astype(np.int64))), TypeError, "int32",
                 id="int64-context-lens"),
    pytest.param(lambda b: prefill(table_entry(b, 1, 1, b.key_cache.shape[0])), ValueError, "outside the pool",
                 id="block-past-the-pool"),
    pytest.param(lambda b: prefill(table_entry(b, 1, 0, -1)), ValueError, "outside the pool", id="block-minus-one"),
    pytest.param(lambda b: prefill(with_(b, context_lens=_i32([5, 64]))), ValueError, "max_blocks_per_seq",
                 id="context-past-the-table"),
    pytest.param(lambda b: prefill(with_(b, context_lens=_i32([4, 29]))), ValueError, "new tokens",
                 id="context-shorter-than-new-tokens"),
    pytest.param(lambda b: prefill(with_(b, context_lens=_i32([5]))), ValueError, "must agree",
                 id="one-length-too-few"),
    pytest.param(lambda b: prefill(with_(b, query_start_loc=_i32([0, 5, 13]))), ValueError, "must rise from 0 to 14",
                 id="starts-end-short"),
    pytest.param(lambda b: prefill(with_(b, query_start_loc=_i32([1, 5, 14]))), ValueError, "must rise from 0",
                 id="starts-not-at-0"),
    pytest.param(lambda b: prefill(with_(b, query_start_loc=_i32([0, 0, 14]))), ValueError, "steps of at least 1",
                 id="empty-sequence"),
    pytest.param(lambda b: prefill(with_(b, query_start_loc=_i32([0, 14]))), ValueError, "in 3 steps",
                 id="starts-wrong-length"),
    pytest.param(lambda b: prefill(with_(b, query_start_loc=_i32([[0, 5, 14]]))), TypeError, "1-D int32",
                 id="2-D-starts"),
    pytest.param(lambda b: prefill(b, scale=float("nan")), ValueError, "scale", id="nan-scale"),
    pytest.param(lambda b: prefill(b, out=np.empty((14, 4, 32), np.float16)), ValueError, "out must have shape",
                 id="out-shape"),
    pytest.param(lambda b: prefill(b, out=np.empty((14, 4, 64), np.float32)), TypeError, "out must hold",
                 id="out-type"),
]


@pytest.fixture
def launches(monkeypatch) -> list[Any]:
    """Pretend to be on a GPU and record what would be launched, instead of launching."""
    recorded: list[Any] = []
    monkeypatch.setattr(backend, "has_gpu", lambda: True)
    monkeypatch.setattr(pp, "launch_prefill", lambda problem, *arrays: recorded.append((problem, arrays)))
    return recorded


@pytest.mark.skipif(backend.has_gpu(), reason="builds NumPy inputs; the GPU tests below cover the device path")
@pytest.mark.parametrize(("call", "error", "message"), BAD_INPUTS)
def test_bad_inputs_are_refused_before_any_launch(rng, launches, call, error, message):
    with pytest.raises(error, match=message):
        call(small_batch(rng))
    assert launches == []


@pytest.mark.skipif(backend.has_gpu(), reason="builds NumPy inputs; the GPU tests below cover the device path")
def test_table_entries_past_a_sequences_blocks_are_never_checked_or_read(rng, launches):
    batch = small_batch(rng)
    assert batch.block_tables[0, -1] == -1  # the first sequence needs 1 block of the 2 a row holds
    prefill(batch)
    ((problem, arrays),) = launches
    assert problem.max_blocks_per_seq == 2 and arrays[1] is batch.query


@pytest.mark.skipif(backend.has_gpu(), reason="the CPU path: tiled_prefill in float32")
@pytest.mark.parametrize("dtype", pp.ELEMENT_TYPES)
def test_cpu_mode_computes_the_tiles_in_numpy(rng, dtype):
    batch = small_batch(rng, dtype)
    out = prefill(batch)
    assert out.dtype == batch.query.dtype and out.shape == batch.query.shape
    expected = prefill_reference(*(a.astype(np.float64) if a.dtype.kind == "f" else a for a in batch.arrays()))
    assert relative_error(out.astype(np.float32), expected) < tolerance_for(dtype)


# ---- the kernel's fragment plan, lane by lane, on the NumPy model of ldmatrix and mma.sync ------------------
# These functions restate paged_prefill.cu's index formulas (marked "as in the .cu"). They check that the formulas
# fit together (swizzled addresses, ldmatrix lane addresses, register pairs, P packed from S); they do not check the
# CUDA itself, which only a GPU run does.


def swizzled_tile(logical: np.ndarray) -> np.ndarray:
    """A [rows, head_dim] tile as the .cu file stores it: chunk c of row r at chunk c ^ (r % 8)."""
    rows, head_dim = logical.shape
    stored = np.empty_like(logical)
    for r in range(rows):
        for c in range(head_dim // 8):
            stored[r, 8 * (c ^ (r & 7)):8 * (c ^ (r & 7)) + 8] = logical[r, 8 * c:8 * c + 8]
    return stored


def lane_address(row: int, chunk: int) -> tuple[int, int]:
    return row, 8 * (chunk ^ (row & 7))  # swizzled<HEAD_DIM>(row, chunk), as (row, column)


def mma(d: np.ndarray, a: np.ndarray, b: np.ndarray, rounding: Any) -> np.ndarray:
    """mma.sync m16n8k16 on per-lane registers: ``a`` [32, 8], ``b`` [32, 4], ``d`` [32, 4] (fp32)."""
    big_a, big_b = np.zeros((16, 16)), np.zeros((16, 8))
    for lane in range(32):
        for i in range(8):
            big_a[fragments.a_element(lane, i)] = rounding(a[lane, i])
        for i in range(4):
            big_b[fragments.b_element(lane, i)] = rounding(b[lane, i])
    product = big_a @ big_b
    return d + np.array([[product[fragments.c_element(lane, i)] for i in range(4)] for lane in range(32)])


def emulate_warp(q_tile: np.ndarray, k_tiles: list[np.ndarray], v_tiles: list[np.ndarray], positions: np.ndarray,
                 query_start: int, scale_log2: float, first_row: int, rounding: Any) -> np.ndarray:
    """The 16 output rows of one m16 tile of a warp (block rows ``first_row`` .. + 15) after the key loop, computed
    the .cu file's way, register by register. A warp's other m16 tile runs the same plan on the same fragments."""
    head_dim, key_tile, lanes = q_tile.shape[1], k_tiles[0].shape[0], np.arange(32)
    stored_q = swizzled_tile(q_tile)
    q = [fragments.ldmatrix(stored_q, [lane_address(first_row + lane % 16, 2 * k + lane // 16) for lane in lanes])
         for k in range(head_dim // 16)]
    o = np.zeros((head_dim // 8, 32, 4))
    m, l_sum = np.full((32, 2), -np.inf), np.zeros((32, 2))  # the .cu file's m and l
    row_position = positions[lanes[:, None] // 4 + 8 * np.arange(2)[None, :]]  # [lane, half]
    for t, (keys, values) in enumerate(zip(k_tiles, v_tiles, strict=True)):
        stored_k, stored_v = swizzled_tile(keys), swizzled_tile(values)
        s = np.zeros((key_tile // 8, 32, 4))
        for k in range(head_dim // 16):
            for n in range(0, key_tile // 8, 2):
                b = fragments.ldmatrix(stored_k, [lane_address(n * 8 + (lane // 8 // 2) * 8 + lane % 8,
                                                               2 * k + lane // 8 % 2) for lane in lanes])
                s[n] = mma(s[n], q[k], b[:, :4], rounding)
                s[n + 1] = mma(s[n + 1], q[k], b[:, 4:], rounding)
        tile_start = t * key_tile
        s *= scale_log2
        if tile_start + key_tile - 1 > query_start:  # the diagonal
            key = (tile_start + np.arange(key_tile // 8)[:, None, None] * 8 + 2 * (lanes[None, :, None] % 4)
                   + np.arange(4) % 2)
            s = np.where(key > row_position[None, :, np.arange(4) // 2], -np.inf, s)
        for half in range(2):
            top = np.maximum(m[:, half], s[:, :, 2 * half:2 * half + 2].max(axis=(0, 2)))
            top = top.reshape(8, 4).max(axis=1).repeat(4)  # quad_max
            base = np.where(top == -np.inf, 0.0, top)
            rescale = np.exp2(m[:, half] - base)
            m[:, half] = top
            s[:, :, 2 * half:2 * half + 2] = np.exp2(s[:, :, 2 * half:2 * half + 2] - base[None, :, None])
            l_sum[:, half] = l_sum[:, half] * rescale + s[:, :, 2 * half:2 * half + 2].sum(axis=(0, 2))
            o[:, :, 2 * half:2 * half + 2] *= rescale[None, :, None]
        for j in range(key_tile // 16):
            p = np.concatenate([s[2 * j][:, :2], s[2 * j][:, 2:], s[2 * j + 1][:, :2], s[2 * j + 1][:, 2:]], axis=1)
            for d in range(0, head_dim // 8, 2):
                b = fragments.ldmatrix(stored_v, [lane_address(16 * j + (lane // 8 % 2) * 8 + lane % 8,
                                                               d + lane // 8 // 2) for lane in lanes], trans=True)
                o[d] = mma(o[d], p, b[:, :4], rounding)
                o[d + 1] = mma(o[d + 1], p, b[:, 4:], rounding)
    total = l_sum.reshape(8, 4, 2).sum(axis=1).repeat(4, axis=0)  # quad_sum
    out = np.empty((16, head_dim))
    for lane in lanes:
        for d in range(head_dim // 8):
            for i in range(4):
                row, col = fragments.c_element(lane, i)
                out[row, d * 8 + col] = o[d, lane, i] / total[lane, i // 2]
    return out


@pytest.mark.parametrize(("head_dim", "query_start", "group"), [(64, 70, 1), (128, 100, 4)])
def test_the_kernels_fragment_plan_computes_causal_attention(rng, head_dim, query_start, group):
    """A block of ROWS rows at positions from ``query_start`` reads its key tiles, the last ones diagonal; the
    second m16 tile of warp 2 comes out as the softmax of its rows' visible keys (fp16 rounding of the mma inputs,
    as on the tensor cores)."""
    rows_a_block, key_tile = pp.ROWS, pp.KEY_TILE
    positions = query_start + np.arange(rows_a_block) // group
    key_count = math.ceil((positions[-1] + 1) / key_tile) * key_tile
    queries, keys, values = (rng.standard_normal((n, head_dim)) for n in (rows_a_block, key_count, key_count))
    keys[positions[-1] + 1:] = 0.0  # zero-filled by cp.async past the block's last query
    values[positions[-1] + 1:] = 0.0
    scale = 1 / math.sqrt(head_dim)

    def rounding(v: np.ndarray) -> np.ndarray:
        return np.float16(v).astype(np.float64)

    first_row = 2 * pp.TILING.m_tiles * 16 + 16 * (pp.TILING.m_tiles - 1)  # warp 2's last m16 tile
    rows = positions[first_row:first_row + 16]
    tiles = range(0, key_count, key_tile)
    out = emulate_warp(queries, [keys[t:t + key_tile] for t in tiles], [values[t:t + key_tile] for t in tiles],
                       rows, query_start, scale * math.log2(math.e), first_row, rounding)
    logits = queries[first_row:first_row + 16] @ keys.T * scale
    logits[np.arange(key_count)[None, :] > rows[:, None]] = -np.inf
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected = weights @ values / weights.sum(axis=1, keepdims=True)
    assert relative_error(out, expected) < 3e-3


# ---- on a GPU: the kernel against the float64 reference -----------------------------------------------------

GPU_BATCHES = {  # (new tokens, cached prefix) per sequence, heads, kv heads, block size
    "one token, no prefix": ([1], [0], 4, 4, 16),
    "ragged whole prompts": ([1, 17, 64, 130, 3], [0, 0, 0, 0, 0], 8, 2, 16),
    "chunks cutting blocks": ([11, 64, 29, 65], [5, 37, 100, 16], 8, 2, 16),
    "prefix-cache hits of several blocks": ([1, 100, 7], [96, 256, 64], 4, 1, 32),
    "block size 8, odd group of 7": ([33, 2], [9, 70], 7, 1, 8),
    "long prompt, MHA": ([300], [200], 4, 4, 16),
}


def case_batch(rng: np.random.Generator, case: str, head_dim: int) -> PrefillBatch:
    new_lens, prefix_lens, num_heads, num_kv_heads, block_size = GPU_BATCHES[case]
    return random_prefill_batch(rng, new_lens, prefix_lens, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                head_dim=head_dim, block_size=block_size)


def assert_within_tolerance(got: np.ndarray, expected: np.ndarray, dtype: str) -> None:
    error = relative_error(got, expected)
    assert error < tolerance_for(dtype), f"relative error {error:.3g} over {tolerance_for(dtype)} for {dtype}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", pp.ELEMENT_TYPES)
@pytest.mark.parametrize("head_dim", pp.HEAD_DIMS)
@pytest.mark.parametrize("case", GPU_BATCHES)
def test_the_kernel_matches_the_float64_reference(rng, case, head_dim, dtype):
    assert_matches_reference(case_batch(rng, case, head_dim), dtype,
                             lambda out, arrays: pp.paged_prefill(*arrays, out=out, dtype=dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("tiling", pp.TILINGS)
@pytest.mark.parametrize("case", ["ragged whole prompts", "chunks cutting blocks", "block size 8, odd group of 7"])
def test_every_tiling_matches_the_float64_reference(rng, case, tiling):
    """The benchmark times every tiling: each must be right before its time means anything."""
    dtype = "bfloat16"

    def launch(out: Any, arrays: tuple[Any, ...]) -> Any:
        problem = pp.check_prefill_problem(*arrays, dtype=dtype)
        pp.launch_prefill(problem, out, *arrays, tiling=pp.TILINGS[tiling])
        return out

    assert_matches_reference(case_batch(rng, case, 128), dtype, launch)


def assert_matches_reference(batch: PrefillBatch, dtype: str, run: Any) -> None:
    """``run(out, device arrays)`` writes into a poisoned buffer with one more poisoned row: every row it owns must
    be written, the extra row untouched, and the result within tolerance of float64."""
    num_heads, head_dim = batch.query.shape[1:]
    arrays = device_batch(batch, dtype)
    total = batch.query.shape[0]
    storage = dtypes.empty((1,), dtype).dtype
    padded = poison((total + 1, num_heads, head_dim), storage)  # one poisoned token row past the end
    out = run(padded[:total], arrays)
    backend.synchronize()
    assert not is_poison(out).any(), "some outputs were never written"
    assert is_poison(padded[total]).all(), "the kernel wrote past the end of out"
    rounded = [dtypes.to_float32(a, dtype).astype(np.float64) for a in arrays[:3]]
    assert_within_tolerance(dtypes.to_float32(out, dtype), prefill_reference(*rounded, *batch.arrays()[3:]), dtype)


# ---- on the CPU: the kernel itself, on the warp emulator, against the same reference --------------------------

needs_emulator = pytest.mark.skipif(emulator.emulator_problem() is not None, reason=str(emulator.emulator_problem()))


def emulated(batch: PrefillBatch, dtype: str, source: str | None = None, copies_at_issue: bool = False) -> np.ndarray:
    """The kernel's output for ``batch`` (queries and caches rounded to ``dtype``), run on the warp emulator from
    paged_prefill.cu or from ``source``; checks that every output row is written and nothing past them."""
    host = dtypes.host_dtype(dtype)
    arrays = tuple(a.astype(host) if a.dtype.kind == "f" else a for a in batch.arrays())
    problem = pp.check_prefill_problem(*arrays, on_host=True)
    total, heads, head_dim = arrays[0].shape
    padded = np.full((total + 1, heads, head_dim), np.nan, host)  # one poisoned token row past the end
    pp.emulate_prefill(problem, padded[:total], *arrays, source=source, copies_at_issue=copies_at_issue)
    out = padded.astype(np.float32)
    assert not np.isnan(out[:total]).any(), "some outputs were never written"
    assert np.isnan(out[total]).all(), "the kernel wrote past the end of out"
    return out[:total]


def reference_for(batch: PrefillBatch, dtype: str) -> np.ndarray:
    host = dtypes.host_dtype(dtype)
    return prefill_reference(*(a.astype(host).astype(np.float64) if a.dtype.kind == "f" else a
                               for a in batch.arrays()))


@needs_emulator
@pytest.mark.parametrize("dtype", pp.ELEMENT_TYPES)
@pytest.mark.parametrize("head_dim", pp.HEAD_DIMS)
@pytest.mark.parametrize("case", GPU_BATCHES)
def test_the_kernel_run_by_the_warp_emulator_matches_the_float64_reference(rng, case, head_dim, dtype):
    """The GPU test's batches, through paged_prefill.cu's own code on the CPU (course_lib.emulator)."""
    batch = case_batch(rng, case, head_dim)
    assert_within_tolerance(emulated(batch, dtype), reference_for(batch, dtype), dtype)


@needs_emulator
def test_the_kernel_is_right_whether_copies_land_at_once_or_at_their_wait(rng):
    """The two extremes a GPU may choose between: a kernel that read a stage before waiting for it would differ."""
    batch = random_prefill_batch(rng, [130, 9], [70, 0], num_heads=8, num_kv_heads=2, head_dim=64, block_size=16)
    expected = reference_for(batch, "float16")
    for copies_at_issue in (False, True):
        assert relative_error(emulated(batch, "float16", copies_at_issue=copies_at_issue), expected) < 1e-2


@needs_emulator
@pytest.mark.parametrize("slip", kernel_slips.PREFILL_SLIPS)
def test_the_emulated_check_catches_a_slipped_kernel(rng, slip):
    source = kernel_slips.with_slip(cuda_compile.kernel_path(pp.SOURCE).read_text(), slip)
    batch = random_prefill_batch(rng, [100, 7], [40, 0], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16)
    assert relative_error(emulated(batch, "float16", source), reference_for(batch, "float16")) > 0.05


def test_a_slip_that_no_longer_fits_the_kernel_is_named():
    with pytest.raises(ValueError, match="not in the source exactly once"):
        kernel_slips.with_slip("// an edited kernel", "V read without .trans")
    with pytest.raises(KeyError, match="the slips are"):
        kernel_slips.with_slip("", "no such slip")


@pytest.mark.gpu
def test_the_kernel_takes_a_scale_and_agrees_on_every_row(rng):
    batch = random_prefill_batch(rng, [70, 5], [30, 0], num_heads=8, num_kv_heads=2, head_dim=128, block_size=16)
    arrays = device_batch(batch, "bfloat16")
    out = dtypes.to_float32(pp.paged_prefill(*arrays, scale=0.3, dtype="bfloat16"), "bfloat16")
    rounded = [dtypes.to_float32(a, "bfloat16").astype(np.float64) for a in arrays[:3]]
    expected = prefill_reference(*rounded, *batch.arrays()[3:], scale=0.3)
    worst = max(relative_error(out[t], expected[t]) for t in range(out.shape[0]))  # no row may be off, however few
    assert worst < 3 * tolerance_for("bfloat16")
