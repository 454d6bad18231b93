"""The tensor_parallel benchmark suite in one process: its quick run and results file, the slices its ranks draw,
the bytes and collectives it counts, a layout it cannot split, and the headline read across the degrees' files.
(Several ranks: tests/mpi/test_bench_tensor_parallel_mpi.py.)"""

import json
import types

import numpy as np
import pytest

from course_lib import backend
from course_lib.bench import results
from course_lib.bench.__main__ import main
from course_lib.bench.results import SCHEMA_VERSION, card_folder
from course_lib.bench.runner import measurement
from course_lib.bench.suites import tensor_parallel as suite
from course_lib.bench.timing import Timing
from course_lib.checkpoint.config import LLAMA_8B_SHAPED, TINY
from course_lib.device_facts import device_facts
from course_lib.distributed import run_ranks
from course_lib.engine.model import LlamaModel

NOTE = "needs the TP=1 file of the same card and a run on 2/4 GPUs"


@pytest.fixture(scope="module")
def quick_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tensor_parallel")
    assert main(["tensor_parallel", "--quick", "--out", str(folder)]) == 0
    return json.loads((folder / "tensor_parallel_tp1.json").read_text())  # one process: TP 1


def test_one_process_quick_run_writes_a_results_file_of_tp_1(quick_file):
    assert quick_file["schema"] == SCHEMA_VERSION and quick_file["name"] == "tensor_parallel_tp1"
    assert {"card", "mode", "date", "device", "parameters", "measurements", "headline"} <= quick_file.keys()
    assert quick_file["parameters"]["quick"]
    copy, *steps = quick_file["measurements"]
    assert copy["label"] == "copy" and copy["derived"]["gbps"] > 0 and copy["parameters"]["ranks"] == 1
    assert [(m["parameters"]["model"], m["parameters"]["batch"]) for m in steps] == [("tiny", 1), ("tiny", 8)]
    for m in steps:
        p, d, median = m["parameters"], m["derived"], m["timing"]["median_s"]
        assert (p["tp"], p["ranks"], p["context"], p["one_token_matvec"]) == (1, 1, 64, False)
        assert p["backend"] in ("mpi", "nccl") and p["dtype"] in ("float32", "bfloat16") and p["scaling_shape"] is None
        assert f"tiny, TP 1 ({p['backend']})" in m["label"] and m["timing"]["repeats"] == 3
        assert d["tokens_per_s"] == pytest.approx(p["batch"] / median)
        assert p["traffic_per_rank"]["all_reduces"] == 0 and d["collectives_alone_s"] == 0  # one rank talks to none
        assert d["predicted_step_s"] == d["memory_floor_s"] > 0
        assert d["predicted_over_measured"] == pytest.approx(d["predicted_step_s"] / median)


def test_one_rank_headline_is_null_with_a_note(quick_file):
    figures = quick_file["headline"]
    assert figures["tp2_decode_speedup_b1_8b"] is None and figures["tp4_decode_speedup_b1_8b"] is None
    assert NOTE in figures["note"]


def test_a_rank_draws_only_its_slice_and_its_step_gives_finite_logits():
    big = suite.rank_weights(LLAMA_8B_SHAPED, 4, "float32", seed=0)["model.layers.0.mlp.down_proj.weight"]
    assert isinstance(big, suite.RandomWeight) and big.shape == (4096, 14336)  # nothing drawn yet
    assert big[:2, 3584:7168].shape == (2, 3584)  # indexing draws what it takes, no more
    whole = suite.rank_weights(TINY, 1, "float32", seed=0)
    assert all(isinstance(w, np.ndarray) for w in whole.values())  # one rank: drawn whole, nothing to cut

    def rank_main(comm):
        model = LlamaModel(TINY, suite.rank_weights(TINY, comm.size, "float32", comm.rank), "float32",
                           one_token_matvec=False, comm=comm)
        logits = suite.decode_step(model, 3, 40)()
        suite.check_logits(logits, 3, TINY.vocab_size)
        return model.weights["model.layers.0.self_attn.qkv_proj.weight"].shape, suite.step_traffic(model, 3, 40)

    (qkv, moved), _ = run_ranks(rank_main, 2, xp=backend.xp)
    assert qkv == ((2 + 1 + 1) * TINY.head_dim, TINY.hidden_size)  # 2 of the 4 query heads, 1 of the 2 KV heads
    assert moved["all_reduces"] == 2 * TINY.num_layers + 1 and moved["all_reduce_bytes"] == 4 * 3 * TINY.hidden_size
    assert moved["all_gather_bytes"] == 4 * 3 * TINY.vocab_size
    assert moved["kv_bytes"] == 2 * 3 * 40 * TINY.num_layers * 1 * TINY.head_dim * 4


def test_a_step_reads_its_weights_once_but_one_embedding_row_a_token_plus_its_context():
    model = LlamaModel(TINY, suite.rank_weights(TINY, 1, "float32", seed=1), "float32", one_token_matvec=False)
    table = model.weights["model.embed_tokens.weight"]
    moved = suite.step_traffic(model, 5, 10)
    assert moved["weight_bytes"] == sum(w.nbytes for w in model.weights.values()) - table.nbytes \
        + 5 * TINY.hidden_size * 4
    assert moved["kv_bytes"] == 2 * 5 * 10 * TINY.num_layers * TINY.num_kv_heads * TINY.head_dim * 4
    assert (moved["all_reduces"], moved["all_gather_bytes"]) == (0, 0)


def test_bad_logits_are_named():
    with pytest.raises(RuntimeError, match=r"logits of shape \(2, 5\), expected \(2, 6\)"):
        suite.check_logits(backend.xp.zeros((2, 5)), 2, 6)
    with pytest.raises(RuntimeError, match="not finite"):
        suite.check_logits(backend.xp.asarray([[0.0, np.nan]]), 1, 2)


def test_a_layout_the_ranks_cannot_split_is_recorded_with_the_reason(monkeypatch):
    three = types.SimpleNamespace(size=3, rank=0, backend="mpi")
    monkeypatch.setattr(suite, "communicator", lambda: three)
    assert suite.result_name() == "tensor_parallel_tp3"
    planned = suite.steps(quick=True)
    assert [step.label for step in planned] == ["copy", "tiny: does not split"]
    record = planned[1].measure()
    assert record["timing"] is None and record["parameters"] == {"model": "tiny", "tp": 3, "ranks": 3, "backend": "mpi"}
    assert "cannot be split over 3 ranks" in record["skipped"]


def step_record(tp, seconds, model="llama-8b-shaped", batch=1):
    timing = Timing(seconds, seconds, seconds, seconds, seconds, 30, "perf_counter")
    return measurement(f"decode batch {batch}, {model}, TP {tp} (nccl)", timing,
                       {"model": model, "tp": tp, "ranks": tp, "backend": "nccl", "batch": batch})


def test_headline_divides_tp_1_by_tp_2_and_4():
    records = [step_record(1, 12e-3), step_record(2, 8e-3), step_record(4, 5e-3), step_record(2, 1.0, batch=64),
               step_record(1, 1.0, model="llama-1b-shaped")]
    assert suite.headline(records) == pytest.approx({"tp2_decode_speedup_b1_8b": 1.5, "tp4_decode_speedup_b1_8b": 2.4})


def test_headline_reads_the_other_degrees_from_the_same_cards_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    recorded = results.new_result("tensor_parallel_tp1", {})
    recorded["measurements"] = [step_record(1, 12e-3), step_record(2, 1.0)]  # its own TP 2 step: older, outranked
    results.save_result(recorded, tmp_path / card_folder(device_facts()))
    figures = suite.headline([step_record(2, 6e-3)])
    assert figures["tp2_decode_speedup_b1_8b"] == pytest.approx(2.0) and figures["tp4_decode_speedup_b1_8b"] is None
    assert NOTE in figures["note"] and "known at TP 1, TP 2" in figures["note"]


def test_each_gpu_model_names_the_same_shape_in_the_scaling_catalogue():
    from course_lib.scaling.shapes import ModelShape, shape

    for name, config in suite.GPU_PLAN.models.items():
        ours, theirs = ModelShape.from_config(config, name), shape(suite.SCALING_SHAPES[name])
        assert ours.parameters() == theirs.parameters() and ours.kv_bytes_per_token() == theirs.kv_bytes_per_token()
    assert shape("llama-3.1-8b").parameters() / 1e9 == pytest.approx(8.03, abs=0.01)  # Llama 3.1 8B's 8.03 billion
