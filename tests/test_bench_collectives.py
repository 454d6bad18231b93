"""The collectives benchmark suite: its one-process CPU run and results file, its plan of sizes, its headline
arithmetic and its plot. (Several ranks: tests/mpi/test_bench_collectives_mpi.py.)"""

import json
import subprocess
import sys

import matplotlib.pyplot as plt
import numpy as np
import pytest

from course_lib import backend
from course_lib.bench import run_suite, save_result
from course_lib.bench.runner import measurement
from course_lib.bench.suites import collectives as suite
from course_lib.bench.timing import Timing

CPU_ONLY = pytest.mark.skipif(backend.has_gpu(), reason="the CPU run; on a GPU the suite goes to 1 GiB")


@pytest.fixture(scope="module")
def quick_result():
    return run_suite("collectives", quick=True, progress=False)


@CPU_ONLY
def test_one_process_quick_run_writes_a_labelled_results_file(quick_result, tmp_path):
    data = json.loads(save_result(quick_result, tmp_path).read_text())
    assert data["name"] == "collectives" and data["mode"] == "cpu" and data["parameters"]["quick"]
    timed = [m for m in data["measurements"] if m["timing"]]
    assert {(m["parameters"]["collective"], m["parameters"]["method"]) for m in timed} == \
        {key for key in suite.METHODS if key[1] != "torch"}
    for m in timed:
        assert (m["parameters"]["ranks"], m["parameters"]["backend"]) == (1, "mpi") and "1 rank (mpi)" in m["label"]
        assert m["timing"]["median_s"] > 0 and m["derived"]["algbw_gbps"] > 0 and m["derived"]["busbw_gbps"] == 0
    assert [m["parameters"]["bytes"] for m in timed if m["parameters"]["method"] == "ring"] == [8, 128, 2048, 32768]


@CPU_ONLY
def test_every_way_is_fitted_and_the_missing_anchor_says_why(quick_result):
    fits = [m for m in quick_result["measurements"] if "fitted_sizes" in m["parameters"]]
    assert len(fits) == len(suite.METHODS) - 1
    for fit in fits:
        assert fit["derived"]["alpha_s"] >= 0 and fit["derived"]["seconds_per_byte"] >= 0
        assert fit["derived"]["byte_factor"] == 1.0 and fit["parameters"]["bandwidth"].startswith("algorithm")
    [torch] = [m for m in quick_result["measurements"] if m["parameters"]["method"] == "torch"]
    assert torch["timing"] is None and "needs a GPU" in torch["skipped"]


@CPU_ONLY
def test_one_rank_headline_is_null_with_a_note(quick_result):
    figures = quick_result["headline"]
    assert figures["allreduce_busbw_vs_torch_1gib"] is None and figures["ring_busbw_vs_nccl_256mib"] is None
    assert "bus bandwidth is 0" in figures["note"] and "2 or more GPUs" in figures["note"]


@CPU_ONLY
def test_recorded_sweeps_and_the_plot_read_the_result(quick_result, tmp_path):
    sweeps = suite.recorded_sweeps(quick_result)
    assert [s.method for s in sweeps] == ["library", "ring", "recursive_doubling"]
    assert list(sweeps[1].sizes) == [8, 128, 2048, 32768] and (sweeps[1].median_s > 0).all()
    fig = suite.plot(quick_result, "all_to_all")
    assert [ax.get_ylabel() for ax in fig.axes] == ["time per call (s)", "algbw (GB/s)"]
    fig.savefig(tmp_path / "all_to_all.png")
    plt.close(fig)
    with pytest.raises(ValueError, match="no broadcast measurements"):
        suite.plot(quick_result, "broadcast")


def record(method, nbytes, busbw, ranks=2, backend_name="nccl"):
    timing = Timing(1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 20, "perf_counter")
    parameters = {"collective": "all_reduce", "method": method, "ranks": ranks, "backend": backend_name,
                  "bytes": nbytes}
    return measurement(f"all_reduce {method}", timing, parameters, algbw_gbps=busbw, busbw_gbps=busbw)


def test_headline_takes_bus_bandwidth_ratios_on_several_gpus():
    records = [record("library", 1 << 30, 360.0), record("torch", 1 << 30, 400.0),
               record("ring", 256 << 20, 90.0), record("library", 256 << 20, 300.0)]
    assert suite.headline(records) == pytest.approx({"allreduce_busbw_vs_torch_1gib": 0.9,
                                                     "ring_busbw_vs_nccl_256mib": 0.3})


def test_headline_without_torch_names_the_skip():
    records = [record("library", 1 << 30, 360.0), record("ring", 256 << 20, 90.0), record("library", 256 << 20, 300.0),
               {"label": "all_reduce torch", "parameters": {"collective": "all_reduce", "method": "torch"},
                "skipped": "PyTorch is not installed", "timing": None, "derived": {}}]
    figures = suite.headline(records)
    assert figures["allreduce_busbw_vs_torch_1gib"] is None and figures["ring_busbw_vs_nccl_256mib"] == 0.3
    assert "torch skipped: PyTorch is not installed" in figures["note"]


def test_headline_over_mpi_is_null():
    figures = suite.headline([record("library", 1 << 30, 1.0, backend_name="mpi")])
    assert figures["allreduce_busbw_vs_torch_1gib"] is None and "compare NCCL on GPUs" in figures["note"]


def test_a_wrong_result_is_named_by_its_first_wrong_element():
    suite.expect("all_gather library", np.array([[1.0, 1.0], [2.0, 2.0]]), np.array([[1.0], [2.0]]))
    with pytest.raises(RuntimeError, match=r"all_gather library is wrong: element \(1, 0\) is 3.0, expected 2.0"):
        suite.expect("all_gather library", np.array([[1.0, 1.0], [3.0, 2.0]]), np.array([[1.0], [2.0]]))


def test_message_sizes_give_every_rank_whole_elements():
    assert suite.message_bytes("all_reduce", 8, 3) == 8
    assert suite.message_bytes("all_gather", 8, 3) == 12  # one float32 from each of 3 ranks
    assert suite.message_bytes("all_to_all", 1 << 20, 3) == 3 * 4 * ((1 << 20) // 12)
    assert [suite.size_text(n) for n in (8, 2048, 256 << 20, 1 << 30, 12)] == ["8 B", "2 KiB", "256 MiB", "1 GiB",
                                                                               "12 B"]


def test_the_gpu_plan_reaches_1_gib_and_the_headline_sizes(monkeypatch):
    monkeypatch.setattr(backend, "has_gpu", lambda: True)
    full, quick = suite.nominal_sizes(quick=False), suite.nominal_sizes(quick=True)
    assert full == [1 << power for power in range(3, 31)]
    assert {8, 256 << 20, 1 << 30} <= set(quick) and len(quick) < len(full) / 2


@pytest.mark.gpu
def test_one_gpu_quick_run_measures_nccl_and_labels_what_needs_more_gpus(tmp_path):
    # A fresh process: PyTorch (the anchor) crashes when imported after numba.cuda, which other tests load.
    code = ("import sys; from course_lib.bench import run_suite, save_result; "
            "save_result(run_suite('collectives', quick=True, progress=False), sys.argv[1])")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads((tmp_path / "collectives.json").read_text())
    timed = [m for m in data["measurements"] if m["timing"]]
    assert {(m["parameters"]["ranks"], m["parameters"]["backend"]) for m in timed} == {(1, "nccl")}
    assert max(m["parameters"]["bytes"] for m in timed) == 1 << 30 and all(m["timing"]["median_s"] > 0 for m in timed)
    torch = [m for m in data["measurements"] if m["parameters"]["method"] == "torch"]
    assert torch[0].get("skipped", "").startswith("PyTorch is not installed") or len(torch) > 2
    assert data["headline"]["allreduce_busbw_vs_torch_1gib"] is None and "2 or more GPUs" in data["headline"]["note"]
