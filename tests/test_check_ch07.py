"""Chapter 07 checkers: the right answers pass, and each known mistake is rejected with its hint.

The decode-step reference is also held against ``course_lib.scaling.cost.step_cost``, the chapter's own model:
both count the same weights, keys and values, so they agree where the simple model's one roofline is a fair
summary of step_cost's roofline per operation group.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from checker_testing import rejected_with

from course_lib.check.ch07 import (
    Candidate,
    best_layout_reference,
    check_best_layout,
    check_decode_step_seconds,
    decode_case,
    decode_step_reference,
    kv_cache_bytes,
    layout_candidates,
    layout_target,
)
from course_lib.scaling.cost import Batch, Layout, step_cost
from course_lib.scaling.hardware import Hardware
from course_lib.scaling.plan import Workload, plan
from course_lib.scaling.shapes import shape

# --- decode_step_seconds -------------------------------------------------------------------------------------


def decode_step_seconds(params, layers, kv_heads, head_dim, batch, context, bytes_per_value, hbm_bytes_per_s,
                        flops_per_s):
    weight_bytes = params * bytes_per_value
    kv_bytes = batch * context * layers * 2 * kv_heads * head_dim * bytes_per_value
    flops = 2 * params * batch
    return max((weight_bytes + kv_bytes) / hbm_bytes_per_s, flops / flops_per_s)


def decode_with(weight_reads=None, kv_values=2, kv_sequences=None, flops_per_weight=2, flop_tokens=None,
                combine=max, scale=1.0):
    """The solution with one part counted wrong; None means 'as the solution counts it'."""

    def wrong(params, layers, kv_heads, head_dim, batch, context, bytes_per_value, hbm_bytes_per_s, flops_per_s):
        weight_bytes = params * bytes_per_value * (1 if weight_reads is None else batch)
        sequences = batch if kv_sequences is None else kv_sequences
        kv_bytes = sequences * context * layers * kv_values * kv_heads * head_dim * bytes_per_value
        flops = flops_per_weight * params * (batch if flop_tokens is None else flop_tokens)
        return scale * combine((weight_bytes + kv_bytes) / hbm_bytes_per_s, flops / flops_per_s)

    return wrong


def test_decode_step_seconds_accepts_the_solution(capsys):
    assert check_decode_step_seconds(decode_step_seconds) is None
    assert capsys.readouterr().out.startswith("PASSED decode_step_seconds: 12 random cases (memory-bound and "
                                              "compute-bound, seed ")


def test_decode_step_seconds_accepts_the_reference_and_other_arithmetic():
    check_decode_step_seconds(decode_step_reference)

    def in_another_order(params, layers, kv_heads, head_dim, batch, context, bytes_per_value, hbm, rate):
        kv_per_token = 2.0 * layers * kv_heads * head_dim * bytes_per_value
        memory_s = params * bytes_per_value / hbm + batch * context * kv_per_token / hbm
        return max(memory_s, batch * (2.0 * params / rate))

    check_decode_step_seconds(in_another_order)


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (decode_with(kv_values=0), "weights' bytes alone"),
        (decode_with(kv_values=1), "keys AND values"),
        (decode_with(kv_sequences=1), "each of the batch's sequences reads its own"),
        (decode_with(weight_reads="per sequence"), "once per sequence"),
        (decode_with(flops_per_weight=1), "a multiply-add is 2 FLOPs"),
        (decode_with(flop_tokens=1), "counts the FLOPs of one token"),
        (decode_with(combine=lambda memory, compute: memory + compute), "memory time + compute time"),
        (decode_with(combine=min), "the smaller of the two times"),
        (decode_with(scale=1e3), "factor of 1000"),
    ],
    ids=["no-kv", "keys-only", "kv-of-one-sequence", "weights-per-sequence", "one-flop", "flops-of-one-token", "sum",
         "min", "milliseconds"],
)
def test_decode_step_seconds_rejects_known_mistakes(seed, wrong, hint):
    message = rejected_with(check_decode_step_seconds, wrong)
    assert hint in message and "decode_step_seconds(params=" in message and ", expected " in message


def test_decode_step_seconds_names_the_regime_of_the_failing_case(seed):
    assert "a compute-bound step" in rejected_with(check_decode_step_seconds, decode_with(flops_per_weight=1))
    assert "a memory-bound step" in rejected_with(check_decode_step_seconds, decode_with(kv_values=0))


def test_decode_step_seconds_unknown_mistake_still_shows_both_values(seed):
    message = rejected_with(check_decode_step_seconds, decode_with(scale=1.01))
    assert ", expected " in message and "Hint" not in message


def test_decode_step_seconds_missing_return_and_wrong_signature():
    assert "forget to `return`" in rejected_with(check_decode_step_seconds, lambda *args: None)
    message = rejected_with(check_decode_step_seconds, lambda params, layers, batch: 0.0)
    assert "but the checker calls it as decode_step_seconds(params, layers, kv_heads" in message


def test_decode_cases_are_clearly_on_their_side_of_the_ridge():
    rng = np.random.default_rng(5)
    for case in range(200):
        params, layers, kv_heads, head_dim, batch, context, value_bytes, hbm, rate = decode_case(rng, case % 2 == 0)
        kv_bytes = kv_cache_bytes(layers, kv_heads, head_dim, batch, context, value_bytes)
        memory_s = (params * value_bytes + kv_bytes) / hbm
        compute_s = 2 * params * batch / rate
        assert batch >= 3
        assert (compute_s * 2.5 <= memory_s) if case % 2 == 0 else (compute_s >= 2.5 * memory_s)


H100 = Hardware.datasheet("h100-sxm")


def read_every_step(model):
    """The parameters a decode step reads whatever its batch: every layer's, the output projection (lm_head, the
    embedding table itself when the two are tied) and the final norm. Of the embedding a step reads only its
    tokens' rows."""
    return model.num_layers * model.layer_parameters() + model.embedding_parameters + model.hidden_size


def reference_for(model, hw, batch, context):
    """The exercise's model for ``model`` on one GPU, bf16."""
    return decode_step_reference(read_every_step(model), model.num_layers, model.num_kv_heads, model.head_dim, batch,
                                 context, 2, hw.hbm_bytes_per_s, hw.bf16_flops_per_s)


@pytest.mark.parametrize("name", ["llama-3.1-8b", "smollm2-135m", "llama-1b-shaped"])
def test_decode_reference_counts_the_bytes_step_cost_counts(name):
    model = shape(name)
    batch, context = 8, 2048
    step = step_cost(model, H100, Layout(), Batch(batch, 1, context))
    assert step.total("weight_bytes") == pytest.approx(2 * read_every_step(model), rel=1e-3)
    # step_cost also writes the new token's keys and values: context + 1 tokens a sequence
    assert step.total("kv_bytes") == pytest.approx(
        kv_cache_bytes(model.num_layers, model.num_kv_heads, model.head_dim, batch, context + 1, 2), rel=1e-12)


@pytest.mark.parametrize(("batch", "context", "rel"), [(1, 2048, 0.01), (64, 4096, 0.01), (4096, 16, 0.06)],
                         ids=["batch-1", "memory-bound-batch-64", "compute-bound-short-context"])
def test_decode_reference_agrees_with_step_cost(batch, context, rel):
    """One roofline for the step against step_cost's roofline per operation group (plus activations and the
    attention's FLOPs): close while one bound rules every group; at a large batch step_cost also adds the KV read
    and the activations, which it does not overlap with the arithmetic, so the compute-bound step is looser."""
    model = shape("llama-3.1-8b")
    step = step_cost(model, H100, Layout(), Batch(batch, 1, context))
    assert reference_for(model, H100, batch, context) == pytest.approx(step.seconds, rel=rel)
    attention = next(c for c in step.costs if c.name == "attention")
    assert step.total("flops") - attention.flops == pytest.approx(2 * read_every_step(model) * batch, rel=1e-3)


def test_decode_reference_is_optimistic_where_groups_sit_on_both_sides():
    """At a large batch and a long context the projections are compute-bound and the KV read memory-bound:
    one roofline overlaps the two, step_cost (one group after the other) does not."""
    model = shape("llama-3.1-8b")
    predicted = step_cost(model, H100, Layout(), Batch(1024, 1, 512)).seconds
    assert reference_for(model, H100, 1024, 512) < 0.8 * predicted


# --- best_layout -----------------------------------------------------------------------------------------------


def best_layout(candidates, tpot_target_s):
    meeting = [c for c in candidates if c.tpot_s <= tpot_target_s]
    return max(meeting, key=lambda c: c.tokens_per_s_per_gpu) if meeting else None


def test_best_layout_accepts_the_solution(capsys):
    assert check_best_layout(best_layout) is None
    assert capsys.readouterr().out.startswith("PASSED best_layout: 10 random cases (targets between candidates, "
                                              "on one, and below all, seed ")


def test_best_layout_accepts_a_loop_and_a_sort():
    def loop(candidates, tpot_target_s):
        best = None
        for c in candidates:
            if c.tpot_s <= tpot_target_s and (best is None or c.tokens_per_s_per_gpu > best.tokens_per_s_per_gpu):
                best = c
        return best

    def sort_in_place(candidates, tpot_target_s):
        candidates.sort(key=lambda c: -c.tokens_per_s_per_gpu)
        return next((c for c in candidates if c.tpot_s <= tpot_target_s), None)

    check_best_layout(loop)
    check_best_layout(sort_in_place)
    check_best_layout(best_layout_reference)


def first_meeting(candidates, target):
    return next((c for c in candidates if c.tpot_s <= target), None)


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (lambda cs, target: max(cs, key=lambda c: c.tokens_per_s_per_gpu), "misses the target"),
        (lambda cs, target: max([c for c in cs if c.tpot_s >= target] or cs, key=lambda c: c.tokens_per_s_per_gpu),
         "misses the target"),
        (lambda cs, target: min(cs, key=lambda c: c.tpot_s), "fastest per user"),
        (lambda cs, target: max(cs, key=lambda c: c.tokens_per_s_per_user), "fastest per user"),
        (lambda cs, target: max([c for c in cs if c.tpot_s < target], key=lambda c: c.tokens_per_s_per_gpu,
                                default=None), "compare with <=, not <"),
    ],
    ids=["ignores-target", "reversed-comparison", "lowest-tpot", "most-per-user", "strict-less"],
)
def test_best_layout_rejects_known_mistakes(seed, wrong, hint):
    message = rejected_with(check_best_layout, wrong)
    assert hint in message and "best_layout(candidates, tpot_target_s=" in message and "expected" in message


def test_best_layout_rejects_the_first_that_meets_the_target(seed):
    message = rejected_with(check_best_layout, first_meeting)
    assert "first candidate that meets the target" in message or "fastest per user" in message  # when it is both


def test_best_layout_rejects_the_fewest_tokens_per_gpu(seed):
    def least(cs, target):
        return min((c for c in cs if c.tpot_s <= target), key=lambda c: c.tokens_per_s_per_gpu, default=None)

    message = rejected_with(check_best_layout, least)
    assert "take the most (max)" in message or "fastest per user" in message  # often the same candidate


def test_best_layout_none_when_none_meets(seed):
    def never_none(cs, target):
        meeting = [c for c in cs if c.tpot_s <= target] or cs
        return max(meeting, key=lambda c: c.tokens_per_s_per_gpu)

    assert "expected None: no candidate meets the target" in rejected_with(check_best_layout, never_none)

    def max_without_default(cs, target):
        return max((c for c in cs if c.tpot_s <= target), key=lambda c: c.tokens_per_s_per_gpu)

    assert "return None (max(..., default=None)" in rejected_with(check_best_layout, max_without_default)


def test_best_layout_wrong_kind_of_answer():
    def index(cs, target):
        chosen = best_layout(cs, target)
        return -1 if chosen is None else cs.index(chosen)

    assert "not its position" in rejected_with(check_best_layout, index)
    assert "not its layout" in rejected_with(check_best_layout, lambda cs, target: cs[0].layout)
    assert "forget to `return`" in rejected_with(check_best_layout, lambda cs, target: None)


def test_layout_targets_separate_the_mistakes():
    rng = np.random.default_rng(7)
    for _ in range(200):
        candidates = layout_candidates(rng)
        fastest = min(candidates, key=lambda c: c.tpot_s)
        most = max(candidates, key=lambda c: c.tokens_per_s_per_gpu)
        for kind in ("between", "edge", "none"):
            target = layout_target(rng, candidates, kind)
            answer = best_layout_reference(candidates, target)
            if kind == "none":
                assert answer is None
                continue
            assert answer not in (fastest, most)
            strict = best_layout_reference([c for c in candidates if c.tpot_s < target], target)
            assert (strict != answer) == (kind == "edge") and strict != fastest


def test_best_layout_on_the_planners_predictions():
    """The exercise's records carry a Prediction's attributes: a learner's function chooses from plan() too."""
    result = plan(shape("llama-3.1-70b"), H100, 16, Workload(1024, 256, 50.0))
    chosen = best_layout_reference(result.feasible, 0.020)
    at_slo = [p for p in result.feasible if p.tpot_s * 1e3 <= 20.0]
    assert chosen is max(at_slo, key=lambda p: p.tokens_per_s_per_gpu)  # the book's choice, section 5
    assert set(vars(Candidate("TP1 PP1 DP1", 1, 0.01, 100.0))) <= set(vars(chosen))
    assert math.isclose(Candidate("TP1 PP1 DP1", 1, 0.02, 1.0).tokens_per_s_per_user, 50.0)


def test_code_that_never_returns_is_stopped(monkeypatch):
    monkeypatch.setenv("COURSE_CHECK_TIME_LIMIT_S", "0.5")

    def forever(candidates, tpot_target_s):
        while True:
            pass

    assert "did not return within 0.5 s" in rejected_with(check_best_layout, forever)
