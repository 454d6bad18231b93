"""The command-line examples run on CPU with the tiny model and explain themselves with --help."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script, *args):
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.mark.parametrize("script", ["single_gpu_infer.py"])
def test_every_example_has_help(script):
    done = run(script, "--help")
    assert done.returncode == 0 and "usage:" in done.stdout


def test_single_gpu_infer_streams_tokens_and_prints_timings():
    done = run("single_gpu_infer.py", "--prompt-tokens", "1 2 3 4 5", "--max-tokens", "4")
    assert done.returncode == 0, done.stderr
    generated = next(line for line in done.stdout.splitlines() if line.startswith("generated:"))
    assert len(generated.split()) == 1 + 4
    assert "time to first token" in done.stdout and "Mode:" in done.stdout
