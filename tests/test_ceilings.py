"""The reference copy bandwidth, the recorded copies by size, and the kernels above the practical roof."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from course_lib import backend  # noqa: E402
from course_lib.bench.roofline import Roofline, measured_roofline, reference_copy  # noqa: E402
from course_lib.bench.runner import run_suite  # noqa: E402
from course_lib.bench.suites import copy_sizes  # noqa: E402
from course_lib.labs import ceilings  # noqa: E402

H100 = "nvidia-h100-80gb-hbm3"


def test_reference_copy_is_the_env_suites_256_mib_copy():
    copy = reference_copy(H100)
    assert copy.buffer_bytes == 256 << 20
    assert copy.folder == H100 and "measured" in copy.source
    assert 1000 < copy.gbps < 3350  # below the H100 SXM's datasheet HBM bandwidth
    roof = measured_roofline(H100)
    assert roof.peak_bytes_per_s == copy.bytes_per_s


def test_recorded_copies_span_sizes_and_mark_the_reference():
    copy = reference_copy(H100)
    points = ceilings.recorded_copies(H100)
    sizes = {point.buffer_bytes for point in points}
    assert min(sizes) < copy.buffer_bytes < max(sizes)
    assert any(point.suite == "paged_attention" for point in points)
    assert "env*" in ceilings.copy_table(points, copy)
    findings = ceilings.copy_findings(points, copy, 3350.0, 50 << 20)
    assert any(line.startswith("at the reference size") for line in findings)


def test_above_the_roof_finds_only_figures_above_it():
    roof = measured_roofline(H100)
    datasheet = Roofline(3350e9, 989.5e12, label="datasheet")
    rows = ceilings.above_the_roof(H100, roof, datasheet)
    assert rows and all(row["over_measured"] > 1 for row in rows)
    assert all(row["over_datasheet"] < 1 for row in rows if row["unit"] == "TFLOP/s")
    assert "/ datasheet" in ceilings.beyond_table(rows)
    impossible = Roofline(1e18, 1e18)
    assert ceilings.above_the_roof(H100, impossible) == []


def test_draw_roofs_and_copy_sizes():
    copy = reference_copy(H100)
    fig, (left, right) = plt.subplots(1, 2)
    ceilings.draw_roofs(left, measured_roofline(H100), Roofline(3350e9, 989.5e12, label="datasheet"))
    ceilings.draw_copy_sizes(right, ceilings.recorded_copies(H100), copy, 3350.0, 50 << 20)
    assert len(left.get_lines()) >= 3 and right.get_legend() is not None
    plt.close(fig)


def test_copy_sizes_suite_runs_its_quick_sizes_in_this_mode():
    result = run_suite("copy_sizes", quick=True, progress=False)
    by_method = copy_sizes.bandwidth_by_size(result)
    assert [size for size, _ in by_method["copy"]] == copy_sizes.SIZES[backend.DECISION.mode]["quick"]
    assert result["headline"]["copy_gbps_max"] > 0
