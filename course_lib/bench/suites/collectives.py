"""All-reduce, all-gather and all-to-all from 8 bytes up: time, algorithm and bus bandwidth, and the alpha-beta fit
of each way of running them (chapter 05).

The ways, on whatever ranks started the process (``mpiexec -n N``, or one process alone):

* ``library``: the course communicator's own collective (``course_lib.distributed.connect()``): NCCL's on GPUs,
  MPI's on the CPU;
* ``ring`` and ``recursive_doubling`` (all-reduce), ``pairwise`` (all-to-all): the hand-written algorithms of
  ``course_lib.distributed.algorithms``, over the same communicator's ``sendrecv``;
* ``torch`` (all-reduce, GPU only): ``torch.distributed.all_reduce`` on an NCCL process group over the same ranks
  and GPUs, the library anchor, measured in the same run (a labelled gap where PyTorch is not installed).

Sizes double from 8 B to 1 GiB on a GPU and to 64 MiB on the CPU (``--quick``: every sixteenth-fold step and
the headline's sizes on a GPU, 8 B to 32 KiB in four steps on the CPU). ``S`` counts as in nccl-tests
(``course_lib.bench.collective_bandwidth``): an all-reduce's buffer on each rank, an all-gather's gathered
result, an all-to-all's whole send buffer; it is rounded so that every rank's part is a whole number of float32
elements. Before it is timed, every way is checked once at every size: each rank's input is ``rank + 1`` and the
result must be exactly what that implies.

Timing: each call starts from a barrier and is timed on the host until its result is ready (the GPU
synchronised); a call's time is the largest over the ranks (a collective is done when its last rank is done),
so every rank computes the same records. All-reduces run in place on zeros: sums of zeros stay zeros however
many calls are timed, and the values do not change the time. After the sizes, each way gets an alpha-beta fit
(``fit_alpha_beta``), with the bus factor as its byte factor (its bandwidth is then the link's, the ``B`` of
``course_lib.scaling.collectives``); with one rank the factor is 0, and the fit is of the algorithm bandwidth.

Every rank measures; rank 0's result is the one to keep. The headline compares bus bandwidths, which are 0 on
one rank: it stays null, with a note, until the suite runs on two or more GPUs.
"""

from __future__ import annotations

import functools
import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from course_lib import backend
from course_lib.bench.baselines import require_torch
from course_lib.bench.collective_bandwidth import AlphaBetaFit, algorithm_bandwidth, bus_factor, fit_alpha_beta
from course_lib.bench.results import provenance
from course_lib.bench.runner import Step, measurement
from course_lib.bench.timing import Timing
from course_lib.distributed import Communicator, connect
from course_lib.distributed.algorithms import pairwise_all_to_all, recursive_doubling_all_reduce, ring_all_reduce

DESCRIPTION = "all-reduce, all-gather, all-to-all: library vs hand-written vs torch.distributed, busbw and alpha-beta"
DTYPE, ITEM_BYTES = "float32", 4
GPU_TOP, CPU_TOP = 30, 26  # the largest message, as a power of two: 1 GiB on a GPU, 64 MiB on the CPU
REPEATS, WARMUP = 20, 3
QUICK_REPEATS, QUICK_WARMUP = 3, 1
# What runs, for each (collective, method).
METHODS = {
    ("all_reduce", "library"): "the communicator's all_reduce (NCCL's or MPI's own), in place",
    ("all_reduce", "ring"): "course_lib.distributed.algorithms.ring_all_reduce over sendrecv, in place",
    ("all_reduce", "recursive_doubling"): "course_lib.distributed.algorithms.recursive_doubling_all_reduce, in place",
    ("all_reduce", "torch"): "torch.distributed.all_reduce on an NCCL process group, in place",
    ("all_gather", "library"): "the communicator's all_gather (NCCL's or MPI's own)",
    ("all_to_all", "library"): "the communicator's all_to_all (its counts all-gathered first, then NCCL's or MPI's)",
    ("all_to_all", "pairwise"): "course_lib.distributed.algorithms.pairwise_all_to_all over sendrecv",
}
# The headline: (method, its anchor, size): the method's bus bandwidth over the anchor's, same run, same size.
HEADLINES = {"allreduce_busbw_vs_torch_1gib": ("library", "torch", 1 << 30),
             "ring_busbw_vs_nccl_256mib": ("ring", "library", 256 << 20)}
PARAMETERS = {"dtype": DTYPE, "sizes": "8 B to 1 GiB on a GPU, 8 B to 64 MiB on the CPU, doubling",
              "bytes": "S as nccl-tests count it: all-reduce each rank's buffer, all-gather the gathered result, "
                       "all-to-all each rank's whole send buffer",
              "timing": "host clock from a barrier to the result ready, the slowest rank's; median of the calls",
              "methods": {f"{collective} {method}": how for (collective, method), how in METHODS.items()}}


def steps(quick: bool) -> list[Step]:
    torch_reason = torch_missing()
    if torch_reason is None:
        require_torch("the collectives suite's torch.distributed anchor")  # loaded first, as the other suites do
    comm = connect()
    repeats, warmup = (QUICK_REPEATS, QUICK_WARMUP) if quick else (REPEATS, WARMUP)
    planned = []
    for collective, method in METHODS:
        if method == "torch" and torch_reason:
            planned.append(Step("all_reduce torch", functools.partial(skipped, comm, torch_reason)))
            continue
        sizes = sorted({message_bytes(collective, nominal, comm.size) for nominal in nominal_sizes(quick)})
        sweep = Sweep(comm, collective, method, repeats, warmup)
        planned += [Step(sweep.label(nbytes), functools.partial(sweep.measure, nbytes)) for nbytes in sizes]
        planned.append(Step(f"fit {sweep.name}", sweep.fit))
    return planned


def nominal_sizes(quick: bool) -> list[int]:
    """Message sizes, doubling from 8 B to 1 GiB on a GPU and to 64 MiB on the CPU. Quick: every sixteenth-fold
    step, to 32 KiB on the CPU; on a GPU, to 1 GiB, with the headline's sizes."""
    gpu = backend.has_gpu()
    if not quick:
        powers = set(range(3, (GPU_TOP if gpu else CPU_TOP) + 1))
    elif gpu:
        powers = {*range(3, GPU_TOP + 1, 4), *(nbytes.bit_length() - 1 for _, _, nbytes in HEADLINES.values())}
    else:
        powers = set(range(3, 16, 4))
    return [1 << power for power in sorted(powers)]


def message_bytes(collective: str, nominal: int, ranks: int) -> int:
    """``S`` for a message of about ``nominal`` bytes, rounded down so that each rank's part (all-gather) or each
    destination's block (all-to-all) is a whole number of float32 elements, at least one."""
    parts = 1 if collective == "all_reduce" else ranks
    return ITEM_BYTES * parts * max(1, nominal // (ITEM_BYTES * parts))


def ranks_text(ranks: int) -> str:
    """``1 rank``, ``4 ranks``."""
    return f"{ranks} rank{'s' if ranks > 1 else ''}"


def size_text(nbytes: int) -> str:
    """``8 B``, ``4 KiB``, ``256 MiB``, ``1 GiB``: the largest binary unit that divides the size, else bytes."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift} {unit}"
    return f"{nbytes} B"


# ---- one collective, one way, one size ----------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """The buffers of one size, ready: ``run`` makes one call; ``check`` makes one and checks its result,
    leaving the buffers as ``run`` should find them."""

    run: Callable[[], Any]
    check: Callable[[], None]


def prepare(comm: Communicator, collective: str, method: str, nbytes: int) -> Prepared:
    """Inputs for ``nbytes`` (``message_bytes``), each rank's filled with ``rank + 1``, and the call to time."""
    xp, ranks = comm.xp, comm.size
    if collective == "all_reduce":
        if method == "torch":
            return _prepare_torch(comm, nbytes)
        x = xp.full(nbytes // ITEM_BYTES, comm.rank + 1, dtype=DTYPE)
        run = {"library": lambda: comm.all_reduce(x, out=x),
               "ring": lambda: ring_all_reduce(comm, x, out=x),
               "recursive_doubling": lambda: recursive_doubling_all_reduce(comm, x, out=x)}[method]

        def check_sum() -> None:
            run()
            expect(f"all_reduce {method}", x, xp.asarray(ranks * (ranks + 1) // 2, dtype=DTYPE))
            x.fill(0)  # sums of zeros stay zeros, however many calls are timed

        return Prepared(run, check_sum)
    # all-gather and all-to-all: every rank ends with one block from each rank, block s full of s + 1
    block = nbytes // ITEM_BYTES // ranks
    senders = xp.arange(1, ranks + 1, dtype=DTYPE)[:, None]
    if collective == "all_gather":
        mine, gathered = xp.full(block, comm.rank + 1, dtype=DTYPE), xp.empty(ranks * block, dtype=DTYPE)
        run = functools.partial(comm.all_gather, mine, out=gathered)
        return Prepared(run, lambda: expect("all_gather library", run().reshape(ranks, block), senders))
    outgoing, counts = xp.full(ranks * block, comm.rank + 1, dtype=DTYPE), [block] * ranks
    run = {"library": functools.partial(comm.all_to_all, outgoing, counts),
           "pairwise": functools.partial(pairwise_all_to_all, comm, outgoing, counts)}[method]
    return Prepared(run, lambda: expect(f"all_to_all {method}", xp.stack(run()), senders))


def expect(what: str, got: Any, expected: Any) -> None:
    """Raise, naming the first wrong element, unless ``got`` equals ``expected`` (broadcast to its shape)."""
    wrong = (got != expected).reshape(-1)
    if bool(wrong.any()):
        index = np.unravel_index(int(wrong.argmax()), got.shape)
        should = np.broadcast_to(backend.to_numpy(expected), got.shape)[index]
        raise RuntimeError(f"{what} is wrong: element {tuple(map(int, index))} is {float(got[index])}, "
                           f"expected {float(should)}")


def time_collective(comm: Communicator, run: Callable[[], Any], repeats: int, warmup: int) -> Timing:
    """Seconds per call of a collective, as its slowest rank saw them.

    Each timed call starts from a barrier, so that the ranks start together, and ends when its result is ready
    (on a GPU every stream synchronised: torch queues on streams of its own). The time of a call is the largest
    over the ranks, all-reduced with "max": every rank ends with the same ``Timing``. The barrier releases the
    ranks a little apart, and that skew is in the time too, as it is in any program that calls the collective.
    """
    for _ in range(warmup):
        run()
    wait_for_gpu()
    samples = np.empty(repeats)
    for index in range(repeats):
        comm.barrier()
        start = time.perf_counter()
        run()
        wait_for_gpu()
        samples[index] = time.perf_counter() - start
    slowest = comm.all_reduce(comm.xp.asarray(samples), op="max")
    return Timing.from_samples(backend.to_numpy(slowest), "perf_counter")


def wait_for_gpu() -> None:
    """Every stream of this process's GPU idle (nothing to wait for on the CPU)."""
    if backend.has_gpu():
        backend.xp.cuda.Device().synchronize()


# ---- a way of running a collective, over all sizes ----------------------------------------------------------


class Sweep:
    """One way of running one collective, measured size by size (``measure``), then fitted (``fit``)."""

    def __init__(self, comm: Communicator, collective: str, method: str, repeats: int, warmup: int):
        self.comm, self.collective, self.method = comm, collective, method
        self.repeats, self.warmup = repeats, warmup
        self.where = f"{ranks_text(comm.size)} ({comm.backend})"  # every record says how many ranks, over what
        self.name = f"{collective} {method}, {self.where}"
        self.medians: list[tuple[int, float]] = []  # (bytes, median seconds), filled by measure

    def label(self, nbytes: int) -> str:
        """``all_reduce ring 1 MiB, 4 ranks (mpi)``."""
        return f"{self.collective} {self.method} {size_text(nbytes)}, {self.where}"

    def parameters(self) -> dict[str, Any]:
        """What every record of this sweep carries: the collective, the way, how many ranks, over what."""
        return {"collective": self.collective, "method": self.method, "ranks": self.comm.size,
                "backend": self.comm.backend, "how": METHODS[self.collective, self.method], "dtype": DTYPE}

    def measure(self, nbytes: int) -> dict[str, Any]:
        """One size: checked once, then timed; time, algorithm and bus bandwidth (GB/s). A rank whose check
        fails tells the others (``report_failures``), which stop at once instead of waiting out their timeout."""
        with self.comm.report_failures():
            prepared = prepare(self.comm, self.collective, self.method, nbytes)
            prepared.check()
            timing = time_collective(self.comm, prepared.run, self.repeats, self.warmup)
        self.medians.append((nbytes, timing.median_s))
        algbw = algorithm_bandwidth(nbytes, timing.median_s)
        return measurement(self.label(nbytes), timing, {**self.parameters(), "bytes": nbytes},
                           algbw_gbps=algbw / 1e9, busbw_gbps=algbw * bus_factor(self.collective, self.comm.size) / 1e9)

    def fit(self) -> dict[str, Any]:
        """The alpha-beta fit of the medians measured so far (a record with no timing of its own)."""
        factor = bus_factor(self.collective, self.comm.size)
        sizes, medians = zip(*self.medians, strict=True)
        fitted = fit_alpha_beta(sizes, medians, byte_factor=factor if factor > 0 else 1.0)
        if self.method == "torch":  # the anchor's last step: its process group is done with
            torch_distributed(self.comm).destroy_process_group()
        parameters = {**self.parameters(), "fitted_sizes": list(sizes),
                      "bandwidth": "bus" if factor > 0 else "algorithm (one rank: the bus factor is 0)"}
        return {"label": f"fit {self.name}", "parameters": parameters, "timing": None, "derived": fitted.asdict()}


def skipped(comm: Communicator, reason: str) -> dict[str, Any]:
    """The record of the torch anchor where it cannot run, with why: a gap in a table is never silent."""
    parameters = {"collective": "all_reduce", "method": "torch", "ranks": comm.size, "backend": comm.backend}
    return {"label": "all_reduce torch", "parameters": parameters, "skipped": reason, "timing": None, "derived": {}}


# ---- the anchor: torch.distributed -------------------------------------------------------------------------


def torch_missing() -> str | None:
    """Why torch.distributed's NCCL all-reduce cannot run in this process, or None when it can."""
    if not backend.has_gpu():
        return "torch.distributed's NCCL all-reduce needs a GPU (CPU mode)"
    if importlib.util.find_spec("torch") is None:
        return "PyTorch is not installed (pip install torch): no torch.distributed anchor in this run"
    return None


@functools.cache
def torch_distributed(comm: Communicator) -> ModuleType:
    """``torch.distributed`` with an NCCL process group over the ranks and GPUs of ``comm`` (an NCCL communicator).

    The ranks meet through a TCP store that rank 0 opens on a free port of this host (one host, as on a single
    node) and whose port it broadcasts over ``comm``. ``NcclCommunicator`` has already set NCCL_NVLS_ENABLE=0 in
    the environment, so torch's NCCL keeps NVLink multicast off as well.
    """
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(comm.device)
    store = dist.TCPStore("127.0.0.1", 0, comm.size, is_master=True, wait_for_workers=False) if comm.rank == 0 else None
    port = int(comm.broadcast(comm.xp.asarray([store.port if store else 0], dtype="int64"))[0])
    if store is None:
        store = dist.TCPStore("127.0.0.1", port, comm.size, is_master=False)
    dist.init_process_group("nccl", store=store, rank=comm.rank, world_size=comm.size)
    return dist


def _prepare_torch(comm: Communicator, nbytes: int) -> Prepared:
    """``prepare`` for torch.distributed's all-reduce: a CUDA tensor of ``rank + 1``, summed in place."""
    import torch

    dist = torch_distributed(comm)
    x = torch.full((nbytes // ITEM_BYTES,), comm.rank + 1, dtype=torch.float32, device="cuda")

    def check_sum() -> None:
        dist.all_reduce(x)
        expect("all_reduce torch", comm.xp.from_dlpack(x), comm.size * (comm.size + 1) // 2)
        x.zero_()

    return Prepared(lambda: dist.all_reduce(x), check_sum)


# ---- the headline -------------------------------------------------------------------------------------------


def headline(measurements: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 15's figures: the course's NCCL all-reduce against torch.distributed's at 1 GiB, and the hand ring
    against the course's NCCL all-reduce at 256 MiB, as ratios of bus bandwidth in the same run.

    Bus bandwidth is 0 on one rank and MPI on a CPU is no NCCL: there, and wherever an input was not measured,
    a figure is None and ``note`` says why. Never a number that does not measure what its name says.
    """
    timed = [m for m in measurements if m.get("timing") and m["parameters"].get("collective") == "all_reduce"
             and "bytes" in m["parameters"]]
    busbw = {(m["parameters"]["method"], m["parameters"]["bytes"]): m["derived"]["busbw_gbps"] for m in timed}
    ranks = {m["parameters"]["ranks"] for m in timed}
    backends = {m["parameters"]["backend"] for m in timed}
    figures: dict[str, Any] = dict.fromkeys(HEADLINES)
    if ranks == {1}:
        figures["note"] = ("measured on 1 rank, where bus bandwidth is 0 by definition (2(n-1)/n = 0): these "
                           "ratios need 2 or more GPUs, which the multi-GPU measurements fill in")
        return figures
    if backends != {"nccl"}:
        figures["note"] = f"measured over {', '.join(sorted(backends)) or 'nothing'}: these ratios compare NCCL on GPUs"
        return figures
    skips = {m["parameters"]["method"]: m["skipped"] for m in measurements if m.get("skipped")}
    missing = []
    for name, (method, anchor, nbytes) in HEADLINES.items():
        if (method, nbytes) in busbw and (anchor, nbytes) in busbw:
            figures[name] = busbw[method, nbytes] / busbw[anchor, nbytes]
        else:
            why = "; ".join(f"{way} skipped: {skips[way]}" for way in (method, anchor) if way in skips)
            missing.append(f"{name}: no {size_text(nbytes)} all-reduce by both {method} and {anchor} in this run"
                           + (f" ({why})" if why else ""))
    if missing:
        figures["note"] = "; ".join(missing)
    return figures


# ---- reading a results file back (chapter 05) ---------------------------------------------------------------


@dataclass(frozen=True)
class RecordedSweep:
    """One way of running one collective, as a results file recorded it."""

    method: str
    ranks: int
    backend: str
    sizes: np.ndarray  # bytes
    median_s: np.ndarray
    algbw_gbps: np.ndarray
    busbw_gbps: np.ndarray
    fit: AlphaBetaFit


def recorded_sweeps(result: dict[str, Any], collective: str = "all_reduce") -> list[RecordedSweep]:
    """Every way ``collective`` was measured in ``result`` (a collectives results file), in the order it ran."""
    records = [m for m in result["measurements"]
               if m["parameters"].get("collective") == collective and not m.get("skipped")]
    sweeps = []
    for fit in (m for m in records if "fitted_sizes" in m["parameters"]):
        method = fit["parameters"]["method"]
        points = [m for m in records if m["parameters"]["method"] == method and "bytes" in m["parameters"]]
        derived = fit["derived"]
        sweeps.append(RecordedSweep(
            method, fit["parameters"]["ranks"], fit["parameters"]["backend"],
            np.array([m["parameters"]["bytes"] for m in points]),
            np.array([m["timing"]["median_s"] for m in points]),
            np.array([m["derived"]["algbw_gbps"] for m in points]),
            np.array([m["derived"]["busbw_gbps"] for m in points]),
            AlphaBetaFit(derived["alpha_s"], derived["seconds_per_byte"], derived["byte_factor"], derived["residual"])))
    return sweeps


def plot(result: dict[str, Any], collective: str = "all_reduce") -> Any:
    """Two panels for ``collective``: measured time against size with each way's fitted alpha-beta line, and bus
    bandwidth against size (algorithm bandwidth on one rank, where bus bandwidth is 0). Returns the figure."""
    import matplotlib.pyplot as plt

    from course_lib.bench import plots

    sweeps = recorded_sweeps(result, collective)
    if not sweeps:
        raise ValueError(f"the result has no {collective} measurements")
    one_rank = sweeps[0].ranks == 1
    fig, (time_ax, bandwidth_ax) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for sweep, color in zip(sweeps, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False):
        line = np.geomspace(sweep.sizes.min(), sweep.sizes.max(), 200)
        time_ax.loglog(sweep.sizes, sweep.median_s, "o", color=color, markersize=4, label=f"{sweep.method}")
        bandwidth = f"{sweep.fit.bytes_per_s / 1e9:.3g} GB/s" if sweep.fit.seconds_per_byte > 0 else "no size term"
        time_ax.loglog(line, sweep.fit.time_s(line), "-", color=color, linewidth=1,
                       label=f"fit: alpha {sweep.fit.alpha_s * 1e6:.3g} us, B {bandwidth}")
        bandwidth_ax.semilogx(sweep.sizes, sweep.algbw_gbps if one_rank else sweep.busbw_gbps, "o-", color=color,
                              markersize=4, label=sweep.method)
    time_ax.set(xlabel="message size S (bytes)", ylabel="time per call (s)", title=f"{collective}: time")
    bandwidth_ax.set(xlabel="message size S (bytes)", ylabel="algbw (GB/s)" if one_rank else "busbw (GB/s)",
                     title=f"{collective}: " + ("algorithm bandwidth (busbw is 0 on one rank)" if one_rank
                                                else "bus bandwidth"))
    for ax in (time_ax, bandwidth_ax):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    plots.caption(fig, f"{provenance(result)}; {ranks_text(sweeps[0].ranks)} over {sweeps[0].backend}")
    return fig
