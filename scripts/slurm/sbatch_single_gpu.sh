#!/bin/bash
# One GPU: the course's engine answers one prompt (examples/single_gpu_infer.py); options go to the example.
#
#   sbatch scripts/slurm/sbatch_single_gpu.sh --model smollm2 --prompt "The capital of France is"
#   sbatch scripts/slurm/sbatch_single_gpu.sh --prompt-tokens "1 17 42 99" --max-tokens 16 --json
#
# Submit from the course's folder. Slurm reads the #SBATCH lines below as if they were options of sbatch;
# an option given on sbatch's command line wins over its #SBATCH line.
#SBATCH --job-name=course-single-gpu   # the name squeue and the output file show
#SBATCH --nodes=1                      # one machine
#SBATCH --ntasks=1                     # one process
#SBATCH --gpus-per-node=1              # one GPU; Slurm sets CUDA_VISIBLE_DEVICES to it
#SBATCH --cpus-per-task=4              # host cores for Python, the launches and the tokenizer
#SBATCH --time=00:15:00                # wall-clock limit: Slurm ends the job after it
#SBATCH --output=%x-%j.out             # stdout and stderr together, in <job name>-<job id>.out
set -euo pipefail
source scripts/slurm/course_env.sh
"$PYTHON" examples/single_gpu_infer.py "$@"
