# Sourced by the course's job scripts at the start of a job: the course's folder, its Python, the settings
# every job keeps. Submit jobs from the course's folder (sbatch copies the script elsewhere; the folder you
# submitted from is $SLURM_SUBMIT_DIR).
cd "${SLURM_SUBMIT_DIR:?not inside a Slurm job: submit the script with sbatch from the course\'s folder}"
PYTHON=${COURSE_PYTHON:-.venv/bin/python}        # the environment scripts/course.py setup made
[ -x "$PYTHON" ] || PYTHON=python3
MPIEXEC=${COURSE_MPIEXEC:-$(dirname "$PYTHON")/mpiexec}  # the launcher that came with mpi4py's MPI
[ -x "$MPIEXEC" ] || MPIEXEC=mpiexec
export NCCL_NVLS_ENABLE=0   # NVLink multicast off: the course's rule on machines shared with other jobs
export PYTHONUNBUFFERED=1   # lines reach the job's .out file as they are printed
echo "job ${SLURM_JOB_ID} on $(hostname): ${SLURM_NTASKS:-1} task(s), GPUs ${CUDA_VISIBLE_DEVICES:-none}"
