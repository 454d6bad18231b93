#!/bin/bash
# Several nodes: one process a GPU on every node, the model split over all of them (tensor parallelism through
# examples/multi_gpu_infer.py). MPI starts the ranks across the nodes of the allocation and carries NCCL's
# rendezvous (rank 0's unique id); NCCL then finds NVLink inside a node and the network between nodes.
#
#   sbatch scripts/slurm/sbatch_multinode.sh --model llama-1b-shaped --prompt-length 64 --json
#   sbatch --nodes=4 scripts/slurm/sbatch_multinode.sh ...      # 4 nodes x 8 GPUs = TP 32 (if the heads split)
#
# Submit from the course's folder, on a cluster whose nodes share it (a network file system). Tensor
# parallelism across nodes is usually a poor layout (every layer's all-reduces cross the network, chapter 07
# says when); this script is how any multi-node job of the course starts, and the place to get NCCL's
# network settings right.
#SBATCH --job-name=course-multinode    # the name squeue and the output file show
#SBATCH --nodes=2                      # machines
#SBATCH --ntasks-per-node=8            # one process a GPU on each
#SBATCH --gpus-per-node=8              # every GPU of each node
#SBATCH --cpus-per-task=8              # host cores for each process
#SBATCH --exclusive                    # no other job on these nodes: NCCL uses every NIC and all of NVLink
#SBATCH --time=00:30:00                # wall-clock limit
#SBATCH --output=%x-%j.out             # <job name>-<job id>.out
set -euo pipefail
source scripts/slurm/course_env.sh
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}  # INFO prints the rings, trees and transports NCCL chose (chapter 05)
# Which network NCCL uses between nodes: set these to your cluster's interfaces (ask its admins), e.g.
#   export NCCL_SOCKET_IFNAME=ib0        # the interface for NCCL's own sockets (bootstrap, and TCP transport)
#   export NCCL_IB_HCA=mlx5_0,mlx5_1     # the InfiniBand adapters to use for data
echo "nodes: ${SLURM_JOB_NODELIST}"
"$MPIEXEC" -n "$SLURM_NTASKS" "$PYTHON" examples/multi_gpu_infer.py --tp "$SLURM_NTASKS" "$@"
