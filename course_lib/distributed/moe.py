"""A mixture-of-experts (MoE) layer with its experts spread over ranks: expert parallelism, whose dispatch and
combine are two all-to-alls.

An MoE layer replaces a transformer block's dense MLP by ``num_experts`` MLPs, the *experts* (SwiGLU here, as
in Mixtral), and a *router* that picks ``top_k`` of them for each token; the layer's output for a token is the
sum of its experts' outputs, weighted by the router. A token costs the compute of ``top_k`` experts while the
layer holds the weights of all ``E`` of them.

**Expert parallelism.** With ``p`` ranks, rank ``r`` holds whole experts, ``E / p`` of them
(``expert_range``), and a copy of the router; it also holds tokens of its own (a data-parallel share of the
batch). A token's experts mostly live on other ranks, so its hidden vector travels to them and their outputs
travel back. ``moe_forward`` runs six steps; steps 2, 3 and 5 talk:

1. **Route** (no communication): logits ``x @ router``, the ``top_k`` largest for each token, their softmax.
2. **Count**: an ``all_gather`` of each rank's number of rows for each expert (``E`` int64s a rank). Then every
   rank knows the whole ``[p, E]`` table: how many rows it sends to each rank, how many it receives from each
   rank, and for which of its experts. A receiver must size its buffer before the rows arrive (which is why
   ``Communicator.all_to_all`` exchanges counts first) and must know which expert each row is for. This
   table is the one thing copied to the host: slicing rows needs its numbers in Python.
3. **Dispatch**: an ``all_to_all`` of token rows, one row of ``hidden`` values for each (token, expert) pair.
   Sorted by expert they are sorted by owner too, since each rank owns a contiguous range of experts: the
   rows for rank 0 come first, then those for rank 1, as ``all_to_all`` wants them.
4. **Experts** (no communication): each of this rank's experts runs once on all the rows that arrived for it,
   from every rank: one matrix product over many rows rather than one per source (engines go further and
   run all their experts in a single *grouped GEMM* launch).
5. **Combine**: an ``all_to_all`` that returns each output row to the rank its token came from, with the
   dispatch's counts transposed. Rows come back in the order they were sent, so the sender knows whose is which.
6. **Weight and sum** (no communication): each token's ``top_k`` expert outputs times its router weights.

No token is dropped: there is no *capacity factor* capping the rows an expert takes (training systems use
one to bound their buffers; inference engines such as vLLM do not). A token whose chosen experts share a rank
travels once for each of them; a dispatcher can send it once per rank and sum its outputs there before the
combine, which saves bytes when experts cluster. Here each (token, expert) pair is one row, so that every
step above is one array operation.

Arrays are ``comm.xp`` arrays throughout (NumPy on the threads and MPI backends, CuPy on NCCL): the weights
too (``MoeWeights.to``). ``moe_reference`` is the same layer, dense and in float64 on one rank: every token
through its experts with no communication, for the tests to trust.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy

from course_lib.distributed.communicator import Array, Communicator

FLOAT_DTYPES = ("float32", "float64")


def expert_range(num_experts: int, rank: int, size: int) -> range:
    """The experts rank ``rank`` of ``size`` holds: ``E / p`` consecutive ones, rank 0 the first."""
    if num_experts % size:
        raise ValueError(f"{num_experts} experts do not split evenly over {size} ranks: expert parallelism gives "
                         f"each rank num_experts / ranks whole experts, so the rank count must divide {num_experts}")
    share = num_experts // size
    return range(rank * share, (rank + 1) * share)


@dataclass(frozen=True)
class MoeWeights:
    """An MoE layer's weights, or one rank's share of them (``shard``).

    ``router`` [hidden, num_experts] is whole on every rank: each rank routes its own tokens. The experts
    ``first_expert`` to ``first_expert + held - 1`` are stacked along axis 0: ``gate`` and ``up``
    [held, hidden, inner], ``down`` [held, inner, hidden]; expert ``e`` computes
    ``(silu(x @ gate) * (x @ up)) @ down``.
    """

    router: Array
    gate: Array
    up: Array
    down: Array
    first_expert: int = 0

    def __post_init__(self) -> None:
        shapes = tuple(tuple(array.shape) for array in (self.router, self.gate, self.up, self.down))
        if self.router.ndim != 2 or self.gate.ndim != 3 or self.gate.shape[0] < 1:
            raise ValueError(f"MoeWeights needs router [hidden, experts] and gate [held >= 1, hidden, inner], "
                             f"got router {shapes[0]} and gate {shapes[1]}")
        (hidden, num_experts), (held, _, inner) = shapes[:2]
        if shapes[1:] != ((held, hidden, inner), (held, hidden, inner), (held, inner, hidden)):
            raise ValueError(f"MoeWeights needs gate and up [held, hidden, inner] and down [held, inner, hidden] "
                             f"with the router's hidden = {hidden}; got gate, up, down {shapes[1:]}")
        if not 0 <= self.first_expert <= num_experts - held:
            raise ValueError(f"experts {self.first_expert} to {self.first_expert + held - 1} are not among the "
                             f"router's {num_experts}")
        dtypes = {str(array.dtype) for array in (self.router, self.gate, self.up, self.down)}
        if len(dtypes) != 1 or self.dtype not in FLOAT_DTYPES:
            raise TypeError(f"MoeWeights needs one dtype, {' or '.join(FLOAT_DTYPES)}, for all four arrays; "
                            f"got {sorted(dtypes)}")

    @property
    def num_experts(self) -> int:
        return int(self.router.shape[1])

    @property
    def held(self) -> range:
        """The experts whose weights these are."""
        return range(self.first_expert, self.first_expert + int(self.gate.shape[0]))

    @property
    def dtype(self) -> str:
        return str(self.router.dtype)

    def shard(self, rank: int, size: int) -> MoeWeights:
        """Rank ``rank``'s share of a whole layer's weights: the router and its ``expert_range`` (views)."""
        if len(self.held) != self.num_experts:
            raise ValueError(f"shard splits a whole layer, but these weights hold only experts {_span(self.held)}")
        mine = expert_range(self.num_experts, rank, size)
        rows = slice(mine.start, mine.stop)
        return MoeWeights(self.router, self.gate[rows], self.up[rows], self.down[rows], mine.start)

    def to(self, xp: ModuleType) -> MoeWeights:
        """The same weights as ``xp`` arrays (``cupy``: copied to the current GPU)."""
        return MoeWeights(*(xp.asarray(array) for array in (self.router, self.gate, self.up, self.down)),
                          self.first_expert)


def random_moe_weights(rng: numpy.random.Generator, num_experts: int, hidden: int, inner: int,
                       dtype: str = "float64") -> MoeWeights:
    """A whole layer of random NumPy weights. The router's entries are standard normal, so that routing is
    decisive; the experts' are scaled by ``1 / sqrt(fan-in)``, so that outputs stay near unit size."""

    def normal(shape: tuple[int, ...], scale: float) -> numpy.ndarray:
        return (rng.standard_normal(shape) * scale).astype(dtype)

    return MoeWeights(router=normal((hidden, num_experts), 1.0),
                      gate=normal((num_experts, hidden, inner), hidden ** -0.5),
                      up=normal((num_experts, hidden, inner), hidden ** -0.5),
                      down=normal((num_experts, inner, hidden), inner ** -0.5))


@dataclass(frozen=True)
class MoeTraffic:
    """What one rank sent in one MoE layer's dispatch and combine: token rows of ``row_bytes`` each.

    ``dispatch_rows[d]`` rows went to rank ``d`` for its experts, ``combine_rows[s]`` expert outputs went back to
    rank ``s``; the share a rank sends itself is counted there but never leaves it. Not counted: the count table
    of step 2, ``E`` int64s from each rank to each rank.

    ``course_lib.scaling.collectives.all_to_all_s(S, p, B, alpha)`` models one all-to-all in which every rank
    scatters ``S`` bytes evenly, so that ``(p - 1) / p * S`` leave it. For the dispatch ``S`` is every (token,
    expert) row, ``sum(dispatch_rows) * row_bytes``; what leaves depends on where the router sent the tokens::

        out, traffic = moe_forward(comm, x, whole.shard(comm.rank, comm.size))
        scattered = sum(traffic.dispatch_rows) * traffic.row_bytes        # S
        traffic.dispatch_bytes, (comm.size - 1) / comm.size * scattered    # measured, and the even split
        all_to_all_s(scattered, comm.size, bytes_per_s, alpha_s)           # the model's seconds: x2 a layer
    """

    rank: int
    dispatch_rows: tuple[int, ...]
    combine_rows: tuple[int, ...]
    row_bytes: int

    @property
    def dispatch_bytes(self) -> int:
        """Bytes that left this rank in the dispatch."""
        return self._leaving(self.dispatch_rows)

    @property
    def combine_bytes(self) -> int:
        """Bytes that left this rank in the combine."""
        return self._leaving(self.combine_rows)

    def _leaving(self, rows: tuple[int, ...]) -> int:
        return (sum(rows) - rows[self.rank]) * self.row_bytes


def route(x: Array, router: Array, top_k: int, xp: ModuleType = numpy) -> tuple[Array, Array]:
    """Each token's ``top_k`` experts [tokens, top_k] (int64, best first) and their weights [tokens, top_k].

    The weights are the softmax of the chosen logits (Mixtral's convention; the same numbers as a softmax over
    all experts renormalised over the chosen ones). They sum to 1, so a token's output is a weighted average of
    its experts' outputs whatever ``E`` and ``top_k`` are, and ``top_k = 1`` passes its one expert's output
    through unscaled. (Some models, e.g. Qwen2-MoE with ``norm_topk_prob=False``, keep the softmax over all
    ``E`` unrenormalised: weights that sum to less than 1.)

    Ties go to the lower expert id: a stable sort of the negated logits keeps equal ones in id order, so the
    choice never depends on the sort's whims, and every rank and the reference choose alike.
    """
    _check_top_k(top_k, int(router.shape[1]))
    logits = x @ router
    experts = xp.argsort(-logits, axis=1, kind="stable")[:, :top_k]
    chosen = xp.take_along_axis(logits, experts, axis=1)
    scaled = xp.exp(chosen - chosen[:, :1])  # the best logit first: subtract it so that exp cannot overflow
    return experts.astype("int64"), scaled / scaled.sum(axis=1, keepdims=True)


def _check_top_k(top_k: int, num_experts: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int | numpy.integer) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be a whole number from 1 to the number of experts ({num_experts}), "
                         f"got {top_k!r}")


def expert_mlp(x: Array, gate: Array, up: Array, down: Array, xp: ModuleType = numpy) -> Array:
    """One SwiGLU expert on rows ``x`` [rows, hidden]: ``(silu(x @ gate) * (x @ up)) @ down``."""
    gated = x @ gate
    return (gated / (1 + xp.exp(-gated)) * (x @ up)) @ down


def moe_forward(comm: Communicator, x: Array, weights: MoeWeights, top_k: int = 2) -> tuple[Array, MoeTraffic]:
    """The MoE layer on this rank's tokens ``x`` [tokens, hidden], with ``weights`` this rank's share
    (``whole.shard(comm.rank, comm.size)``); return the layer's output for them and what this rank sent.

    Every rank calls it together (it holds three collectives), each with its own tokens; any count works,
    0 included. The steps are those of the module's docstring.
    """
    xp, rank, size = comm.xp, comm.rank, comm.size
    _check_layer(comm, x, weights)
    mine = weights.held
    tokens, hidden = x.shape

    # 1. Route. Assignment a = token * top_k + slot: the pairs in order, token by token.
    experts, probabilities = route(x, weights.router, top_k, xp)
    order = xp.argsort(experts.reshape(-1), kind="stable")  # assignments by expert, hence by owner
    starts = xp.searchsorted(experts.reshape(-1)[order], xp.arange(weights.num_experts + 1))

    # 2. Count: counts[s][e] = rows rank s sends expert e, the same table on every rank.
    counts = comm.all_gather(xp.diff(starts)).reshape(size, weights.num_experts).tolist()
    send_rows = [sum(counts[rank][e] for e in expert_range(weights.num_experts, dest, size)) for dest in range(size)]
    recv_rows = [sum(counts[source][e] for e in mine) for source in range(size)]

    # 3. Dispatch: one row per assignment, sorted by expert; what arrives is sorted by source, then by expert.
    arrived = xp.concatenate(comm.all_to_all(x[order // top_k], send_rows))

    # 4. Experts: each runs once, on its rows from every source (none: no token chose it).
    outputs = xp.empty_like(arrived)
    for index, spans in enumerate(_arrivals_by_expert(counts, mine)):
        if spans:
            result = expert_mlp(xp.concatenate([arrived[span] for span in spans]), weights.gate[index],
                                weights.up[index], weights.down[index], xp)
            offset = 0
            for span in spans:
                outputs[span] = result[offset:offset + span.stop - span.start]
                offset += span.stop - span.start

    # 5. Combine: each output row goes back to its token's rank, which gets its rows in the order it sent them.
    returned = xp.concatenate(comm.all_to_all(outputs, recv_rows))

    # 6. Weight and sum: undo the sort, then each token's top_k outputs times its router weights.
    by_assignment = xp.empty_like(returned)
    by_assignment[order] = returned
    out = (probabilities[:, :, None] * by_assignment.reshape(tokens, top_k, hidden)).sum(axis=1)
    return out, MoeTraffic(rank, tuple(send_rows), tuple(recv_rows), hidden * x.itemsize)


def _arrivals_by_expert(counts: list[list[int]], mine: range) -> list[list[slice]]:
    """For each expert of ``mine``, where its rows sit among the rows that arrived: one slice per source rank
    that sent it any. The arrivals are source 0's rows for each of ``mine`` in expert order, then source 1's..."""
    spans: list[list[slice]] = [[] for _ in mine]
    row = 0
    for source_counts in counts:
        for index, expert in enumerate(mine):
            if source_counts[expert]:
                spans[index].append(slice(row, row + source_counts[expert]))
            row += source_counts[expert]
    return spans


def _check_layer(comm: Communicator, x: Array, weights: MoeWeights) -> None:
    """Raise, with what was expected, unless ``x`` and ``weights`` fit each other and this rank."""
    xp = comm.xp
    if not all(isinstance(array, xp.ndarray) for array in (x, weights.router, weights.gate, weights.up, weights.down)):
        raise TypeError(f"moe_forward on the {comm.backend} backend takes {xp.__name__} arrays (tokens and "
                        f"weights: weights.to(comm.xp)), got {type(x).__module__} tokens and "
                        f"{type(weights.router).__module__} weights")
    mine = expert_range(weights.num_experts, comm.rank, comm.size)
    if weights.held != mine:
        raise ValueError(f"rank {comm.rank} of {comm.size} holds experts {_span(mine)}, but its weights are "
                         f"experts {_span(weights.held)}: pass whole.shard(comm.rank, comm.size)")
    _check_tokens(x, weights)


def _check_tokens(x: Array, weights: MoeWeights) -> None:
    hidden = int(weights.router.shape[0])
    if x.ndim != 2 or x.shape[1] != hidden:
        raise ValueError(f"tokens must be [tokens, hidden = {hidden}], got {tuple(x.shape)}")
    if str(x.dtype) != weights.dtype:
        raise TypeError(f"tokens are {x.dtype} but the weights are {weights.dtype}: give both one dtype")


def _span(experts: range) -> str:
    return f"{experts.start} to {experts.stop - 1}"


def moe_reference(x: numpy.ndarray, weights: MoeWeights, top_k: int = 2) -> numpy.ndarray:
    """The whole layer on one rank in float64 NumPy, densely: every expert on every token, then each token
    takes its ``top_k`` experts' outputs, weighted by the router. ``weights``: a whole layer, NumPy arrays."""
    if len(weights.held) != weights.num_experts:
        raise ValueError(f"moe_reference needs a whole layer, but these weights hold only experts "
                         f"{_span(weights.held)}")
    _check_tokens(x, weights)
    whole = MoeWeights(*(numpy.asarray(array, numpy.float64)
                         for array in (weights.router, weights.gate, weights.up, weights.down)))
    x = numpy.asarray(x, numpy.float64)
    experts, probabilities = route(x, whole.router, top_k)
    every = numpy.stack([expert_mlp(x, whole.gate[e], whole.up[e], whole.down[e]) for e in range(whole.num_experts)])
    tokens = numpy.arange(len(x))
    return sum(probabilities[:, slot, None] * every[experts[:, slot], tokens] for slot in range(top_k))
