"""Sweep batch size x prompt length x output length through the course's engine; write JSON and a plot.

For every combination the engine serves ``batch`` requests of ``prompt`` random tokens, each generating
``output`` tokens (greedy, no early stop), and the sweep records what a user of a server feels:

* time to first token (TTFT): from submitting the batch to a request's first token, averaged;
* time per output token (TPOT): the mean gap between a request's later tokens;
* throughput: output tokens of the whole batch over the wall time.

Runs in CPU mode with the tiny model (seconds) and on a GPU for real. The JSON carries the device, mode,
date and library versions of the run, like every results file of the course.

    python examples/latency_bench.py --batch-sizes 1 4 16 --prompt-lengths 32 128 --output-lengths 16
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: this program never opens a window

import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from course_lib import backend  # noqa: E402
from course_lib.bench.results import new_result, provenance, save_result  # noqa: E402
from course_lib.checkpoint.config import LLAMA_1B_SHAPED, TINY  # noqa: E402
from course_lib.engine.llm import LLM  # noqa: E402
from course_lib.labs.latency import measure_latency  # noqa: E402
from engine_options import add_engine_options, engine_options  # noqa: E402

MODELS = {"tiny": TINY, "llama-1b-shaped": LLAMA_1B_SHAPED}


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny", help="model shape, random weights")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16], help="requests served together")
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[32, 128], help="tokens per prompt")
    parser.add_argument("--output-lengths", type=int, nargs="+", default=[16], help="tokens generated per request")
    add_engine_options(parser)
    parser.add_argument("--num-blocks", type=int, default=1024, help="KV-cache blocks of 16 tokens")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompts")
    parser.add_argument("--out", type=Path, default=Path("latency_bench"), help="folder for the JSON and PNG")
    args = parser.parse_args(argv)
    args.engine = engine_options(parser, args)  # LLM's keyword arguments, checked
    return args


def plot(result: dict[str, Any], path: Path) -> None:
    """TPOT and throughput against batch size, one line per (prompt, output) length."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    rows = result["measurements"]
    for key in sorted({(r["prompt_length"], r["output_length"]) for r in rows}):
        line = sorted((r for r in rows if (r["prompt_length"], r["output_length"]) == key), key=lambda r: r["batch"])
        batches = [r["batch"] for r in line]
        label = f"prompt {key[0]}, output {key[1]}"
        left.plot(batches, [r["tpot_s"] * 1e3 for r in line], "o-", label=label)
        right.plot(batches, [r["tokens_per_s"] for r in line], "o-", label=label)
    for ax, name in ((left, "time per output token (ms)"), (right, "output tokens per second")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (requests served together)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(f"{result['parameters']['model']} model, {backend.mode_text()}", fontsize=9)
    fig.text(0.01, 0.01, provenance(result), fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    print(backend.mode_line())
    config = MODELS[args.model]
    result = new_result("latency_bench", {"model": args.model, "dtype": args.dtype, "num_blocks": args.num_blocks})
    rng = np.random.default_rng(args.seed)
    sweep = list(itertools.product(args.batch_sizes, args.prompt_lengths, args.output_lengths))
    llm = LLM(config, seed=args.seed, num_blocks=args.num_blocks, max_model_len=config.max_position_embeddings,
              **args.engine)
    for batch, prompt_length, output_length in tqdm(sweep, desc="latency sweep", unit="point"):
        result["measurements"].append(measure_latency(llm, batch, prompt_length, output_length, rng))
    json_path, png_path = save_result(result, args.out), args.out / "latency_bench.png"
    plot(result, png_path)
    for row in result["measurements"]:
        print(f"batch {row['batch']:>4} prompt {row['prompt_length']:>5} output {row['output_length']:>4}: "
              f"TTFT {row['ttft_s'] * 1e3:8.1f} ms  TPOT {row['tpot_s'] * 1e3:7.2f} ms  "
              f"{row['tokens_per_s']:9.1f} tokens/s")
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
