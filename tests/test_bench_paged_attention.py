"""The paged-attention benchmark suite: its CPU smoke run, its plan of shapes and its headline arithmetic."""

import pytest

from course_lib import backend
from course_lib.bench import run_suite
from course_lib.bench.runner import measurement
from course_lib.bench.suites import paged_attention as suite
from course_lib.bench.timing import Timing


def measured(version, batch, context, seconds, **derived):
    timing = Timing(seconds, seconds, seconds, seconds, seconds, 10, "cuda-graph-replay")
    params = {"version": version, "batch": batch, "context": context}
    return measurement(f"{version} {batch} x {context}", timing, params, **derived)


def test_headline_takes_v2_against_copy_and_against_sdpa():
    records = [measured("v2", 64, 4096, 4e-4, gbps=2400.0, fraction_of_copy=0.8),
               measured("v2", 1, 32768, 1e-4, gbps=2100.0, fraction_of_copy=0.7),
               measured("v1", 64, 4096, 9e-4, gbps=1000.0, fraction_of_copy=0.3),
               measured("sdpa", 64, 4096, 5e-4, gbps=1900.0)]
    figures = suite.headline(records)
    assert figures == pytest.approx({"v2_vs_copy_b64_c4096": 0.8, "v2_vs_copy_b1_c32768": 0.7,
                                     "time_vs_sdpa_b64_c4096": 0.8, "paged_waste_fraction": suite.request_mix_waste()})


def test_a_headline_without_its_measurements_keeps_only_the_waste_model():
    figures = suite.headline([measured("v1", 64, 4096, 9e-4, gbps=1.0, fraction_of_copy=0.1)])
    assert list(figures) == ["paged_waste_fraction"] and 0 < figures["paged_waste_fraction"] < 0.04


def test_the_gpu_plan_covers_every_shape_with_both_versions_and_sdpa(monkeypatch):
    monkeypatch.setattr(backend, "has_gpu", lambda: True)
    monkeypatch.setattr(suite, "require_torch", lambda purpose: None)
    labels = [step.label for step in suite.steps(quick=False)]
    for batch in suite.BATCHES:
        for context in suite.CONTEXTS:
            assert {f"v1 {batch} x {context}", f"v2 {batch} x {context}", f"SDPA {batch} x {context}"} <= set(labels)


def test_bytes_count_k_and_v_once_plus_query_and_output():
    per_token = 2 * suite.NUM_KV_HEADS * suite.HEAD_DIM * 2
    assert suite.kv_bytes(64, 4096) == 64 * 4096 * per_token
    assert suite.bytes_moved(64, 4096) == suite.kv_bytes(64, 4096) + 2 * 64 * suite.NUM_HEADS * suite.HEAD_DIM * 2


@pytest.mark.skipif(backend.has_gpu(), reason="the CPU smoke run; the GPU suite is measured on the H100 node")
def test_cpu_smoke_run_has_only_the_waste_model_in_its_headline():
    result = run_suite("paged_attention", progress=False)
    assert [m["parameters"]["version"] for m in result["measurements"]] == ["v1", "v2"]
    assert list(result["headline"]) == ["paged_waste_fraction"]
