"""Paged decode attention (v1) as a Numba CUDA kernel: the algorithm of ``paged_attention.cu`` in Python.

One thread block per (sequence, query head). Its threads first share out the context's tokens: each
follows the block table to its tokens' keys and computes their logits into shared memory. The block
then finds the largest logit, turns logits into ``exp(logit - max)`` (so nothing overflows) and sums
them; last, the threads share out the ``head_dim`` output elements, each a weighted sum of values.
Everything is accumulated in float32.

It is the teaching version: float32 caches, and every logit of a context kept in shared memory,
which caps the context at ``MAX_CONTEXT_LEN`` tokens (v2's partitions lift that cap). It runs in
Numba's simulator in CPU mode (small sizes only: the simulator is slow) and compiled on a GPU. The
cache layout and the input checks are those of :mod:`course_lib.kernels.paged_attention`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import float32

from course_lib import backend
from course_lib.kernels import paged_attention

cuda = backend.numba_cuda()

THREADS = 32  # a power of two, for the tree reductions
SHARED_BYTES = 48 * 1024  # the shared memory a block may use without opting in
MAX_CONTEXT_LEN = SHARED_BYTES // 4 - paged_attention.MAX_HEAD_DIM - THREADS  # float32 logits beside q and partials
MAX_HEAD_DIM = paged_attention.MAX_HEAD_DIM


@cuda.jit(device=True)
def block_reduce(partials, value, take_max):
    """The max (``take_max``) or the sum of every thread's ``value``, returned to all threads of the block."""
    t = cuda.threadIdx.x
    partials[t] = value
    cuda.syncthreads()
    half = THREADS // 2
    while half > 0:
        if t < half:
            other = partials[t + half]
            partials[t] = max(partials[t], other) if take_max else partials[t] + other
        cuda.syncthreads()
        half //= 2
    result = partials[0]
    cuda.syncthreads()  # everyone has read the result before partials is used again
    return result


@cuda.jit
def paged_decode_kernel(out, query, key_cache, value_cache, block_tables, context_lens, scale, queries_per_kv):
    """``out[seq, head]``: softmax(q . K / sqrt(d)) V over the sequence's paged context; grid (heads, seqs)."""
    head, seq = cuda.blockIdx.x, cuda.blockIdx.y
    t = cuda.threadIdx.x
    kv_head = head // queries_per_kv  # grouped-query attention: query heads share a kv head
    head_dim, block_size = query.shape[2], key_cache.shape[2]
    context_len = context_lens[seq]
    q = cuda.shared.array(MAX_HEAD_DIM, float32)
    partials = cuda.shared.array(THREADS, float32)
    logits = cuda.shared.array(0, float32)  # context_len of them: sized at launch

    for d in range(t, head_dim, THREADS):
        q[d] = query[seq, head, d] * scale  # scaled once here, not once per token
    cuda.syncthreads()

    thread_max = float32(-math.inf)
    for token in range(t, context_len, THREADS):
        block = block_tables[seq, token // block_size]  # the table turns a position into a block
        offset = token % block_size
        dot = float32(0)
        for d in range(head_dim):
            dot += q[d] * key_cache[block, kv_head, offset, d]
        logits[token] = dot
        thread_max = max(thread_max, dot)
    max_logit = block_reduce(partials, thread_max, True)

    thread_sum = float32(0)
    for token in range(t, context_len, THREADS):
        weight = math.exp(logits[token] - max_logit)
        logits[token] = weight
        thread_sum += weight
    exp_sum = block_reduce(partials, thread_sum, False)  # the barrier inside also publishes the weights

    for d in range(t, head_dim, THREADS):
        acc = float32(0)
        for token in range(context_len):
            block = block_tables[seq, token // block_size]
            acc += logits[token] * value_cache[block, kv_head, token % block_size, d]
        out[seq, head, d] = acc / exp_sum


def paged_decode_numba(query: Any, key_cache: Any, value_cache: Any, block_tables: Any, context_lens: Any, *,
                       scale: float | None = None, out: Any = None) -> Any:
    """Decode attention with the Numba kernel: float32 ``[num_seqs, num_heads, head_dim]``.

    Same arguments and layout as :func:`paged_attention.paged_attention_decode`, float32 only.
    """
    problem = paged_attention.check_decode_inputs(query, key_cache, value_cache, block_tables, context_lens, scale)
    if problem.cache.dtype != "float32":
        raise TypeError(f"the Numba kernel reads float32 caches, got {problem.cache.dtype}; "
                        "paged_attention_decode runs the float16/bfloat16 kernels")
    if problem.max_context_len > MAX_CONTEXT_LEN:
        raise ValueError(f"the Numba kernel keeps every logit in shared memory, so a context may hold at most "
                         f"{MAX_CONTEXT_LEN} tokens, got {problem.max_context_len}; v2's partitions lift this cap")
    paged_attention.require_device_arrays({"query": query, "key_cache": key_cache, "value_cache": value_cache,
                                           "block_tables": block_tables, "context_lens": context_lens})
    out = paged_attention.output_buffer(out, tuple(query.shape), "float32")
    grid = (problem.num_heads, problem.rows)
    logits_bytes = 4 * problem.max_context_len
    paged_decode_kernel[grid, THREADS, 0, logits_bytes](out, query, key_cache, value_cache, block_tables,
                                                        context_lens, np.float32(problem.scale),
                                                        np.int32(problem.queries_per_kv))
    return out
