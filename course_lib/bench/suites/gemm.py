"""GEMM steps against cuBLAS, bf16, in one run (chapter 03; steps 1-5 so far).

TFLOP/s counts 2*M*N*K operations over the median time (CUDA events; each call runs for
milliseconds, so the launch cost does not show). The baseline is cuBLAS on the same operands:
through PyTorch for bf16 (CuPy has no bfloat16 dtype), and through CuPy for fp16.
In CPU mode the suite times NumPy's float32 product at small sizes: a smoke test only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from course_lib import backend, dtypes
from course_lib.bench.roofline import achieved_tflops
from course_lib.bench.runner import Step, measurement
from course_lib.bench.timing import time_call
from course_lib.kernels import gemm

DESCRIPTION = "GEMM steps (naive to WMMA tensor cores) vs cuBLAS, bf16"
SIZES = (4096, 8192)
PARAMETERS = {"dtype": "bfloat16", "sizes": list(SIZES), "steps": list(gemm.STEPS)}


def steps(quick: bool) -> list[Step]:
    if not backend.has_gpu():
        return [Step(f"{step} 256^3 (NumPy)", lambda step=step: measure_step(step, 256)) for step in gemm.STEPS[2:]]
    sizes = SIZES[:1] if quick else SIZES
    measured = [Step(f"{step} {n}^3", lambda step=step, n=n: measure_step(step, n))
                for n in sizes for step in gemm.STEPS]
    measured += [Step(f"cuBLAS bf16 {n}^3", lambda n=n: measure_cublas(n)) for n in sizes]
    return measured


def _operands(n: int) -> tuple[Any, Any]:
    rng = np.random.default_rng()
    return dtypes.random_normal((n, n), "bfloat16", rng), dtypes.random_normal((n, n), "bfloat16", rng)


CHECKED_ROWS = 4


def _check(first_rows: np.ndarray, a: Any, b: Any) -> float:
    """Relative error of C's first rows (host float32) against float64: a fast wrong answer is no benchmark."""
    expected = gemm.gemm_reference(a[:CHECKED_ROWS], b, "bfloat16")
    error = float(np.linalg.norm(first_rows - expected) / np.linalg.norm(expected))
    if not error < 1e-2:
        raise RuntimeError(f"GEMM result is wrong on random inputs: relative error {error:.3g}")
    return error


def measure_step(step: str, n: int) -> dict[str, Any]:
    """Check, then time one step of the progression on ``n x n x n`` bf16."""
    a, b = _operands(n)
    c = gemm.matmul(a, b, step=step, dtype="bfloat16")
    error = _check(dtypes.to_float32(c[:CHECKED_ROWS], "bfloat16"), a, b)
    timing = time_call(lambda: gemm.matmul(a, b, step=step, dtype="bfloat16"), repeats=5 if step == "naive" else 10,
                       warmup=2)
    params = {"step": step, "n": n, "dtype": "bfloat16", "relative_error": error}
    return measurement(f"{step} {n}^3", timing, params, tflops=achieved_tflops(2 * n**3, timing.median_s))


def measure_cublas(n: int) -> dict[str, Any]:
    """cuBLAS bf16 through PyTorch on the same kind of operands (the baseline of every ratio)."""
    import torch

    a, b = _operands(n)
    ta, tb = (torch.from_dlpack(x).view(torch.bfloat16) for x in (a, b))
    _check(torch.matmul(ta[:CHECKED_ROWS], tb).float().cpu().numpy(), a, b)
    timing = time_call(torch.matmul, ta, tb, repeats=10, warmup=3)
    params = {"library": f"cuBLAS via torch {torch.__version__}", "n": n, "dtype": "bfloat16"}
    return measurement(f"cuBLAS bf16 {n}^3", timing, params, tflops=achieved_tflops(2 * n**3, timing.median_s))


def headline(measurements: list[dict[str, Any]]) -> dict[str, float]:
    if not backend.has_gpu():
        return {}
    figures = {}
    for n in SIZES:
        cublas = [m["derived"]["tflops"] for m in measurements if m["label"] == f"cuBLAS bf16 {n}^3"]
        course = [m["derived"]["tflops"] for m in measurements if m["label"].endswith(f" {n}^3")
                  and m["parameters"].get("step")]
        if cublas and course:
            figures[f"cublas_tflops_{n}"] = cublas[0]
            figures[f"best_vs_cublas_{n}"] = max(course) / cublas[0]
    return figures
