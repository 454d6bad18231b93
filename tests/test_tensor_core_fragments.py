"""Chapter 02's helpers: fragment layouts, the ldmatrix model, the swizzle, number formats, the copy pipeline and
the accuracy experiments. All of it is NumPy and matplotlib: it runs the same in CPU and GPU mode."""

import matplotlib
import ml_dtypes
import numpy as np
import pytest

from course_lib.kernels import precision
from course_lib.labs import copy_pipeline, format_accuracy, number_formats
from course_lib.labs import tensor_core_fragments as fragments

matplotlib.use("Agg")


@pytest.mark.parametrize("name", list(fragments.FRAGMENTS))
def test_every_element_of_each_fragment_is_held_by_exactly_one_lane(name):
    element, shape, per_lane = fragments.FRAGMENTS[name]
    lane_of = fragments.owners(element, shape, per_lane)
    assert sorted(np.bincount(lane_of.ravel())) == [per_lane] * 32


def test_a_layout_that_holds_an_element_twice_is_refused():
    with pytest.raises(AssertionError, match="held by lanes 0 and 0"):
        fragments.owners(lambda lane, i: (0, 0), (16, 8), 4)


def test_the_ldmatrix_model_gives_each_lane_the_fragments_mma_sync_expects():
    tile = np.arange(16 * 16).reshape(16, 16)  # each value is its own address
    row_starts = [(lane % 16, 8 * (lane // 16)) for lane in range(32)]  # step 6's lane_offsets
    a_wanted = [[tile[fragments.a_element(lane, i)] for i in range(8)] for lane in range(32)]
    assert np.array_equal(fragments.ldmatrix(tile, row_starts), a_wanted)
    b_loaded = fragments.ldmatrix(tile, row_starts, trans=True)
    row, col = fragments.b_element(5, 0)
    assert b_loaded[5, 0] == tile[row, col]  # .trans: the k-pairs of B's columns


def test_the_swizzle_reads_every_chunk_column_in_one_pass_and_the_plain_layout_does_not():
    plain, swizzled = fragments.bank_groups(8, swizzled=False), fragments.bank_groups(8, swizzled=True)
    assert max(fragments.ldmatrix_passes(plain, c) for c in range(8)) == 8  # 128-byte rows: one bank group
    assert all(fragments.ldmatrix_passes(swizzled, c) == 1 for c in range(8))
    assert sorted(swizzled[0]) == list(range(8))  # the XOR only permutes chunks within a 128-byte line


def test_the_instruction_table_counts_the_multiply_adds_of_one_mma_sync():
    table = fragments.instruction_table()
    row = next(line for line in table.splitlines() if line.startswith("mma.sync") and "m16n8k16" in line)
    assert row.split()[4:8] == ["32", "2048", "64", "8"]  # threads, FMAs, FMAs per thread, A elements per thread
    assert "opaque" in table and "smem*" in table


def test_the_fragment_and_bank_figures_draw_one_panel_per_tile():
    assert len(fragments.plot_fragments(marked_lane=5).axes) == 3
    assert len(fragments.plot_bank_groups({"A": 4, "B": 8}).axes) == 4


def test_the_ieee_rules_reproduce_ml_dtypes_except_for_e4m3_which_has_no_infinity():
    facts = number_formats.format_facts()
    assert list(facts) == list(precision.FORMATS)
    for fmt in ("float16", "bfloat16", "float8_e5m2"):
        assert facts[fmt] == pytest.approx(number_formats.ieee_like(facts[fmt]["exponent"], facts[fmt]["mantissa"]))
    assert facts["float8_e4m3"]["max"] == float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max) == 448
    assert number_formats.ieee_like(4, 3)["max"] == 240
    assert facts["tf32"]["mantissa"] == 10 and facts["tf32"]["normal"] == facts["float32"]["normal"]


def test_the_format_table_and_the_bit_picture_show_every_format():
    facts = number_formats.format_facts()
    table = number_formats.format_table(facts)
    assert [line.split()[0] for line in table.splitlines()[1:]] == list(facts)
    figure, axes = matplotlib.pyplot.subplots()
    number_formats.draw_bit_layouts(axes, facts)
    assert [label.get_text() for label in axes.get_yticklabels()] == list(reversed(facts))


@pytest.mark.parametrize("stages", [1, 2, 4])
def test_the_pipeline_computes_a_tile_only_after_its_copy_landed_and_one_tile_at_a_time(stages):
    loads, computes = copy_pipeline.schedule(stages, tiles=8, load_time=3.0, compute_time=1.0)
    assert all(begin >= start + 3.0 for start, begin in zip(loads, computes, strict=True))
    assert all(later >= earlier + 1.0 for earlier, later in zip(computes, computes[1:], strict=False))


def test_more_stages_finish_sooner_and_one_stage_is_serial():
    done = {s: copy_pipeline.schedule(s, 8, 3.0, 1.0)[1][-1] + 1.0 for s in (1, 2, 4)}
    assert done[1] == 8 * (3.0 + 1.0)
    assert done[4] < done[2] < done[1]
    assert len(copy_pipeline.plot_schedules((4, 2, 1), 8, 3.0, 1.0).axes) == 1


def test_fp16_accumulators_lose_accuracy_with_k_and_fp32_accumulators_do_not(rng):
    a = rng.standard_normal((32, 8192), dtype=np.float32)
    b = rng.standard_normal((8192, 32), dtype=np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    fp32_sums = precision.relative_error(precision.emulated_matmul(a, b, "float16"), exact)
    fp16_sums = precision.relative_error(format_accuracy.fp16_accumulators(a, b), exact)
    assert fp16_sums > 4 * fp32_sums


def test_fp16_overflows_where_bf16_does_not(rng):
    a, b = (rng.standard_normal((16, 16), dtype=np.float32) for _ in range(2))
    assert np.isinf(format_accuracy.error_at_scale(a, b, "float16", 2.0**20))
    assert format_accuracy.error_at_scale(a, b, "bfloat16", 2.0**20) < 1e-2
    assert format_accuracy.error_at_scale(a, b, "float16", 2.0**8, round_c_to="float16") == np.inf


def test_the_accuracy_figures_say_how_they_were_computed(rng):
    k_values = [64, 256]
    errors = {fmt: [1e-3, 1e-3] for fmt in (*precision.FORMATS, format_accuracy.FP16_ACC)}
    figure = format_accuracy.plot_errors_by_k(errors, k_values, size=16)
    assert "mode) with course_lib.kernels.precision" in figure.get_supxlabel()
    a, b = (rng.standard_normal((8, 8), dtype=np.float32) for _ in range(2))
    figure = format_accuracy.plot_range(a, b, np.arange(-4, 5, 4))
    assert "8 x 8 x 8 product" in figure.axes[0].get_title()
