"""The program Nsight Compute profiles: each of the chapters' kernels launched once (``python -m course_lib.bench
profile`` runs it under ncu; see ``course_lib.bench.nsight``).

    python -m course_lib.bench.profile_target --manifest launches.json [--quick]

It launches every GEMM step of chapter 03 on one bf16 product (4096^3), then paged decode v1 and v2 of chapter 04
on one problem (batch 64 x context 4096, the ``paged_attention`` suite's heads, head size and block size, its
blocks scattered over the pool); v2 is two kernels, its partitions and their merge. Last, the prefill kernel of
chapter 04b on the ``prefill`` suite's problem (one 4096-token prompt, its blocks scattered). Nothing else it
launches has a name that ncu's kernel filter lets through (the inputs are filled by CuPy's own kernels). It then
writes the manifest: the launches in order, each with the kernel function it runs, or why a step was skipped on
this GPU (``wgmma`` needs Hopper). ``--quick`` profiles a smaller product and decode problem. GPU only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from course_lib import backend, dtypes
from course_lib.bench.suites import paged_attention as decode_suite
from course_lib.bench.suites import prefill as prefill_suite
from course_lib.kernels import gemm
from course_lib.kernels import paged_attention as pa
from course_lib.kernels import paged_prefill as pp

DTYPE = "bfloat16"
GEMM_SIZE, QUICK_GEMM_SIZE = 4096, 1024
DECODE_SHAPE, QUICK_DECODE_SHAPE = (64, 4096), (8, 1024)  # (batch, context)
DECODE_KERNELS = (("v1", "paged_attention"), ("v2", "paged_attention"), ("v2 merge", "paged_attention_merge"))


def planned_launches(quick: bool = False) -> list[dict[str, Any]]:
    """What the program launches, in order: ``{"group", "label", "function", "shape"}`` each (no GPU needed)."""
    n = QUICK_GEMM_SIZE if quick else GEMM_SIZE
    product = gemm.Product(DTYPE, n, n, n)
    plan = [{"group": "gemm", "label": step, "function": gemm.launch_config(step, product)[0].split("<")[0],
             "shape": f"{n}^3 {DTYPE}"} for step in gemm.STEPS]
    batch, context = QUICK_DECODE_SHAPE if quick else DECODE_SHAPE
    shape = (f"batch {batch} x context {context}, {decode_suite.NUM_HEADS} query heads over "
             f"{decode_suite.NUM_KV_HEADS} KV heads, head_dim {decode_suite.HEAD_DIM}, "
             f"block size {decode_suite.BLOCK_SIZE}, {DTYPE}")
    prefill_shape = (f"batch 1 x {prefill_suite.TOKENS} new tokens, {prefill_suite.NUM_HEADS} query heads over "
                     f"{prefill_suite.NUM_KV_HEADS} KV heads, head_dim {prefill_suite.HEAD_DIM}, block size "
                     f"{prefill_suite.BLOCK_SIZE}, {DTYPE}")
    return (plan + [{"group": "decode", "label": label, "function": function, "shape": shape}
                    for label, function in DECODE_KERNELS]
            + [{"group": "prefill", "label": f"prefill {name}", "function": "paged_prefill", "shape": prefill_shape}
               for name in pp.TILINGS])


def launch_gemm_steps(plan: list[dict[str, Any]], n: int) -> None:
    """Each step once on the same random operands; a step this GPU cannot run is marked skipped in ``plan``."""
    rng = np.random.default_rng(0)
    a, b = (dtypes.random_normal((n, n), DTYPE, rng) for _ in range(2))
    for entry in (entry for entry in plan if entry["group"] == "gemm"):
        if reason := gemm.unsupported_reason(entry["label"], DTYPE):
            entry["skipped"] = reason
            continue
        product = gemm.check_inputs(a, b, entry["label"], DTYPE)
        gemm.launch(entry["label"], product, dtypes.empty((n, n), DTYPE), a, b)
        backend.synchronize()


def decode_problem(batch: int, context: int) -> tuple[Any, ...]:
    """Query, key and value caches, scattered block tables and context lengths of ``batch`` sequences."""
    xp = backend.xp
    blocks_per_sequence = math.ceil(context / decode_suite.BLOCK_SIZE)
    num_blocks = batch * blocks_per_sequence
    shape = (num_blocks, decode_suite.NUM_KV_HEADS, decode_suite.BLOCK_SIZE, decode_suite.HEAD_DIM)
    rng = np.random.default_rng(0)
    tables = rng.permutation(num_blocks).astype(np.int32).reshape(batch, blocks_per_sequence)
    query = dtypes.random_normal((batch, decode_suite.NUM_HEADS, decode_suite.HEAD_DIM), DTYPE, rng)

    def cache() -> Any:  # normal values filled on the GPU, cut to bf16 (the top 16 bits of each float32)
        values = xp.random.standard_normal(math.prod(shape), dtype=xp.float32).view(xp.uint32)
        return (values >> 16).astype(xp.uint16).reshape(shape)

    return query, cache(), cache(), xp.asarray(tables), xp.full(batch, context, dtype=xp.int32)


def launch_decode(batch: int, context: int) -> None:
    """v1 once, then v2 (partitions and merge) once, on one problem checked once."""
    problem = decode_problem(batch, context)
    checked = pa.check_decode_inputs(*problem, dtype=DTYPE)
    out = dtypes.empty((batch, decode_suite.NUM_HEADS, decode_suite.HEAD_DIM), DTYPE)
    for version in pa.VERSIONS:
        plan = pa.plan_decode(checked, version, decode_suite.PARTITION_SIZE)
        pa.decode_unchecked(plan, *problem, out=out)
        backend.synchronize()


def launch_prefill() -> None:
    """The prefill kernel once in each of its tilings, first version first, on the ``prefill`` suite's one-prompt
    problem."""
    arrays = prefill_suite.paged_problem(1)
    problem = pp.check_prefill_problem(*arrays, dtype=DTYPE)
    out = dtypes.empty(tuple(arrays[0].shape), DTYPE)
    for tiling in pp.TILINGS.values():
        pp.launch_prefill(problem, out, *arrays, tiling=tiling)
        backend.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib.bench.profile_target",
                                     description="Launch each profiled kernel once, for Nsight Compute.")
    parser.add_argument("--manifest", type=Path, required=True, help="where to write the list of launches (JSON)")
    parser.add_argument("--quick", action="store_true", help="a smaller GEMM and decode problem")
    args = parser.parse_args(argv)
    if not backend.has_gpu():
        print(f"profile_target launches GPU kernels for Nsight Compute, and there is no GPU here: "
              f"{backend.mode_text()}", file=sys.stderr)
        return 2
    plan = planned_launches(args.quick)
    launch_gemm_steps(plan, QUICK_GEMM_SIZE if args.quick else GEMM_SIZE)
    launch_decode(*(QUICK_DECODE_SHAPE if args.quick else DECODE_SHAPE))
    launch_prefill()
    args.manifest.write_text(json.dumps(plan, indent=1) + "\n")
    print(f"launched {sum(not entry.get('skipped') for entry in plan)} kernels; wrote {args.manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
