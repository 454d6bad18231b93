"""What GPUs pay to talk: the alpha-beta model of a collective.

A message of ``S`` bytes over a link of bandwidth ``B`` takes ``alpha + S / B``: ``alpha`` is the fixed cost
(launching the collective, the handshakes, the hops), ``S / B`` the time on the wire. A collective is a
pattern of such messages, and its bandwidth term follows from how many bytes each GPU must send:

* **ring all-reduce** over ``p`` GPUs: each GPU holds ``S`` bytes and ends with the sum of all ``p`` copies.
  The ring does it in a reduce-scatter then an all-gather, ``p - 1`` steps each, sending ``S / p`` bytes a
  step: ``2 (p - 1) / p * S`` bytes leave every GPU, all GPUs sending at once, so

      time = alpha + 2 (p - 1) / p * S / B

  (NCCL's "bus bandwidth" is exactly ``2 (p - 1) / p * S / time``: the ``B`` this formula sees.)
* **all-to-all** (expert parallelism's dispatch and combine): each GPU sends a ``1 / p`` share of its ``S``
  bytes to each other GPU, ``(p - 1) / p * S`` in all: time = alpha + (p - 1) / p * S / B.
* **all-gather** (tensor parallelism's logits: each GPU holds ``1 / p`` of the vocabulary's scores): each GPU
  ends with the gathered ``S`` bytes, of which it lacks ``(p - 1) / p``: time = alpha + (p - 1) / p * S / B.
* **send** (pipeline parallelism, one stage to the next): time = alpha + S / B.

``B`` is one direction of one GPU's link: half of NVLink's datasheet figure (which sums both directions),
or the NIC's line rate when the group spans more than one NVLink domain.

``alpha`` is a parameter, and it is the fixed cost of the *whole collective*, not of each of its messages: a
ring all-reduce over ``p`` GPUs sends ``2 (p - 1)`` messages a GPU, but what NCCL reports for a message too
small for bandwidth to matter is the time of the entire call, every step and launch included, and that
measured time is what ``alpha`` holds. Its defaults are such small-message all-reduce times from public NCCL
threads (below, with their sources). Mind where they were measured: the NVLink one on **2 GPUs** of an HGX
H100 node (the thread reports it growing with the number of GPUs, so for a TP8 all-reduce it is optimistic),
the network one on 2 nodes of 8 GPUs. Pass your own measured figure where you have one;
``alpha_sources`` says, for whatever alphas a prediction used, where each came from.

**Which algorithm: alpha a step.** To choose between all-reduce algorithms, charge alpha for every message a
GPU waits for in a row (``step_alpha_s``: one hop, its launch and handshake) instead of once a call. An
algorithm is then two numbers (``all_reduce_schedule``): how many messages follow one another on its longest
path, and how many bytes they carry in all per byte of ``S``.

* **ring**: ``2 (p - 1)`` messages of ``S / p``: time = 2 (p - 1) alpha + 2 (p - 1) / p * S / B.
* **recursive doubling**: ``log2 p`` rounds in which partners swap everything they have, ``log2 p`` messages
  of all ``S`` bytes: time = log2 p * (alpha + S / B). Like a tree, it needs only logarithmically many steps.
  When ``p`` is not a power of two, ``course_lib.distributed.algorithms.recursive_doubling_all_reduce`` folds
  the extra ranks in before and out after: ``log2`` of the largest power of two below ``p``, plus two messages.

The ring sends the fewest bytes, recursive doubling the fewest messages: below ``all_reduce_crossover_bytes``
recursive doubling is faster, above it the ring. NCCL makes the same choice, size by size, between its ring and
its own tree (a pipelined double binary tree, which sends about ``2 S`` rather than ``S log2 p``).

What was measured is read the other way: ``course_lib.bench.collective_bandwidth`` fits ``alpha`` and ``B`` to
measured times (``fit_alpha_beta``) and turns times into algorithm and bus bandwidth as nccl-tests do.
"""

from __future__ import annotations

import math
from typing import Any

from course_lib.scaling.hardware import Source

# Defaults for alpha: the time of an all-reduce too small for bandwidth to matter.
NVLINK_ALPHA_S = 6e-6
NVLINK_ALPHA_SOURCE = Source(
    "NVIDIA/nccl issue #1259: all_reduce_perf (NCCL 2.20.5, CUDA graphs, NVLSTree) on an HGX 8x H100 node, "
    "2 GPUs: 'the latency is approximately 6us'", "https://github.com/NVIDIA/nccl/issues/1259", "2026-12-07",
    "the issue reports it growing with the number of GPUs")
NETWORK_ALPHA_S = 46.30e-6
NETWORK_ALPHA_SOURCE = Source(
    "NVIDIA/nccl issue #1244: all_reduce_perf (NCCL 2.21.5, NVLSTree) on 2 nodes of 8 H20 GPUs with ConnectX-7 "
    "InfiniBand NDR, 64-byte all-reduce: 46.30 us", "https://github.com/NVIDIA/nccl/issues/1244", "2026-12-07",
    "16 GPUs, 2 nodes")
DEFAULT_ALPHAS = {"nvlink_alpha_s": (NVLINK_ALPHA_S, NVLINK_ALPHA_SOURCE),
                  "network_alpha_s": (NETWORK_ALPHA_S, NETWORK_ALPHA_SOURCE)}


def alpha_sources(nvlink_alpha_s: float = NVLINK_ALPHA_S,
                  network_alpha_s: float = NETWORK_ALPHA_S) -> dict[str, dict[str, Any]]:
    """Both alphas, JSON-ready: seconds, and the public source of a default or 'given by the caller'."""
    out = {}
    for name, value in (("nvlink_alpha_s", nvlink_alpha_s), ("network_alpha_s", network_alpha_s)):
        default, source = DEFAULT_ALPHAS[name]
        out[name] = {"value": value, "unit": "s",
                     "source": vars(source) if value == default else "given by the caller"}
    return out


def alpha_lines(nvlink_alpha_s: float = NVLINK_ALPHA_S, network_alpha_s: float = NETWORK_ALPHA_S) -> list[str]:
    """One line per alpha for a listing: microseconds and where the figure comes from."""
    return [f"{name} {entry['value'] * 1e6:.2f} us (a whole small all-reduce): "
            + (Source(**entry["source"]).line() if isinstance(entry["source"], dict) else entry["source"])
            for name, entry in alpha_sources(nvlink_alpha_s, network_alpha_s).items()]


def _check(nbytes: float, gpus: int, bytes_per_s: float, alpha_s: float) -> None:
    if nbytes < 0:
        raise ValueError(f"a message has >= 0 bytes, got {nbytes}")
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"a collective needs a positive whole number of GPUs, got {gpus!r}")
    if not bytes_per_s > 0:
        raise ValueError(f"link bandwidth must be > 0 bytes/s, got {bytes_per_s!r}")
    if alpha_s < 0:
        raise ValueError(f"alpha must be >= 0 s, got {alpha_s}")


def ring_all_reduce_s(nbytes: float, gpus: int, bytes_per_s: float, alpha_s: float) -> float:
    """Seconds to all-reduce ``nbytes`` held by each of ``gpus`` GPUs: alpha + 2(p-1)/p * S / B (0 for one GPU)."""
    _check(nbytes, gpus, bytes_per_s, alpha_s)
    if gpus == 1:
        return 0.0
    return alpha_s + 2 * (gpus - 1) / gpus * nbytes / bytes_per_s


def all_to_all_s(nbytes: float, gpus: int, bytes_per_s: float, alpha_s: float) -> float:
    """Seconds for each of ``gpus`` GPUs to scatter ``nbytes`` evenly to all: alpha + (p-1)/p * S / B."""
    _check(nbytes, gpus, bytes_per_s, alpha_s)
    if gpus == 1:
        return 0.0
    return alpha_s + (gpus - 1) / gpus * nbytes / bytes_per_s


def all_gather_s(gathered_bytes: float, gpus: int, bytes_per_s: float, alpha_s: float) -> float:
    """Seconds for each of ``gpus`` GPUs to end with all ``gathered_bytes``, each having held an equal share:
    alpha + (p-1)/p * S / B (0 for one GPU). ``S`` is the gathered result, as nccl-tests count an all-gather.
    Each GPU sends its share to the p - 1 others and receives theirs: the traffic of an all-to-all of ``S``."""
    return all_to_all_s(gathered_bytes, gpus, bytes_per_s, alpha_s)


def send_s(nbytes: float, bytes_per_s: float, alpha_s: float) -> float:
    """Seconds to send ``nbytes`` to one other GPU: alpha + S / B."""
    _check(nbytes, 2, bytes_per_s, alpha_s)
    return alpha_s + nbytes / bytes_per_s


ALL_REDUCE_ALGORITHMS = ("ring", "recursive_doubling")


def all_reduce_schedule(algorithm: str, gpus: int) -> tuple[int, float]:
    """(messages one after another, the bytes they carry per byte of ``S``) of an all-reduce over ``gpus`` GPUs,
    on the busiest rank: the ring's ``2 (p - 1)`` sendrecvs of ``S / p``; recursive doubling's rounds of ``S``."""
    _check(0, gpus, 1, 0)
    if algorithm == "ring":
        return 2 * (gpus - 1), 2 * (gpus - 1) / gpus
    if algorithm == "recursive_doubling":
        doubling = 1 << (gpus.bit_length() - 1)  # the largest power of two <= gpus
        rounds = doubling.bit_length() - 1 + (2 if gpus != doubling else 0)  # log2, plus the fold in and out
        return rounds, float(rounds)
    raise ValueError(f"algorithm must be one of {ALL_REDUCE_ALGORITHMS}, got {algorithm!r}")


def stepwise_all_reduce_s(algorithm: str, nbytes: float, gpus: int, bytes_per_s: float, step_alpha_s: float) -> float:
    """Seconds to all-reduce ``nbytes`` by ``algorithm``, paying ``step_alpha_s`` for every message in a row:
    messages * alpha + bytes factor * S / B (``all_reduce_schedule``; 0 for one GPU)."""
    _check(nbytes, gpus, bytes_per_s, step_alpha_s)
    messages, byte_factor = all_reduce_schedule(algorithm, gpus)
    return messages * step_alpha_s + byte_factor * nbytes / bytes_per_s


def all_reduce_crossover_bytes(gpus: int, bytes_per_s: float, step_alpha_s: float) -> float:
    """The message size at which the ring and recursive doubling take the same time: below it recursive doubling
    is faster, above it the ring. Equating the two lines of ``stepwise_all_reduce_s``:

        S* = alpha * B * (ring messages - doubling messages) / (doubling bytes factor - ring bytes factor)

    ``inf`` on 2 GPUs: both send ``S`` bytes there, and recursive doubling in fewer messages, at every size.
    """
    _check(0, gpus, bytes_per_s, step_alpha_s)
    if gpus < 2:
        raise ValueError("one GPU sends nothing: both algorithms take 0 s, there is no crossover")
    ring_messages, ring_factor = all_reduce_schedule("ring", gpus)
    tree_messages, tree_factor = all_reduce_schedule("recursive_doubling", gpus)
    if tree_factor <= ring_factor:
        return math.inf
    return step_alpha_s * bytes_per_s * (ring_messages - tree_messages) / (tree_factor - ring_factor)
