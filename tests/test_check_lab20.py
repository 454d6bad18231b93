"""Lab 20 checkers: the knee and the KV limit pass when computed as the lab does, and each known mistake is rejected
with its hint. Both references are also held against the course's cost model on its catalogue and named models: the
knee is where ``step_cost``'s MLP turns compute-bound, and the KV limit is ``cost.memory``'s; and the checker's
records have the attributes of the cost model's, so the same solutions take either."""

from __future__ import annotations

import math

import pytest
from checker_testing import rejected_with, unwritten

from course_lib.check import lab20
from course_lib.check.lab20 import (
    BYTES_PER_VALUE,
    batch_case,
    check_decode_knee,
    check_max_batch,
    decode_knee_reference,
    knee_cases,
    max_batch_reference,
)
from course_lib.scaling.cost import Assumptions, Batch, Layout, memory, step_cost
from course_lib.scaling.hardware import Hardware, list_keys
from course_lib.scaling.shapes import MODELS, dtype_bytes, shape


def decode_knee(hw, weights):
    return dtype_bytes(weights) * hw.flops_per_s(weights) / (2 * hw.hbm_bytes_per_s)


def max_batch(model, hw, context, memory_utilization):
    free = hw.hbm_bytes * memory_utilization - model.parameters() * 2
    kv_per_token = 2 * model.num_layers * model.num_kv_heads * model.head_dim * 2
    return max(0, int(free // (context * kv_per_token)))


def test_the_solutions_pass(capsys):
    check_decode_knee(decode_knee)
    check_max_batch(max_batch)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("PASSED decode_knee: 6 random cases (bfloat16, float8 and float4 weights")
    assert lines[1].startswith("PASSED max_batch: 8 random cases (random models and GPUs, one model too big")


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (lambda hw, w: 2 * decode_knee(hw, w), "a multiply-add is 2 FLOPs"),
        (lambda hw, w: hw.flops_per_s(w) / hw.hbm_bytes_per_s, "the ridge point in FLOPs per byte"),
        (lambda hw, w: 1 / decode_knee(hw, w), "the knee's inverse"),
        (lambda hw, w: 2 * hw.flops_per_s(w) / (2 * hw.hbm_bytes_per_s), "take dtype_bytes(weights) bytes each"),
        (lambda hw, w: dtype_bytes(w) * hw.flops_per_s("bfloat16") / (2 * hw.hbm_bytes_per_s), "the bfloat16 rate"),
        (lambda hw, w: 8 * decode_knee(hw, w), "not bits"),
        (lambda hw, w: math.ceil(decode_knee(hw, w)), "rounded"),
    ],
    ids=["no-factor-2", "ridge", "inverted", "bf16-bytes", "bf16-rate", "bits", "ceil"],
)
def test_knee_rejects_known_mistakes(seed, wrong, hint):
    message = rejected_with(check_decode_knee, wrong)
    assert hint in message and "weights" in message and "case " in message


def batch_with(kv_values=2, query_heads=False, one_layer=False, weight_bytes=2, all_memory=False,
               rounding=math.floor, clamp=True):
    """The solution with one part counted the way a known mistake counts it."""

    def wrong(model, hw, context, memory_utilization):
        free = hw.hbm_bytes * (1 if all_memory else memory_utilization) - model.parameters() * weight_bytes
        heads = model.num_heads if query_heads else model.num_kv_heads
        layers = 1 if one_layer else model.num_layers
        batch = int(rounding(free / (context * kv_values * layers * heads * model.head_dim * 2)))
        return max(0, batch) if clamp else batch

    return wrong


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (batch_with(kv_values=1), "twice the batch"),
        (batch_with(query_heads=True), "only the"),
        (batch_with(one_layer=True), "one layer's keys and values"),
        (batch_with(weight_bytes=0), "the weights take their share"),
        (batch_with(weight_bytes=1), "each bfloat16 weight takes 2 bytes"),
        (batch_with(all_memory=True), "memory_utilization of the memory"),
        (batch_with(rounding=math.ceil), "round down"),
        (batch_with(clamp=False), "not a negative batch"),
        (lambda model, hw, context, u: (hw.hbm_bytes * u - model.parameters() * 2) / (context * 2 * model.num_layers
                                        * model.num_kv_heads * model.head_dim * 2), "a fraction"),
    ],
    ids=["keys-only", "query-heads", "one-layer", "no-weights", "weights-one-byte", "all-memory", "ceil", "negative",
         "float"],
)
def test_max_batch_rejects_known_mistakes(seed, wrong, hint):
    message = rejected_with(check_max_batch, wrong)
    assert hint in message and "memory_utilization" in message


def test_unwritten_and_wrong_signature():
    def stub(hw, weights):
        raise NotImplementedError("Exercise: write decode_knee; see the text above")

    assert unwritten(check_decode_knee, stub).startswith("decode_knee is not written yet")
    assert "calls it as max_batch(model, hw, context, memory_utilization)" in rejected_with(
        check_max_batch, lambda model, hw: 0)


CATALOGUE = [Hardware.datasheet(key) for key in list_keys()]


@pytest.mark.parametrize("weights", ["bfloat16", "float8"])
def test_the_knee_is_where_step_cost_turns_compute_bound(weights):
    """The MLP of an 8B model, in the course's cost model, is memory-bound up to B* and compute-bound a quarter
    above it: its activations' bytes, which the knee leaves out, move the turn up by a tenth to a fifth."""
    model, assumptions = shape("llama-3.1-8b"), Assumptions(weights=weights)
    for hw in CATALOGUE:
        knee = decode_knee_reference(hw, weights)
        assert knee == decode_knee(hw, weights)

        def mlp_bound(batch, hw=hw):
            costs = step_cost(model, hw, Layout(), Batch(batch, 1, 1), assumptions).costs
            return next(cost.bound for cost in costs if cost.name == "mlp")

        assert mlp_bound(math.floor(knee)) == "memory" and mlp_bound(math.ceil(1.25 * knee)) == "compute"


@pytest.mark.parametrize("name", list(MODELS))
def test_max_batch_reference_is_what_cost_memory_counts(name):
    model = shape(name)
    for hw in CATALOGUE:
        for context in (1000, 8192, 131072):
            for utilization in (0.8, 0.9, 0.95):
                expected = memory(model, hw, Layout(), Assumptions(memory_utilization=utilization)).max_batch(context)
                assert max_batch_reference(model, hw, context, utilization) == expected
                assert max_batch(model, hw, context, utilization) == expected


def test_the_checkers_records_are_what_the_solutions_expect(rng):
    assert {dtype: dtype_bytes(dtype) for dtype in BYTES_PER_VALUE} == BYTES_PER_VALUE
    for _ in range(40):
        model, hw, context, utilization = batch_case(rng)
        assert max_batch_reference(model, hw, context, utilization) == max_batch(model, hw, context, utilization)
    assert max_batch_reference(*batch_case(rng, fits=False)) == 0
    cases = knee_cases(rng)
    assert cases[0][1] == "float4" and {weights for _, weights in cases} == {"bfloat16", "float8", "float4"}
    assert lab20.KNEE_CASES % 3 == 0
