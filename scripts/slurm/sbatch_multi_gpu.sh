#!/bin/bash
# One node, several GPUs: the model split over them, one process a GPU (tensor parallelism,
# examples/multi_gpu_infer.py): the ranks talk through NCCL, bootstrapped over MPI; options go to the example.
#
#   sbatch scripts/slurm/sbatch_multi_gpu.sh --prompt-tokens "1 17 42 99" --max-tokens 16 --json
#   sbatch --ntasks-per-node=4 --gpus-per-node=4 scripts/slurm/sbatch_multi_gpu.sh --model llama-1b-shaped
#
# Submit from the course's folder. The tensor-parallel size is the number of tasks; the model's heads must split
# evenly over them (SmolLM2: 3). mpiexec starts the tasks inside the allocation; each rank takes the GPU of its
# local rank.
#SBATCH --job-name=course-multi-gpu    # the name squeue and the output file show
#SBATCH --nodes=1                      # one machine: its GPUs talk over NVLink
#SBATCH --ntasks-per-node=2            # one process a GPU
#SBATCH --gpus-per-node=2              # as many GPUs as processes
#SBATCH --cpus-per-task=4              # host cores for each process
#SBATCH --time=00:15:00                # wall-clock limit
#SBATCH --output=%x-%j.out             # <job name>-<job id>.out
set -euo pipefail
source scripts/slurm/course_env.sh
"$MPIEXEC" -n "$SLURM_NTASKS" "$PYTHON" examples/multi_gpu_infer.py --tp "$SLURM_NTASKS" "$@"
