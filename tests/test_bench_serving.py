"""The serving roofline's step plan and arithmetic, and the phase timer that shows where a serving run's time goes."""

import time

import pytest

from course_lib.bench.phase_timer import PhaseTimer
from course_lib.bench.serving_roofline import (
    StepCost,
    kv_bytes_per_token,
    layer_parameters,
    roofline_seconds,
    step_cost,
    streamed_weight_bytes,
    workload_steps,
)
from course_lib.checkpoint.config import LLAMA_1B_SHAPED, TINY


def test_the_workload_is_its_prefill_steps_then_one_decode_step_per_further_token():
    steps = workload_steps(TINY, 2, requests=4, prompt=10, output=5, token_budget=16)
    assert len(steps) == 3 + 4  # 40 prompt tokens in steps of 16, 16, 8; then 4 decode steps of 4 sequences
    decode = steps[3]
    assert decode == step_cost(TINY, 2, [(1, 11)] * 4)
    assert decode.bytes == streamed_weight_bytes(TINY, 2) + 4 * 11 * kv_bytes_per_token(TINY, 2)


def test_a_prefill_steps_flops_are_the_projections_the_sampled_rows_logits_and_causal_attention():
    config, tokens = LLAMA_1B_SHAPED, 4096
    pairs = tokens * (tokens + 1) / 2
    expected = (2 * layer_parameters(config) * tokens + 2 * config.vocab_size * config.hidden_size
                + 4 * config.num_layers * config.num_heads * config.head_dim * pairs)
    assert step_cost(config, 2, [(tokens, tokens)]).flops == pytest.approx(expected)
    # A chunk after a prefix sees the prefix whole: 3 new tokens after 5 cached see 6, 7 and 8 keys.
    no_prefix, after_prefix = (step_cost(TINY, 2, [(3, context)]).flops for context in (3, 8))
    assert after_prefix - no_prefix == pytest.approx(4 * TINY.num_layers * TINY.num_heads * TINY.head_dim * 3 * 5)


def test_a_step_takes_the_slower_of_its_bytes_and_its_flops():
    step = StepCost(bytes=3e9, flops=7e12)
    assert step.seconds(copy_gbps=3000, matmul_tflops=700) == pytest.approx(0.01)  # FLOPs bound: 10 ms > 1 ms
    assert roofline_seconds([step, StepCost(6e9, 0)], 3000, 700) == pytest.approx(0.012)


def test_the_workload_needs_positive_sizes():
    with pytest.raises(ValueError, match="must be >= 1"):
        workload_steps(TINY, 2, requests=0, prompt=10, output=5, token_budget=16)


class Loop:
    def work(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds


def test_the_phase_timer_adds_up_each_phase_and_puts_the_methods_back():
    loop = Loop()
    with PhaseTimer() as phases:
        phases.wrap(loop, "work", "working")
        assert loop.work(0.01) == 0.01 and loop.work(0.02) == 0.02
    assert phases.calls == {"working": 2} and phases.seconds["working"] >= 0.03
    assert "work" not in vars(loop)  # the class's method shows through again


def test_a_serving_breakdown_names_every_phase_and_accounts_for_the_whole_run():
    from course_lib.bench.suites import engine

    derived = engine.measure_engine(TINY, requests=4, prompt=16, output=8, breakdown=True)["derived"]
    phases = {phase for _, _, phase in engine.SERVING_PHASES} | {"other"}
    assert {f"s_{phase}" for phase in phases} <= set(derived)
    assert derived["s_decode_runs_gpu"] > 0 and derived["s_model_prefill_steps"] > 0  # runs and prefills happened
    total = sum(derived[f"s_{phase}"] for phase in phases)
    assert total == pytest.approx(derived["s_phased_run"])
