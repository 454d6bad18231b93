"""Log-probabilities, text prompts, end-of-sequence tokens and the engine's counters, checked against float64.

Every log-probability the engine returns is compared with ``log_softmax`` of the float64 reference model
(``dense_forward``) at the row that predicts the token: an output token's row is the previous position of
prompt + outputs, a prompt token's row the position before it. Prompts, weights and k are fresh random draws
each run (the seed is printed, and shown when a test fails). The engine works in float32, so values agree to
about 1e-4; near-ties may swap two ids, so a top-k is checked by its values, not by the order of equal ones.
"""

import numpy as np
import pytest
from test_engine_llm import record_runs, tokens_of
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers

from course_lib.check.llama_reference import dense_forward
from course_lib.checkpoint.config import TINY
from course_lib.checkpoint.tokenizer import Tokenizer
from course_lib.checkpoint.weights import random_weights
from course_lib.engine.llm import LLM
from course_lib.engine.logprobs import top_logprobs
from course_lib.engine.sampling import SamplingParams
from course_lib.kernels.kv_blocks import blocks_for

TOLERANCE = 1e-4  # float32 logits from a float32 model against float64 ones


@pytest.fixture
def rng() -> np.random.Generator:
    seed = np.random.SeedSequence().entropy
    print(f"random weights, prompts and k from seed {seed}")
    return np.random.default_rng(seed)


def random_prompts(rng: np.random.Generator, count: int, low: int = 3, high: int = 40) -> list[list[int]]:
    return [rng.integers(0, TINY.vocab_size, size=int(rng.integers(low, high))).tolist() for _ in range(count)]


def random_model(rng: np.random.Generator) -> dict:
    return random_weights(TINY, seed=int(rng.integers(2**31)))


def reference_logprobs(weights: dict, token_ids: list[int]) -> np.ndarray:
    """float64 log-probabilities ``[len, vocab]``: row ``t`` is the distribution of the token after position ``t``."""
    logits = dense_forward(TINY, weights, np.array(token_ids))
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def assert_entry(entry: dict[int, float], reference: np.ndarray, k: int, chosen: int, where: str) -> None:
    """One token's dict: the k likeliest (likeliest first), then the chosen token if it is not among them."""
    ids, values = list(entry), np.array(list(entry.values()))
    assert all(isinstance(token, int) for token in ids), f"{where}: ids must be Python ints, got {ids}"
    assert chosen in entry, f"{where}: the chosen token {chosen} is missing from {entry}"
    expected_size = k if chosen in ids[:k] else k + 1
    assert len(entry) == expected_size, f"{where}: {len(entry)} entries for k={k}, chosen {chosen}: {entry}"
    if chosen not in ids[:k]:
        assert ids[-1] == chosen, f"{where}: the chosen token comes after the k likeliest: {entry}"
    np.testing.assert_allclose(values, reference[ids], atol=TOLERANCE, rtol=0, err_msg=f"{where}: values by id")
    top = values[:k]
    assert np.all(np.diff(top) <= 0), f"{where}: not likeliest first: {entry}"
    np.testing.assert_allclose(top, np.sort(reference)[::-1][:k], atol=TOLERANCE, rtol=0,
                               err_msg=f"{where}: these are not the k likeliest tokens")


def assert_output_logprobs(output, weights: dict, k: int) -> None:
    """Every generated token's dict against the reference row that predicted it."""
    tokens = [*output.prompt_token_ids, *output.output_token_ids]
    reference = reference_logprobs(weights, tokens[:-1])
    prompt_len = len(output.prompt_token_ids)
    assert output.logprobs is not None and len(output.logprobs) == len(output.output_token_ids)
    for i, (entry, token) in enumerate(zip(output.logprobs, output.output_token_ids, strict=True)):
        assert_entry(entry, reference[prompt_len - 1 + i], k, token, f"request {output.request_id}, output {i}")


def assert_prompt_logprobs(output, weights: dict, k: int) -> None:
    """None for the first prompt token, then one dict per prompt token, scored by the position before it."""
    prompt = list(output.prompt_token_ids)
    assert output.prompt_logprobs is not None, f"request {output.request_id} asked for prompt logprobs"
    assert len(output.prompt_logprobs) == len(prompt), \
        f"request {output.request_id}: {len(output.prompt_logprobs)} prompt logprobs for {len(prompt)} prompt tokens"
    assert output.prompt_logprobs[0] is None
    reference = reference_logprobs(weights, prompt)
    for t in range(1, len(prompt)):
        assert_entry(output.prompt_logprobs[t], reference[t - 1], k, prompt[t],
                     f"request {output.request_id}, prompt token {t}")


def record_preemptions(engine: LLM) -> list[tuple[int, int, int]]:
    """(request, tokens computed, tokens generated) of each sequence the engine's scheduler preempts from now on."""
    preempted, preempt = [], engine.scheduler._preempt

    def recording(sequence):
        preempted.append((sequence.seq_id, sequence.num_computed_tokens, len(sequence.output_token_ids)))
        preempt(sequence)

    engine.scheduler._preempt = recording
    return preempted


# Five prompts of these lengths, 12 tokens each, in a pool of 10 blocks of 8 with a 24-token budget: the third
# request is preempted halfway through its prompt, the fifth after it has sampled, with or without prompt
# log-probabilities, whatever the tokens (the schedule depends only on the lengths: random prompts share no prefix).
SQUEEZED_LENGTHS = (29, 24, 22, 14, 25)
SQUEEZED = {"num_blocks": 10, "block_size": 8, "max_num_batched_tokens": 24}


# ---- logprobs: the generated tokens --------------------------------------------------------------------------


def test_greedy_logprobs_match_the_reference_and_lead_with_the_chosen_token(rng):
    weights, k = random_model(rng), int(rng.integers(1, 8))
    batch = random_prompts(rng, 3)
    outputs = LLM(TINY, weights, block_size=8).generate(batch, SamplingParams(temperature=0.0, max_tokens=6,
                                                                                logprobs=k))
    for output in outputs:
        assert_output_logprobs(output, weights, k)
        assert [next(iter(entry)) for entry in output.logprobs] == list(output.output_token_ids)
        assert output.prompt_logprobs is None  # not asked for


def test_sampled_logprobs_are_the_models_distribution_before_temperature(rng):
    weights, k = random_model(rng), int(rng.integers(1, 8))
    batch = random_prompts(rng, 3)
    params = [SamplingParams(temperature=0.7, top_k=40, max_tokens=7, seed=int(rng.integers(2**31)), logprobs=k),
              SamplingParams(temperature=1.5, max_tokens=5, seed=int(rng.integers(2**31)), logprobs=0),
              SamplingParams(temperature=0.9, max_tokens=4, seed=int(rng.integers(2**31)))]
    outputs = LLM(TINY, weights).generate(batch, params)
    assert_output_logprobs(outputs[0], weights, k)
    assert_output_logprobs(outputs[1], weights, 0)
    assert all(len(entry) == 1 for entry in outputs[1].logprobs)  # k=0: the sampled token alone
    assert outputs[2].logprobs is None


def test_the_stream_hands_out_the_same_logprobs(rng):
    weights, k = random_model(rng), int(rng.integers(1, 6))
    batch = random_prompts(rng, 3)
    params = [SamplingParams(temperature=0.0, max_tokens=5, logprobs=k),
              SamplingParams(temperature=0.8, max_tokens=6, seed=int(rng.integers(2**31)), logprobs=k),
              SamplingParams(temperature=0.0, max_tokens=4)]
    outputs = LLM(TINY, weights).generate(batch, params)
    streamed = [[] for _ in batch]
    for event in LLM(TINY, weights).stream(batch, params):
        streamed[event.request_id].append((event.token_id, event.logprobs))
    for output, events in zip(outputs, streamed, strict=True):
        assert tuple(token for token, _ in events) == output.output_token_ids
        expected = output.logprobs or (None,) * len(output.output_token_ids)
        assert tuple(logprobs for _, logprobs in events) == expected


# ---- prompt_logprobs: once per prompt position, however the prompt is computed ------------------------------


def test_prompt_logprobs_in_one_step(rng):
    weights, k = random_model(rng), int(rng.integers(1, 6))
    batch = [*random_prompts(rng, 2), random_prompts(rng, 1, low=1, high=2)[0]]  # a one-token prompt too
    outputs = LLM(TINY, weights).generate(batch, SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=k))
    for output in outputs:
        assert_prompt_logprobs(output, weights, k)
        assert output.logprobs is None
    assert outputs[2].prompt_logprobs == (None,)


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_prompt_logprobs_over_chunks_next_to_other_requests(rng, decode_steps):
    """A 16-token budget cuts the prompts into chunks; requests with and without prompt logprobs share steps."""
    weights, k = random_model(rng), int(rng.integers(1, 6))
    batch = random_prompts(rng, 4, low=20, high=50)
    with_them = SamplingParams(temperature=0.0, max_tokens=6, prompt_logprobs=k)
    without = SamplingParams(temperature=0.0, max_tokens=6)
    params = [with_them, without, with_them, without]
    engine = LLM(TINY, weights, block_size=8, max_num_batched_tokens=16, decode_steps=decode_steps)
    runs = record_runs(engine)
    outputs = engine.generate(batch, params)
    for output, param in zip(outputs, params, strict=True):
        if param is with_them:
            assert_prompt_logprobs(output, weights, k)
        else:
            assert output.prompt_logprobs is None
    assert engine.stats.prefill_steps >= sum(len(p) for p in batch) // 16  # the prompts did span several steps
    assert tokens_of(outputs) == tokens_of(LLM(TINY, weights).generate(batch, without))
    if decode_steps > 1:
        assert any(run is not None for run in runs)


def test_prompt_logprobs_are_recorded_once_across_a_preemption(rng):
    weights, k = random_model(rng), int(rng.integers(1, 6))
    batch = [rng.integers(0, TINY.vocab_size, size=n).tolist() for n in SQUEEZED_LENGTHS]
    params = [SamplingParams(temperature=0.0, max_tokens=12, prompt_logprobs=k if i % 2 == 0 else None,
                             logprobs=k if i % 2 == 0 else None) for i in range(len(batch))]
    engine = LLM(TINY, weights, **SQUEEZED)
    preempted = record_preemptions(engine)
    squeezed = engine.generate(batch, params)
    assert sum(out.num_preemptions for out in squeezed) > 0
    scored = {i for i, p in enumerate(params) if p.prompt_logprobs is not None}
    assert any(i in scored and computed > 0 and generated == 0 for i, computed, generated in preempted), preempted
    assert any(i in scored and generated > 0 for i, _, generated in preempted), preempted
    for output, param in zip(squeezed, params, strict=True):
        if param.prompt_logprobs is not None:
            assert_prompt_logprobs(output, weights, k)
            assert_output_logprobs(output, weights, k)
    assert tokens_of(squeezed) == tokens_of(LLM(TINY, weights).generate(batch, params))


def test_prompt_logprobs_take_no_prefix_hit_while_their_twin_does(rng):
    weights, k, block_size = random_model(rng), int(rng.integers(1, 6)), 8
    prompt = random_prompts(rng, 1, low=3 * block_size + 1, high=5 * block_size)[0]
    greedy = SamplingParams(temperature=0.0, max_tokens=4)
    engine = LLM(TINY, weights, block_size=block_size)
    engine.generate([prompt], greedy)  # the prompt's full blocks are now in the prefix cache
    hits_before, prompt_tokens_before = engine.block_pool.stats().hit_tokens, engine.stats.prompt_tokens
    scored, twin = engine.generate([prompt, prompt], [SamplingParams(temperature=0.0, max_tokens=4,
                                                                     prompt_logprobs=k), greedy])
    assert_prompt_logprobs(scored, weights, k)
    cached = (len(prompt) - 1) // block_size * block_size  # the twin's full blocks; its last token is computed
    assert engine.block_pool.stats().hit_tokens - hits_before == cached
    assert engine.stats.prompt_tokens - prompt_tokens_before == len(prompt) + len(prompt) - cached
    assert scored.output_token_ids == twin.output_token_ids


# ---- multi-step decoding steps aside for logprobs --------------------------------------------------------------


def test_decode_runs_give_the_same_tokens_and_logprobs(rng):
    weights, k = random_model(rng), int(rng.integers(1, 6))
    batch = random_prompts(rng, 3)
    params = [SamplingParams(temperature=0.0, max_tokens=6, logprobs=k),
              SamplingParams(temperature=0.0, max_tokens=14),
              SamplingParams(temperature=0.0, max_tokens=10, logprobs=k, prompt_logprobs=k)]
    single = LLM(TINY, weights).generate(batch, params)
    multi = LLM(TINY, weights, decode_steps=4)
    runs = record_runs(multi)
    outputs = multi.generate(batch, params)
    assert tokens_of(outputs) == tokens_of(single)
    for output, expected in zip(outputs, single, strict=True):
        for mine, theirs in [(output.logprobs, expected.logprobs), (output.prompt_logprobs, expected.prompt_logprobs)]:
            assert (mine is None) == (theirs is None)
            for a, b in zip(mine or (), theirs or (), strict=True):
                assert (a is None and b is None) or list(a) == list(b)
                if a is not None:
                    np.testing.assert_allclose(list(a.values()), list(b.values()), atol=1e-5, rtol=0)
    assert any(run is not None for run in runs)  # after the logprobs requests finish, runs take over
    assert all(seq.sampling_params.logprobs is None for run in runs if run for seq in run.sequences)
    assert_output_logprobs(outputs[2], weights, k)


# ---- text: errors, a tokenizer, end-of-sequence tokens ----------------------------------------------------------


def word_tokenizer(words: list[str], eos: tuple[int, ...] = (), template: str | None = None) -> Tokenizer:
    """A word-level tokenizer: one id per whitespace-separated word, ``[UNK]`` (id 0) for any other."""
    backend = BackendTokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["</s>"])
    return Tokenizer(backend, bos_token_id=None, eos_token_ids=eos, add_bos_token=False, chat_template=template,
                     source="a test's word list")


def test_text_needs_a_tokenizer_and_params_are_checked():
    engine = LLM(TINY)
    with pytest.raises(ValueError, match="need a tokenizer, and this model has none"):
        engine.generate("hello")
    with pytest.raises(ValueError, match="need a tokenizer, and this model has none"):
        engine.generate([[1, 2, 3], "hello"])
    with pytest.raises(ValueError, match="need a tokenizer, and this model has none"):
        engine.chat([{"role": "user", "content": "hello"}])
    assert not engine.scheduler.has_unfinished()  # nothing was queued by the refused calls
    for bad in (-1, True, 1.5):
        with pytest.raises((ValueError, TypeError)):
            SamplingParams(logprobs=bad)
        with pytest.raises((ValueError, TypeError)):
            SamplingParams(prompt_logprobs=bad)
    with pytest.raises(ValueError, match="must be None or an integer >= 0"):
        SamplingParams(prompt_logprobs=True)
    too_big = word_tokenizer(["[UNK]", *(f"w{i}" for i in range(TINY.vocab_size))])
    with pytest.raises(ValueError, match="not from the same model"):
        LLM(TINY, tokenizer=too_big)


def test_text_prompts_chat_and_streamed_text_with_a_tokenizer(rng):
    words = ["[UNK]", *(f"w{i}" for i in range(TINY.vocab_size - 2))]  # with </s>: the model's vocabulary, full
    template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}assistant"
    tokenizer = word_tokenizer(words, eos=(TINY.vocab_size - 1,), template=template)
    weights = random_model(rng)
    engine = LLM(TINY, weights, tokenizer=tokenizer)
    assert engine.scheduler.eos_token_ids == (TINY.vocab_size - 1,)  # the tokenizer's EOS, by default
    text = " ".join(f"w{i}" for i in rng.integers(0, len(words) - 1, size=12))
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    (from_text,) = engine.generate(text, params)
    assert list(from_text.prompt_token_ids) == tokenizer.encode(text)
    assert from_text.output_token_ids == engine.generate([tokenizer.encode(text)], params)[0].output_token_ids
    assert from_text.text == tokenizer.decode(from_text.output_token_ids, skip_special_tokens=True)
    assert "".join(event.text for event in engine.stream(text, params)) == from_text.text
    messages = [{"role": "user", "content": "w1 w2"}]
    assert engine.chat_prompt(messages) == tokenizer.encode("user w1 w2 </s> assistant", add_special_tokens=False)
    (answer,) = engine.chat(messages, params)
    assert answer.prompt_token_ids == tuple(engine.chat_prompt(messages))


def test_either_eos_token_stops_a_request_unless_ignored(rng):
    weights = random_model(rng)
    batch = random_prompts(rng, 4)
    long = SamplingParams(temperature=0.0, max_tokens=12)
    plain = tokens_of(LLM(TINY, weights).generate(batch, long))
    first, second = plain[0][4], plain[1][7]
    eos = (first, second)
    for decode_steps in (1, 4):
        engine = LLM(TINY, weights, eos_token_ids=eos, decode_steps=decode_steps)
        for output, tokens in zip(engine.generate(batch, long), plain, strict=True):
            stop = next((i for i, token in enumerate(tokens) if token in eos), None)
            if stop is None:
                assert output.output_token_ids == tokens and output.finish_reason == "length"
            else:
                assert output.output_token_ids == tokens[:stop + 1] and output.finish_reason == "stop"
        ignoring = engine.generate(batch, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
        assert tokens_of(ignoring) == plain and {out.finish_reason for out in ignoring} == {"length"}


# ---- the engine's counters ------------------------------------------------------------------------------------


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_stats_count_prompt_and_generated_tokens(rng, decode_steps):
    batch = random_prompts(rng, 4, low=5, high=40)
    max_tokens, block_size = 9, 8
    engine = LLM(TINY, random_model(rng), block_size=block_size, decode_steps=decode_steps)
    outputs = engine.generate(batch, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    stats = engine.stats
    generated = sum(len(out.output_token_ids) for out in outputs)
    assert generated == max_tokens * len(batch)
    assert stats.prompt_tokens == sum(len(p) for p in batch)  # random prompts: no prefix hits
    assert stats.generated_tokens == generated
    assert stats.decode_tokens == generated - len(batch)  # every output but the last is fed back once
    assert stats.prefill_steps == 1  # all four prompts fit the default budget of one step
    assert stats.steps == max_tokens  # the prefill samples each first token, then one step per token
    longest = max(len(p) for p in batch) + max_tokens - 1  # the last token never needs a KV slot
    assert stats.peak_blocks_used >= blocks_for(longest, block_size)
    assert stats.peak_blocks_used <= sum(blocks_for(len(p) + max_tokens, block_size) for p in batch)
    assert f"{stats.prompt_tokens} prompt tokens" in stats.summary()


def test_stats_across_chunks_and_preemptions(rng):
    batch = [rng.integers(0, TINY.vocab_size, size=n).tolist() for n in SQUEEZED_LENGTHS]
    max_tokens = 12
    engine = LLM(TINY, random_model(rng), **SQUEEZED)
    preempted = record_preemptions(engine)
    outputs = engine.generate(batch, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    assert any(computed > 0 and generated == 0 for _, computed, generated in preempted), preempted  # mid-prompt
    stats = engine.stats
    assert stats.prompt_tokens == sum(SQUEEZED_LENGTHS)  # a prompt's first computes all count, its recomputes not
    assert stats.generated_tokens == sum(len(out.output_token_ids) for out in outputs) == max_tokens * len(batch)
    assert stats.decode_tokens == stats.generated_tokens - len(batch)
    assert stats.recomputed_tokens > 0 and "recomputed after preemptions" in stats.summary()
    assert stats.prefill_steps >= sum(SQUEEZED_LENGTHS) / SQUEEZED["max_num_batched_tokens"]
    assert stats.peak_blocks_used == SQUEEZED["num_blocks"]  # preemption happens only when the pool is full


# ---- top_logprobs on its own -----------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
def test_top_logprobs_against_float64(rng, scale):
    rows, vocab, k = int(rng.integers(1, 9)), int(rng.integers(2, 300)), int(rng.integers(0, 12))
    logits = (rng.standard_normal((rows, vocab)) * scale).astype(np.float32)
    chosen = rng.integers(0, vocab, size=rows)
    wide = logits.astype(np.float64)
    reference = wide - wide.max(axis=1, keepdims=True)
    reference -= np.log(np.exp(reference).sum(axis=1, keepdims=True))
    entries = top_logprobs(logits, chosen, k)
    assert len(entries) == rows
    tolerance = 2e-6 * max(1.0, float(np.abs(wide).max()))  # float32: relative to the row's largest magnitude
    for row, entry in enumerate(entries):
        values = np.array(list(entry.values()))
        assert np.isfinite(values).all(), f"row {row}: {entry}"
        ids = list(entry)
        assert int(chosen[row]) in entry and len(entry) in (min(k, vocab), min(k, vocab) + 1)
        np.testing.assert_allclose(values, reference[row, ids], atol=tolerance, rtol=0)
        top = reference[row, ids[:k]]
        np.testing.assert_allclose(top, np.sort(reference[row])[::-1][:k], atol=tolerance, rtol=0)


def test_top_logprobs_ties_go_to_the_lower_id_and_the_chosen_comes_last():
    logits = np.array([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]], dtype=np.float32)
    first, second = top_logprobs(logits, np.array([3, 4]), 2)
    assert list(first) == [1, 2, 3]
    assert list(second) == [0, 1, 4]
    np.testing.assert_allclose(list(second.values()), [np.log(0.2)] * 3, rtol=1e-6)
    assert list(top_logprobs(logits, np.array([1, 0]), 0)[0]) == [1]  # k=0: the chosen alone
    assert list(top_logprobs(logits, np.array([0, 0]), 99)[0]) == [1, 2, 4, 0, 3]  # k past the vocabulary: all


@pytest.mark.parametrize("logits, chosen, k, message", [
    (np.zeros(5, np.float32), np.array([0]), 1, "logits \\[rows, vocab\\]"),
    (np.zeros((2, 5), np.float32), np.array([0]), 1, "one chosen token per row"),
    (np.zeros((2, 5), np.float32), np.array([[0], [1]]), 1, "one chosen token per row"),
    (np.zeros((2, 5), np.float32), np.array([0, 1]), -1, "k must be >= 0"),
    (np.zeros((2, 5), np.float32), np.array([0, 5]), 1, "outside the vocabulary"),
    (np.zeros((2, 5), np.float32), np.array([-1, 0]), 1, "outside the vocabulary"),
])
def test_top_logprobs_refuses_bad_arguments(logits, chosen, k, message):
    with pytest.raises(ValueError, match=message):
        top_logprobs(logits, chosen, k)
