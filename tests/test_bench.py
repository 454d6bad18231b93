"""Timing, roofline arithmetic, results files and the benchmark command line."""

import json
import subprocess
import sys
import time

import pytest

from course_lib import backend
from course_lib.bench import Roofline, achieved_gbps, achieved_tflops, results, roofline_time, time_call


def test_time_call_reports_a_median_inside_the_spread():
    timing = time_call(time.sleep, 0.002, repeats=5, warmup=1)
    assert timing.min_s <= timing.p10_s <= timing.median_s <= timing.p90_s <= timing.max_s
    assert timing.repeats == 5 and timing.median_s > 0


def test_time_call_rejects_zero_repeats():
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        time_call(print, repeats=0)


def test_roofline_arithmetic():
    assert achieved_gbps(3e9, 1.5) == pytest.approx(2.0)
    assert achieved_tflops(4e12, 2.0) == pytest.approx(2.0)
    assert roofline_time(1e12, 1e9, 1e12, 1e9) == pytest.approx(1.0)
    assert roofline_time(2e12, 1e9, 1e12, 1e9) == pytest.approx(2.0)  # the slower term wins
    roof = Roofline(peak_bytes_per_s=3e12, peak_flops_per_s=900e12)
    assert roof.ridge_intensity == pytest.approx(300)
    assert roof.attainable_flops_per_s(1.0) == pytest.approx(3e12)
    assert roof.fraction_of_roof(flops=0, bytes_moved=3e12, seconds=2.0) == pytest.approx(0.5)


def test_zero_seconds_is_an_error_not_infinity():
    with pytest.raises(ValueError, match="seconds must be > 0"):
        achieved_gbps(1e9, 0.0)


def test_results_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    result = results.new_result("demo", {"n": 3})
    result["headline"] = {"speed": 1.5}
    result["card"] = result["device"]["name"] = "NVIDIA Test Card"
    result["device"]["mode"] = "gpu"
    path = results.save_result(result)
    assert path == tmp_path / "nvidia-test-card" / "demo.json"
    assert results.gpu_cards() == ["nvidia-test-card"]
    assert results.load_result("demo")["headline"] == {"speed": 1.5}
    assert results.headline("demo", "speed") == 1.5
    assert results.provenance(result).startswith("NVIDIA Test Card, measured 20")
    with pytest.raises(KeyError, match="has no headline 'missing'"):
        results.headline("demo", "missing")


def test_cpu_results_are_never_offered_as_gpu_results(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    result = results.new_result("demo", {})
    result["device"]["mode"] = "cpu"
    results.save_result(result)
    assert results.gpu_cards() == []
    with pytest.raises(FileNotFoundError, match="python -m course_lib.bench demo"):
        results.load_result("demo")


def test_an_incomplete_result_is_not_saved(tmp_path):
    with pytest.raises(ValueError, match="new_result"):
        results.save_result({"name": "x"}, tmp_path)


def test_committed_results_carry_their_provenance():
    for card in results.gpu_cards():
        for path in (results.RESULTS_DIR / card).glob("*.json"):
            data = json.loads(path.read_text())
            # measured on the GPU, or a prediction from such files that says what it was derived from
            assert data["mode"] == "gpu" or data["mode"] == "derived" and data["derived_from"], path
            assert data["headline"], path
            assert data["device"]["driver_cuda_version"] and data["device"]["libraries"], path
            assert data["date"][:4].isdigit(), path


def test_bench_command_writes_a_results_file(tmp_path):
    command = [sys.executable, "-m", "course_lib.bench", "env", "--quick", "--out", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    data = json.loads((tmp_path / "env.json").read_text())
    assert data["name"] == "env" and data["mode"] == backend.DECISION.mode
    assert data["headline"]["copy_gbps"] > 0
    assert all(m["timing"]["median_s"] > 0 for m in data["measurements"])


def test_bench_command_explains_an_unknown_suite():
    out = subprocess.run([sys.executable, "-m", "course_lib.bench", "nonsense"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown suite 'nonsense'; choose from:" in out.stderr and "env" in out.stderr


@pytest.mark.gpu
def test_gpu_ceilings_are_plausible():
    from course_lib.bench import run_suite

    headline = run_suite("env", quick=True, progress=False)["headline"]
    assert headline["copy_gbps"] > 100
    assert headline["matmul_fp16_tflops"] > 5


def test_a_caption_sits_below_the_x_axis_labels_of_a_figure_made_without_a_layout():
    import matplotlib.pyplot as plt

    from course_lib.bench import plots

    fig, axes = plt.subplots(1, 2, figsize=(8, 3))  # a plain figure, as a chapter may make one
    for ax in axes:
        ax.plot([1, 2, 4], [1, 2, 3])
        ax.set_xlabel("batch size")
    plots.caption(fig, "where the numbers came from " * 8)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (caption,) = fig.texts
    assert caption.get_window_extent(renderer).y1 < min(ax.xaxis.label.get_window_extent(renderer).y0 for ax in axes)
    plt.close(fig)
