"""The command-line examples run on CPU with the tiny model and explain themselves with --help."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script, *args):
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.mark.parametrize("script", ["single_gpu_infer.py", "latency_bench.py"])
def test_every_example_has_help(script):
    done = run(script, "--help")
    assert done.returncode == 0 and "usage:" in done.stdout


def test_single_gpu_infer_streams_tokens_and_prints_timings():
    done = run("single_gpu_infer.py", "--prompt-tokens", "1 2 3 4 5", "--max-tokens", "4")
    assert done.returncode == 0, done.stderr
    generated = next(line for line in done.stdout.splitlines() if line.startswith("generated:"))
    assert len(generated.split()) == 1 + 4
    assert "time to first token" in done.stdout and "Mode:" in done.stdout


def test_latency_bench_writes_a_results_file_and_a_plot(tmp_path):
    done = run("latency_bench.py", "--batch-sizes", "1", "2", "--prompt-lengths", "8", "--output-lengths", "3",
               "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "latency_bench.json").read_text())
    assert [(m["batch"], m["output_length"]) for m in result["measurements"]] == [(1, 3), (2, 3)]
    assert all(m["ttft_s"] > 0 and m["tokens_per_s"] > 0 for m in result["measurements"])
    assert result["mode"] and (tmp_path / "latency_bench.png").stat().st_size > 0


def test_multi_step_decoding_streams_the_same_tokens():
    plain, multi = (run("single_gpu_infer.py", "--prompt-tokens", "1 2 3", "--max-tokens", "9", *extra)
                    for extra in ([], ["--decode-steps", "4"]))
    assert plain.returncode == multi.returncode == 0, plain.stderr + multi.stderr
    generated = [next(line for line in done.stdout.splitlines() if line.startswith("generated:"))
                 for done in (plain, multi)]
    assert generated[0] == generated[1]


SHORT_RUNS = {"single_gpu_infer.py": ["--max-tokens", "4"],
              "latency_bench.py": ["--batch-sizes", "1", "2", "--prompt-lengths", "8", "--output-lengths", "3"]}


@pytest.mark.parametrize("script", sorted(SHORT_RUNS))
def test_the_cuda_graphs_flag_runs_on_a_gpu_and_explains_itself_on_a_cpu(script, tmp_path):
    from course_lib import backend

    done = run(script, "--cuda-graphs", *SHORT_RUNS[script], *(["--out", str(tmp_path)] if "bench" in script else []))
    if backend.has_gpu():
        assert done.returncode == 0, done.stderr
    else:
        assert done.returncode == 2 and "--cuda-graphs needs an NVIDIA GPU" in done.stderr
