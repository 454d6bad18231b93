"""Chapters 02, 03 and 03b's GEMM helpers: source excerpts and constants, the steps' arithmetic, the results
file read back, and the figures drawn from it. They read the course's .cu files and the recorded H100 results,
so they run the same in CPU and GPU mode."""

import matplotlib
import pytest

from course_lib import compile as cuda_compile
from course_lib.bench import Roofline, load_result
from course_lib.bench.suites import gemm as gemm_suite
from course_lib.kernels import gemm
from course_lib.labs import gemm_figures, gemm_sources, gemm_steps
from course_lib.labs.gemm_records import CUDA_CORE_STEPS, GemmResults, percent, speed_figures, tflops

matplotlib.use("Agg")
CARD = "nvidia-h100-80gb-hbm3"


@pytest.fixture(scope="module")
def results() -> GemmResults:
    return GemmResults(load_result("gemm", CARD))


def test_a_function_comes_with_its_comment_and_ends_where_its_braces_balance():
    text = gemm_sources.cuda_function("tensor_core.cuh", "grouped_tile")
    assert text.lstrip().startswith("//") and text.rstrip().endswith("}")
    assert text.count("{") == text.count("}")
    with pytest.raises(ValueError, match="defines no function 'no_such_kernel'"):
        gemm_sources.cuda_function("gemm.cu", "no_such_kernel")


def test_only_literal_constants_are_read():
    constants = gemm_sources.cuda_constants("gemm.cu")
    assert constants["BM"] == 128 and constants["TM"] == 8
    assert "THREADS" not in constants  # defined by an expression, not a literal
    assert gemm_sources.cuda_constants("gemm_wgmma.cu")["CONSUMERS"] == 2


def test_sections_and_excerpts_are_cut_from_the_source():
    assert gemm_sources.section("gemm_wgmma.cu", "7.").startswith("// ---- 7.")
    with pytest.raises(ValueError, match="no section"):
        gemm_sources.section("gemm.cu", "no such heading")
    assert gemm_sources.excerpt("a\nb first\nc\nd last\ne", "first", "last") == "b first\nc\nd last"
    assert gemm_sources.wgmma_shape() == (64, gemm_sources.cuda_constants("gemm_wgmma.cu")["BN"], 16)


def test_intensities_and_the_knee():
    assert gemm_steps.problem_intensity(4096, 4096, 4096) == pytest.approx(4096 / 3)
    assert gemm_steps.tile_intensity(128, 128) == 64
    knee = gemm_steps.knee(4096, ridge=260.0)
    assert gemm_steps.problem_intensity(knee, 4096, 4096) == pytest.approx(260.0)


def test_occupancy_names_the_resource_that_limits_it():
    limits = gemm_steps.occupancy(threads=128, registers_per_thread=255, shared_bytes=96 * 1024)
    assert limits == {"registers": 2, "threads": 16, "the block limit": 32, "shared memory": 2}
    assert gemm_steps.resource_lines("wmma", {}) == ["gemm_wmma<__nv_bfloat16>: no compiler report on this machine"]
    assert gemm_steps.resident_blocks("wmma", {}, 4096) is None


def test_resources_from_a_report_count_the_dynamic_shared_memory():
    report = cuda_compile.KernelResources("gemm_mma_sync<__nv_bfloat16>", "sm_90a", registers=255, shared_bytes=0,
                                          stack_bytes=0, spill_store_bytes=0, spill_load_bytes=0, barriers=1)
    first, second = gemm_steps.resource_lines("mma_sync", {report.kernel: report})
    assert "255 registers a thread" in first and "no spills" in first
    assert "2 blocks, 8 warps" in second
    assert gemm_steps.resident_blocks("mma_sync", {report.kernel: report}, 8192) == 2


def test_the_tiles_grow_along_the_progression():
    tiles = gemm_steps.step_tiles()
    assert list(tiles) == list(gemm.STEPS)
    intensities = [gemm_steps.tile_intensity(*tiles[step][0]) for step in ("naive", "smem_tiled", "vectorized",
                                                                               "mma_sync", "wgmma")]
    assert intensities == sorted(intensities)
    assert tiles["naive"][1] is None


def test_the_feed_table_has_a_row_per_step_and_tma_copies_whole_tiles():
    table = gemm_steps.feed_table().splitlines()
    rows = {line.split()[0]: line for line in table[2:6]}
    assert list(rows) == ["vectorized", "wmma", "mma_sync", "wgmma"]
    assert "TMA" in rows["wgmma"] and "a tile" in rows["wgmma"]


def test_grouped_order_reads_fewer_distinct_slices_than_row_by_row():
    assert gemm_steps.distinct_slices("row by row", blocks=64, tiles_n=64, group_m=8) == (1, 64)
    assert gemm_steps.distinct_slices("grouped", blocks=64, tiles_n=64, group_m=8) == (8, 8)


def test_the_results_file_answers_by_name_and_shape(results):
    best = results.best_cuda_core(4096)
    assert best["parameters"]["backend"] in CUDA_CORE_STEPS
    assert all(tflops(best) >= tflops(results.square(step, 4096)) for step in CUDA_CORE_STEPS)
    n, record = results.largest_measured("cuBLAS")
    assert n == max(gemm_suite.SQUARE_SIZES) and tflops(record) > 100
    lines = results.recorded_lines("wgmma")
    assert lines[0].startswith("Recorded: NVIDIA H100") and "of cuBLAS" in lines[1]
    series = results.decode_series("cuBLASLt", 4096, 4096)
    assert [m["parameters"]["shape"][0] for m in series] == list(gemm_suite.DECODE_ROWS)
    assert results.has_decode_shapes()


def test_no_results_file_means_no_records_and_says_why():
    empty = GemmResults(None, "no gemm.json")
    assert empty.measurements == [] and empty.square("wgmma", 4096) is None
    assert empty.best_cuda_core(4096) is None and not empty.has_decode_shapes()
    assert empty.recorded_lines("wgmma")[1] == "  4096^3: not measured in this results file"


def test_percent_keeps_a_decimal_only_below_ten_percent():
    assert (percent(0.032), percent(0.87)) == ("3.2%", "87%")


def test_speeds_are_read_from_the_file_in_cpu_mode(results, monkeypatch):
    monkeypatch.setattr("course_lib.backend.has_gpu", lambda: False)
    speeds = speed_figures(results, ("vectorized", "wgmma", "cuBLAS"), 8192)
    assert set(speeds.tflops) == {"vectorized", "wgmma", "cuBLAS"} and speeds.source.startswith("recorded in one run")
    assert len(gemm_figures.plot_speeds(speeds, 8192).axes) == 1


def test_the_figures_carry_their_source(results):
    figure, gaps = gemm_figures.plot_progression(results)
    assert len(figure.axes) == 2 and "recorded: NVIDIA H100" in figure.get_supxlabel()
    assert all(gap.split("^3, ")[0] in {"4096", "8192"} for gap in gaps)
    roof = Roofline(3.0e12, 780e12)
    points = [{"label": "wgmma", "intensity": 85.3, "tflops": 600.0}]
    assert "roofs: env" in gemm_figures.plot_steps_on_roofline(roof, points, 50.0, results, "env").get_supxlabel()
    assert "roofs: env" in gemm_figures.plot_decode(roof, results, "env").get_supxlabel()
    record = results.find("cuBLASLt", "algorithms", gemm_suite.ALGORITHM_SHAPE.mnk)
    figure = gemm_figures.plot_candidates(record, results.source)
    assert len(figure.axes[0].get_yticklabels()) == len(record["parameters"]["candidates"])
