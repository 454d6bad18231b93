"""The gemm benchmark suite: its CPU smoke run, its headline arithmetic and its shapes."""

import json
import subprocess
import sys

import pytest

from course_lib import backend
from course_lib.bench import run_suite
from course_lib.bench.runner import measurement
from course_lib.bench.suites import gemm as suite
from course_lib.bench.timing import Timing

REQUIRED = ("best_vs_cublas_8192", "mma_sync_vs_cublas_8192", "cublas_tflops_8192", "cublaslt_vs_cublas_8192",
            "bias_gelu_fusion_speedup", "best_vs_cublas_4096")


def measured(name, shape, tflops, group="square", **derived):
    """A record as the suite writes it, with the TFLOP/s given (the timing itself does not enter the headline)."""
    timing = Timing(1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 10, "cuda-graph-replay")
    params = {"backend": name, "group": group, "shape": list(shape)}
    return measurement(f"{name} {shape}", timing, params, tflops=tflops, **derived)


def test_headline_compares_the_best_course_step_and_cublaslt_with_cublas():
    cube, small = (8192, 8192, 8192), (4096, 4096, 4096)
    records = [
        measured("cuBLAS", cube, 800.0), measured("cuBLASLt", cube, 780.0),
        measured("mma_sync", cube, 400.0), measured("wgmma", cube, 600.0), measured("vectorized", cube, 40.0),
        measured("cuBLAS", small, 640.0), measured("vectorized", small, 40.0),
        suite.skipped("wgmma 4096^3", {"backend": "wgmma", "group": "square", "shape": list(small)}, "not Hopper"),
        measured("wgmma", (1, 4096, 4096), 5000.0, group="decode"),  # other groups never enter the ratios
        measured("cuBLASLt", (4096, 16384, 4096), 700.0, group="fusion", speedup_vs_unfused=1.2),
    ]
    figures = suite.headline(records)
    assert set(REQUIRED) <= figures.keys()
    assert figures["cublas_tflops_8192"] == 800.0
    assert figures["best_vs_cublas_8192"] == pytest.approx(0.75)
    assert figures["mma_sync_vs_cublas_8192"] == pytest.approx(0.5)
    assert figures["wgmma_vs_cublas_8192"] == pytest.approx(0.75)
    assert figures["cublaslt_vs_cublas_8192"] == pytest.approx(0.975)
    assert figures["best_vs_cublas_4096"] == pytest.approx(40 / 640)
    assert "wgmma_vs_cublas_4096" not in figures  # skipped, with its reason in the record
    assert figures["bias_gelu_fusion_speedup"] == 1.2


def test_headline_without_a_cublas_baseline_is_empty():
    assert suite.headline([measured("wgmma", (8192, 8192, 8192), 600.0)]) == {}
    assert suite.headline([]) == {}


def test_a_skipped_measurement_says_why_and_has_no_numbers():
    record = suite.skipped("wgmma 8192^3", {"backend": "wgmma"}, "wgmma needs sm_90a")
    assert record["skipped"] == "wgmma needs sm_90a" and record["timing"] is None and record["derived"] == {}


def test_shapes_count_flops_and_the_bytes_a_decode_product_moves():
    decode = suite.Shape(1, 4096, 4096, "decode")
    assert str(decode) == "1x4096x4096" and str(suite.Shape(8192, 8192, 8192, "square")) == "8192^3"
    assert decode.flops == 2 * 4096 * 4096
    assert decode.bytes_moved == (4096 + 4096 * 4096 + 4096) * 2  # activations + weights + output, bf16


def test_decode_weights_are_copied_until_they_overflow_the_l2(monkeypatch):
    monkeypatch.setattr(backend, "has_gpu", lambda: True)
    monkeypatch.setattr(suite, "_l2_bytes", lambda: 50 << 20)
    assert suite._weight_copies(suite.Shape(16, 2048, 2048, "decode")) == 25  # 4 x 50 MiB over 8 MiB weights
    assert suite._weight_copies(suite.Shape(16, 8192, 8192, "decode")) == 2
    assert suite._weight_copies(suite.Shape(8192, 8192, 8192, "square")) == 1


def test_the_full_gpu_plan_covers_every_group(monkeypatch):
    monkeypatch.setattr(backend, "has_gpu", lambda: True)
    monkeypatch.setattr(suite, "require_torch", lambda purpose: None)
    labels = [step.label for step in suite.steps(quick=False)]
    assert all(f"{name} {n}^3" in labels for name in (*suite.gemm.STEPS, "cuBLAS", "cuBLASLt") for n in (4096, 8192))
    assert "cuBLASLt 1x2048x2048" in labels and "wgmma 256x16384x4096" in labels and "cuBLAS 8192x4096x4096" in labels
    assert labels[-2:] == ["bias+GELU epilogue 4096x16384x4096", "cuBLASLt algorithms 16x4096x4096"]


@pytest.mark.skipif(backend.has_gpu(), reason="the CPU smoke run; the GPU suite is the test below")
def test_cpu_smoke_run_checks_every_product():
    result = run_suite("gemm", quick=True, progress=False)
    assert result["headline"] == {}
    assert [m["parameters"]["backend"] for m in result["measurements"]] == [*suite.gemm.STEPS[2:], "cuBLASLt"]
    assert all(m["parameters"]["relative_error"] < 1e-2 and m["timing"]["median_s"] > 0
               for m in result["measurements"])


@pytest.mark.gpu
def test_gpu_quick_suite_reports_the_headline_at_4096(tmp_path):
    # A fresh process: PyTorch (the cuBLAS baseline) crashes when imported after numba.cuda, which other tests load.
    command = [sys.executable, "-m", "course_lib.bench", "gemm", "--quick", "--out", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    figures = json.loads((tmp_path / "gemm.json").read_text())["headline"]
    assert {"cublas_tflops_4096", "best_vs_cublas_4096", "cublaslt_vs_cublas_4096", "bias_gelu_fusion_speedup"} <= \
        figures.keys()
    assert all(value > 0 for value in figures.values())


def test_records_are_found_by_backend_group_and_shape():
    done = {"label": "wgmma 8192^3", "parameters": {"backend": "wgmma", "group": "square", "shape": [8192] * 3},
            "derived": {"tflops": 700.0}}
    skipped = suite.skipped("wgmma 4096^3", {"backend": "wgmma", "group": "square", "shape": [4096] * 3}, "sm_80")
    records = [done, skipped]
    assert suite.find(records, "wgmma", "square", [8192, 8192, 8192]) is done
    assert suite.missing_reason(done) is None
    assert "sm_80" in suite.missing_reason(suite.find(records, "wgmma", "square", (4096,) * 3))
    assert suite.missing_reason(suite.find(records, "cuBLAS", "square", [8192] * 3)).startswith("not measured")
