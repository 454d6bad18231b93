"""Generate from one prompt with the model split over several ranks (tensor parallelism), one GPU a rank.

Start one process a rank with ``mpiexec``; ``--tp`` must equal their number. On GPUs the ranks talk through
NCCL, in CPU mode through MPI; the options and the output are those of ``single_gpu_infer.py``, and the tokens
are the same as one rank's. Rank 0 runs the scheduler and prints; the other ranks run the steps it sends.

    mpiexec -n 2 python examples/multi_gpu_infer.py --tp 2 --prompt-tokens "1 17 42 99" --max-tokens 16 --json
    mpiexec -n 3 python examples/multi_gpu_infer.py --tp 3 --model smollm2 --prompt "The capital of France is"
"""

from __future__ import annotations

import sys

from course_lib.distributed import BACKENDS, connect
from single_gpu_infer import argument_parser, generate, parse_arguments


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--tp", type=int, required=True, help="ranks the model is split over: mpiexec's -n")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="auto (default): NCCL on GPUs, MPI in CPU mode")
    args = parse_arguments(argv, parser)
    comm = connect(args.backend)
    if comm.size != args.tp:
        if comm.rank == 0:
            print(f"error: --tp {args.tp} needs {args.tp} ranks, and {comm.size} started: run it as "
                  f"mpiexec -n {args.tp} python examples/multi_gpu_infer.py --tp {args.tp} ...", file=sys.stderr)
        return 2
    return generate(args, comm)


if __name__ == "__main__":
    sys.exit(main())
