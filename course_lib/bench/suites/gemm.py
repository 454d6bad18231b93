"""GEMM in bf16: the course's steps against cuBLAS and cuBLASLt, in one run (chapter 03).

What is measured (bf16 operands, fp32 accumulation; labels name a shape M x N x K, or N^3 for a cube):

* **square** 4096^3 and 8192^3: every step of ``gemm.STEPS``, cuBLAS (``torch.matmul``) and cuBLASLt
  (``LtMatmul``, planned once and autotuned). The slow CUDA-core steps are timed over fewer calls.
* **decode** ``[M, h] @ [h, h]`` for M in 1..256 and h in 2048..8192, plus the MLP up-projection
  ``[M, 4096] @ [4096, 16384]``: with few rows the weights are most of the bytes, so these products are
  memory-bound and GB/s (weights + activations + output, each moved once) matters as much as TFLOP/s. The fast
  course steps (mma_sync, wgmma), cuBLAS and cuBLASLt. Each timed graph cycles through copies of the weights that
  add up to 4x the L2 cache, so every call reads its weights from HBM, as a decode step reads each layer's.
* **prefill** ``[8192, 4096] @ [4096, 4096]`` (M = 4096 is the 4096^3 square, measured once).
* **epilogue fusion** on the MLP up-projection ``[4096, 4096] @ [4096, 16384]``: cuBLASLt with bias + GELU in its
  epilogue against cuBLASLt's plain product followed by PyTorch's bias add and GELU (the same tanh GELU).
* **algorithm choice** at ``[16, 4096] @ [4096, 4096]``: the heuristic's first candidates, each checked and timed,
  and the one autotuning picks.

Every time is a CUDA-graph replay (``time_graph``, or ``time_torch_graph`` for PyTorch): the GPU's own time, with no
gaps between launches. Every measurement first checks the first rows of the very output it times against float64: a
fast wrong answer is no benchmark. A step this GPU cannot run is recorded with the reason, never left out. In CPU
mode the suite times the NumPy paths at 256^3: a smoke test, never shown as GPU figures.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from course_lib import backend, dtypes
from course_lib.bench.baselines import require_torch
from course_lib.bench.roofline import achieved_gbps, achieved_tflops
from course_lib.bench.runner import Step, measurement
from course_lib.bench.timing import Timing, time_call, time_graph, time_torch_graph
from course_lib.device_facts import device_facts
from course_lib.kernels import cublaslt, gemm

DESCRIPTION = "GEMM steps vs cuBLAS and cuBLASLt, bf16: square, decode, prefill, epilogue fusion, algorithms"
DTYPE = "bfloat16"
TOLERANCE = 1e-2  # bf16 outputs, ||out - ref|| / ||ref|| (DESIGN.md)
SQUARE_SIZES = (4096, 8192)
FAST_STEPS = ("mma_sync", "wgmma")
LIBRARIES = ("cuBLAS", "cuBLASLt")
DECODE_ROWS = (1, 16, 64, 256)
DECODE_HIDDEN = (2048, 4096, 8192)
MLP_HIDDEN = 4096  # decode also runs [M, 4096] @ [4096, 4 * 4096], an MLP up-projection
PREFILL_ROWS, PREFILL_HIDDEN = (8192,), 4096
L2_MULTIPLE = 4  # decode weight copies add up to this many times the L2 cache
COLD_WEIGHT_GROUPS = ("decode", "algorithms")  # groups whose weights come from HBM on every call
DECODE_CALLS = 64  # launches per graph for the microsecond decode products
CHECKED_ROWS = 4
ALGORITHMS_TIMED = 8


@dataclass(frozen=True)
class Shape:
    """One product ``[M, K] @ [K, N]`` and the regime it stands for: square, decode, prefill, fusion, algorithms."""

    m: int
    n: int
    k: int
    group: str

    def __str__(self) -> str:
        return f"{self.m}^3" if self.m == self.n == self.k else f"{self.m}x{self.n}x{self.k}"

    @property
    def mnk(self) -> list[int]:
        return [self.m, self.n, self.k]

    @property
    def flops(self) -> int:
        return 2 * self.m * self.n * self.k

    @property
    def bytes_moved(self) -> int:
        """Activations and weights read once, the output written once."""
        return (self.m * self.k + self.k * self.n + self.m * self.n) * dtypes.ITEM_BYTES[DTYPE]


FUSION_SHAPE = Shape(4096, 4 * MLP_HIDDEN, MLP_HIDDEN, "fusion")
ALGORITHM_SHAPE = Shape(16, 4096, 4096, "algorithms")
PARAMETERS = {
    "dtype": DTYPE,
    "steps": list(gemm.STEPS),
    "square_sizes": list(SQUARE_SIZES),
    "decode": {"rows": list(DECODE_ROWS), "hidden": list(DECODE_HIDDEN), "mlp_hidden": MLP_HIDDEN,
               "backends": [*FAST_STEPS, *LIBRARIES], "weights_cycle_over_l2": L2_MULTIPLE},
    "prefill": {"rows": list(PREFILL_ROWS), "hidden": PREFILL_HIDDEN},
    "fusion_shape": FUSION_SHAPE.mnk,
    "algorithm_shape": ALGORITHM_SHAPE.mnk,
    "timing": "CUDA graph replay",
}


def steps(quick: bool) -> list[Step]:
    if not backend.has_gpu():
        smoke = Shape(256, 256, 256, "square")
        return [Step(f"{name} {smoke} (NumPy)", functools.partial(measure, name, smoke))
                for name in (*gemm.STEPS[2:], "cuBLASLt")]
    require_torch("the gemm suite's cuBLAS baseline")
    measured = [Step(f"{name} {shape}", functools.partial(measure, name, shape))
                for shape, course_steps in planned_shapes(quick) for name in (*course_steps, *LIBRARIES)]
    measured.append(Step(f"bias+GELU epilogue {FUSION_SHAPE}", measure_fusion))
    measured.append(Step(f"cuBLASLt algorithms {ALGORITHM_SHAPE}", measure_algorithms))
    return measured


def planned_shapes(quick: bool) -> list[tuple[Shape, tuple[str, ...]]]:
    """Every GPU shape with the course steps measured on it (cuBLAS and cuBLASLt run on all of them)."""
    sizes = SQUARE_SIZES[:1] if quick else SQUARE_SIZES
    rows, hidden = (DECODE_ROWS[::2], (MLP_HIDDEN,)) if quick else (DECODE_ROWS, DECODE_HIDDEN)
    square = [Shape(n, n, n, "square") for n in sizes]
    decode = [Shape(m, h, h, "decode") for h in hidden for m in rows]
    decode += [Shape(m, 4 * MLP_HIDDEN, MLP_HIDDEN, "decode") for m in rows]
    prefill = [] if quick else [Shape(m, PREFILL_HIDDEN, PREFILL_HIDDEN, "prefill") for m in PREFILL_ROWS]
    every_step = [(shape, gemm.STEPS) for shape in square]
    return every_step + [(shape, FAST_STEPS) for shape in decode + prefill]


def _as_torch(array: Any) -> Any:
    """The same device memory as a PyTorch bf16 tensor (CuPy holds bf16 as uint16 bits)."""
    import torch

    return torch.from_dlpack(array).view(torch.bfloat16)


def skipped(label: str, parameters: dict[str, Any], reason: str) -> dict[str, Any]:
    """The record of a measurement this device cannot make, with why: a gap in a table is never silent."""
    return {"label": label, "parameters": parameters, "skipped": reason, "timing": None, "derived": {}}


# ---- one backend on one shape ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """A backend ready to go: one launch per weight copy, its output's first rows, and its graph timer."""

    launches: list[Callable[[], Any]]
    first_rows: Callable[[], np.ndarray]
    graph_timer: Callable[..., Timing] = time_graph


def measure(name: str, shape: Shape) -> dict[str, Any]:
    """Check, then time one backend (a course step, cuBLAS or cuBLASLt) on one shape."""
    label = f"{name} {shape}"
    params = _parameters(name, shape)
    a, weights = _operands(shape)
    params["weight_copies"] = len(weights)
    if reason := _cannot_run(name, a, weights[0]):
        return skipped(label, params, reason)
    with _open(name, a, weights) as run:
        run.launches[0]()
        params["relative_error"] = _check(run.first_rows(), a, weights[0])
        timing = _time(run, shape, slow=name in gemm.STEPS and name not in gemm.TENSOR_CORE_STEPS)
    return measurement(label, timing, params, **_rates(shape, timing))


def _parameters(name: str, shape: Shape) -> dict[str, Any]:
    return {"backend": name, "group": shape.group, "shape": shape.mnk, "dtype": DTYPE}


def _operands(shape: Shape) -> tuple[Any, list[Any]]:
    """Fresh random activations [M, K] and weights [K, N] (never zeros); decode shapes get copies of the weights."""
    rng = np.random.default_rng()
    a = dtypes.random_normal((shape.m, shape.k), DTYPE, rng)
    weights = dtypes.random_normal((shape.k, shape.n), DTYPE, rng)
    return a, [weights] + [weights.copy() for _ in range(_weight_copies(shape) - 1)]


def _weight_copies(shape: Shape) -> int:
    """Decode: enough weight copies that cycling through them overflows the L2 cache. Elsewhere one."""
    if shape.group not in COLD_WEIGHT_GROUPS or not backend.has_gpu():
        return 1
    weight_bytes = shape.k * shape.n * dtypes.ITEM_BYTES[DTYPE]
    return max(1, math.ceil(L2_MULTIPLE * _l2_bytes() / weight_bytes))


@functools.cache
def _l2_bytes() -> int:
    return device_facts()["l2_bytes"] or 0


def _cannot_run(name: str, a: Any, b: Any) -> str | None:
    """Why a course step cannot run on this GPU or on these operands; None when it can (and for the libraries)."""
    if name not in gemm.STEPS:
        return None
    if reason := gemm.unsupported_reason(name, DTYPE):
        return reason
    try:
        gemm.check_inputs(a, b, name, DTYPE)
    except (ValueError, TypeError) as error:
        return str(error)
    return None


@contextlib.contextmanager
def _open(name: str, a: Any, weights: list[Any]) -> Iterator[Run]:
    """``name`` ready to run on ``a`` and each weight copy; cuBLASLt's plan is released afterwards."""
    if name == "cuBLASLt":
        with cublaslt.LtMatmul(a, weights[0], dtype=DTYPE) as lt:
            if backend.has_gpu():
                lt.autotune()
            yield Run([functools.partial(lt, b=w) for w in weights], lambda: _rows(lt.out))
    elif name == "cuBLAS":
        yield _torch_run(a, weights)
    else:
        yield _course_run(name, a, weights)


def _rows(c: Any) -> np.ndarray:
    return dtypes.to_float32(c[:CHECKED_ROWS], DTYPE)


def _torch_run(a: Any, weights: list[Any]) -> Run:
    """cuBLAS through ``torch.matmul``, writing into one preallocated output."""
    import torch

    activations = _as_torch(a)
    out = torch.empty((a.shape[0], weights[0].shape[1]), dtype=torch.bfloat16, device="cuda")
    launches = [functools.partial(torch.matmul, activations, _as_torch(w), out=out) for w in weights]
    return Run(launches, lambda: out[:CHECKED_ROWS].float().cpu().numpy(), time_torch_graph)


def _course_run(step: str, a: Any, weights: list[Any]) -> Run:
    """A course step launched straight into one output (in CPU mode, gemm.matmul's NumPy path)."""
    product = gemm.check_inputs(a, weights[0], step, DTYPE)
    c = dtypes.empty((product.m, product.n), DTYPE)

    def numpy_product(b: Any) -> None:
        np.copyto(c, gemm.matmul(a, b, step=step, dtype=DTYPE))

    launch = functools.partial(gemm.launch, step, product, c, a) if backend.has_gpu() else numpy_product
    return Run([functools.partial(launch, w) for w in weights], lambda: _rows(c))


def _check(first_rows: np.ndarray, a: Any, b: Any, epilogue: str | None = None, bias: Any = None) -> float:
    """Relative error of C's first rows against float64: a fast wrong answer is no benchmark."""
    expected = cublaslt.reference(a[:CHECKED_ROWS], b, epilogue, bias, DTYPE)
    error = float(np.linalg.norm(first_rows - expected) / np.linalg.norm(expected))
    if not error < TOLERANCE:
        raise RuntimeError(f"GEMM result is wrong on random inputs: relative error {error:.3g}")
    return error


def _time(run: Run, shape: Shape, slow: bool = False) -> Timing:
    """Graph replays going round the weight copies; few for the slow CUDA-core steps, many for decode."""
    if not backend.has_gpu():
        return time_call(run.launches[0], repeats=5, warmup=1)
    for first_call in run.launches:  # one-time work (a TMA tensor map per weight copy) must not happen in a capture
        first_call()
    turn = itertools.cycle(run.launches)

    def launch() -> Any:
        return next(turn)()

    if slow:  # tens to hundreds of milliseconds a call
        return run.graph_timer(launch, calls=1, repeats=3, warmup=1)
    calls = max(DECODE_CALLS, len(run.launches)) if shape.group in COLD_WEIGHT_GROUPS else 4
    return run.graph_timer(launch, calls=calls, repeats=10)


def _rates(shape: Shape, timing: Timing) -> dict[str, float]:
    return {"tflops": achieved_tflops(shape.flops, timing.median_s),
            "gbps": achieved_gbps(shape.bytes_moved, timing.median_s)}


# ---- cuBLASLt's epilogue and its algorithms ------------------------------------------------------------------


def _on_torch_stream(launch: Callable[[], Any]) -> Any:
    """Run CuPy/nvmath work on PyTorch's current stream, so that a torch graph capture records it too."""
    import torch

    with backend.xp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
        return launch()


def measure_fusion() -> dict[str, Any]:
    """cuBLASLt with bias + GELU fused into its epilogue, against its plain product then PyTorch's add and GELU."""
    import torch.nn.functional as F

    shape = FUSION_SHAPE
    a, (weights,) = _operands(shape)
    bias = dtypes.random_normal((shape.n,), DTYPE, np.random.default_rng())
    params = {**_parameters("cuBLASLt", shape), "fused": "epilogue='bias_gelu'",
              "unfused": "plain product, then torch add_ and gelu(approximate='tanh')"}
    with (cublaslt.LtMatmul(a, weights, epilogue="bias_gelu", bias=bias, dtype=DTYPE) as fused,
          cublaslt.LtMatmul(a, weights, dtype=DTYPE) as plain):
        fused.autotune()
        plain.autotune()
        product, torch_bias = _as_torch(plain.out), _as_torch(bias)

        def run_fused() -> Any:
            return _on_torch_stream(fused)

        def run_unfused() -> Any:
            _on_torch_stream(plain)
            return F.gelu(product.add_(torch_bias), approximate="tanh")

        params["relative_error"] = _check(_rows(run_fused()), a, weights, "bias_gelu", bias)
        unfused_rows = run_unfused()[:CHECKED_ROWS].float().cpu().numpy()
        params["unfused_relative_error"] = _check(unfused_rows, a, weights, "bias_gelu", bias)
        timing = time_torch_graph(run_fused, calls=4, repeats=10)
        unfused = time_torch_graph(run_unfused, calls=4, repeats=10)
    params["unfused_timing"] = unfused.asdict()
    return measurement(f"bias+GELU epilogue {shape}", timing, params, **_rates(shape, timing),
                       unfused_tflops=achieved_tflops(shape.flops, unfused.median_s),
                       speedup_vs_unfused=unfused.median_s / timing.median_s)


def measure_algorithms() -> dict[str, Any]:
    """The heuristic's first candidates at one decode shape, each checked and timed; and autotuning's pick."""
    shape = ALGORITHM_SHAPE
    a, weights = _operands(shape)
    params = {**_parameters("cuBLASLt", shape), "weight_copies": len(weights), "candidates": []}
    timings = []
    with cublaslt.LtMatmul(a, weights[0], dtype=DTYPE) as lt:
        run = Run([functools.partial(lt, b=w) for w in weights], lambda: _rows(lt.out))
        for rank, algorithm in enumerate(lt.algorithms[:ALGORITHMS_TIMED]):
            lt.choose(rank)
            run.launches[0]()
            error = _check(run.first_rows(), a, weights[0])
            timings.append(_time(run, shape))
            params["candidates"].append({"heuristic_rank": rank, **cublaslt.describe(algorithm),
                                         "relative_error": error, "timing": timings[-1].asdict(),
                                         **_rates(shape, timings[-1])})
        params["autotuned"] = cublaslt.describe(lt.autotune()[0])  # id, tile, stages and split-K of the pick
    fastest = min(t.median_s for t in timings)
    return measurement(f"cuBLASLt algorithms {shape}", timings[0], params, **_rates(shape, timings[0]),
                       fastest_tflops=achieved_tflops(shape.flops, fastest),
                       fastest_over_heuristic=timings[0].median_s / fastest)


# ---- headline ------------------------------------------------------------------------------------------------


def headline(measurements: list[dict[str, Any]]) -> dict[str, float]:
    """Course steps and cuBLASLt against cuBLAS at the square sizes, and the epilogue fusion's speedup."""
    square = {(m["parameters"]["backend"], tuple(m["parameters"]["shape"])): m["derived"]["tflops"]
              for m in measurements if m["parameters"].get("group") == "square" and not m.get("skipped")}
    figures = {}
    for n in SQUARE_SIZES:
        cube = (n, n, n)
        cublas = square.get(("cuBLAS", cube))
        if cublas is None:
            continue
        figures[f"cublas_tflops_{n}"] = cublas
        course = [tflops for (name, shape), tflops in square.items() if shape == cube and name in gemm.STEPS]
        if course:
            figures[f"best_vs_cublas_{n}"] = max(course) / cublas
        for name in (*FAST_STEPS, "cuBLASLt"):
            if (name, cube) in square:
                figures[f"{name.lower()}_vs_cublas_{n}"] = square[(name, cube)] / cublas
    fusion = [m for m in measurements if m["parameters"].get("group") == "fusion" and not m.get("skipped")]
    if fusion:
        figures["bias_gelu_fusion_speedup"] = fusion[0]["derived"]["speedup_vs_unfused"]
    return figures


# ---- reading a results file back (the chapters' figures) ------------------------------------------------------


def find(measurements: list[dict[str, Any]], backend_name: str, group: str, mnk: list[int]) -> dict[str, Any] | None:
    """The record of ``backend_name`` (a step, "cuBLAS" or "cuBLASLt") on one shape of one group, or None."""
    return next((m for m in measurements if m["parameters"].get("backend") == backend_name
                 and m["parameters"].get("group") == group and m["parameters"].get("shape") == list(mnk)), None)


def missing_reason(record: dict[str, Any] | None) -> str | None:
    """Why a record holds no figure ("not measured", or the skip reason it carries), or None when it holds one."""
    if record is None:
        return "not measured in this results file"
    return f"skipped on the recorded GPU: {record['skipped']}" if record.get("skipped") else None
