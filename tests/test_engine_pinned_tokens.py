"""The engine's tokens for fixed seeds, pinned: a refactor of the engine must leave every one of them unchanged.

Each scenario exercises a path of the engine loop: chunked prefill under a small token budget, preemption in a
small KV pool, prefix-cache hits between prompts that share a prefix, multi-step decode runs, seeded sampling.
The expected tokens were recorded from the engine as of the commit that added this file (CPU mode, float32);
``COURSE_PIN_TOKENS=write`` records them again, which only a change meant to alter the engine's outputs may do.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from course_lib.checkpoint.config import TINY
from course_lib.engine.llm import LLM
from course_lib.engine.sampling import SamplingParams

FIXTURE = Path(__file__).parent / "fixtures" / "engine_pinned_tokens.json"
SCENARIOS = {
    "greedy, roomy": {"engine": {}, "sampling": {"temperature": 0.0}},
    "greedy, chunked prefill, small pool": {"engine": {"num_blocks": 14, "block_size": 8,
                                                       "max_num_batched_tokens": 24}, "sampling": {"temperature": 0.0}},
    "greedy, decode runs": {"engine": {"decode_steps": 4, "block_size": 8}, "sampling": {"temperature": 0.0}},
    "seeded sampling, chunked": {"engine": {"max_num_batched_tokens": 32, "block_size": 8},
                                 "sampling": {"temperature": 0.8, "top_k": 40, "top_p": 0.9}},
}


def prompts() -> list[list[int]]:
    """Six prompts of mixed lengths; the first two share a 16-token prefix (a prefix-cache hit)."""
    rng = np.random.default_rng(1234)
    shared = [int(t) for t in rng.integers(0, TINY.vocab_size, 16)]
    others = [[int(t) for t in rng.integers(0, TINY.vocab_size, n)] for n in (5, 23, 1, 40, 11)]
    return [shared + others[0], shared, *others[1:]]


def generate(scenario: dict) -> tuple[list[list[int]], LLM]:
    """The scenario's tokens: the prompts served twice by one engine (the second time, from the prefix cache)."""
    llm = LLM(TINY, seed=11, **scenario["engine"])
    params = [SamplingParams(max_tokens=12 + 3 * i, seed=100 + i, ignore_eos=True, **scenario["sampling"])
              for i in range(len(prompts()))]
    outputs = [out for _ in range(2) for out in llm.generate(prompts(), params)]
    return [list(out.output_token_ids) for out in outputs], llm


def fixture_text(outputs: dict[str, list[list[int]]]) -> str:
    """JSON with one line per request, so that a diff of the fixture shows which requests changed."""
    scenarios = [f" {json.dumps(name)}: [\n" + ",\n".join(f"  {json.dumps(tokens)}" for tokens in requests) + "\n ]"
                 for name, requests in outputs.items()]
    return "{\n" + ",\n".join(scenarios) + "\n}\n"


def test_the_scenarios_take_the_paths_they_pin():
    _, small = generate(SCENARIOS["greedy, chunked prefill, small pool"])
    assert small.stats.recomputed_tokens > 0  # a preemption happened
    _, roomy = generate(SCENARIOS["greedy, roomy"])
    assert roomy.block_pool.stats().hit_tokens > 0  # the second round found its prompts' blocks


def test_pinned_tokens_are_unchanged():
    got = {name: generate(scenario)[0] for name, scenario in SCENARIOS.items()}
    if os.environ.get("COURSE_PIN_TOKENS") == "write":
        FIXTURE.write_text(fixture_text(got))
        pytest.skip(f"wrote {FIXTURE}")
    expected = json.loads(FIXTURE.read_text())
    for name in SCENARIOS:
        assert got[name] == expected[name], f"scenario {name!r}: the engine's tokens changed"
