"""The two ceilings of a device: copy bandwidth and matrix-multiply rate (chapter 00).

Copy bandwidth counts bytes read plus bytes written (a copy of N bytes moves 2N; see baselines.py). Matmul rate is
2*M*N*K operations over the median time. On a GPU: cuBLAS
through CuPy (fp16, fp32) and through PyTorch (bf16) where PyTorch is installed. On CPU: NumPy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from course_lib import backend
from course_lib.bench.baselines import copy_bandwidth
from course_lib.bench.roofline import achieved_tflops
from course_lib.bench.runner import Step, measurement
from course_lib.bench.timing import time_call

DESCRIPTION = "copy bandwidth and matmul rate of this device"


def steps(quick: bool) -> list[Step]:
    if not backend.has_gpu():
        return [
            Step("copy", lambda: copy_bandwidth(32 << 20 if quick else 256 << 20)),
            Step("matmul float32", lambda: matmul_rate(512 if quick else 2048, "float32")),
            Step("matmul float64", lambda: matmul_rate(512 if quick else 2048, "float64")),
        ]
    n = 4096 if quick else 8192
    measured = [
        Step("copy", lambda: copy_bandwidth(256 << 20)),  # 5x the L2; at >= 1 GiB an H100 copied slower
        Step("matmul float16 (cuBLAS via CuPy)", lambda: matmul_rate(n, "float16")),
        Step("matmul float32 (cuBLAS via CuPy)", lambda: matmul_rate(n, "float32")),
    ]
    if _torch() is not None:
        measured.append(Step("matmul bfloat16 (cuBLAS via PyTorch)", lambda: torch_bf16_matmul_rate(n)))
    return measured


def matmul_rate(n: int, dtype: str) -> dict[str, Any]:
    """Time ``a @ b`` for random ``n x n`` matrices of ``dtype``; report TFLOP/s."""
    xp = backend.xp
    rng = xp.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=xp.float32).astype(dtype)
    b = rng.standard_normal((n, n), dtype=xp.float32).astype(dtype)
    timing = time_call(xp.matmul, a, b, repeats=10 if n >= 4096 else 5, warmup=2)
    _check_matmul(xp.matmul(a, b), a, b)
    label = f"matmul {dtype}"
    return measurement(label, timing, {"n": n, "dtype": dtype}, tflops=achieved_tflops(2 * n**3, timing.median_s))


def torch_bf16_matmul_rate(n: int) -> dict[str, Any]:
    """bf16 ``a @ b`` through PyTorch (CuPy has no bfloat16 dtype): the rate an engine gets."""
    torch = _torch()
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    timing = time_call(torch.matmul, a, b, repeats=10, warmup=2)
    product = backend.xp.asarray(torch.matmul(a, b).float())
    _check_matmul(product, backend.xp.asarray(a.float()), backend.xp.asarray(b.float()))
    params = {"n": n, "dtype": "bfloat16", "library": f"torch {torch.__version__}"}
    return measurement("matmul bfloat16 (torch)", timing, params, tflops=achieved_tflops(2 * n**3, timing.median_s))


def _check_matmul(product: Any, a: Any, b: Any, rows: int = 8) -> None:
    """Compare a few rows against a float64 NumPy product: a fast wrong answer is no benchmark."""
    a64 = backend.to_numpy(a[:rows]).astype(np.float64)
    reference = a64 @ backend.to_numpy(b).astype(np.float64)
    got = backend.to_numpy(product[:rows]).astype(np.float64)
    error = np.linalg.norm(got - reference) / np.linalg.norm(reference)
    if not error < 2e-2:
        raise RuntimeError(f"matmul result is wrong: relative error {error:.3g} against float64")


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def headline(measurements: list[dict[str, Any]]) -> dict[str, float]:
    by_label = {m["label"]: m["derived"] for m in measurements}
    figures = {"copy_gbps": by_label["copy"]["gbps"]}
    for label, key in [("matmul float16", "matmul_fp16_tflops"), ("matmul float32", "matmul_fp32_tflops"),
                       ("matmul float64", "matmul_fp64_tflops"), ("matmul bfloat16 (torch)", "matmul_bf16_tflops")]:
        if label in by_label:
            figures[key] = by_label[label]["tflops"]
    return figures
