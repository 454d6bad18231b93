"""The collectives suite on however many ranks ``mpiexec -n N`` started: every rank measures the same records
(each call's time is the slowest rank's), and rank 0's results file says N ranks over MPI."""

import json
import tempfile
from pathlib import Path

import pytest

from course_lib import backend
from course_lib.bench import run_suite, save_result

pytestmark = [pytest.mark.mpi,
              pytest.mark.skipif(backend.has_gpu(), reason="the MPI backend on the CPU; on GPUs the suite runs NCCL")]


def test_quick_suite_on_every_rank():
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    result = run_suite("collectives", quick=True, progress=False)
    timed = [m for m in result["measurements"] if m["timing"]]
    medians = [m["timing"]["median_s"] for m in timed]
    assert world.allgather(medians) == [medians] * world.size  # one set of figures, whichever rank writes them
    if world.rank == 0:  # a folder of its own: pytest's tmp_path folders are shared by the ranks' sessions
        with tempfile.TemporaryDirectory() as folder:
            data = json.loads(save_result(result, Path(folder)).read_text())
        records = [m for m in data["measurements"] if not m.get("skipped")]
        assert records and all((m["parameters"]["ranks"], m["parameters"]["backend"]) == (world.size, "mpi")
                               for m in records)
        assert all(f"{world.size} ranks (mpi)" in m["label"] and m["timing"]["median_s"] > 0
                   for m in data["measurements"] if m["timing"])
        assert all(m["derived"]["busbw_gbps"] > 0 for m in data["measurements"] if m["timing"])
        assert data["headline"]["ring_busbw_vs_nccl_256mib"] is None and "NCCL" in data["headline"]["note"]
    world.Barrier()
