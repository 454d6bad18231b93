"""Kernel timelines: records drawn as host and GPU lanes, their summary, the timeline suite's headline, and the
message in CPU mode."""

import matplotlib.pyplot as plt
import pytest

from course_lib import backend
from course_lib.bench.suites import timeline as suite
from course_lib.bench.timeline import plot_timeline, record_timeline, relative, summary

RECORDS = [{"lane": "host", "name": "cuLaunchKernel", "start_us": 100.0, "end_us": 106.0},
           {"lane": "gpu", "name": "matvec", "start_us": 104.0, "end_us": 110.0},
           {"lane": "host", "name": "cuLaunchKernel", "start_us": 106.0, "end_us": 112.0},
           {"lane": "gpu", "name": "paged_attention", "start_us": 112.0, "end_us": 115.0}]


def test_records_start_at_zero_and_lanes_are_summed_without_overlap():
    shifted = relative(RECORDS)
    assert shifted[0]["start_us"] == 0.0 and shifted[-1]["end_us"] == 15.0
    assert summary(shifted) == {"span_us": 15.0, "gpu_busy_us": 9.0, "host_busy_us": 12.0}
    overlapping = [*RECORDS, {"lane": "gpu", "name": "again", "start_us": 105.0, "end_us": 108.0}]
    assert summary(overlapping)["gpu_busy_us"] == 9.0


def test_a_timeline_draws_one_bar_per_record_in_two_lanes():
    fig, ax = plt.subplots()
    plot_timeline(ax, relative(RECORDS), "synthetic")
    assert [label.get_text() for label in ax.get_yticklabels()] == ["GPU: kernels", "host: launches"]
    assert sum(len(collection.get_paths()) for collection in ax.collections) == len(RECORDS)
    plt.close(fig)


def test_a_timeline_refuses_what_it_cannot_draw():
    fig, ax = plt.subplots()
    with pytest.raises(ValueError, match="no records"):
        plot_timeline(ax, [])
    with pytest.raises(ValueError, match=r"lanes \['cpu'\]"):
        plot_timeline(ax, [{**RECORDS[0], "lane": "cpu"}])
    plt.close(fig)


@pytest.mark.skipif(backend.has_gpu(), reason="checks the CPU-mode message")
def test_recording_without_a_gpu_says_why_and_what_to_do_instead():
    with pytest.raises(RuntimeError, match="records GPU work, and there is no GPU here.*capture model"):
        record_timeline(lambda: None)
    with pytest.raises(RuntimeError, match="records GPU kernels with CUPTI"):
        suite.steps(quick=True)


def test_the_suite_headline_is_each_steps_gpu_busy_fraction():
    measurements = [{"parameters": {"role": f"timeline {how}"}, "derived": {"span_us": 100.0, "gpu_busy_us": busy}}
                    for how, busy in (("eager", 20.0), ("graph", 90.0))]
    assert suite.headline(measurements) == {"gpu_busy_fraction_eager": 0.2, "gpu_busy_fraction_graph": 0.9}
