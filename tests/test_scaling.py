"""course_lib.scaling: the catalogue's sources, model shapes, the cost model, the planner, the CLI, calibration."""

import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest

from course_lib.bench.results import RESULTS_DIR, load_result
from course_lib.scaling import collectives
from course_lib.scaling.calibration import calibration_report
from course_lib.scaling.cost import (
    PLAIN,
    Assumptions,
    Batch,
    Layout,
    Prediction,
    memory,
    min_gpus,
    predict,
    prefill_batches,
    serve_s,
    step_cost,
)
from course_lib.scaling.hardware import CATALOGUE, FIGURES, Hardware, all_entries, hardware
from course_lib.scaling.plan import Workload, pareto_front, plan, plot
from course_lib.scaling.shapes import MODELS, ModelShape, shape

CARD = "nvidia-h100-80gb-hbm3"
H100 = Hardware.datasheet("h100-sxm")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "course_lib.scaling", *args], capture_output=True, text=True,
                          timeout=120)


# ---- the catalogue ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", all_entries(), ids=lambda e: f"{e.key}-{e.origin}")
def test_every_figure_has_a_source_and_every_gap_a_reason(entry):
    for name in FIGURES:
        value = getattr(entry, name)
        if value is None:
            assert len(entry.missing[name]) > 20, f"{entry.key}.{name}: say why it is missing"
        else:
            source = entry.sources[name]
            assert source.title and source.read[:2] == "20", f"{entry.key}.{name}: {source}"
            assert source.url.startswith("https://") or (RESULTS_DIR.parent.parent / source.url).is_file()


def test_the_catalogue_has_the_gpus_the_issue_names():
    assert set(CATALOGUE) == {"h100-sxm", "h200", "b200", "gb200-nvl72", "gb300-nvl72"}
    assert CATALOGUE["gb200-nvl72"].nvlink_domain == CATALOGUE["gb300-nvl72"].nvlink_domain == 72
    assert H100.bf16_flops_per_s == pytest.approx(989.5e12)  # dense: the datasheet's sparse 1,979 halved
    assert "halved" in H100.sources["bf16_flops_per_s"].note


def test_a_figure_without_a_source_is_refused():
    with pytest.raises(ValueError, match="has no source"):
        replace(H100, sources={k: v for k, v in H100.sources.items() if k != "hbm_bytes"})
    with pytest.raises(ValueError, match="say why"):
        replace(H100, hbm_bytes=None)


def test_measured_entry_reads_the_results_files():
    measured = Hardware.measured("h100-sxm")
    engine = load_result("engine", CARD)
    copy = next(m for m in engine["measurements"] if m["label"] == "copy")
    assert measured.hbm_bytes_per_s == pytest.approx(copy["derived"]["gbps"] * 1e9)
    cublas = load_result("gemm", CARD)["headline"]["cublas_tflops_8192"]
    assert measured.bf16_flops_per_s == pytest.approx(cublas * 1e12)
    assert measured.sources["hbm_bytes_per_s"].url.endswith("engine.json")
    assert measured.nvlink_bytes_per_s == H100.nvlink_bytes_per_s  # not measured: the datasheet's, with its source
    assert measured.sources["nvlink_bytes_per_s"] == H100.sources["nvlink_bytes_per_s"]


def test_datasheet_memory_gb_are_gib():
    """The datasheet's '80GB' is 80 GiB: within 2% of what the course's H100 reports to its driver."""
    reported = load_result("engine", CARD)["device"]["memory_bytes"]
    assert Hardware.measured("h100-sxm").hbm_bytes == reported
    assert H100.hbm_bytes == 80 * 2**30 == pytest.approx(reported, rel=0.02)


def test_unknown_gpu_and_missing_figures_are_clear_errors():
    with pytest.raises(ValueError, match="unknown GPU 'b300'.*h100-sxm"):
        hardware("b300")
    with pytest.raises(ValueError, match="measured no 'b200'"):
        Hardware.measured("b200")
    with pytest.raises(ValueError, match="no fp4_flops_per_s: Hopper has no FP4"):
        H100.flops_per_s("float4")


# ---- model shapes -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "public"), [("llama-3.1-8b", 8.0e9), ("llama-3.1-70b", 70.6e9),
                                              ("llama-3.1-405b", 405e9), ("mixtral-8x7b", 46.7e9)])
def test_parameter_counts_match_the_published_sizes(name, public):
    assert shape(name).parameters() == pytest.approx(public, rel=0.02)


def test_mixture_of_experts_counts_active_parameters():
    mixtral = shape("mixtral-8x7b")
    assert mixtral.is_moe and mixtral.active_parameters() == pytest.approx(12.9e9, rel=0.02)
    assert shape("llama-3.1-8b").active_parameters() == shape("llama-3.1-8b").parameters()


def test_kv_bytes_per_token():
    llama = shape("llama-3.1-70b")  # 80 layers x 8 kv heads x 128 x keys and values x 2 bytes
    assert llama.kv_bytes_per_token() == 80 * 8 * 128 * 2 * 2
    assert llama.kv_bytes_per_token("float8") == llama.kv_bytes_per_token() / 2


def test_shapes_come_from_config_dicts_and_refuse_what_they_cannot_read():
    config, _ = MODELS["llama-3.1-8b"]
    assert ModelShape.from_hf(config, "x").hidden_size == 4096
    with pytest.raises(ValueError, match="not understood"):  # the engine's own check of Llama configs
        ModelShape.from_hf({**config, "sliding_window": 4096})
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        ModelShape.from_hf({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="unknown model 'llama-4'.*llama-3.1-70b"):
        shape("llama-4")


# ---- the cost model -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "role"), [("llama-1b-shaped", "graph"), ("smollm2-135m", "graph smollm2")])
def test_decode_bytes_match_the_engine_suites_count(name, role):
    """The model's batch-1 bytes are the suite's bytes_read, plus the new token's keys and values it writes."""
    model = shape(name)
    m = next(m for m in load_result("engine", CARD)["measurements"] if m["parameters"].get("role") == role)
    step = step_cost(model, H100, Layout(), Batch(1, 1, m["parameters"]["context"]))
    written = model.kv_bytes_per_token()
    assert step.total("weight_bytes") + step.total("kv_bytes") == m["parameters"]["bytes_read"] + written


def test_decode_time_is_weight_bytes_over_bandwidth_and_scales_with_them():
    small = shape("llama-3.1-8b")
    big = replace(small, num_layers=2 * small.num_layers)
    steps = [step_cost(model, H100, Layout(), Batch(1, 1, 1)) for model in (small, big)]
    for step in steps:  # batch 1: every operation is memory-bound, its time its bytes over the bandwidth
        assert all(cost.bound == "memory" for cost in step.costs)
        total_bytes = sum(step.total(k) for k in ("weight_bytes", "kv_bytes", "activation_bytes"))
        assert step.seconds == pytest.approx(total_bytes / H100.hbm_bytes_per_s)
    layer_s = [sum(c.seconds for c in s.costs if c.name in ("qkv", "attention", "o_proj", "mlp")) for s in steps]
    assert layer_s[1] == pytest.approx(2 * layer_s[0])


def test_fp8_weights_halve_the_layers_but_not_the_tables():
    """fp8 covers the layers' projections; the embedding and lm_head stay bf16 (cost.py's docstring says why)."""
    model, batch = shape("llama-3.1-8b"), Batch(1, 1, 1)
    bf16, fp8 = ({c.name: c.weight_bytes for c in step_cost(model, H100, Layout(), batch, Assumptions(weights=w)).costs}
                 for w in ("bfloat16", "float8"))
    for name in ("qkv", "o_proj", "mlp"):
        assert fp8[name] == pytest.approx(bf16[name] / 2, rel=1e-3)  # qkv's norm weights stay bf16
    assert fp8["lm_head"] == bf16["lm_head"] and fp8["embedding"] == bf16["embedding"]
    tables = 2 * model.embedding_parameters * 2  # embedding and untied lm_head, bf16
    room = {w: memory(model, H100, Layout(), Assumptions(weights=w)).weight_bytes for w in ("bfloat16", "float8")}
    assert room["float8"] - tables == pytest.approx((room["bfloat16"] - tables) / 2, rel=1e-3)
    four = Assumptions(weights="float4")
    assert min_gpus(shape("llama-3.1-405b"), CATALOGUE["b200"], four) == math.ceil(
        memory(shape("llama-3.1-405b"), CATALOGUE["b200"], Layout(), four).weight_bytes / (180 * 2**30 * 0.9))


def test_large_batch_prefill_is_compute_bound():
    step = step_cost(shape("llama-3.1-8b"), H100, Layout(), Batch(8, 2048, 2048))
    assert next(c for c in step.costs if c.name == "mlp").bound == "compute"


def test_tensor_parallelism_halves_the_weights_and_adds_an_all_reduce():
    model, batch = shape("llama-3.1-8b"), Batch(16, 1, 1024)
    one, two = (step_cost(model, H100, Layout(tp=tp), batch) for tp in (1, 2))
    assert two.total("weight_bytes") == pytest.approx(one.total("weight_bytes") / 2, rel=1e-3)  # norms are not split
    assert not [c for c in one.costs if "all-reduce" in c.name]
    reduce = next(c for c in two.costs if "all-reduce" in c.name)
    hidden = 16 * model.hidden_size * 2
    expected = 2 * model.num_layers * collectives.ring_all_reduce_s(
        hidden, 2, H100.nvlink_bytes_per_s / 2, collectives.NVLINK_ALPHA_S)
    assert reduce.seconds == pytest.approx(expected)


def test_collectives_follow_the_alpha_beta_formulas():
    assert collectives.ring_all_reduce_s(1e6, 1, 1e9, 1e-5) == 0
    assert collectives.ring_all_reduce_s(1e6, 4, 1e9, 1e-5) == pytest.approx(1e-5 + 1.5 * 1e6 / 1e9)
    assert collectives.all_to_all_s(1e6, 4, 1e9, 0) == pytest.approx(0.75e-3)
    assert collectives.send_s(1e6, 1e9, 1e-5) == pytest.approx(1.01e-3)
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        collectives.ring_all_reduce_s(1e6, 2, 0, 0)


def test_experts_read_grow_with_the_batch():
    mixtral = shape("mixtral-8x7b")

    def expert_bytes(batch: int) -> float:
        cost = next(c for c in step_cost(mixtral, H100, Layout(tp=2), Batch(batch, 1, 1)).costs if "mlp" in c.name)
        return cost.weight_bytes / mixtral.num_layers

    one_expert = mixtral.expert_parameters / 2 * 2  # split over TP2, 2 bytes a weight
    assert expert_bytes(1) == pytest.approx(2 * one_expert, rel=1e-3)  # top-2: two experts
    assert expert_bytes(4096) == pytest.approx(8 * one_expert, rel=1e-3)  # every expert
    ep = step_cost(mixtral, H100, Layout(tp=2, dp=4, ep=8), Batch(64, 1, 64))
    all_to_all = next(c for c in ep.costs if "all-to-all" in c.name)
    link, alpha, h = H100.nvlink_bytes_per_s / 2, collectives.NVLINK_ALPHA_S, mixtral.hidden_size
    sent = 64 / 2 * mixtral.experts_per_token * h * 2  # each TP rank dispatches its half of the tokens, top-2
    regather = collectives.all_to_all_s(64 * h * 2, 2, link, alpha)  # the replica's tokens back on both TP ranks
    assert all_to_all.seconds == pytest.approx(
        mixtral.num_layers * (2 * collectives.all_to_all_s(sent, 8, link, alpha) + regather))


def test_the_largest_batch_shrinks_as_the_context_grows():
    room = memory(shape("llama-3.1-8b"), H100, Layout())
    batches = [room.max_batch(context) for context in (1024, 8192, 32768, 131072)]
    assert batches == sorted(batches, reverse=True) and batches[0] > batches[-1] >= 1
    assert not memory(shape("llama-3.1-70b"), H100, Layout()).fits  # 131 GiB of weights on one 80 GiB GPU
    assert memory(shape("llama-3.1-70b"), H100, Layout(tp=4)).fits


def test_pipeline_bubble_and_prefill_steps():
    model = shape("llama-3.1-8b")
    assert predict(model, H100, Layout(pp=4), 1, 128, 16).bubble == 0.75
    assert predict(model, H100, Layout(pp=4), 8, 128, 16).bubble == 0
    steps = prefill_batches(64, 512, 16384)  # as the engine suite schedules it: 32 whole prompts a step
    assert [(b.sequences, b.new_tokens) for b in steps] == [(32, 512), (32, 512)]
    assert [b.context for b in prefill_batches(1, 1000, 400)] == [400, 800, 1000]  # chunked prefill


def test_pipelining_one_sequence_costs_the_sum_of_the_stages():
    """At batch 1 a token crosses the 4 stages in turn: every layer and lm_head once, plus 3 sends."""
    model, context = shape("llama-3.1-8b"), 128 + 8
    pp1, pp4 = (predict(model, H100, Layout(pp=pp), 1, 128, 16).tpot_s for pp in (1, 4))
    send = collectives.send_s(model.hidden_size * 2, H100.nvlink_bytes_per_s / 2, collectives.NVLINK_ALPHA_S)
    assert pp4 == pytest.approx(pp1 + 3 * send)
    slowest_stage = step_cost(model, H100, Layout(pp=4), Batch(1, 1, context)).seconds
    assert pp4 < 4 * slowest_stage  # what charging pp x the slowest stage (lm_head on each) would say


def test_pipeline_send_stays_on_nvlink_whatever_the_data_parallelism():
    """The stages of one replica talk; DP replicas do not, so adding them does not move the send to the NIC."""
    model = shape("llama-3.1-8b")
    sends = [next(c for c in step_cost(model, H100, Layout(tp=4, pp=2, dp=dp), Batch(4, 1, 64)).costs
                  if c.name == "pipeline send").seconds for dp in (1, 4)]
    assert sends[0] == sends[1] == pytest.approx(
        collectives.send_s(4 * model.hidden_size * 2, H100.nvlink_bytes_per_s / 2, collectives.NVLINK_ALPHA_S))


def test_ttft_is_the_batch_prefill_the_throughput_counts():
    model, layout = shape("llama-3.1-8b"), Layout()
    p = predict(model, H100, layout, 32, 512, 64)
    prefill, decode = serve_s(model, H100, layout, 32, 512, 64)
    assert p.ttft_s == prefill and p.serve_s == prefill + decode
    assert p.ttft_s > predict(model, H100, layout, 1, 512, 64).ttft_s  # a lone prompt is prefilled sooner


def test_bad_layouts_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="6 GPUs do not split into TP4"):
        Layout.split(6, tp=4)
    with pytest.raises(ValueError, match="inside one NVLink domain"):
        step_cost(shape("llama-3.1-8b"), H100, Layout(tp=16), Batch(1, 1, 1))
    with pytest.raises(ValueError, match="ep must be 1"):
        Layout(tp=2, dp=2, ep=3)
    with pytest.raises(ValueError, match="is dense"):
        Layout(tp=2, ep=2).check(shape("llama-3.1-8b"), H100)
    with pytest.raises(ValueError, match="attention_kernel"):
        Assumptions(attention_kernel="naive")


# ---- the planner --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_plan():
    return plan(shape("llama-3.1-8b"), H100, 4, Workload(prompt=512, output=128, tpot_ms=15))


def test_plan_respects_the_latency_target(small_plan):
    assert small_plan.feasible and all(p.tpot_s * 1e3 <= 15 for p in small_plan.feasible)
    loose = plan(shape("llama-3.1-8b"), H100, 4, Workload(prompt=512, output=128, tpot_ms=1e6))
    assert len(small_plan.feasible) < len(loose.feasible)  # the 15 ms target turned the big batches away
    tight = plan(shape("llama-3.1-8b"), H100, 4, Workload(prompt=512, output=128, tpot_ms=1))
    assert not tight.feasible and tight.rejected
    assert all("misses the target" in reason for _, reason in tight.rejected)


def dominates(a: Prediction, b: Prediction) -> bool:
    """``a`` is at least as good as ``b`` on both counts and better on one."""
    at_least = (a.tokens_per_s_per_user >= b.tokens_per_s_per_user and a.tokens_per_s_per_gpu >= b.tokens_per_s_per_gpu)
    better = a.tokens_per_s_per_user > b.tokens_per_s_per_user or a.tokens_per_s_per_gpu > b.tokens_per_s_per_gpu
    return at_least and better


def test_plan_front_is_a_pareto_front(small_plan):
    front = small_plan.front
    assert front and all(not dominates(q, p) for p in front for q in small_plan.feasible)
    off_front = [p for p in small_plan.feasible if p not in front]
    assert all(any(dominates(q, p) or q.as_dict() == p.as_dict() for q in front) for p in off_front)
    speeds = [p.tokens_per_s_per_user for p in front]
    assert speeds == sorted(speeds, reverse=True)


def test_pareto_front_of_a_handmade_cloud(small_plan):
    a = small_plan.feasible[0]
    worse = replace(a, tokens_per_s_per_user=a.tokens_per_s_per_user - 1,
                    tokens_per_s_per_gpu=a.tokens_per_s_per_gpu - 1)
    assert worse not in pareto_front([a, worse]) and dominates(a, worse) and not dominates(a, a)


def test_plan_plot_writes_a_figure(small_plan, tmp_path):
    path = plot(small_plan, tmp_path / "front.png")
    assert path.stat().st_size > 10_000


# ---- the command line ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [[], ["list"], ["plan"], ["calibrate"]])
def test_cli_help(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0 and "usage: python -m course_lib.scaling" in result.stdout


def test_cli_plan_json():
    result = run_cli("plan", "--model", "llama-3.1-70b", "--gpu", "h100-sxm", "--gpus", "16", "--tpot-ms", "50",
                     "--price", "2.0", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["pareto_front"] and all(p["tpot_ms"] <= 50 and p["gpus"] == 16 for p in out["pareto_front"])
    assert all(p["cost_per_million_tokens"] > 0 for p in out["pareto_front"])
    assert out["min_gpus_for_weights"] == 2
    alphas = out["collective_alphas"]
    assert alphas["nvlink_alpha_s"]["value"] == collectives.NVLINK_ALPHA_S
    assert alphas["nvlink_alpha_s"]["source"]["url"] == collectives.NVLINK_ALPHA_SOURCE.url
    assert alphas["network_alpha_s"]["source"]["url"] == collectives.NETWORK_ALPHA_SOURCE.url


def test_plan_header_names_the_alphas_and_a_callers_own():
    model, workload = shape("llama-3.1-8b"), Workload(prompt=512, output=128, tpot_ms=50)
    header = "\n".join(plan(model, H100, 2, workload).table()[:4])
    assert "nccl/issues/1259" in header and "nccl/issues/1244" in header
    own = plan(model, H100, 2, workload, Assumptions(nvlink_alpha_s=20e-6))
    assert own.as_dict()["collective_alphas"]["nvlink_alpha_s"] == {"value": 20e-6, "unit": "s",
                                                                    "source": "given by the caller"}


def test_cli_list_json_has_sources():
    out = json.loads(run_cli("list", "--json").stdout)
    figures = [f for entry in out["hardware"] for f in entry["figures"].values()]
    assert all(("source" in f) != (f["value"] is None) for f in figures)
    assert out["collective_alphas"]["network_alpha_s"]["value"] == collectives.NETWORK_ALPHA_S
    text = run_cli("list").stdout
    assert "(copy, read+write)" in text and "nccl/issues/1259" in text and "GiB" in text


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "gpt-5"], "unknown model 'gpt-5'"),
    (["--gpu", "tpu-v5"], "unknown GPU 'tpu-v5'"),
    (["--gpus", "6", "--tp", "4"], "6 GPUs are not divisible by tp=4"),
    (["--tpot-ms", "-1"], "TPOT target must be > 0"),
])
def test_cli_bad_inputs_are_clear_errors(args, message):
    base = {"--model": "llama-3.1-8b", "--gpu": "h100-sxm", "--gpus": "8", "--tpot-ms": "50"}
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    result = run_cli("plan", *[token for pair in base.items() for token in pair])
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


# ---- calibration against the engine's H100 measurements ------------------------------------------------------

def test_calibration_against_the_engine_measurements():
    report = calibration_report()
    # the plain roofline is too optimistic (negative error); the named overheads bring both within 20%
    assert report["decode_b1_prediction_error_plain"] < -0.15
    assert abs(report["decode_b1_prediction_error"]) <= 0.2
    assert abs(report["serving_b64_prediction_error"]) <= 0.2
    assert report["decode_b1"]["bytes_read_model"] == pytest.approx(report["decode_b1"]["bytes_read_measured"],
                                                                    rel=1e-4)
    assert report["inputs"]["kernel_s"]["source"]["url"].endswith("norm.json")
    errors = [f"{name}_prediction_error{suffix}" for name in ("decode_b1", "serving_b64")
              for suffix in ("_plain", "_kernel_floor", "")]
    assert all(math.isfinite(report[key]) for key in errors)  # all six, each present
    assert PLAIN.kernel_s == 0  # the plain version really is plain


def test_the_committed_scaling_json_is_what_the_model_computes_now():
    """scaling.json must not go stale: its headline is recomputed here from the committed results files."""
    from course_lib.bench.results import load_result, provenance
    from course_lib.scaling.calibration import calibration_result

    committed, fresh = load_result("scaling", "nvidia-h100-80gb-hbm3"), calibration_result()
    assert committed["headline"] == pytest.approx(fresh["headline"]), "python -m course_lib.scaling calibrate --write"
    assert abs(committed["headline"]["decode_b1_prediction_error"]) < 0.2
    assert abs(committed["headline"]["serving_b64_prediction_error"]) < 0.2
    assert "predicted" in provenance(committed) and committed["mode"] == "derived"


# ---- published results of a production engine ------------------------------------------------------------------

def test_published_runs_are_predicted_with_their_source_and_error():
    from course_lib.scaling.published import PUBLISHED_RUNS, published_comparison

    rows = published_comparison()
    assert len(rows) == len(PUBLISHED_RUNS) >= 3
    assert len({(row["model"], row["gpu"]) for row in rows}) >= 3  # three models or GPUs, not one run three times
    for row, run in zip(rows, PUBLISHED_RUNS, strict=True):
        assert row["source"]["url"].startswith("https://") and row["source"]["read"]
        room = memory(shape(run.model), Hardware.datasheet(run.gpu), Layout.split(run.tp, tp=run.tp),
                      Assumptions(weights=run.weights, kv_cache=run.kv_cache))
        assert row["batch"] == room.max_batch(run.prompt + run.output)
        assert row["error"] == pytest.approx(run.output_tokens_per_s / row["predicted_tokens_per_s"] - 1)
        assert -0.6 < row["error"] < 0, f"{row['label']}: the chapter explains a plain model 29-54 % optimistic"
    eight_b = rows[0]  # the premise of FP8 keys and values: bf16 ones could not reach the published figure
    assert eight_b["bf16_kv_bound_tokens_per_s"] < eight_b["published_tokens_per_s"] < eight_b["predicted_tokens_per_s"]


def test_a_published_run_that_cannot_fit_is_refused_with_a_reason():
    from course_lib.scaling.published import TRTLLM_OVERVIEW, PublishedRun, predict_published

    with pytest.raises(ValueError, match="405"):  # 405 B parameters in bf16 do not fit one H100
        predict_published(PublishedRun("llama-3.1-405b", "h100-sxm", 1, 128, 128, 1.0, TRTLLM_OVERVIEW, "bfloat16"))


def test_the_calibration_says_where_it_is_fragile():
    committed = load_result("scaling", CARD)
    assert len(committed["parameters"]["caveats"]) >= 3
    assert sum(m["label"].startswith("published: ") for m in committed["measurements"]) >= 3
    assert "published" in run_cli("calibrate").stdout
