"""The tensor_parallel suite on however many ranks ``mpiexec -n N`` started: TP = N. Every rank times the same steps
(each step's time is the slowest rank's) and rank 0's file, ``tensor_parallel_tp<N>.json``, says TP N over MPI; on 3
ranks, which the tiny model's 4 heads do not split over, it says so instead of crashing."""

import json
import tempfile
from pathlib import Path

import pytest

from course_lib import backend
from course_lib.bench import run_suite, save_result
from course_lib.bench.suites import tensor_parallel as suite
from course_lib.checkpoint.config import TINY

pytestmark = [pytest.mark.mpi,
              pytest.mark.skipif(backend.has_gpu(), reason="the MPI backend on the CPU; on GPUs the suite runs NCCL")]


def test_quick_suite_on_every_rank():
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    result = run_suite("tensor_parallel", quick=True, progress=False)
    steps = [m for m in result["measurements"] if m["parameters"].get("model")]
    medians = [m["timing"]["median_s"] for m in steps if m["timing"]]
    assert world.allgather(medians) == [medians] * world.size  # one set of figures, whichever rank writes them
    if world.rank == 0:  # a folder of its own: pytest's tmp_path folders are shared by the ranks' sessions
        with tempfile.TemporaryDirectory() as folder:
            path = save_result(result, Path(folder))
            data = json.loads(path.read_text())
        assert path.name == f"tensor_parallel_tp{world.size}.json"
        assert all((m["parameters"]["tp"], m["parameters"]["ranks"], m["parameters"]["backend"]) ==
                   (world.size, world.size, "mpi") for m in data["measurements"][1:])
        if TINY.num_heads % world.size:
            [skipped] = data["measurements"][1:]
            assert skipped["timing"] is None and f"cannot be split over {world.size} ranks" in skipped["skipped"]
        else:
            assert [m["parameters"]["batch"] for m in data["measurements"][1:]] == list(suite.QUICK_PLAN.batches)
            for m in data["measurements"][1:]:
                assert f"TP {world.size} (mpi)" in m["label"] and m["timing"]["median_s"] > 0
                assert m["parameters"]["traffic_per_rank"]["all_reduces"] == 2 * TINY.num_layers + 1
                assert m["derived"]["all_reduce_alone_s"] > 0 and m["derived"]["all_gather_alone_s"] > 0
        assert data["headline"]["tp2_decode_speedup_b1_8b"] is None and "TP=1 file" in data["headline"]["note"]
    world.Barrier()
