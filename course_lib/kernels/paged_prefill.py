"""Prefill attention over the paged KV cache on the tensor cores: input checks, launch configuration and launcher.

``paged_prefill.cu`` is FlashAttention-2's loop over a paged cache (``paged_prefill_reference.tiled_prefill`` is
the same loop in NumPy): a thread block owns 128 query rows of one sequence and one kv head (32 a warp), streams
key/value tiles of 32 positions through shared memory with ``cp.async``, and runs ``S = Q Kᵀ`` and ``O += P V`` as
``mma.sync`` m16n8k16 products with an online softmax in registers. Its tiling is a pair of template parameters
(:class:`Tiling`); the first version's, 64 rows a block, is built too, so the benchmark can time one against the
other.

STATUS: the kernel compiles for sm_80 and sm_90 (its resource report is tested on any machine). Its GPU tests
(``tests/test_paged_prefill_kernel.py``, marked ``gpu``: the float64 reference on ragged batches, chunks, prefix hits,
both head sizes and both types) passed on an H100 80GB node (2026-12-07) for the first tiling; the second, which
launches use, has not run on a GPU yet. On the CPU the course's warp emulator runs it
(:func:`emulate_prefill`) and it matches the same reference on the same batches there; the engine's mixed steps give
the dense model's logits through it. The engine's steps with prompt tokens call it
(``engine.model.LlamaModel.attend``); ``python -m course_lib.bench prefill`` times it against PyTorch's SDPA.

The layout is ``paged_attention``'s (caches ``[num_blocks, num_kv_heads, block_size, head_dim]``, int32 block
tables) and the batch is flat as in ``paged_prefill_reference``: ``query [total_new_tokens, num_heads, head_dim]``,
sequence ``s`` owning rows ``query_start_loc[s]:query_start_loc[s + 1]`` at positions ``context_lens[s] - new ..
context_lens[s] - 1``; the keys and values of those positions are in the cache already. The kernel takes float16 or
bfloat16 (tensor-core inputs) with head_dim 64 or 128 and needs sm_80 or newer.

Why the checks are strict: a kernel follows whatever block id, offset or length it is handed. A wrong entry reads
another sequence's keys, or memory outside the cache, silently. So :func:`check_prefill_problem` reads the small
index arrays on the host and checks every entry the kernel will follow before anything launches, reusing the
decode launcher's checks (``paged_attention``) and the reference's (``paged_prefill_reference``). In CPU mode the
same checks run and ``tiled_prefill`` computes the result in float32 (the kernel's accumulators), rounded to the
inputs' type.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from course_lib import backend, dtypes, emulator
from course_lib import compile as cuda_compile
from course_lib.kernels import paged_attention as pa
from course_lib.kernels import paged_prefill_reference as reference

SOURCE = "paged_prefill.cu"
HEAD_DIMS = (64, 128)  # the head sizes paged_prefill.cu is instantiated for
ELEMENT_TYPES = ("float16", "bfloat16")  # mma.sync's m16n8k16 inputs; it accumulates in fp32
# These mirror prefill::THREADS and STAGES in the .cu file (a test checks that they agree).
THREADS = 128
STAGES = 2  # key/value tiles in shared memory at once
MAX_GRID_YZ = 65535  # CUDA's limit on gridDim.y (kv heads) and gridDim.z (sequences)
MIN_ARCH = (8, 0)  # cp.async, ldmatrix and bf16 mma.sync


@dataclass(frozen=True)
class Tiling:
    """How a thread block cuts its work: the kernel's ``M_TILES`` and ``KEY_TILE`` template parameters."""

    m_tiles: int  # m16 tiles of query rows per warp: each K/V fragment from shared memory feeds that many mma.sync
    key_tile: int  # key positions per step of the key loop

    @property
    def rows(self) -> int:
        """Query rows a block owns: 4 warps x ``m_tiles`` x 16."""
        return THREADS // 32 * self.m_tiles * 16


# The tilings paged_prefill.cu is instantiated for (a test checks the list), oldest first: the benchmark times each.
TILINGS = {
    "v1: 16 rows a warp": Tiling(m_tiles=1, key_tile=64),  # the first version: shared memory set its pace
    "v2: 32 rows a warp": Tiling(m_tiles=2, key_tile=32),  # each K/V fragment feeds two mma.sync
}
TILING = TILINGS["v2: 32 rows a warp"]  # the one launches use
ROWS, KEY_TILE = TILING.rows, TILING.key_tile  # 128 rows (32 positions x 4 heads at G = 4), key tiles of 32


@dataclass(frozen=True)
class Prefill:
    """A validated prefill step: ``total_tokens`` new tokens of ``num_seqs`` sequences over a paged cache."""

    cache: pa.Cache
    num_heads: int
    num_seqs: int
    total_tokens: int
    max_query_len: int  # new tokens of the longest sequence of the step: the grid is sized by it
    max_blocks_per_seq: int
    scale: float

    @property
    def group(self) -> int:
        """Query heads per kv head: a block's rows are (position, head) pairs over one such group."""
        return self.num_heads // self.cache.num_kv_heads


# ---- input checks: every index the kernel follows is checked here, before anything could launch ------------


def check_prefill_problem(query: Any, key_cache: Any, value_cache: Any, block_tables: Any, query_start_loc: Any,
                          context_lens: Any, scale: float | None = None, dtype: str | None = None, *,
                          on_host: bool = False) -> Prefill:
    """Validate a prefill step, every index included, and return its shape.

    Types and shapes first (nothing is read back), then the index arrays on the host: ``block_tables`` entries in
    the pool for every block a sequence reads, ``1 <= context_len <= max_blocks_per_seq * block_size``, and
    ``query_start_loc`` rising from 0 to ``total_new_tokens`` with each sequence's new tokens fitting its context.
    The arrays are the current mode's (CuPy on a GPU), or NumPy ones ``on_host``: :func:`emulate_prefill`'s.
    """
    pa.require_device_arrays({"query": query, "key_cache": key_cache, "value_cache": value_cache,
                              "block_tables": block_tables, "query_start_loc": query_start_loc,
                              "context_lens": context_lens}, on_host)
    if str(getattr(query_start_loc, "dtype", None)) != "int32" or query_start_loc.ndim != 1:
        raise TypeError(f"query_start_loc must be a 1-D int32 array [num_seqs + 1], got "
                        f"{getattr(query_start_loc, 'dtype', type(query_start_loc).__name__)} of shape "
                        f"{getattr(query_start_loc, 'shape', None)}")
    # The index arrays are small: one host copy each serves every check (a device-to-host copy on a GPU).
    tables, starts, lens = (backend.to_numpy(a) for a in (block_tables, query_start_loc, context_lens))
    problem = prefill_problem(query, key_cache, value_cache, np.diff(starts), int(tables.shape[1]), scale, dtype)
    pa.validate_block_tables(tables, lens, problem.cache.num_blocks, problem.cache.block_size)
    reference.check_prefill_inputs(query, key_cache, value_cache, tables, starts, lens)
    return problem


def prefill_problem(query: Any, key_cache: Any, value_cache: Any, query_lens: np.ndarray, max_blocks_per_seq: int,
                    scale: float | None = None, dtype: str | None = None) -> Prefill:
    """The shape of a prefill step whose index arrays the caller has checked (an engine's ``StepBatch.check``):
    types and shapes are checked here, from the host's ``query_lens`` (new tokens per sequence), and nothing is
    read back from the device."""
    cache = pa.check_cache(key_cache, value_cache, dtype)
    if cache.dtype not in ELEMENT_TYPES:
        raise TypeError(f"the prefill kernel feeds the tensor cores, which take {' or '.join(ELEMENT_TYPES)} "
                        f"(accumulating in fp32); got {cache.dtype}")
    if cache.head_dim not in HEAD_DIMS:
        raise ValueError(f"paged_prefill.cu is built for head_dim in {HEAD_DIMS}, got {cache.head_dim}")
    num_heads = pa.check_heads("query", query, cache, dtype)
    query_lens = np.asarray(query_lens, dtype=np.int64)
    num_seqs = int(query_lens.size)
    if num_seqs < 1 or num_seqs > MAX_GRID_YZ or cache.num_kv_heads > MAX_GRID_YZ:
        raise ValueError(f"one launch takes 1 to {MAX_GRID_YZ} sequences and at most {MAX_GRID_YZ} kv heads (the "
                         f"grid's z and y), got {num_seqs} sequences and {cache.num_kv_heads} kv heads")
    max_query_len = int(query_lens.max())
    group = num_heads // cache.num_kv_heads
    if max_query_len * group > pa.MAX_INT32 or int(query.shape[0]) * num_heads > pa.MAX_INT32:
        raise ValueError(f"rows of (token, head) must fit an int32: {query.shape[0]} tokens x {num_heads} heads")
    return Prefill(cache, num_heads, num_seqs, int(query.shape[0]), max_query_len, max_blocks_per_seq,
                   pa.check_scale(scale, cache.head_dim))


def supports(dtype: str, head_dim: int) -> bool:
    """Whether the kernel is built for this element type and head size (an engine falls back to decode rows)."""
    return dtype in ELEMENT_TYPES and head_dim in HEAD_DIMS


def unsupported_reason() -> str | None:
    """Why this device cannot run the kernel, or None when it can (CPU mode always can: NumPy computes)."""
    if not backend.has_gpu():
        return None
    major, minor = backend.compute_capability()
    if (major, minor) < MIN_ARCH:
        return f"cp.async, ldmatrix and bf16 mma.sync need sm_80 or newer; this GPU is sm_{major}{minor}"
    return None


# ---- the launch configuration ----------------------------------------------------------------------------------


def prefill_grid(problem: Prefill, tiling: Tiling = TILING) -> tuple[int, int, int]:
    """(query tiles, kv heads, sequences): one block per ``tiling.rows`` rows of (position, head) pairs of one kv
    head group.

    The x extent fits the longest sequence; the blocks of shorter ones past their rows return at once.
    """
    return (math.ceil(problem.max_query_len * problem.group / tiling.rows), problem.cache.num_kv_heads,
            problem.num_seqs)


def shared_bytes(head_dim: int, dtype: str, tiling: Tiling = TILING) -> int:
    """Dynamic shared memory of one block: its query tile and STAGES tiles of keys and of values.

    64 KiB at head_dim 128 in fp16/bf16 (128 query rows, key tiles of 32): above the 48 KiB a kernel gets without
    asking, within an A100's 164 KiB and an H100's 228 KiB.
    """
    return (tiling.rows + STAGES * 2 * tiling.key_tile) * head_dim * dtypes.ITEM_BYTES[dtype]


def kernel_name(dtype: str, head_dim: int, tiling: Tiling = TILING) -> str:
    """The name expression of one instantiation of ``paged_prefill``."""
    return f"paged_prefill<{dtypes.CUDA_TYPES[dtype]}, {head_dim}, {tiling.m_tiles}, {tiling.key_tile}>"


def kernel_names(tilings: tuple[Tiling, ...] = tuple(TILINGS.values())) -> tuple[str, ...]:
    """The instantiations in paged_prefill.cu of these tilings (all of them by default), as name expressions."""
    return tuple(kernel_name(kind, head_dim, tiling) for tiling in tilings for kind in ELEMENT_TYPES
                 for head_dim in HEAD_DIMS)


@functools.cache
def _kernel(name: str, shared: int) -> Any:
    module = cuda_compile.load_file(SOURCE, name_expressions=kernel_names())
    return cuda_compile.allow_shared_memory(module.get_function(name), shared)


Launch = tuple[tuple[int, int, int], tuple[int], tuple[Any, ...], int]  # grid, block, kernel arguments, shared bytes


def launch_arguments(problem: Prefill, out: Any, query: Any, key_cache: Any, value_cache: Any, block_tables: Any,
                     query_start_loc: Any, context_lens: Any, tiling: Tiling = TILING) -> Launch:
    """(grid, block, kernel arguments, dynamic shared bytes) of one launch, outputs first as in paged_prefill.cu."""
    cache = problem.cache
    arguments = (out, query, key_cache, value_cache, block_tables, query_start_loc, context_lens,
                 np.int32(problem.num_heads), np.int32(cache.num_kv_heads), np.int32(cache.block_size),
                 np.int32(problem.max_blocks_per_seq), np.float32(problem.scale * math.log2(math.e)))
    return prefill_grid(problem, tiling), (THREADS,), arguments, shared_bytes(cache.head_dim, cache.dtype, tiling)


def launch_prefill(problem: Prefill, *arrays: Any, tiling: Tiling = TILING) -> None:
    """Launch the kernel on checked device arrays (``out, query, key_cache, value_cache, block_tables,
    query_start_loc, context_lens``), in the course's tiling unless another of :data:`TILINGS` is named."""
    if reason := unsupported_reason():
        raise RuntimeError(f"paged_prefill cannot run here: {reason}")
    grid, block, arguments, shared = launch_arguments(problem, *arrays, tiling=tiling)
    _kernel(kernel_name(problem.cache.dtype, problem.cache.head_dim, tiling), shared)(grid, block, arguments,
                                                                                      shared_mem=shared)


def emulate_prefill(problem: Prefill, *arrays: Any, source: str | None = None, copies_at_issue: bool = False) -> None:
    """Run paged_prefill.cu itself on the CPU, on the course's warp emulator, over NumPy arrays (in the order of
    :func:`launch_prefill`) checked by ``check_prefill_problem(..., on_host=True)``: slow, for a few thread blocks,
    and how the kernel is checked without a GPU (in GPU mode too: the emulator always runs on the CPU).

    ``source`` replaces the file's text (a what-if, or a slip to see what the check reports); ``copies_at_issue``
    lands every ``cp.async`` at once instead of at its wait.
    """
    grid, block, arguments, shared = launch_arguments(problem, *arrays)
    name = kernel_name(problem.cache.dtype, problem.cache.head_dim)
    if source is None:
        module = emulator.load_file(SOURCE, name_expressions=kernel_names((TILING,)))
    else:
        module = emulator.EmulatedModule(source, (name,))
    module.get_function(name)(grid, block, arguments, shared, copies_at_issue=copies_at_issue)


def paged_prefill(query: Any, key_cache: Any, value_cache: Any, block_tables: Any, query_start_loc: Any,
                  context_lens: Any, *, scale: float | None = None, out: Any = None, dtype: str | None = None) -> Any:
    """Causal attention of a flat batch of new tokens over the paged cache: ``[total_new_tokens, num_heads,
    head_dim]`` in the query's type.

    Every input is checked first (:func:`check_prefill_problem`), then :func:`prefill_unchecked` runs.
    ``out`` (default: a new array) must be C-contiguous, of the query's shape and type.
    """
    problem = check_prefill_problem(query, key_cache, value_cache, block_tables, query_start_loc, context_lens,
                                    scale, dtype)
    out = pa.output_buffer(out, tuple(query.shape), problem.cache.dtype, dtype)
    prefill_unchecked(problem, out, query, key_cache, value_cache, block_tables, query_start_loc, context_lens)
    return out


def prefill_unchecked(problem: Prefill, out: Any, query: Any, key_cache: Any, value_cache: Any, block_tables: Any,
                      query_start_loc: Any, context_lens: Any) -> None:
    """Prefill attention of a checked ``problem`` into ``out``: the tensor-core kernel on a GPU; in CPU mode
    ``tiled_prefill``, the same tiles in NumPy in float32 (the kernel's accumulators), rounded to the inputs' type.
    Nothing is checked or read back: the caller vouches for every index."""
    if backend.has_gpu():
        launch_prefill(problem, out, query, key_cache, value_cache, block_tables, query_start_loc, context_lens)
        return
    kind = problem.cache.dtype
    out[...] = reference.tiled_prefill(dtypes.widen(query, kind), dtypes.widen(key_cache, kind),
                                       dtypes.widen(value_cache, kind), block_tables, query_start_loc, context_lens,
                                       problem.scale, query_tile=ROWS // problem.group or 1,
                                       key_tile=KEY_TILE).astype(out.dtype)
