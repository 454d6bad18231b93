#!/bin/bash
# A job array: the latency sweep of lab 20 cut into independent jobs, one batch size each, so that a queue with
# free GPUs runs them side by side. Each task writes its own JSON; lab 20's plots read any of them.
#
#   sbatch scripts/slurm/sbatch_latency_sweep.sh                    # batch sizes 1, 8, 32, 64
#   sbatch --array=0-1 scripts/slurm/sbatch_latency_sweep.sh --model tiny   # the first two only
#
# Submit from the course's folder; each task writes its JSON and plot into sweep/<array job id>/batch-<size>/
# ($COURSE_SWEEP_DIR instead of sweep/ if set).
#SBATCH --job-name=course-latency-sweep # the name squeue and the output files show
#SBATCH --array=0-3                    # four tasks, SLURM_ARRAY_TASK_ID = 0..3, one batch size each
#SBATCH --nodes=1                      # each task: one machine,
#SBATCH --ntasks=1                     # one process,
#SBATCH --gpus-per-node=1              # one GPU
#SBATCH --cpus-per-task=4              # host cores for the engine loop
#SBATCH --time=00:20:00                # wall-clock limit of each task
#SBATCH --output=%x-%A_%a.out          # <job name>-<array job id>_<task id>.out
set -euo pipefail
source scripts/slurm/course_env.sh
BATCH_SIZES=(1 8 32 64)
batch=${BATCH_SIZES[$SLURM_ARRAY_TASK_ID]}
"$PYTHON" examples/latency_bench.py --batch-sizes "$batch" \
    --out "${COURSE_SWEEP_DIR:-sweep}/${SLURM_ARRAY_JOB_ID}/batch-$batch" "$@"
