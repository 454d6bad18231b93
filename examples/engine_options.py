"""The engine options the command-line examples share: element type, CUDA graphs and decode steps per run.

Run as ``python examples/NAME.py``, an example has this folder first on ``sys.path``, so it imports this
module by its bare name, ``engine_options``.
"""

from __future__ import annotations

import argparse
from typing import Any

from course_lib import backend


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """``--dtype``, ``--cuda-graphs`` and ``--decode-steps``, with help that says what each changes."""
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay decode steps from CUDA graphs captured at start-up (needs a GPU)")
    parser.add_argument("--decode-steps", type=int, default=1,
                        help="decode steps per round trip to the host while every request decodes greedily "
                             "(default 1; tokens then arrive in bursts of this many)")


def engine_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """The parsed options as ``LLM`` keyword arguments; a usage error (exit 2) for ones this machine cannot run."""
    if args.cuda_graphs and not backend.has_gpu():
        parser.error(f"--cuda-graphs needs an NVIDIA GPU: {backend.mode_text()}")
    if args.decode_steps < 1:
        parser.error(f"--decode-steps must be >= 1, got {args.decode_steps}")
    return {"dtype": args.dtype, "cuda_graphs": args.cuda_graphs, "decode_steps": args.decode_steps}
