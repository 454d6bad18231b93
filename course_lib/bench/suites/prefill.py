"""Paged prefill attention on the tensor cores against PyTorch's SDPA, bf16, 4096-token prompts (chapter 04b).

The shape is a Llama-3-8B-like attention layer: 32 query heads over 8 kv heads (GQA), head_dim 128, prompts of
4096 tokens with nothing cached before them, batch 1 and 8. The course's kernel (``paged_prefill``) reads its keys
and values through block tables from a paged cache whose blocks are scattered over the pool, as in a running
server; PyTorch's ``scaled_dot_product_attention`` (causal, flash backend) gets contiguous K/V of the same shape,
its best case. Both are checked against each other on sequence 0 of the measured problem before they are timed,
and timed as CUDA-graph replays. The kernel is timed in each of its tilings (``paged_prefill.TILINGS``, first
version first): the table is the kernel's history, version by version; the headline is the tiling launches use.

FLOPs count the attention a causal prompt needs: ``4 * heads * head_dim`` per visible (query, key) pair, two
matrix products of 2 FLOPs a multiply-add, over ``tokens * (tokens + 1) / 2`` pairs per sequence. The kernel
computes the masked half of its diagonal tiles too; that work is not counted, for either side.

In CPU mode the suite runs the NumPy tiles on a tiny problem: a smoke test, never shown as GPU figures.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from course_lib import backend, dtypes
from course_lib.bench.baselines import require_torch
from course_lib.bench.runner import Step, measurement
from course_lib.bench.timing import Timing, time_call, time_graph, time_torch_graph
from course_lib.kernels import paged_prefill as pp
from course_lib.kernels.paged_prefill_reference import PrefillBatch, prefill_reference, random_prefill_batch

DESCRIPTION = "paged prefill attention (tensor cores) vs torch SDPA (flash, causal), bf16, 4096-token prompts"
DTYPE = "bfloat16"
TOKENS = 4096
BATCHES = (1, 8)
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
CALLS, REPEATS = 5, 10  # launches per captured graph, timed replays
TOLERANCE = 1e-2  # bf16 inputs, fp32 accumulation: both sides round P or the output to bf16
PARAMETERS = {"dtype": DTYPE, "tokens": TOKENS, "batches": list(BATCHES), "num_heads": NUM_HEADS,
              "num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK_SIZE,
              "timing": "CUDA graph replay", "flops": "4 * heads * head_dim * tokens * (tokens + 1) / 2 per sequence"}


def steps(quick: bool) -> list[Step]:
    if not backend.has_gpu():
        return [Step("paged_prefill 2 sequences (NumPy)", measure_smoke)]
    require_torch("the prefill suite's SDPA baseline")
    batches = BATCHES[:1] if quick else BATCHES
    return ([Step(f"paged_prefill {name} {batch} x {TOKENS}", functools.partial(measure_prefill, batch, name))
             for batch in batches for name in pp.TILINGS]
            + [Step(f"SDPA {batch} x {TOKENS}", functools.partial(measure_sdpa, batch)) for batch in batches])


def causal_flops(batch: int, tokens: int = TOKENS) -> float:
    """The FLOPs of causal attention over ``batch`` prompts of ``tokens`` tokens (no prefix)."""
    return 4.0 * batch * NUM_HEADS * HEAD_DIM * tokens * (tokens + 1) / 2


# ---- the course's kernel on a scattered paged cache -------------------------------------------------------------


@functools.cache
def paged_problem(batch: int) -> tuple[Any, ...]:
    """``batch`` prompts of TOKENS tokens on the device: query, caches, tables, query_start_loc, context_lens."""
    host = random_prefill_batch(np.random.default_rng(), [TOKENS] * batch, [0] * batch, num_heads=NUM_HEADS,
                                num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, block_size=BLOCK_SIZE)
    floats = dtypes.host_dtype(DTYPE)
    return tuple(dtypes.to_device(a.astype(floats) if a.dtype.kind == "f" else a) for a in host.arrays())


def measure_prefill(batch: int, tiling: str) -> dict[str, Any]:
    """The kernel in one of its tilings on ``batch`` prompts: checked against SDPA on sequence 0, then timed."""
    arrays = paged_problem(batch)
    problem = pp.check_prefill_problem(*arrays, dtype=DTYPE)
    out = dtypes.empty(tuple(arrays[0].shape), DTYPE)

    def run() -> None:
        pp.launch_prefill(problem, out, *arrays, tiling=pp.TILINGS[tiling])

    run()
    error = _relative_error(dtypes.to_float32(out[:TOKENS], DTYPE), _sdpa_of_first_sequence(batch))
    if not error < TOLERANCE:
        raise RuntimeError(f"paged_prefill ({tiling}) disagrees with SDPA on the benchmark's problem: relative error "
                           f"{error:.3g}")
    timing = time_graph(run, calls=CALLS, repeats=REPEATS)
    used = pp.TILINGS[tiling] == pp.TILING
    params = {"version": "paged_prefill" if used else f"paged_prefill {tiling}", "tiling": tiling, "batch": batch,
              "tokens": TOKENS, "relative_error_vs_sdpa": error}
    return measurement(f"paged_prefill {tiling} {batch} x {TOKENS}", timing, params,
                       tflops=causal_flops(batch) / timing.median_s / 1e12)


@functools.cache
def _sdpa_of_first_sequence(batch: int) -> np.ndarray:
    """SDPA on sequence 0's keys and values of ``paged_problem(batch)``, gathered from the paged cache:
    ``[TOKENS, NUM_HEADS, HEAD_DIM]``; computed once, for every tiling checked against it."""
    import torch

    query, key_cache, value_cache, tables = paged_problem(batch)[:4]
    blocks = backend.xp.asarray(tables[0, : TOKENS // BLOCK_SIZE])

    def as_torch(bits: Any) -> Any:  # bf16 bits on the GPU -> a torch bfloat16 tensor, no copy
        return torch.from_dlpack(backend.xp.ascontiguousarray(bits).view(backend.xp.int16)).view(torch.bfloat16)

    k, v = (as_torch(cache[blocks]).transpose(0, 1).reshape(1, NUM_KV_HEADS, TOKENS, HEAD_DIM)
            for cache in (key_cache, value_cache))
    q = as_torch(query[:TOKENS]).transpose(0, 1).unsqueeze(0)  # [1, heads, tokens, head_dim]
    return _sdpa(q, k, v)[0].transpose(0, 1).float().cpu().numpy()


def _relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


# ---- PyTorch's SDPA on contiguous K/V ------------------------------------------------------------------------


def _sdpa(q: Any, k: Any, v: Any) -> Any:
    """Causal SDPA on the flash backend, the query heads of a kv head sharing it (``enable_gqa``)."""
    import torch.nn.functional as functional
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def measure_sdpa(batch: int) -> dict[str, Any]:
    """SDPA on ``batch`` prompts of contiguous K/V (its own random tensors), timed as graph replays."""
    import torch

    timing = _time_sdpa(batch)
    torch.cuda.empty_cache()  # the contiguous Q/K/V are gone: hand their memory back
    params = {"version": "sdpa", "batch": batch, "tokens": TOKENS, "library": f"torch {torch.__version__}",
              "backend": "flash"}
    return measurement(f"sdpa {batch} x {TOKENS}", timing, params, tflops=causal_flops(batch) / timing.median_s / 1e12)


def _time_sdpa(batch: int) -> Timing:
    import torch

    q = torch.randn(batch, NUM_HEADS, TOKENS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    k, v = (torch.randn(batch, NUM_KV_HEADS, TOKENS, HEAD_DIM, dtype=torch.bfloat16, device="cuda") for _ in "kv")
    return time_torch_graph(lambda: _sdpa(q, k, v), calls=CALLS, repeats=REPEATS)


# ---- CPU smoke run and the headline --------------------------------------------------------------------------


def measure_smoke() -> dict[str, Any]:
    """The NumPy tiles on two short sequences, one after a prefix, checked against float64: proves the suite runs."""
    batch: PrefillBatch = random_prefill_batch(np.random.default_rng(), [40, 9], [0, 20], num_heads=4, num_kv_heads=2,
                                               head_dim=64, block_size=BLOCK_SIZE)
    arrays = tuple(a.astype(np.float16) if a.dtype.kind == "f" else a for a in batch.arrays())
    timing = time_call(lambda: pp.paged_prefill(*arrays), repeats=3, warmup=1)
    error = _relative_error(pp.paged_prefill(*arrays).astype(np.float64), prefill_reference(*arrays))
    if not error < TOLERANCE:
        raise RuntimeError(f"the NumPy tiles disagree with the float64 reference: relative error {error:.3g}")
    return measurement("paged_prefill smoke", timing, {"version": "paged_prefill", "relative_error": error})


def headline(measurements: list[dict[str, Any]]) -> dict[str, float]:
    """``prefill_vs_sdpa_4096``: SDPA's time over the kernel's, the lower of batch 1 and 8; and each TFLOP/s."""
    found = {(m["parameters"]["version"], m["parameters"].get("batch")): m for m in measurements}
    figures, ratios = {}, []
    for batch in BATCHES:
        ours, theirs = found.get(("paged_prefill", batch)), found.get(("sdpa", batch))
        for name, m in (("paged_prefill", ours), ("sdpa", theirs)):
            if m:
                figures[f"{name}_tflops_b{batch}"] = m["derived"]["tflops"]
        if ours and theirs:
            ratios.append(theirs["timing"]["median_s"] / ours["timing"]["median_s"])
            figures[f"prefill_vs_sdpa_b{batch}"] = ratios[-1]
    if ratios:
        figures["prefill_vs_sdpa_4096"] = min(ratios)
    return figures
