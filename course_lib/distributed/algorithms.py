"""Collectives written by hand over point-to-point calls: what runs inside NCCL and MPI, step by step.

Each function takes any ``Communicator`` (threads, MPI or NCCL) and uses only ``sendrecv``, ``send`` and
``recv``, so every byte it moves is in plain sight. Exchanges are ``sendrecv``: a rank sends to one peer
while it receives from another, so no step can deadlock the way two facing ``send`` calls do.

Reductions combine arrays with the communicator's array module, ``comm.xp``: NumPy on the CPU backends; on
NCCL, CuPy's element-wise kernels (``cupy.add``, ``cupy.maximum``), one small kernel for each block that
arrives. That is enough to teach and to check; NCCL itself fuses the reduction into the kernel that copies.

Which one when (the time formulas are in ``course_lib.scaling.collectives``):

* ``ring_all_reduce``: ``2 (p - 1)`` steps of ``S / p`` bytes; the fewest bytes a rank can send
  (``ring_all_reduce_s``), so it wins for large messages.
* ``recursive_doubling_all_reduce``: ``log2 p`` steps of all ``S`` bytes; the fewest steps, so it wins for
  small messages, where each step's fixed cost (alpha) outweighs its bytes.
* ``pairwise_all_to_all``: ``p - 1`` steps, each rank meeting each other once (``all_to_all_s``).
"""

from __future__ import annotations

from collections.abc import Sequence

from course_lib.distributed.communicator import (
    REDUCE_OPS,
    Array,
    Communicator,
    check_reduction,
    output_buffer,
    split_rows,
)


def segment_bounds(length: int, parts: int) -> list[int]:
    """Where ``parts`` nearly equal segments of ``length`` elements begin, and the end: segment ``i`` is
    ``bounds[i]:bounds[i + 1]``. Lengths differ by at most one; some are 0 when ``length < parts``."""
    return [index * length // parts for index in range(parts + 1)]


def ring_all_reduce(comm: Communicator, array: Array, op: str = "sum", out: Array | None = None,
                    chunk_elements: int | None = None) -> Array:
    """The element-wise ``op`` of ``array`` over all ranks, on every rank, by the ring algorithm.

    The ``p`` ranks form a ring: each sends to ``rank + 1`` and receives from ``rank - 1``. The array is cut
    into ``p`` segments (``segment_bounds``: any length works, any ``p``).

    1. **Reduce-scatter**, ``p - 1`` steps. At step ``s`` rank ``r`` sends segment ``r - s`` (mod ``p``), its
       running partial result, and adds the segment ``r - s - 1`` it receives into its own copy. After
       ``p - 1`` steps segment ``r + 1`` on rank ``r`` has passed through every rank: it is complete.
    2. **All-gather**, ``p - 1`` steps. Each rank passes complete segments on: at step ``s`` rank ``r`` sends
       segment ``r + 1 - s`` and overwrites segment ``r - s`` with the one it receives.

    Every rank sends ``2 (p - 1)`` messages of ``S / p`` bytes, ``2 (p - 1) / p * S`` in all, whatever ``p``,
    and no all-reduce does with less (Patarasuk and Yuan, 2009, prove it). Roughly: with the work spread
    evenly, a rank reduces ``S / p`` of the result, for which it must receive the other ranks' parts of that
    share, ``(p - 1) / p * S`` bytes, and then it must receive the ``(p - 1) / p * S`` it did not reduce. Every
    link carries a message at every step. Time: ``course_lib.scaling.collectives.ring_all_reduce_s``; NCCL's
    bus bandwidth is the bandwidth that formula sees.

    ``chunk_elements`` runs the ring on slices of at most ``chunk_elements * p`` elements in turn: the same
    bytes in more, smaller messages, with a scratch buffer of at most ``chunk_elements``. NCCL chunks its
    ring the same way so that a GPU forwards one chunk while the next arrives; with these synchronous calls
    it only bounds the memory.
    """
    check_reduction("ring_all_reduce", array, op)
    if chunk_elements is not None and (isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int)
                                       or chunk_elements < 1):
        raise ValueError(f"chunk_elements must be a whole number >= 1 (or None), got {chunk_elements!r}")
    out = output_buffer(comm.xp, out, array.shape, array.dtype, "ring_all_reduce")
    out[...] = array
    flat = out.reshape(-1)
    slice_length = max(1, flat.size if chunk_elements is None else chunk_elements * comm.size)
    scratch = comm.xp.empty(-(-min(slice_length, flat.size) // comm.size), array.dtype)  # one segment at most
    for start in range(0, flat.size, slice_length):
        _ring(comm, flat[start:start + slice_length], scratch, op)
    return out


def _ring(comm: Communicator, flat: Array, scratch: Array, op: str) -> None:
    """The ring's two phases over ``flat`` (one rank's copy, reduced in place)."""
    size, rank = comm.size, comm.rank
    right, left = (rank + 1) % size, (rank - 1) % size
    bounds = segment_bounds(flat.size, size)
    combine = getattr(comm.xp, REDUCE_OPS[op])

    def segment(index: int) -> Array:
        return flat[bounds[index % size]:bounds[index % size + 1]]

    for step in range(size - 1):  # reduce-scatter: add what arrives into my copy of that segment
        arriving = segment(rank - step - 1)
        received = comm.sendrecv(segment(rank - step), right, scratch[:arriving.size], left)
        combine(arriving, received, out=arriving)
    for step in range(size - 1):  # all-gather: pass complete segments on, overwrite with what arrives
        comm.sendrecv(segment(rank + 1 - step), right, segment(rank - step), left)


def recursive_doubling_all_reduce(comm: Communicator, array: Array, op: str = "sum",
                                  out: Array | None = None) -> Array:
    """The element-wise ``op`` of ``array`` over all ranks, on every rank, in about ``log2 p`` steps.

    With ``p`` a power of two: at step ``k`` rank ``r`` swaps its whole running result with rank
    ``r XOR 2**k`` and combines the two; after ``log2 p`` steps each rank has combined all ``p`` inputs. Each
    step sends all ``S`` bytes, ``S log2 p`` in all (the ring sends under ``2 S``), but in ``log2 p`` messages
    rather than ``2 (p - 1)``: for small messages, where the fixed cost of a message dominates, it is faster.

    Any other ``p`` folds the extra ranks in first. With ``q`` the largest power of two not above ``p`` and
    ``e = p - q``, the first ``2 e`` ranks pair up: each even one sends its array to the odd one after it,
    which combines, and sits out. The remaining ``q`` ranks, renumbered ``0 .. q - 1``, double; then each
    odd rank below ``2 e`` sends the result back to its even partner: two more steps of ``S`` bytes.

    ``a + b == b + a`` exactly in floating point, so both ranks of a pair get the same bits: every rank ends
    with an identical result, as with the ring.
    """
    check_reduction("recursive_doubling_all_reduce", array, op)
    out = output_buffer(comm.xp, out, array.shape, array.dtype, "recursive_doubling_all_reduce")
    out[...] = array
    size, rank = comm.size, comm.rank
    doubling = 1 << (size.bit_length() - 1)  # the largest power of two <= size
    extra = size - doubling
    combine = getattr(comm.xp, REDUCE_OPS[op])
    scratch = comm.xp.empty_like(out)

    folded_away = rank < 2 * extra and rank % 2 == 0
    if folded_away:  # hand my input over, wait for the answer
        comm.send(out, rank + 1)
        return comm.recv(out, rank + 1)
    if rank < 2 * extra:  # take my even partner's input
        combine(out, comm.recv(scratch, rank - 1), out=out)

    def real_rank(doubling_rank: int) -> int:
        return 2 * doubling_rank + 1 if doubling_rank < extra else doubling_rank + extra

    my_doubling_rank = rank // 2 if rank < 2 * extra else rank - extra
    distance = 1
    while distance < doubling:
        partner = real_rank(my_doubling_rank ^ distance)
        combine(out, comm.sendrecv(out, partner, scratch, partner), out=out)
        distance *= 2
    if rank < 2 * extra:  # give my even partner the answer
        comm.send(out, rank - 1)
    return out


def pairwise_all_to_all(comm: Communicator, array: Array, send_counts: Sequence[int]) -> list[Array]:
    """Send ``send_counts[d]`` consecutive rows of ``array`` to each rank ``d``; return what each rank sent
    here, one array per source rank in rank order (the same contract as ``Communicator.all_to_all``).

    ``p - 1`` steps: at step ``k`` rank ``r`` sends to ``r + k`` and receives from ``r - k`` (mod ``p``), so
    each pair of ranks meets exactly once and every rank sends and receives at every step. Each block of rows
    is preceded by a one-number message with its row count, since the receiver must size its buffer before
    the rows arrive. With even counts each rank sends ``(p - 1) / p`` of its bytes:
    ``course_lib.scaling.collectives.all_to_all_s``.
    """
    size, rank, xp = comm.size, comm.rank, comm.xp
    blocks = split_rows(array, send_counts, size)
    received: list[Array] = [None] * size
    received[rank] = blocks[rank].copy()
    arriving_rows = xp.empty(1, dtype="int64")
    for step in range(1, size):
        dest, source = (rank + step) % size, (rank - step) % size
        comm.sendrecv(xp.asarray([len(blocks[dest])], dtype="int64"), dest, arriving_rows, source)
        rows = xp.empty((int(arriving_rows[0]), *array.shape[1:]), array.dtype)
        received[source] = comm.sendrecv(blocks[dest], dest, rows, source)
    return received
