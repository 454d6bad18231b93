"""Generate from one prompt with the course's engine, streaming the reply, then print the timings.

With a real model the prompt is text and so is the reply: ``--model smollm2`` (SmolLM2-135M-Instruct,
fetched once), ``--gguf FILE`` or ``--checkpoint DIR`` (a Hugging Face folder with its tokenizer.json).
``--chat`` sends the prompt as a user's message through the model's chat template. The random-weight
shapes (``--model tiny``, ``llama-1b-shaped``) have no tokenizer: their prompts are token ids, given with
``--prompt-tokens`` or drawn at random (``--prompt-length``). Runs on a laptop in CPU mode and on a GPU.

    python examples/single_gpu_infer.py --model smollm2 --prompt "The capital of France is" --max-tokens 8
    python examples/single_gpu_infer.py --model smollm2 --chat --prompt "Why is the sky blue?"
    python examples/single_gpu_infer.py --model tiny --prompt-length 32 --max-tokens 16 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from course_lib import backend
from course_lib.checkpoint.config import LLAMA_1B_SHAPED, TINY
from course_lib.distributed import Communicator
from course_lib.engine.llm import LLM
from course_lib.engine.sampling import SamplingParams
from course_lib.models import MODELS, FetchError
from engine_options import add_engine_options, engine_options

RANDOM_MODELS = {"tiny": TINY, "llama-1b-shaped": LLAMA_1B_SHAPED}


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """The options of this program, described by ``doc`` (its first paragraph, then the examples)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog="\n\n".join(doc.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", choices=sorted(RANDOM_MODELS) + sorted(MODELS), default="tiny",
                        help="smollm2: the course's real model; tiny, llama-1b-shaped: random weights (default tiny)")
    source.add_argument("--checkpoint", metavar="DIR", help="a Hugging Face folder: config.json and *.safetensors")
    source.add_argument("--gguf", metavar="FILE", help="a Llama GGUF file (weights, config and tokenizer in one)")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", metavar="TEXT", help="the prompt as text (needs a model with a tokenizer)")
    prompt.add_argument("--prompt-tokens", help="the prompt as token ids separated by spaces, e.g. '1 17 42'")
    prompt.add_argument("--prompt-length", type=int, default=16, help="draw this many random prompt tokens")
    parser.add_argument("--chat", action="store_true", help="send --prompt as a user message in the chat template")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens to generate at most (default 16)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) samples greedily")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="keep the likeliest tokens up to this mass")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights, prompt and sampling")
    parser.add_argument("--logprobs", type=int, metavar="K", help="with --json: each token's K likeliest tokens' "
                        "log-probabilities and its own")
    parser.add_argument("--json", action="store_true", help="print one JSON object (token ids, text, timings) "
                        "instead of the streamed text")
    add_engine_options(parser)
    return parser


def parse_arguments(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    parser = parser or argument_parser(__doc__)
    args = parser.parse_args(argv)
    args.engine = engine_options(parser, args)  # LLM's keyword arguments, checked
    if args.chat and not args.prompt:
        parser.error("--chat needs --prompt TEXT (the user's message)")
    if args.logprobs is not None and (args.logprobs < 0 or not args.json):
        parser.error(f"--logprobs K goes with --json (the JSON object carries them) and K >= 0, got {args.logprobs}")
    return args


def build_engine(args: argparse.Namespace, comm: Communicator | None = None) -> LLM:
    if args.model in RANDOM_MODELS and not (args.checkpoint or args.gguf):
        return LLM(RANDOM_MODELS[args.model], seed=args.seed, comm=comm, **args.engine)
    return LLM.from_pretrained(args.checkpoint or args.gguf or args.model, comm=comm, **args.engine)


def prompt_of(args: argparse.Namespace, llm: LLM) -> list[int]:
    """The prompt's token ids: a chat turn, text, given ids, or random ids."""
    if args.chat:
        return llm.chat_prompt([{"role": "user", "content": args.prompt}])
    if args.prompt is not None:
        return llm.require_tokenizer("prompts given as text (--prompt)").encode(args.prompt)
    if args.prompt_tokens:
        return [int(token) for token in args.prompt_tokens.split()]
    return list(np.random.default_rng(args.seed).integers(0, llm.config.vocab_size, size=args.prompt_length))


def main(argv: list[str] | None = None) -> int:
    return generate(parse_arguments(argv))


def generate(args: argparse.Namespace, comm: Communicator | None = None) -> int:
    """Build the engine (split over ``comm``'s ranks, if given), stream the reply and report; rank 0 prints,
    the other ranks serve its steps."""
    speaks = comm is None or comm.rank == 0
    if not args.json and speaks:
        print(backend.mode_line())
    start = time.perf_counter()
    try:
        llm = build_engine(args, comm)
        prompt = prompt_of(args, llm) if speaks else []
    except (ValueError, OSError, FetchError) as error:  # a file, config or prompt the engine cannot take
        if speaks:
            print(f"error: {error}", file=sys.stderr)
        return 1
    if not speaks:
        llm.run_worker()
        return 0
    try:
        return stream_and_report(args, llm, prompt, start)
    finally:
        llm.close()  # under tensor parallelism, the other ranks' workers return


def stream_and_report(args: argparse.Namespace, llm: LLM, prompt: list[int], start: float) -> int:
    loaded = time.perf_counter()
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            max_tokens=args.max_tokens, seed=args.seed, logprobs=args.logprobs)
    if not args.json:
        shown = repr(llm.tokenizer.decode(prompt)) if llm.tokenizer else " ".join(map(str, prompt))
        print(f"prompt ({len(prompt)} tokens): {shown}")
        print("generated:", end=" " if llm.tokenizer is None else "\n", flush=True)
    times, tokens, logprobs = [], [], []
    began = time.perf_counter()
    for event in llm.stream([prompt], params):
        times.append(time.perf_counter())
        tokens.append(event.token_id)
        logprobs.append(event.logprobs)
        if not args.json:
            print(event.text if llm.tokenizer else event.token_id, end="" if llm.tokenizer else " ", flush=True)
    if not times:
        print("nothing was generated (the request was rejected)", file=sys.stderr)
        return 1
    timings = {"load_s": loaded - start, "ttft_s": times[0] - began,
               "tpot_s": (times[-1] - times[0]) / max(1, len(times) - 1),
               "tokens_per_s": len(times) / (times[-1] - began)}
    if args.json:
        report = {"mode": backend.mode_text(), "prompt_token_ids": [int(t) for t in prompt], "output_token_ids": tokens,
                  "text": llm.tokenizer.decode(tokens, skip_special_tokens=True) if llm.tokenizer else None,
                  **timings}
        if args.logprobs is not None:  # JSON keys are strings: token id -> log-probability
            report["logprobs"] = [{str(token): value for token, value in entry.items()} for entry in logprobs]
        print(json.dumps(report))
        return 0
    print()
    print(f"model built in {timings['load_s']:.2f} s; time to first token {timings['ttft_s'] * 1e3:.1f} ms; "
          f"{timings['tpot_s'] * 1e3:.2f} ms per output token after it ({len(times)} tokens, "
          f"{timings['tokens_per_s']:.1f} tokens/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
