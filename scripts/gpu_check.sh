#!/usr/bin/env bash
# The GPU half of the course's checks, for an NVIDIA machine where the course's Python packages are
# importable (a `scripts/course.py setup` environment, or the packages installed some other way):
#   * the environment report with measured figures, and the same report forced into CPU mode;
#   * every test in GPU mode, the `gpu`-marked ones included;
#   * the solutions and the unsolved exercises checked, the chapters executed in GPU mode (nbclient);
#   * the benchmark suites named on the command line, written as results files.
# Usage: scripts/gpu_check.sh OUTDIR [SUITE ...]     e.g. scripts/gpu_check.sh /tmp/gpu-out env
# Copy OUTDIR/results/<card>/*.json to course_lib/results/<card>/ to publish the figures.
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUTDIR [SUITE ...]}; shift
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
status=0
step() { echo; echo "==== $1"; shift; "$@" || { echo "FAILED: $*"; status=1; }; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
step "environment report (GPU mode, measured)" $py -m course_lib.env --measure
step "environment report with COURSE_DEVICE=cpu" env COURSE_DEVICE=cpu $py -m course_lib.env
step "tests in GPU mode" $py -m pytest -p no:cacheprovider tests --ignore=tests/mpi -m "not mpi" -q -rs
step "solutions in GPU mode" $py -m pytest -p no:cacheprovider --nbval-lax solutions/ -q
step "unsolved exercises fail at their checks in GPU mode" $py scripts/exercises.py verify-unsolved
step "execute the chapters and labs" $py scripts/execute_notebook.py book/*.ipynb book/labs/*.ipynb --output-dir "$out"
for suite in "$@"; do
    step "benchmark $suite" $py -m course_lib.bench "$suite" --out "$out"
done
exit $status
