"""The course's job scripts submitted to a real Slurm: a controller and a node started on this machine.

``scripts/slurm/local_cluster.sh`` brings the cluster up from Debian's slurm-wlm and munge packages (CI installs
them; ``.ci/run``), with four GPUs that exist by count only, so the jobs run in CPU mode. Each script goes through
``sbatch --wait`` as a user would submit it, and its output is checked: the multi-GPU job's tokens must equal a
single rank's. The cluster is stopped at the end, leaving no daemon running.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "scripts" / "slurm" / "local_cluster.sh"
PROMPT = ["--prompt-tokens", "1 17 42 99", "--max-tokens", "8", "--json"]
SMALL = ["--cpus-per-task=1"]  # a laptop or CI node has few cores; a real cluster keeps the scripts' 4

missing = [name for name in ("sbatch", "slurmctld", "slurmd", "munged") if shutil.which(name) is None]
pytestmark = pytest.mark.skipif(bool(missing) or os.geteuid() != 0,
                                reason=f"needs Slurm and munge installed ({', '.join(missing) or 'present'}) and "
                                       "root, as CI has: apt-get install slurm-wlm munge")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict[str, str]:
    """The environment of a running local cluster (``SLURM_CONF``); stopped after the module's tests."""
    env = {**os.environ, "COURSE_SLURM_DIR": str(tmp_path_factory.mktemp("slurm")),
           "COURSE_SLURMCTLD_PORT": "6917", "COURSE_SLURMD_PORT": "6918"}
    started = subprocess.run([str(CLUSTER), "start"], env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    env["SLURM_CONF"] = str(Path(env["COURSE_SLURM_DIR"]) / "slurm.conf")
    yield env
    subprocess.run([str(CLUSTER), "stop"], env=env, capture_output=True, timeout=60)


def submit(slurm: dict[str, str], tmp_path: Path, script: str, *args: str, sbatch: tuple[str, ...] = ()) -> str:
    """Submit ``script`` as a user would (from the course's folder, ``sbatch`` options before it, the example's
    after it), wait for it, return its output."""
    output = tmp_path / f"{Path(script).stem}.out"
    done = subprocess.run(["sbatch", "--wait", "--parsable", *SMALL, *sbatch, f"--output={output}",
                           f"scripts/slurm/{script}", *args], cwd=ROOT, env=slurm, capture_output=True, text=True,
                          timeout=600)
    text = output.read_text() if output.exists() else ""
    assert done.returncode == 0, f"sbatch {script} failed: {done.stderr}\n{text}"
    return text


def tokens_in(output: str) -> list[int]:
    return json.loads(output.strip().splitlines()[-1])["output_token_ids"]


def test_the_single_gpu_job_runs_the_engine(slurm, tmp_path):
    output = submit(slurm, tmp_path, "sbatch_single_gpu.sh", *PROMPT)
    assert output.startswith("job ") and "1 task(s)" in output
    assert len(tokens_in(output)) == 8


def test_the_multi_gpu_job_generates_what_one_rank_generates(slurm, tmp_path):
    single = submit(slurm, tmp_path, "sbatch_single_gpu.sh", *PROMPT)
    split = submit(slurm, tmp_path, "sbatch_multi_gpu.sh", *PROMPT)
    assert "2 task(s)" in split and tokens_in(split) == tokens_in(single)


def test_the_multinode_job_runs_on_the_nodes_it_is_given(slurm, tmp_path):
    """One node here: the script's launch (mpiexec across the allocation, NCCL's settings) is the same on many."""
    single = submit(slurm, tmp_path, "sbatch_single_gpu.sh", *PROMPT)
    split = submit(slurm, tmp_path, "sbatch_multinode.sh", *PROMPT,
                   sbatch=("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=2"))
    assert "nodes: " in split and "2 task(s)" in split and tokens_in(split) == tokens_in(single)


def test_the_latency_sweep_is_a_job_array_of_one_batch_size_each(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    env = {**slurm, "COURSE_SWEEP_DIR": str(sweep)}
    done = subprocess.run(["sbatch", "--wait", "--parsable", *SMALL, "--array=0-1", f"--output={tmp_path}/%a.out",
                           "scripts/slurm/sbatch_latency_sweep.sh", "--model", "tiny", "--prompt-lengths", "8",
                           "--output-lengths", "4"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr + "".join(p.read_text() for p in tmp_path.glob("*.out"))
    job = done.stdout.strip().split(";")[0]
    assert sorted(p.name for p in (sweep / job).iterdir()) == ["batch-1", "batch-8"]
    assert all(list(folder.glob("*.json")) for folder in (sweep / job).iterdir())


def test_the_cluster_reports_its_node_and_queue(slurm):
    status = subprocess.run([str(CLUSTER), "status"], env=slurm, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "debug" in status.stdout and "JOBID" in status.stdout
