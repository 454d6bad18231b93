"""Generate from one prompt with the course's engine, streaming the tokens, then print the timings.

The course's models have no tokenizer, so a prompt is a list of token ids: give them with
``--prompt-tokens`` or let ``--prompt-length`` draw random ones. The weights are random (from ``--seed``)
unless ``--checkpoint`` names a Hugging Face-style directory (``config.json`` + ``*.safetensors``).
Runs on a laptop in CPU mode with the tiny model, and on a GPU for real.

    python examples/single_gpu_infer.py --prompt-length 32 --max-tokens 16
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from course_lib import backend
from course_lib.engine.config import LLAMA_1B_SHAPED, TINY
from course_lib.engine.llm import LLM
from course_lib.engine.options import add_engine_options, engine_options
from course_lib.engine.sampling import SamplingParams

MODELS = {"tiny": TINY, "llama-1b-shaped": LLAMA_1B_SHAPED}


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", choices=sorted(MODELS), default="tiny", help="a model shape with random weights")
    source.add_argument("--checkpoint", help="a directory with config.json and *.safetensors")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt-tokens", help="token ids separated by spaces, e.g. '1 17 42'")
    prompt.add_argument("--prompt-length", type=int, default=16, help="draw this many random prompt tokens")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens to generate (default 16)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) samples greedily")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="keep the likeliest tokens up to this mass")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights, prompt and sampling")
    add_engine_options(parser)
    args = parser.parse_args(argv)
    args.engine = engine_options(parser, args)  # LLM's keyword arguments, checked
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    print(backend.mode_line())
    start = time.perf_counter()
    if args.checkpoint:
        llm = LLM.from_checkpoint(args.checkpoint, **args.engine)
    else:
        llm = LLM(MODELS[args.model], seed=args.seed, **args.engine)
    loaded = time.perf_counter()
    if args.prompt_tokens:
        prompt = [int(token) for token in args.prompt_tokens.split()]
    else:
        prompt = list(np.random.default_rng(args.seed).integers(0, llm.config.vocab_size, size=args.prompt_length))
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            max_tokens=args.max_tokens, seed=args.seed)
    print(f"prompt ({len(prompt)} tokens): {' '.join(map(str, prompt))}")
    print("generated:", end=" ", flush=True)
    times = []
    for event in llm.stream([prompt], params):
        times.append(time.perf_counter())
        print(event.token_id, end=" ", flush=True)
    print()
    if not times:
        print("nothing was generated (the request was rejected)", file=sys.stderr)
        return 1
    first = times[0] - loaded
    per_token = (times[-1] - times[0]) / max(1, len(times) - 1)
    print(f"model built in {loaded - start:.2f} s; time to first token {first * 1e3:.1f} ms; "
          f"{per_token * 1e3:.2f} ms per output token after it ({len(times)} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
