"""CUDA graphs of the decode step: a replay computes what the eager step computes, padding changes nothing,
and an engine with graphs generates the same tokens as one without. The replays need a GPU."""

import numpy as np
import pytest

from course_lib import backend
from course_lib.checkpoint.config import TINY
from course_lib.checkpoint.weights import random_weights
from course_lib.engine.batch import StepBatch
from course_lib.engine.graphs import DecodeGraphs, graph_batch_sizes
from course_lib.engine.llm import LLM
from course_lib.engine.model import AttentionMetadata, KVCache, LlamaModel
from course_lib.engine.sampling import SamplingParams

BLOCK_SIZE, NUM_BLOCKS = 16, 64
gpu = pytest.mark.gpu


@pytest.fixture
def rng() -> np.random.Generator:
    seed = np.random.SeedSequence().entropy
    print(f"random tokens and block tables from seed {seed}")
    return np.random.default_rng(seed)


def test_engines_capture_every_size_up_to_their_batch():
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    assert graph_batch_sizes(5) == [1, 2, 4, 5]
    assert graph_batch_sizes(1) == [1]


@pytest.mark.skipif(backend.has_gpu(), reason="checks the CPU-mode message")
def test_graphs_say_they_need_a_gpu():
    model = LlamaModel(TINY, random_weights(TINY, seed=0))
    with pytest.raises(RuntimeError, match="CUDA graphs record GPU work"):
        DecodeGraphs(model, KVCache.allocate(TINY, NUM_BLOCKS, BLOCK_SIZE))


def prefill(model: LlamaModel, cache: KVCache, prompts: list[np.ndarray], tables: list[list[int]]) -> None:
    attention = AttentionMetadata.build([(len(p), len(p), t) for p, t in zip(prompts, tables, strict=True)],
                                        BLOCK_SIZE)
    model.forward(backend.xp.asarray(np.concatenate(prompts).astype(np.int32)), attention.positions, cache,
                  attention)


@gpu
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_a_replay_equals_the_eager_decode_step(rng, batch):
    model = LlamaModel(TINY, random_weights(TINY, seed=1))
    cache = KVCache.allocate(TINY, NUM_BLOCKS, BLOCK_SIZE)
    graphs = DecodeGraphs(model, cache, batch_sizes=(1, 4, 8), max_context_len=256)
    lengths = rng.integers(5, 60, batch)
    pool = list(rng.permutation(NUM_BLOCKS))
    tables = [[int(pool.pop()) for _ in range(-(-(int(n) + 1) // BLOCK_SIZE))] for n in lengths]
    prefill(model, cache, [rng.integers(0, TINY.vocab_size, n) for n in lengths], tables)
    tokens = rng.integers(0, TINY.vocab_size, batch).astype(np.int32)
    contexts = [int(n) + 1 for n in lengths]
    step = StepBatch.build(step_rows(contexts, tables), BLOCK_SIZE, tokens)
    step.check(NUM_BLOCKS, TINY.vocab_size)
    replayed = backend.to_numpy(graphs.run(step))
    attention = AttentionMetadata.build([(1, c, t) for c, t in zip(contexts, tables, strict=True)], BLOCK_SIZE)
    eager = backend.to_numpy(model.forward(backend.xp.asarray(tokens), attention.positions, cache, attention))
    assert replayed.shape == (batch, TINY.vocab_size)
    np.testing.assert_allclose(replayed, eager, rtol=1e-5, atol=1e-5)
    on_device = backend.to_numpy(graphs.run(StepBatch.build(step_rows(contexts, tables), BLOCK_SIZE),
                                            backend.xp.asarray(tokens)))  # a decode run's tokens, fed on the GPU
    np.testing.assert_array_equal(on_device, replayed)


def step_rows(contexts: list[int], tables: list[list[int]]) -> list[tuple[int, int, list[int]]]:
    return [(1, context, table) for context, table in zip(contexts, tables, strict=True)]


@gpu
def test_replays_refuse_what_they_did_not_capture(rng):
    """Indices are checked by ``StepBatch.check``; a replay checks what is its own: its sizes and its state."""
    model = LlamaModel(TINY, random_weights(TINY, seed=1))
    graphs = DecodeGraphs(model, KVCache.allocate(TINY, NUM_BLOCKS, BLOCK_SIZE), batch_sizes=(2,),
                          max_context_len=64)
    with pytest.raises(ValueError, match="over the graphs' capacity, 64 tokens"):
        graphs.run(StepBatch.build([(1, 65, [0, 1, 2, 3, 4])], BLOCK_SIZE, [1]))
    with pytest.raises(ValueError, match="a decode step of 1 to 2 sequences"):
        graphs.run(StepBatch.build(step_rows([3, 3, 3], [[0], [1], [2]]), BLOCK_SIZE, [1, 2, 3]))
    with pytest.raises(ValueError, match="one new token each; got 2 tokens of 1 sequences"):
        graphs.run(StepBatch.build([(2, 3, [0])], BLOCK_SIZE, [1, 2]))
    graphs.run(StepBatch.build([(1, 3, [0])], BLOCK_SIZE, [1]))
    graphs.close()
    with pytest.raises(RuntimeError, match="were closed"):
        graphs.run(StepBatch.build([(1, 3, [0])], BLOCK_SIZE, [1]))


@gpu
def test_an_engine_with_graphs_generates_the_same_tokens(rng):
    prompts = [list(rng.integers(0, TINY.vocab_size, int(n))) for n in rng.integers(3, 40, 6)]
    params = SamplingParams(max_tokens=12, temperature=0.0)
    options = {"num_blocks": NUM_BLOCKS, "block_size": BLOCK_SIZE, "max_num_seqs": 4, "max_model_len": 128}
    eager = LLM(TINY, seed=2, **options).generate(prompts, params)
    for decode_steps in (1, 4):  # 4: runs of steps, each replay fed the previous arg-max on the GPU
        graphed = LLM(TINY, seed=2, cuda_graphs=True, decode_steps=decode_steps, **options).generate(prompts, params)
        assert [out.output_token_ids for out in graphed] == [out.output_token_ids for out in eager]
