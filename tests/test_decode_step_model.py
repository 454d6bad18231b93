"""The engine's decode step on the capture model: a replay equals the eager step, padding rows change nothing and
write nothing, and costed from the recorded engine.json the model's eager step spans the recorded one."""

import numpy as np
import pytest

from course_lib.bench import load_result
from course_lib.labs.decode_step_model import (
    INPUTS,
    DecodeGraphsModel,
    StepShape,
    costs_from_engine_result,
    model_timelines,
)
from course_lib.labs.graph_capture import CopyNode, StaleAddressError

BATCH = {"token_ids": [3, 5, 7], "context_lens": [5, 9, 2], "block_tables": [[0, 1], [2, 3, 4], [5]]}


def test_a_replay_of_a_padded_batch_equals_the_eager_step():
    eager, graphed = DecodeGraphsModel(seed=3), DecodeGraphsModel(seed=3)
    expected = eager.run_eager(**BATCH)
    np.testing.assert_allclose(graphed.run(**BATCH), expected, rtol=1e-6)  # 3 rows on the graph of 4
    np.testing.assert_allclose(graphed.cache.array, eager.cache.array, rtol=1e-6)
    alone = DecodeGraphsModel(seed=3).run([3], [5], [[0, 1]])  # row 0 alone, on the graph of 1
    np.testing.assert_allclose(alone, expected[:1], rtol=1e-6)


def test_padding_rows_write_nothing_into_the_cache():
    model = DecodeGraphsModel(seed=1)
    before = model.cache.array.copy()
    model.run([2], [6], [[4, 7]])  # batch 1: no padding; slot 7 * 4 + 1
    changed = np.argwhere((model.cache.array != before).any(axis=2))
    assert {int(slot) for _, slot in changed} == {29}
    before = model.cache.array.copy()
    model.run([2, 3, 4], [6, 1, 3], [[4, 7], [9], [10]])  # padded to 4: one padding row
    changed = {int(slot) for _, slot in np.argwhere((model.cache.array != before).any(axis=2))}
    assert changed <= {29, 36, 42}


def test_the_step_captures_its_copies_and_the_engines_kernels():
    model = DecodeGraphsModel(StepShape(num_layers=3), batch_sizes=(2,))
    nodes = model.graphs[2].nodes
    assert sum(isinstance(node, CopyNode) for node in nodes) == len(INPUTS)
    assert len(nodes) == len(INPUTS) + 1 + 6 * 3 + 1


def test_a_replay_refuses_a_reallocated_input():
    model = DecodeGraphsModel(batch_sizes=(1,))
    model.device.malloc("b1.token_ids", 1)
    with pytest.raises(StaleAddressError, match="'b1.token_ids'"):
        model.run([1], [2], [[0]])


def test_a_step_checks_its_batch():
    model = DecodeGraphsModel(batch_sizes=(1, 2))
    with pytest.raises(ValueError, match="fits no captured size"):
        model.run([1, 2, 3], [2, 2, 2], [[0], [1], [2]])
    with pytest.raises(ValueError, match="context lengths must be 1 to 16"):
        model.run([1], [17], [[0, 1, 2, 3, 4]])


def test_costed_from_engine_json_the_model_spans_the_recorded_steps():
    engine = load_result("engine", "nvidia-h100-80gb-hbm3")
    found = {m["parameters"].get("role"): m for m in engine["measurements"]}
    timelines = model_timelines(engine, num_layers=16)
    host_end = max(r["end_us"] for r in timelines["eager"] if r["lane"] == "host")
    assert host_end == pytest.approx(found["eager"]["timing"]["median_s"] * 1e6)
    gpu_busy = sum(r["end_us"] - r["start_us"] for r in timelines["graph"] if r["lane"] == "gpu")
    recorded = sum(value for key, value in found["graph"]["derived"].items() if key.startswith("us_"))
    assert gpu_busy == pytest.approx(recorded)
    assert [r["lane"] for r in timelines["graph"]].count("host") == 1
    costs = costs_from_engine_result(engine, DecodeGraphsModel(StepShape(num_layers=16), batch_sizes=(1,)))
    assert costs.kernel_s["projections"] == pytest.approx(found["graph"]["derived"]["us_projections"] * 1e-6 / 65)
