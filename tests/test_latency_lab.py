"""Lab 20's helpers: what the live sweep shows in each mode, and the decode model with the KV-capacity ceiling."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from course_lib.labs.latency import draw_decode_model, sweep_caveat  # noqa: E402


def test_cpu_caveat_says_what_the_sweep_does_not_show():
    assert "does NOT show a GPU's decode roofline" in sweep_caveat("cpu")
    assert "launch" in sweep_caveat("gpu")


def test_decode_model_marks_knee_and_capacity():
    batches = np.array([1, 2, 4, 8, 16])
    fig, axes = plt.subplots(1, 2)
    draw_decode_model(axes, batches, {"a": np.full(5, 1e-3), "b": np.full(5, 2e-3)}, 8.0, {"a": 4, "b": 0}, 4096)
    labels = [text.get_text() for text in axes[1].get_legend().get_texts()]
    assert any("KV capacity, a: 4" in label for label in labels)
    assert any("compute knee" in label for label in labels)
    plt.close(fig)
