"""The engine benchmark suite: its CPU smoke run and its headline arithmetic."""

import pytest

from course_lib import backend
from course_lib.bench import run_suite
from course_lib.bench.runner import measurement
from course_lib.bench.suites import engine as suite
from course_lib.bench.timing import Timing
from course_lib.checkpoint.config import TINY


def record(label, seconds, **params_and_derived):
    derived = {k: params_and_derived.pop(k) for k in ("gbps", "tokens_per_s") if k in params_and_derived}
    timing = Timing(seconds, seconds, seconds, seconds, seconds, 1, "perf_counter")
    return measurement(label, timing, params_and_derived, **derived)


def test_headline_puts_decode_on_the_roofline_and_compares_graphs_and_transformers():
    records = [record("copy", 1e-3, bytes=1 << 30, how="cudaMemcpyAsync", gbps=2000.0),
               record("decode batch 1, eager", 20e-3, role="eager", bytes_read=2_000_000_000),
               record("decode batch 1, graph", 2e-3, role="graph", bytes_read=2_000_000_000),
               record("engine 64 requests", 4.0, role="engine", requests=64, tokens_per_s=4000.0),
               record("transformers 64 requests", 8.0, role="transformers", requests=64, tokens_per_s=1000.0)]
    assert suite.headline(records) == pytest.approx(
        {"decode_b1_vs_roofline": 0.5, "graph_speedup_b1": 10.0, "throughput_vs_transformers_b64": 4.0})


def test_a_headline_names_only_what_was_measured():
    assert suite.headline([record("decode batch 1, eager", 2e-2, role="eager", bytes_read=1)]) == {}


def test_decode_reads_every_weight_once_but_one_embedding_row_plus_the_context():
    weights = suite.host_weights(TINY)
    embedding = weights["model.embed_tokens.weight"]
    kv = 2 * 10 * TINY.num_layers * TINY.num_kv_heads * TINY.head_dim * embedding.itemsize
    expected = sum(w.nbytes for w in weights.values()) - embedding.nbytes + TINY.hidden_size * embedding.itemsize + kv
    assert suite.decode_bytes(weights, TINY, 10) == expected


@pytest.mark.skipif(backend.has_gpu(), reason="the CPU smoke run")
def test_cpu_smoke_run_times_the_tiny_model_and_claims_no_gpu_figures():
    result = run_suite("engine", quick=True, progress=False)
    assert [m["parameters"]["role"] for m in result["measurements"]] == ["eager", "engine"]
    assert result["headline"] == {}


def test_headline_reports_smollm2_decode_and_chat_throughput():
    records = [record("SmolLM2 decode batch 1, graph", 1e-3, role="graph smollm2", tokens_per_s=1000.0),
               record("SmolLM2 64 chat requests", 2.0, role="smollm2 chat", requests=64, tokens_per_s=5000.0)]
    assert suite.headline(records) == {"smollm2_decode_b1_tokens_per_s": 1000.0,
                                       "smollm2_chat_b64_tokens_per_s": 5000.0}


def test_tied_embeddings_are_read_whole_by_a_decode_step():
    from course_lib.checkpoint.config import ModelConfig

    tied = ModelConfig(**{**vars(TINY), "tie_word_embeddings": True})
    weights = suite.random_weights(tied, seed=0)
    assert suite.decode_bytes(weights, tied, 0) == sum(w.nbytes for w in weights.values()) + \
        tied.hidden_size * weights["model.embed_tokens.weight"].itemsize
