"""Where the eager decode step's time goes, read from the recorded engine.json: the figures and the figure."""

import pytest

from course_lib.bench import load_result
from course_lib.labs.step_time import plot_step_time, step_time


def test_the_recorded_eager_step_is_mostly_host_work_other_than_launches():
    engine = load_result("engine", "nvidia-h100-80gb-hbm3")
    budget = step_time(engine)
    assert budget.launches_s == pytest.approx(budget.graph_nodes * budget.launch_s)
    assert budget.other_host_s == pytest.approx(budget.eager_s - budget.launches_s)
    assert budget.other_host_s > budget.launches_s  # the review's point: not launch-bound
    assert budget.gpu_kernels_s is not None and budget.gpu_kernels_s < budget.graph_s


def test_the_figure_draws_three_rows_and_says_where_the_numbers_came_from():
    figure = plot_step_time(step_time(load_result("engine", "nvidia-h100-80gb-hbm3")), "a card, measured a date")
    (axes,) = figure.axes
    assert [label.get_text() for label in axes.get_yticklabels()] == ["eager step", "graphed step (replay)",
                                                                        "GPU kernel time"]
    assert "GPU mode, recorded: a card" in figure.get_supxlabel()


def test_a_file_without_the_step_says_what_to_run():
    with pytest.raises(KeyError, match="python -m course_lib.bench engine"):
        step_time({"measurements": []})
