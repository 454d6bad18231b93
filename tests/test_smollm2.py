"""The course's engine on the real SmolLM2-135M-Instruct GGUF, against Hugging Face transformers reading the same file.

The expected values are a fixture (tests/fixtures/smollm2_transformers.*) recorded by
tests/programs/record_smollm2_reference.py with transformers and torch in float32 on a CPU: prompt token ids,
the last prompt token's logits and 40 greedy tokens for five prompts (three plain, two chat). transformers
dequantizes the file and un-permutes q and k with its own code, so agreement checks our loader, tokenizer and
forward pass against an independent implementation. CI has no transformers, hence the fixture.

These tests need the GGUF (98 MB, fetched once into the cache by the ``smollm2_gguf`` fixture). They run in
CPU mode in CI and in GPU mode on a GPU, where ``COURSE_SMOLLM2_REPORT`` may name a JSON file to write the
match counts to (float32 and bfloat16).
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from course_lib import backend
from course_lib.bench.results import new_result
from course_lib.engine.llm import LLM
from course_lib.engine.model import AttentionMetadata, KVCache
from course_lib.engine.sampling import SamplingParams

FIXTURE = Path(__file__).parent / "fixtures" / "smollm2_transformers"
RECORDED = json.loads(FIXTURE.with_suffix(".json").read_text())
PROMPTS = RECORDED["prompts"]


@pytest.fixture(scope="module")
def engines(smollm2_gguf):
    """float32 and bfloat16 engines on the GGUF, built once for the module."""
    built = {dtype: LLM.from_gguf(smollm2_gguf, dtype=dtype) for dtype in ("float32", "bfloat16")}
    yield built
    for llm in built.values():
        llm.close()


def last_token_logits(llm: LLM, token_ids: list[int]) -> np.ndarray:
    """The model's float32 logits after the whole prompt, from one prefill step on a fresh cache."""
    block_size = llm.block_pool.block_size
    table = list(range(-(-len(token_ids) // block_size)))
    cache = KVCache.allocate(llm.config, len(table), block_size, llm.model.dtype)
    attention = AttentionMetadata.build([(len(token_ids), len(token_ids), table)], block_size)
    ids = backend.xp.asarray(np.array(token_ids, dtype=np.int32))
    return backend.to_numpy(llm.model.forward(ids, attention.positions, cache, attention))[0]


def matching_prefix(got: list[int], expected: list[int]) -> int:
    """How many tokens agree before the first difference."""
    agree = [a == b for a, b in zip(got, expected, strict=False)]
    return agree.index(False) if False in agree else len(agree)


def greedy_matches(llm: LLM) -> list[int]:
    """The course engine's greedy tokens for every prompt (in one batch): how many agree with transformers'."""
    params = SamplingParams(temperature=0, max_tokens=RECORDED["new_tokens"], ignore_eos=True)
    outputs = llm.generate([p["prompt_token_ids"] for p in PROMPTS], params)
    return [matching_prefix(list(out.output_token_ids), p["greedy_token_ids"]) for out, p in zip(outputs, PROMPTS,
                                                                                                   strict=True)]


def report(key: str, value: object) -> None:
    """Add a figure to the match report, if one was asked for: a results file (card, date, versions) that the GPU
    check writes and the course publishes under course_lib/results/."""
    path = os.environ.get("COURSE_SMOLLM2_REPORT")
    if not path:
        return
    if Path(path).exists():
        result = json.loads(Path(path).read_text())
    else:
        result = new_result("smollm2_match", {"reference": f"transformers {RECORDED['transformers']}, torch "
                                              f"{RECORDED['torch']}, float32 on CPU, reading {RECORDED['gguf_file']}",
                                              "prompts": len(PROMPTS), "greedy_tokens": RECORDED["new_tokens"]})
    result["headline"][key] = value
    Path(path).write_text(json.dumps(result, indent=1) + "\n")


def test_the_fixture_is_of_this_file(smollm2_gguf):
    assert RECORDED["gguf_file"] == smollm2_gguf.name and RECORDED["dtype"] == "float32"


def test_prompts_tokenize_as_transformers_does(engines):
    tokenizer = engines["float32"].tokenizer
    for prompt in PROMPTS:
        if prompt["chat"]:
            assert engines["float32"].chat_prompt(prompt["messages"]) == prompt["prompt_token_ids"]
        else:
            assert tokenizer.encode(prompt["text"]) == prompt["prompt_token_ids"]


def test_last_token_logits_match_transformers_in_float32(engines):
    recorded = np.load(FIXTURE.with_suffix(".npz"))
    errors = []
    for index, prompt in enumerate(PROMPTS):
        expected = recorded[f"prompt{index}"]
        got = last_token_logits(engines["float32"], prompt["prompt_token_ids"])
        errors.append(float(np.linalg.norm(got - expected) / np.linalg.norm(expected)))
    report("float32_logits_max_relative_error", max(errors))
    assert max(errors) < 1e-4, errors


def test_greedy_tokens_match_transformers_for_32_tokens_in_float32(engines):
    matches = greedy_matches(engines["float32"])
    report("float32_greedy_tokens_matching", matches)
    assert min(matches) >= 32, f"tokens matching transformers' greedy continuation, per prompt: {matches}"


def test_bfloat16_stays_close_to_float32_transformers(engines):
    """bf16 rounds every activation to 8 bits of mantissa: continuations drift from float32's sooner or later, so
    this reports how many tokens match and asserts only that each prompt starts the same way."""
    matches = greedy_matches(engines["bfloat16"])
    report("bfloat16_greedy_tokens_matching", matches)
    print(f"bfloat16: tokens matching transformers' float32 greedy continuation, per prompt: {matches}")
    assert min(matches) >= 1, matches


def test_text_and_chat_read_as_english(engines):
    llm = engines["float32"]
    [completion] = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))
    assert completion.text.startswith(" Paris"), completion.text
    [answer] = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                        SamplingParams(temperature=0, max_tokens=32))
    assert "Paris" in answer.text and answer.finish_reason == "stop", answer
    assert answer.output_token_ids[-1] in llm.tokenizer.eos_token_ids and "<|im_end|>" not in answer.text


def test_streamed_text_is_the_generated_text(engines):
    llm, params = engines["float32"], SamplingParams(temperature=0, max_tokens=24)
    prompt = [{"role": "user", "content": "Say hello in French, Japanese and with an emoji."}]
    events = list(llm.stream([llm.chat_prompt(prompt)], params))
    [output] = llm.chat(prompt, params)
    assert "".join(event.text for event in events) == output.text
    assert "\ufffd" not in output.text
