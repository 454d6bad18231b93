"""Paged decode attention against copy bandwidth and PyTorch's SDPA, bf16 (chapter 04).

A decode step reads every cached key and value of every sequence once and does little arithmetic on
them, so its ceiling is a copy of the same bytes: achieved GB/s counts K and V read plus q read and
the output written, and each shape's copy runs in the same run (a device-to-device copy of the K+V
byte count, capped at COPY_CAP: past a few hundred MiB the copy rate no longer changes).

Shapes: batch {1, 8, 64, 256} x context {512, 4096, 32768}; 32 query heads over 8 KV heads (GQA),
head_dim 128, block size 16. The sequences' blocks are scattered over the pool (a random
permutation), as they are in a running server. The largest shape holds 34 GB of KV, so the caches
are filled on the GPU in chunks rather than copied from the host. PyTorch's
``scaled_dot_product_attention`` runs on contiguous K/V of the same shape (its own buffers, filled
after the paged cache is freed). Every paged result is first checked against the float64 reference
on its first sequence; SDPA is checked against the paged kernel on one small shape. Each step checks
its inputs once (``check_decode_inputs``) and times the launches alone (``decode_unchecked``): a CUDA
graph cannot capture the host copy the block-table check makes.

In CPU mode the suite times the NumPy path on a tiny problem: a smoke test, never shown as GPU
figures. The headline's ``paged_waste_fraction`` is chapter 04's request-mix model (the same in both modes).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from course_lib import backend, dtypes
from course_lib.bench.baselines import copy_bandwidth, require_torch
from course_lib.bench.roofline import achieved_gbps
from course_lib.bench.runner import Step, measurement
from course_lib.bench.timing import Timing, time_call, time_graph, time_torch_graph
from course_lib.kernels import paged_attention as pa
from course_lib.labs import kv_waste

DESCRIPTION = "paged decode attention (v1, v2) vs copy bandwidth and torch SDPA, bf16"
DTYPE = "bfloat16"
BATCHES = (1, 8, 64, 256)
CONTEXTS = (512, 4096, 32768)
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
PARTITION_SIZE = pa.DEFAULT_PARTITION_SIZE
COPY_CAP = 4 << 30
FILL_CHUNK = 1 << 28  # elements generated at a time when filling a cache on the GPU
TOLERANCE = 1e-2
WASTE_REQUESTS, WASTE_SEED = 10_000, 0  # the synthetic request mix of chapter 04 (course_lib.labs.kv_waste)
PARAMETERS = {"dtype": DTYPE, "batches": list(BATCHES), "contexts": list(CONTEXTS), "num_heads": NUM_HEADS,
              "num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK_SIZE,
              "partition_size": PARTITION_SIZE, "timing": "CUDA graph replay",
              "waste_mix": {"requests": WASTE_REQUESTS, "seed": WASTE_SEED}}


def steps(quick: bool) -> list[Step]:
    if not backend.has_gpu():
        return [Step(f"{version} batch 2 x context 40 (NumPy)", functools.partial(measure_smoke, version))
                for version in pa.VERSIONS]
    require_torch("the paged_attention suite's SDPA baseline")
    batches, contexts = ((1, 64), (4096,)) if quick else (BATCHES, CONTEXTS)
    shapes = [(batch, context) for batch in batches for context in contexts]
    measured = [Step(f"{version} {batch} x {context}", functools.partial(measure_paged, version, batch, context))
                for batch, context in shapes for version in pa.VERSIONS]
    measured += [Step(f"SDPA {batch} x {context}", functools.partial(measure_sdpa, batch, context))
                 for batch, context in shapes]
    return measured


def kv_bytes(batch: int, context: int) -> int:
    return 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * dtypes.ITEM_BYTES[DTYPE]


def bytes_moved(batch: int, context: int) -> int:
    """K and V read once, q read and the output written."""
    return kv_bytes(batch, context) + 2 * batch * NUM_HEADS * HEAD_DIM * dtypes.ITEM_BYTES[DTYPE]


# ---- the paged kernels ---------------------------------------------------------------------------------------


def measure_paged(version: str, batch: int, context: int) -> dict[str, Any]:
    """One version on one shape, checked then timed, with the copy of the same bytes measured alongside."""
    copy_gbps = _copy_gbps(min(kv_bytes(batch, context), COPY_CAP))
    problem = _paged_problem(batch, context)
    out = dtypes.empty((batch, NUM_HEADS, HEAD_DIM), DTYPE)
    plan = pa.plan_decode(pa.check_decode_inputs(*problem, dtype=DTYPE), version, PARTITION_SIZE)

    def run() -> Any:
        return pa.decode_unchecked(plan, *problem, out=out)

    error = _check_first_sequence(run(), *problem)
    timing = time_graph(run, calls=_calls(batch, context), repeats=10)
    gbps = achieved_gbps(bytes_moved(batch, context), timing.median_s)
    params = {"version": version, "batch": batch, "context": context, "relative_error": error, "copy_gbps": copy_gbps}
    return measurement(f"{version} {batch} x {context}", timing, params, gbps=gbps, fraction_of_copy=gbps / copy_gbps)


@functools.cache
def _copy_gbps(nbytes: int) -> float:
    """A copy moving ``nbytes`` (read + written), measured once per size in the run: v1 and v2 share it."""
    return copy_bandwidth(nbytes // 2)["derived"]["gbps"]


def _calls(batch: int, context: int) -> int:
    """Launches per graph: enough to run for milliseconds, few for the largest shapes."""
    return max(1, min(50, (1 << 30) // max(1, kv_bytes(batch, context))))


def _paged_problem(batch: int, context: int) -> tuple[Any, ...]:
    """Query, caches, scattered block tables and context lengths for ``batch`` sequences of ``context`` tokens."""
    xp = backend.xp
    blocks_per_sequence = math.ceil(context / BLOCK_SIZE)
    num_blocks = batch * blocks_per_sequence
    cache_shape = (num_blocks, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM)
    tables = np.random.default_rng().permutation(num_blocks).astype(np.int32).reshape(batch, blocks_per_sequence)
    query = dtypes.random_normal((batch, NUM_HEADS, HEAD_DIM), DTYPE, np.random.default_rng())
    lens = xp.full(batch, context, dtype=xp.int32)
    return query, _random_bf16(cache_shape), _random_bf16(cache_shape), xp.asarray(tables), lens


def _random_bf16(shape: tuple[int, ...]) -> Any:
    """Normal random bf16 bits filled on the GPU chunk by chunk (rounded to nearest, ties to even)."""
    xp = backend.xp
    bits = xp.empty(shape, dtype=xp.uint16)
    flat = bits.reshape(-1)
    for start in range(0, flat.size, FILL_CHUNK):
        values = xp.random.standard_normal(min(FILL_CHUNK, flat.size - start), dtype=xp.float32).view(xp.uint32)
        rounded = values + xp.uint32(0x7FFF) + ((values >> 16) & xp.uint32(1))
        flat[start:start + values.size] = (rounded >> 16).astype(xp.uint16)
    return bits


def _check_first_sequence(out: Any, query: Any, key_cache: Any, value_cache: Any, tables: Any, lens: Any) -> float:
    """Relative error of sequence 0 against float64, on a compact copy of just its blocks."""
    xp = backend.xp
    used = tables[0, : math.ceil(int(lens[0]) / BLOCK_SIZE)]
    compact = xp.arange(used.size, dtype=xp.int32)[None, :]
    expected = pa.paged_decode_reference(query[:1], key_cache[used], value_cache[used], compact, lens[:1],
                                         dtype=DTYPE)
    got = dtypes.to_float32(out[:1], DTYPE)
    error = float(np.linalg.norm(got - expected) / np.linalg.norm(expected))
    if not error < TOLERANCE:
        raise RuntimeError(f"paged attention is wrong on random inputs: relative error {error:.3g}")
    return error


# ---- PyTorch's SDPA on contiguous K/V ------------------------------------------------------------------------


def _torch_problem(batch: int, context: int) -> tuple[Any, Any, Any]:
    import torch

    q = torch.randn(batch, NUM_HEADS, 1, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    k, v = (torch.randn(batch, NUM_KV_HEADS, context, HEAD_DIM, dtype=torch.bfloat16, device="cuda") for _ in "kv")
    return q, k, v


def _sdpa(q: Any, k: Any, v: Any) -> Any:
    import torch.nn.functional as functional

    return functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def measure_sdpa(batch: int, context: int) -> dict[str, Any]:
    """torch SDPA (GQA, one query token a sequence) on contiguous K/V of the paged shape."""
    import torch

    backend.xp.get_default_memory_pool().free_all_blocks()  # the paged caches' memory, cached by CuPy: to torch
    agreement = sdpa_agrees_with_paged()
    timing = _time_sdpa(batch, context)
    torch.cuda.empty_cache()  # the contiguous K/V are gone: hand their memory back for the next shape
    params = {"version": "sdpa", "batch": batch, "context": context, "library": f"torch {torch.__version__}",
              "relative_error_vs_paged": agreement}
    return measurement(f"sdpa {batch} x {context}", timing, params,
                       gbps=achieved_gbps(bytes_moved(batch, context), timing.median_s))


def _time_sdpa(batch: int, context: int) -> Timing:
    q, k, v = _torch_problem(batch, context)
    return time_torch_graph(lambda: _sdpa(q, k, v), calls=_calls(batch, context), repeats=10)


@functools.cache
def sdpa_agrees_with_paged() -> float:
    """SDPA and the paged kernel on the same K/V, laid out both ways: their relative difference (checked)."""
    import torch

    batch, context = 4, 1000
    q, k, v = _torch_problem(batch, context)
    blocks = math.ceil(context / BLOCK_SIZE)
    padded = [torch.nn.functional.pad(x, (0, 0, 0, blocks * BLOCK_SIZE - context)) for x in (k, v)]
    caches = [x.reshape(batch, NUM_KV_HEADS, blocks, BLOCK_SIZE, HEAD_DIM).transpose(1, 2)
              .reshape(batch * blocks, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM).contiguous() for x in padded]
    xp = backend.xp
    key_cache, value_cache = (xp.from_dlpack(c.view(torch.int16)).view(xp.uint16) for c in caches)
    query = xp.from_dlpack(q[:, :, 0].contiguous().view(torch.int16)).view(xp.uint16)
    tables = xp.arange(batch * blocks, dtype=xp.int32).reshape(batch, blocks)
    lens = xp.full(batch, context, dtype=xp.int32)
    paged = dtypes.to_float32(pa.paged_attention_decode(query, key_cache, value_cache, tables, lens, dtype=DTYPE),
                              DTYPE)
    reference = _sdpa(q, k, v)[:, :, 0].float().cpu().numpy()
    error = float(np.linalg.norm(paged - reference) / np.linalg.norm(reference))
    if not error < TOLERANCE:
        raise RuntimeError(f"SDPA and the paged kernel disagree: relative error {error:.3g}")
    return error


# ---- CPU smoke run and the headline --------------------------------------------------------------------------


def measure_smoke(version: str) -> dict[str, Any]:
    """The NumPy path on a tiny problem: proves the suite runs, times nothing a chapter shows."""
    rng = np.random.default_rng()
    tables = rng.permutation(6).astype(np.int32).reshape(2, 3)
    query = dtypes.random_normal((2, 4, 64), DTYPE, rng)
    caches = [dtypes.random_normal((6, 2, BLOCK_SIZE, 64), DTYPE, rng) for _ in "kv"]
    lens = np.array([40, 33], dtype=np.int32)
    timing = time_call(lambda: pa.paged_attention_decode(query, *caches, tables, lens, version=version, dtype=DTYPE),
                       repeats=3, warmup=1)
    return measurement(f"{version} smoke", timing, {"version": version, "batch": 2, "context": 40})


def request_mix_waste() -> float:
    """The fraction of paged KV memory the course's synthetic request mix leaves empty (a model, not a timing)."""
    mix = kv_waste.request_mix(WASTE_REQUESTS, seed=WASTE_SEED)
    return kv_waste.paged_waste(mix.context_lens, BLOCK_SIZE)


def headline(measurements: list[dict[str, Any]]) -> dict[str, float]:
    """The figures issue 5 names: v2 against copy, v2 against SDPA, and the request mix's paged waste."""
    found = {(m["parameters"].get("version"), m["parameters"].get("batch"), m["parameters"].get("context")): m
             for m in measurements}
    figures = {}
    for batch, context in ((64, 4096), (1, 32768)):
        v2 = found.get(("v2", batch, context))
        if v2 and "fraction_of_copy" in v2["derived"]:
            figures[f"v2_vs_copy_b{batch}_c{context}"] = v2["derived"]["fraction_of_copy"]
    v2, sdpa = found.get(("v2", 64, 4096)), found.get(("sdpa", 64, 4096))
    if v2 and sdpa and "gbps" in v2["derived"]:
        figures["time_vs_sdpa_b64_c4096"] = v2["timing"]["median_s"] / sdpa["timing"]["median_s"]
    figures["paged_waste_fraction"] = request_mix_waste()
    return figures
