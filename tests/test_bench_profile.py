"""Nsight Compute profiles: the metric list, ncu's command lines, its CSV parsed into records, the profile suite's
measurements and headline, the chapters' table and stacked bars, and the refusals without a GPU or without ncu.

``fixtures/ncu_profile_raw.csv`` is written in the format of ``ncu --import REPORT --csv --page raw --print-units
base`` (a header row of identification columns and metric names, a row of units, one row per kernel launch, every
cell quoted, thousands separated by commas), for the twelve launches of ``course_lib.bench.profile_target``. Its
numbers are synthetic: they test the format, they were not measured.
"""

import json
import subprocess
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from course_lib import backend
from course_lib.bench import nsight, profile_target, results
from course_lib.bench.suites import profile as suite

FIXTURE = Path(__file__).parent / "fixtures" / "ncu_profile_raw.csv"


@pytest.fixture
def raw_csv() -> str:
    return FIXTURE.read_text()


def test_the_metric_list_names_each_figure_once_and_every_stall_reason():
    metrics = nsight.metric_names()
    assert len(metrics) == len(set(metrics)) == len(nsight.FIGURES) + len(nsight.STALL_REASONS)
    assert "dram__throughput.avg.pct_of_peak_sustained_elapsed" in metrics
    assert "sm__throughput.avg.pct_of_peak_sustained_elapsed" in metrics
    assert "sm__warps_active.avg.pct_of_peak_sustained_active" in metrics
    for reason in ("long_scoreboard", "barrier", "short_scoreboard", "math_pipe_throttle", "gmma", "selected"):
        assert f"smsp__average_warps_issue_stalled_{reason}_per_issue_active.ratio" in metrics
    assert all("__" in metric and " " not in metric for metric in metrics)  # ncu's <unit>__<counter>.<rollup>
    assert set(nsight.OPTIONAL_METRICS) <= set(metrics)
    assert all(meaning for _, meaning in nsight.FIGURES.values()) and all(nsight.STALL_REASONS.values())


def test_ncu_never_touches_the_clocks_and_profiles_only_the_course_kernels(tmp_path):
    command = nsight.profile_command("ncu", ["a__b.sum", "c__d.ratio"], tmp_path / "r", tmp_path / "m.json")
    assert command[command.index("--clock-control") + 1] == "none"
    assert command[command.index("--metrics") + 1] == "a__b.sum,c__d.ratio"
    assert command[command.index("--kernel-name") + 1] == "regex:gemm_|paged_attention|paged_prefill"
    assert command[-3:] == ["course_lib.bench.profile_target", "--manifest", str(tmp_path / "m.json")]
    assert "--quick" in nsight.profile_command("ncu", ["a__b.sum"], tmp_path / "r", tmp_path / "m.json", quick=True)
    assert nsight.export_command("ncu", tmp_path / "r.ncu-rep")[2:] == [str(tmp_path / "r.ncu-rep"), "--csv", "--page",
                                                                       "raw", "--print-units", "base"]


def test_the_raw_csv_gives_one_launch_per_row_with_its_metrics_and_units(raw_csv):
    launches = nsight.parse_raw_csv("==PROF== Connected to process 48213\n" + raw_csv)
    assert [launch["id"] for launch in launches] == list(range(12))
    naive = launches[0]
    assert naive["kernel"].startswith("void gemm_naive<__nv_bfloat16>(")
    assert naive["block"] == "(32, 8, 1)" and naive["grid"] == "(128, 512, 1)"
    assert naive["metrics"]["gpu__time_duration.sum"] == (27_104_352.0, "nsecond")  # "27,104,352" in the file
    assert naive["metrics"]["dram__throughput.avg.pct_of_peak_sustained_elapsed"] == (9.8, "%")
    assert set(naive["metrics"]) == set(nsight.metric_names())
    assert nsight.number("n/a") is None and nsight.number("") is None and nsight.number("1,234.5") == 1234.5


def test_a_file_that_is_not_ncus_raw_csv_is_refused(raw_csv):
    with pytest.raises(ValueError, match="no header row"):
        nsight.parse_raw_csv("==ERROR== the application returned an error\n")
    header, units, first, *_ = raw_csv.splitlines()
    with pytest.raises(ValueError, match="cells for"):
        nsight.parse_raw_csv("\n".join([header, units, first.rsplit(",", 1)[0]]))


def test_launches_join_the_targets_list_in_order(raw_csv):
    records = nsight.kernel_records(nsight.parse_raw_csv(raw_csv), profile_target.planned_launches())
    assert [record["label"] for record in records] == [*profile_target.gemm.STEPS, "v1", "v2", "v2 merge",
                                                         "prefill v1: 16 rows a warp", "prefill v2: 32 rows a warp"]
    naive, v2 = records[0], records[8]
    assert naive["duration_us"] == pytest.approx(27_104.352)
    assert naive["group"] == "gemm" and v2["group"] == "decode" and "4, true>" in v2["kernel"]
    assert sum(v2["stalls"].values()) == pytest.approx(v2["warp_cycles_per_issue"], abs=0.01)
    assert nsight.top_stall(naive)[0] == "long_scoreboard" and records[6]["missing"] == []
    assert nsight.top_stall(records[6])[0] == "gmma"


def test_a_skipped_step_has_no_row_and_a_wrong_join_is_refused(raw_csv):
    header, units, *rows = raw_csv.splitlines()
    without_wgmma = "\n".join([header, units, *[row for row in rows if "gemm_wgmma" not in row]])
    planned = profile_target.planned_launches()
    planned[6]["skipped"] = "wgmma and TMA need Hopper (sm_90a, e.g. H100/H200); this GPU is sm_89"
    records = nsight.kernel_records(nsight.parse_raw_csv(without_wgmma), planned)
    assert "wgmma" not in [record["label"] for record in records] and len(records) == 11
    with pytest.raises(ValueError, match="ncu profiled 11 kernel launches, the target made 12"):
        nsight.kernel_records(nsight.parse_raw_csv(without_wgmma), profile_target.planned_launches())
    swapped = profile_target.planned_launches()
    swapped[0], swapped[1] = swapped[1], swapped[0]
    with pytest.raises(ValueError, match="but the target launched gemm_smem_tiled"):
        nsight.kernel_records(nsight.parse_raw_csv(raw_csv), swapped)


def fake_ncu(raw_csv: str, failures: list[str]):
    """A stand-in for subprocess.run: ncu profiling (failing with each of ``failures`` first), then exporting."""
    calls = []

    def run(command, **_):
        calls.append(command)
        if "--import" in command:
            return subprocess.CompletedProcess(command, 0, raw_csv, "")
        if failures:
            return subprocess.CompletedProcess(command, 1, "", failures.pop(0))
        manifest = Path(command[command.index("--manifest") + 1])
        manifest.write_text(json.dumps(profile_target.planned_launches()))
        return subprocess.CompletedProcess(command, 0, "==PROF== Disconnected", "")

    return run, calls


def test_run_profile_drops_a_metric_ncu_does_not_know_and_runs_again(raw_csv, monkeypatch):
    monkeypatch.setattr(nsight, "require_profiler", lambda: "ncu")
    gmma = nsight.stall_metric("gmma")
    run, calls = fake_ncu(raw_csv, [f"==ERROR== Failed to find metric {gmma}"])
    profiled = nsight.run_profile(run=run)
    assert len(calls) == 3 and gmma in calls[0][calls[0].index("--metrics") + 1]
    assert gmma not in calls[1][calls[1].index("--metrics") + 1]
    assert list(profiled["dropped"]) == [gmma] and len(profiled["kernels"]) == 12


def test_run_profile_explains_a_permission_error_and_gives_up_on_others(raw_csv, monkeypatch):
    monkeypatch.setattr(nsight, "require_profiler", lambda: "ncu")
    run, _ = fake_ncu(raw_csv, ["==ERROR== ERR_NVGPUCTRPERM - The user does not have permission"])
    with pytest.raises(RuntimeError, match="may not read this GPU's performance counters"):
        nsight.run_profile(run=run)
    run, calls = fake_ncu(raw_csv, ["==ERROR== something else", "==ERROR== something else"])
    with pytest.raises(RuntimeError, match="ncu exited with status 1"):
        nsight.run_profile(run=run)
    assert len(calls) == 2  # a second try without the optional metrics, then no more


@pytest.mark.skipif(backend.has_gpu(), reason="checks the CPU-mode refusals")
def test_without_a_gpu_the_profile_refuses_and_says_what_to_do(tmp_path, capsys):
    with pytest.raises(RuntimeError, match="there is no GPU here.*read a recorded profile"):
        nsight.require_profiler()
    with pytest.raises(RuntimeError, match="there is no GPU here"):
        suite.steps(quick=True)
    assert profile_target.main(["--manifest", str(tmp_path / "m.json")]) == 2
    assert "there is no GPU here" in capsys.readouterr().err and not (tmp_path / "m.json").exists()


def test_without_ncu_the_profile_refuses_and_says_where_to_get_it(monkeypatch):
    monkeypatch.setattr(backend, "has_gpu", lambda: True)
    monkeypatch.setattr(nsight, "find_ncu", lambda: None)
    with pytest.raises(RuntimeError, match="ncu, was not found.*CUDA toolkit"):
        nsight.require_profiler()


def recorded_profile(raw_csv: str, monkeypatch, skip_wgmma: bool = False) -> dict:
    """The results dict the profile suite would write from the fixture (wgmma skipped, as on a non-Hopper GPU)."""
    planned = profile_target.planned_launches()
    launches = nsight.parse_raw_csv(raw_csv)
    if skip_wgmma:
        planned[6]["skipped"] = "wgmma and TMA need Hopper"
        launches = [launch for launch in launches if "gemm_wgmma" not in launch["kernel"]]
    run = {"kernels": nsight.kernel_records(launches, planned), "launches": planned, "dropped": {}}
    monkeypatch.setattr(suite, "profiled", lambda quick: run)
    result = results.new_result("profile", {"quick": False, **suite.PARAMETERS})
    result["measurements"] = [suite.measure_kernel(entry["label"], False) for entry in planned]
    result["headline"] = suite.headline(result["measurements"])
    return result


def test_the_suite_records_one_measurement_per_kernel_and_a_headline(raw_csv, monkeypatch):
    result = recorded_profile(raw_csv, monkeypatch, skip_wgmma=True)
    naive, wgmma, v2 = (result["measurements"][i] for i in (0, 6, 8))
    assert naive["timing"]["clock"] == "ncu" and naive["timing"]["median_s"] == pytest.approx(0.027104352)
    assert naive["derived"]["dram_throughput_pct"] == 9.8 and naive["profile"]["stalls"]["long_scoreboard"] == 41.3
    assert wgmma["skipped"] == "wgmma and TMA need Hopper" and v2["parameters"]["group"] == "decode"
    assert result["headline"]["naive_sm_throughput_pct"] == 61.2
    assert result["headline"]["v2_merge_dram_throughput_pct"] == 21.5
    assert "wgmma_sm_throughput_pct" not in result["headline"]
    json.dumps(result)  # a results file holds it as it is


def test_the_chapter_figure_draws_a_table_and_stacked_bars_with_the_provenance(raw_csv, monkeypatch, capsys):
    result = recorded_profile(raw_csv, monkeypatch, skip_wgmma=True)
    result["card"] = "NVIDIA H100 80GB HBM3"
    fig = nsight.profile_figure("gemm", "GEMM steps", result)
    printed = capsys.readouterr().out
    assert "recorded: NVIDIA H100 80GB HBM3, measured 20" in printed
    assert "wgmma: skipped on the recorded GPU: wgmma and TMA need Hopper" in printed
    assert "naive" in printed and "long_scoreboard (" in printed
    ax = fig.axes[0]
    assert [label.get_text() for label in ax.get_xticklabels()] == list(profile_target.gemm.STEPS[:6])
    assert "NVIDIA H100 80GB HBM3" in fig.get_supxlabel()
    plt.close(fig)
    decode = nsight.profile_figure("decode", "paged decode", result)
    assert [label.get_text() for label in decode.axes[0].get_xticklabels()] == ["v1", "v2", "v2 merge"]
    plt.close(decode)


def test_until_a_profile_is_recorded_the_chapter_says_so(monkeypatch, capsys):
    def missing(name, card=None):
        raise FileNotFoundError(f"no recorded result {name!r}")

    monkeypatch.setattr(nsight, "load_result", missing)
    assert nsight.profile_figure("gemm", "GEMM steps") is None
    printed = capsys.readouterr().out
    assert printed.startswith("NOT YET MEASURED: run `python -m course_lib.bench profile` on an NVIDIA GPU with "
                              "Nsight Compute")
    assert "The figure will show" in printed


def test_stacked_bars_are_shares_of_the_stall_cycles_with_small_reasons_as_other():
    kernels = [{"label": "a", "warp_cycles_per_issue": 10.0,
                "stalls": {"long_scoreboard": 6.0, "barrier": 3.0, "selected": 1.0, "membar": 0.01}},
               {"label": "b", "warp_cycles_per_issue": None, "stalls": {"wait": 2.0, "selected": 1.0, "drain": None}}]
    fig, ax = plt.subplots()
    drawn = nsight.plot_stalls(ax, kernels)
    assert drawn == ["long_scoreboard", "barrier", "wait", "selected", "other"]
    heights = {container.get_label(): [bar.get_height() for bar in container] for container in ax.containers}
    assert heights["long scoreboard"] == pytest.approx([60.0, 0.0], abs=0.1)
    assert heights["wait"] == pytest.approx([0.0, 200 / 3])
    assert [sum(column) for column in zip(*heights.values(), strict=True)] == pytest.approx([100.0, 100.0])
    assert [text.get_text() for text in ax.texts] == ["10.0", "3.0"]  # b: no cycles figure, the stalls' sum
    with pytest.raises(ValueError, match="no profiled kernels"):
        nsight.plot_stalls(ax, [])
    plt.close(fig)
