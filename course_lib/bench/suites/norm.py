"""RMSNorm, fused add + RMSNorm and LayerNorm against copy bandwidth and PyTorch (chapter 01).

Each kernel reads and writes every element once, so its ceiling is a device-to-device copy of the
same bytes, measured in the same run. Times are graph replays (``time_graph``): at small M the
kernels run for microseconds and one-at-a-time launches would time the host, not the GPU. PyTorch,
where installed, runs the same operations on the same data: ``F.rms_norm``, ``residual += x`` then
``F.rms_norm`` (two kernels: what eager PyTorch does), and ``F.layer_norm``.

Shapes: bf16 ``[16384, 8192]`` (the headline, far larger than L2) and ``[M, 4096]`` for M from 1 to
16384 (small M stays in the 50 MB L2, so GB/s there can exceed HBM's). In CPU mode the suite runs
the NumPy versions at small sizes with ``perf_counter``: a smoke test, never shown as GPU figures.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from course_lib import backend, dtypes
from course_lib.bench.baselines import copy_bandwidth
from course_lib.bench.roofline import achieved_gbps
from course_lib.bench.runner import Step, measurement
from course_lib.bench.timing import Timing, time_call, time_graph, time_torch_graph
from course_lib.kernels import norm

DESCRIPTION = "RMSNorm, fused add+RMSNorm, LayerNorm vs copy bandwidth and torch"
HEADLINE_SHAPE = (16384, 8192)
HEADLINE_BYTES = HEADLINE_SHAPE[0] * HEADLINE_SHAPE[1] * dtypes.ITEM_BYTES["bfloat16"]  # one array
SWEEP_HIDDEN = 4096
SWEEP_ROWS = (1, 4, 16, 64, 256, 1024, 4096, 16384)
DTYPE = "bfloat16"
EPS = 1e-6
PARAMETERS = {"dtype": DTYPE, "eps": EPS, "headline_shape": HEADLINE_SHAPE, "sweep": [SWEEP_ROWS, SWEEP_HIDDEN]}
ARRAYS_MOVED = {"rms_norm": 2, "add_rms_norm": 4, "layer_norm": 2}  # full-size arrays read + written
PARAMS_MOVED = {"rms_norm": 1, "add_rms_norm": 1, "layer_norm": 2}  # [hidden] vectors read


def steps(quick: bool) -> list[Step]:
    if not backend.has_gpu():
        shapes = [(64, 1024), (4, 4096)]
        return [Step(f"{op} {shape} (NumPy)", lambda op=op, shape=shape: measure_op(op, shape)) for op in norm.OPS
                for shape in shapes]
    shapes = [HEADLINE_SHAPE] + [(rows, SWEEP_HIDDEN) for rows in (SWEEP_ROWS[::3] if quick else SWEEP_ROWS)]
    measured = [Step("copy", lambda: copy_bandwidth(HEADLINE_BYTES))]
    measured += [Step(f"{op} {shape}", lambda op=op, shape=shape: measure_op(op, shape))
                 for shape in shapes for op in norm.OPS]
    measured += [Step(f"rms_norm {HEADLINE_SHAPE} with {items} packs per thread",
                      lambda items=items: measure_op("rms_norm", HEADLINE_SHAPE, target_items=items))
                 for items in norm.ITEMS_CHOICES]
    return measured


def bytes_moved(op: str, shape: tuple[int, int]) -> int:
    rows, hidden = shape
    item = dtypes.ITEM_BYTES[DTYPE]
    return (ARRAYS_MOVED[op] * rows * hidden + PARAMS_MOVED[op] * hidden) * item


def make_inputs(op: str, shape: tuple[int, int]) -> dict[str, Any]:
    """Fresh random inputs for ``op`` (never zeros): x, weight, and residual or bias."""
    rng = np.random.default_rng()
    inputs = {"x": dtypes.random_normal(shape, DTYPE, rng), "weight": dtypes.random_normal(shape[1:], DTYPE, rng)}
    if op == "add_rms_norm":
        inputs["residual"] = dtypes.random_normal(shape, DTYPE, rng)
    if op == "layer_norm":
        inputs["bias"] = dtypes.random_normal(shape[1:], DTYPE, rng)
    return inputs


def run_course(op: str, inputs: dict[str, Any]) -> Any:
    """The course's function for ``op`` (allocates its output: for checking, not timing)."""
    if op == "layer_norm":
        return norm.layer_norm(inputs["x"], inputs["weight"], inputs["bias"], EPS, dtype=DTYPE)
    if op == "add_rms_norm":
        return norm.add_rms_norm(inputs["x"], inputs["residual"], inputs["weight"], EPS, dtype=DTYPE)
    return norm.rms_norm(inputs["x"], inputs["weight"], EPS, dtype=DTYPE)


def check_output(op: str, inputs: dict[str, Any], launch: norm.Launch | None = None, rows: int = 8) -> float:
    """Relative error of the kernel (the ``launch`` that will be timed, by default the planned one) on
    the first ``rows`` rows against float64: a fast wrong answer is no benchmark."""
    head = {name: (value[:rows].copy() if value.ndim == 2 else value) for name, value in inputs.items()}
    if op == "add_rms_norm":
        expected, _ = norm.add_rms_norm_reference(head["x"], head["residual"], head["weight"], EPS, DTYPE)
    elif op == "layer_norm":
        expected = norm.layer_norm_reference(head["x"], head["weight"], head["bias"], EPS, DTYPE)
    else:
        expected = norm.rms_norm_reference(head["x"], head["weight"], EPS, DTYPE)
    got = dtypes.to_float32(run_course(op, head) if launch is None else _run_launch(op, head, launch), DTYPE)
    error = float(np.linalg.norm(got - expected) / np.linalg.norm(expected))
    if not error < 1e-2:
        raise RuntimeError(f"{op} is wrong on random inputs: relative error {error:.3g}")
    return error


def _run_launch(op: str, inputs: dict[str, Any], launch: norm.Launch) -> Any:
    """Run one specific instantiation on ``inputs`` (GPU mode), returning its output."""
    out, arrays = _arrays(op, inputs)
    norm.launch_kernel(op, norm.Rows(DTYPE, *inputs["x"].shape), arrays, EPS, launch)
    return out


def _arrays(op: str, inputs: dict[str, Any]) -> tuple[Any, list[Any]]:
    """A fresh output and the kernel's array arguments for ``op``, in norm.cu's order."""
    out = dtypes.empty(inputs["x"].shape, DTYPE)
    return out, {
        "rms_norm": [out, inputs["x"], inputs["weight"]],
        "add_rms_norm": [out, inputs.get("residual"), inputs["x"], inputs["weight"]],
        "layer_norm": [out, inputs["x"], inputs["weight"], inputs.get("bias")],
    }[op]


def measure_op(
    op: str, shape: tuple[int, int], target_items: int | None = None, compare_torch: bool = True
) -> dict[str, Any]:
    """Check, then time the course kernel (and, if ``compare_torch``, PyTorch where installed) on one shape."""
    inputs = make_inputs(op, shape)
    params = {"op": op, "shape": shape, "dtype": DTYPE, "bytes": bytes_moved(op, shape)}
    if not backend.has_gpu():
        check_output(op, inputs)
        timing = time_call(run_course, op, inputs, repeats=5, warmup=1)
        return measurement(f"{op} {shape}", timing, params, gbps=achieved_gbps(params["bytes"], timing.median_s))
    launch = norm.plan(op, DTYPE, shape[1], target_items=target_items or norm.TARGET_ITEMS)
    error = check_output(op, inputs, launch)
    _, arrays = _arrays(op, inputs)
    timing = time_graph(lambda: norm.launch_kernel(op, norm.Rows(DTYPE, *shape), arrays, EPS, launch),
                        calls=_calls(shape))
    params.update(kernel=launch.kernel, threads=launch.threads, relative_error=error)
    label = f"{op} {shape}" + (f" items={target_items}" if target_items else "")
    derived = {"gbps": achieved_gbps(params["bytes"], timing.median_s)}
    torch_timing = _time_torch(op, inputs) if compare_torch and not target_items else None
    if torch_timing is not None:
        params["torch_timing"] = torch_timing.asdict()
        derived["torch_gbps"] = achieved_gbps(params["bytes"], torch_timing.median_s)
        derived["speedup_vs_torch"] = torch_timing.median_s / timing.median_s
    return measurement(label, timing, params, **derived)


def _calls(shape: tuple[int, int]) -> int:
    """Launches per graph: many for microsecond kernels, a few for the big ones."""
    return 100 if shape[0] * shape[1] <= 1 << 22 else 10


def _time_torch(op: str, inputs: dict[str, Any]) -> Timing | None:
    """PyTorch's eager implementation of ``op`` on the same data, or None where PyTorch is missing."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    as_torch = {name: torch.from_dlpack(value).view(torch.bfloat16) for name, value in inputs.items()}
    x, weight = as_torch["x"], as_torch["weight"]
    hidden = (x.shape[-1],)
    if op == "rms_norm":
        def run() -> Any:
            return F.rms_norm(x, hidden, weight, EPS)
    elif op == "add_rms_norm":
        residual = as_torch["residual"]

        def run() -> Any:
            residual.add_(x)
            return F.rms_norm(residual, hidden, weight, EPS)
    else:
        bias = as_torch["bias"]

        def run() -> Any:
            return F.layer_norm(x, hidden, weight, bias, EPS)
    return time_torch_graph(run, calls=_calls(tuple(x.shape)))


def headline(measurements: list[dict[str, Any]]) -> dict[str, float]:
    if not backend.has_gpu():
        return {}
    copy = next(m for m in measurements if m["label"] == "copy")["derived"]["gbps"]
    at_headline = {m["parameters"]["op"]: m["derived"]["gbps"] for m in measurements
                   if m["label"] == f"{m['parameters'].get('op')} {HEADLINE_SHAPE}"}
    figures = {
        "copy_gbps": copy,
        "rmsnorm_vs_copy": at_headline["rms_norm"] / copy,
        "add_rmsnorm_vs_copy": at_headline["add_rms_norm"] / copy,
        "layernorm_vs_copy": at_headline["layer_norm"] / copy,
    }
    speedups = [m["derived"]["speedup_vs_torch"] for m in measurements if "speedup_vs_torch" in m["derived"]]
    if speedups:
        figures["worst_speedup_vs_torch"] = min(speedups)
    return figures
