"""Warp divergence counted from the sides a warp's lanes take, and occupancy from a compile report."""

import numpy as np
import pytest

from course_lib.compile import KernelResources
from course_lib.labs import warps


def test_passes_count_the_sides_in_each_warp():
    side = np.array([0, 1] * 16 + [1] * 32 + [0, 1, 2, 3] * 4, dtype=np.int32)  # the last warp is half full
    assert warps.warp_passes(side).tolist() == [2, 1, 4]
    assert warps.lane_efficiency(side) == pytest.approx(80 / (32 * 7))


@pytest.mark.parametrize(("rule", "passes"), [(0, 2), (1, 1), (4, 4)])
def test_branch_kernel_splits_warps_by_its_rule(rule, passes):
    side = warps.run_branches(rule, 128, 64, np.random.default_rng(0))
    assert (warps.warp_passes(side) == passes).all()


def test_sorted_data_split_at_most_one_warp():
    side = warps.run_branches(3, 256, 64, np.random.default_rng(1))
    assert (warps.warp_passes(side) > 1).sum() <= 1


def test_run_branches_rejects_a_block_that_is_not_whole_warps():
    with pytest.raises(ValueError, match="multiple of the warp size"):
        warps.run_branches(0, 64, 48, np.random.default_rng(0))


def test_occupancy_row_names_the_limit():
    report = KernelResources("k", "sm_90", registers=64, shared_bytes=0, stack_bytes=0, spill_store_bytes=0,
                             spill_load_bytes=0, barriers=0)
    row = warps.occupancy_row(report, 256)
    assert (row["blocks"], row["warps"], row["limited_by"]) == (4, 32, "registers")
    assert row["occupancy"] == pytest.approx(0.5)
    assert "limit" in warps.occupancy_table([row])
    assert "64 registers a thread" in warps.registers_sweep(256)


def test_driver_occupancy_needs_a_gpu():
    from course_lib import backend

    if backend.has_gpu():
        pytest.skip("GPU mode: chapter 01 calls the driver")
    with pytest.raises(RuntimeError, match="needs a GPU"):
        warps.driver_blocks_per_sm(object(), 256)
