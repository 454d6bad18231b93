"""Checkers for chapter 06: capture a step on static buffers, pad a batch to a captured size, re-point a graph's nodes.

They run on the chapter's model of stream capture (``course_lib.labs.graph_capture``), which applies CUDA's rules on
NumPy: a capture refuses what would make the host wait (``cudaErrorStreamCaptureUnsupported``), and a replay refuses
a buffer that was reallocated or freed since the capture (``StaleAddressError``, a check CUDA itself does not make).
Each check also reads the model's timeline, so a step that computes the right numbers without replaying a graph, or
on a bigger graph than it needs, is told so. Every run draws new weights, tokens, batch sizes and contexts; the
reference is the float64 step for the first exercise and the same step launched kernel by kernel (``run_eager``) on
a twin model for the others. Every answer is checked again at the end of the run: an answer that is a view of a
static buffer changes when a later replay overwrites it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from course_lib.check.compare import assert_close
from course_lib.check.exercise import checks_an_exercise
from course_lib.check.failure import CheckFailed
from course_lib.check.learner import call_learner
from course_lib.check.run import CheckRun
from course_lib.kernels.kv_blocks import blocks_for
from course_lib.labs.decode_step_model import EPS, DecodeGraphsModel, StepShape
from course_lib.labs.graph_capture import (
    CAPTURE_INVALIDATED,
    Buffer,
    CudaError,
    Device,
    GraphExec,
    KernelNode,
    StaleAddressError,
    Stream,
)

STATIC_HINT = ("a replay reads the addresses it was captured with: allocate every buffer once, before the capture, "
               "and copy each batch's values INTO it (fill the pinned buffer the graph copies from)")
REREAD_HINT = ("an answer you returned earlier changed later: it is a view of a static buffer, which the next replay "
               "overwrites. Return a copy (stream.read(buffer) copies)")


def _explain_capture_error(error: BaseException) -> str | None:
    """Hints for the errors the capture model raises, by what the message says broke the rules."""
    text = str(error)
    if isinstance(error, StaleAddressError):
        return STATIC_HINT
    if not isinstance(error, CudaError):
        return None
    if error.code == CAPTURE_INVALIDATED:
        return "an earlier call inside the capture broke it; the error of that call says which"
    for words, hint in (
        ("reading", "stream.read waits for the GPU, which a capture cannot record: read the logits after "
                    "graph.launch(stream), outside the `with stream.capture()` block"),
        ("Synchronize", "a capture records work, it does not run it: there is nothing to wait for inside it. "
                        "Synchronise (or read) after graph.launch, outside the capture"),
        ("cudaMalloc", "allocating may synchronise the device, so a capture refuses it: allocate every buffer "
                       "before the capture, once"),
        ("cudaHostAlloc", "allocating may synchronise the device, so a capture refuses it: allocate every buffer "
                          "before the capture, once"),
        ("pageable", "a copy from pageable host memory makes the host wait: allocate the staging buffer pinned, "
                     "device.host_alloc(name, shape, dtype) (pinned=True is the default)"),
    ):
        if words in text:
            return hint
    return None


def _host_launches(device: Device) -> list[str]:
    """The names of the host's launches on the model's timeline, in order ('launch graph', 'launch embedding', ...)."""
    return [record["name"] for record in device.timeline if record["lane"] == "host"]


# --- graphed_decode: capture once on static buffers, replay per batch ----------------------------------------------

GRAPHED_SIGNATURE = "graphed_decode(device, stream, weights, token_batches)"
GRAPHED_CASES = 3
STEP_KERNELS = ("launch embedding", "launch normed_matvec lm_head")


def decode_logits_reference(embedding: np.ndarray, lm_head: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
    """The step in float64: each token's embedding row, RMS-normalised, times the LM head."""
    x = embedding.astype(np.float64)[token_ids]
    return x / np.sqrt((x * x).mean(axis=1, keepdims=True) + EPS) @ lm_head.astype(np.float64)


def _graphed_case(rng: np.random.Generator) -> tuple[Device, Stream, dict[str, Buffer], list[np.ndarray]]:
    """A fresh device with random weights, and 3 to 5 batches of the same number of random tokens."""
    device = Device()
    vocab, hidden = int(rng.integers(12, 40)), int(rng.integers(4, 12))
    weights = {"embedding": device.malloc("w.embedding", (vocab, hidden)),
               "lm_head": device.malloc("w.lm_head", (hidden, vocab))}
    for buffer in weights.values():
        buffer.array[...] = rng.standard_normal(buffer.array.shape) / np.sqrt(hidden)
    rows = int(rng.integers(2, 6))
    batches = [rng.integers(0, vocab, size=rows).astype(np.int32) for _ in range(int(rng.integers(3, 6)))]
    return device, device.stream(), weights, batches


def _require_replays(device: Device, batches: int) -> None:
    """One graph launch per batch, and no kernel of the step launched on its own once the first replay ran."""
    __tracebackhide__ = True
    host = _host_launches(device)
    replays = host.count("launch graph")
    if replays != batches:
        raise CheckFailed(f"the right logits, but {replays} graph launches for {batches} batches: capture the step "
                          "once, then run each batch by graph.launch(stream)")
    first = host.index("launch graph")
    eager = [name for name in host[first:] if name in STEP_KERNELS]
    if eager:
        raise CheckFailed(f"{eager[0]!r} ran eagerly after the graph was launched: launch the step's kernels inside "
                          "the capture, so that the replay runs them")


def _list_of_logits(out: Any, batches: int) -> list[Any]:
    __tracebackhide__ = True
    if out is None:
        raise CheckFailed("graphed_decode returned None: did you forget to `return` the list of logits?")
    if not isinstance(out, list | tuple) or len(out) != batches:
        raise CheckFailed(f"graphed_decode returned {out!r:.60}: return a list with one [rows, vocab] array of "
                          f"logits per batch, {batches} of them")
    return list(out)


@checks_an_exercise
def check_graphed_decode(graphed_decode: Callable[..., Any]) -> None:
    """Check ``graphed_decode(device, stream, weights, token_batches)``: capture the embedding and LM-head step once,
    replay it for each batch, and return each batch's logits, equal to the float64 step within float32 rounding."""
    __tracebackhide__ = True
    with CheckRun("graphed_decode") as run:
        for _ in range(GRAPHED_CASES):
            device, stream, weights, batches = _graphed_case(run.rng)
            vocab, hidden = weights["embedding"].array.shape
            run.case = f"{len(batches)} batches of {len(batches[0])} tokens, vocab {vocab}, hidden {hidden}"
            out = call_learner(graphed_decode, device, stream, weights, [batch.copy() for batch in batches],
                               name="graphed_decode", expected_signature=GRAPHED_SIGNATURE,
                               explain_error=_explain_capture_error)
            logits = _list_of_logits(out, len(batches))
            expected = [decode_logits_reference(weights["embedding"].array, weights["lm_head"].array, batch)
                        for batch in batches]
            for index, (got, want) in enumerate(zip(logits, expected, strict=True)):
                stale = index < len(batches) - 1 and np.allclose(np.asarray(got, np.float64), expected[-1])
                try:
                    assert_close(got, want, dtype=np.float32, what=f"the logits of batch {index}")
                except CheckFailed as failure:
                    hint = REREAD_HINT if stale else (
                        "these are the logits of the first batch: the replay never saw the new tokens. "
                        + STATIC_HINT if index and np.allclose(np.asarray(got, np.float64), expected[0]) else None)
                    raise CheckFailed(f"{failure}\nHint: {hint}" if hint else str(failure)) from None
            _require_replays(device, len(batches))
        run.passed(GRAPHED_CASES, detail="3 to 5 batches each, one capture")


# --- decode_padded: the smallest captured size that holds the batch ------------------------------------------------

PADDED_SIGNATURE = "decode_padded(model, token_ids, context_lens, block_tables)"
PADDED_CASES = 6
PAD_RULE = ("pad to the smallest captured size that holds the batch, size = min(s for s in model.steps if s >= rows), "
            "fill that step, launch its graph, and return the first rows rows of its logits")


class _RecordedGraph(GraphExec):
    """A captured step's graph that notes its batch size in ``launched`` each time it is launched."""

    def __init__(self, graph: GraphExec, size: int, launched: list[int]) -> None:
        super().__init__(graph.nodes)
        self.size, self.launched = size, launched

    def launch(self, stream: Stream) -> None:
        self.launched.append(self.size)
        super().launch(stream)


class _ExerciseModel(DecodeGraphsModel):
    """The chapter's model, its own ``run`` and ``run_eager`` closed: the exercise writes what ``run`` does."""

    def run(self, *args: Any) -> np.ndarray:
        raise CheckFailed("model.run is the chapter's own answer: pick the size, fill the step and launch its graph "
                          "yourself")

    run_eager = run


def padded_models(rng: np.random.Generator) -> tuple[_ExerciseModel, DecodeGraphsModel, list[int]]:
    """The learner's model and a twin with the same weights and cache, captured at 1 and a few random sizes."""
    sizes: tuple[int, ...] = (1, 2, 3)
    while not _gaps(list(sizes)):  # some batch below the largest size must need padding
        sizes = tuple(sorted({1, *rng.choice(np.arange(2, 10), size=int(rng.integers(2, 4)), replace=False).tolist()}))
    shape = StepShape(num_layers=int(rng.integers(1, 3)), hidden=int(rng.choice((4, 8))),
                      vocab=int(rng.integers(16, 40)), num_blocks=48)
    seed = int(rng.integers(1 << 30))
    learner, twin = _ExerciseModel(shape, sizes, seed=seed), DecodeGraphsModel(shape, sizes, seed=seed)
    launched: list[int] = []
    learner.graphs = {size: _RecordedGraph(graph, size, launched) for size, graph in learner.graphs.items()}
    return learner, twin, launched


def padded_batch(rng: np.random.Generator, rows: int, shape: StepShape) -> tuple[list[int], list[int], list[list[int]]]:
    """Tokens, context lengths and block tables of ``rows`` sequences, each on blocks of its own."""
    longest = shape.max_blocks * shape.block_size
    lengths = rng.integers(1, longest + 1, size=rows).tolist()
    blocks = iter(rng.permutation(shape.num_blocks).tolist())
    tables = [[next(blocks) for _ in range(blocks_for(length, shape.block_size))] for length in lengths]
    return rng.integers(0, shape.vocab, size=rows).tolist(), lengths, tables


def _gaps(sizes: list[int]) -> list[int]:
    """The batch sizes below the largest captured one that were not captured: those that need padding."""
    return [rows for rows in range(1, sizes[-1]) if rows not in sizes]


def _padded_rows(rng: np.random.Generator, sizes: list[int], case: int) -> int:
    """Batch sizes in turn: one that needs padding, one exactly a captured size, any."""
    if case % 3 == 0:
        return int(rng.choice(_gaps(sizes)))
    if case % 3 == 1:
        return int(rng.choice(sizes))
    return int(rng.integers(1, sizes[-1] + 1))


def _explain_padded_error(error: BaseException) -> str | None:
    if isinstance(error, ValueError) and "for a step of" in str(error):
        return f"the batch does not fit the step you chose: {PAD_RULE}"
    if isinstance(error, ValueError) and "fits no captured size" in str(error):
        return f"no captured size is smaller than the batch and holds it: {PAD_RULE}"
    return _explain_capture_error(error)


@checks_an_exercise
def check_decode_padded(decode_padded: Callable[..., Any]) -> None:
    """Check ``decode_padded(model, token_ids, context_lens, block_tables)``: the logits of the batch's own rows, from
    a replay of the graph of the smallest captured size that holds it, equal to the eager step's."""
    __tracebackhide__ = True
    with CheckRun("decode_padded") as run:
        model, twin, launched = padded_models(run.rng)
        sizes = sorted(model.steps)
        answers = []
        for case in range(PADDED_CASES):
            rows = _padded_rows(run.rng, sizes, case)
            tokens, lengths, tables = padded_batch(run.rng, rows, model.shape)
            run.case = f"captured sizes {sizes}, a batch of {rows}, context lengths {lengths}"
            expected = twin.run_eager(tokens, lengths, tables)
            launched.clear()
            out = call_learner(decode_padded, model, list(tokens), list(lengths), [list(t) for t in tables],
                               name="decode_padded", expected_signature=PADDED_SIGNATURE,
                               explain_error=_explain_padded_error)
            size = min(s for s in sizes if s >= rows)
            if out is not None and np.shape(out) == (size, model.shape.vocab) and size != rows:
                raise CheckFailed(f"the logits have {size} rows for a batch of {rows}: the padding rows' logits are "
                                  f"not anyone's; drop them. {PAD_RULE}")
            assert_close(out, expected, dtype=np.float32, what="the logits")
            if launched != [size]:
                wrong = f"the graph of size {launched[0]}" if launched else "no graph"
                raise CheckFailed(f"the right logits, but {wrong} was launched for a batch of {rows}: {PAD_RULE}")
            answers.append((out, expected))
        for out, expected in answers:
            if not np.allclose(np.asarray(out, np.float64), expected):
                raise CheckFailed(REREAD_HINT)
        run.passed(PADDED_CASES, detail=f"captured sizes {sizes}, batches that need padding and batches that do not")


# --- repoint: give an instantiated graph's kernel nodes a new buffer ------------------------------------------------

REPOINT_SIGNATURE = "repoint(graph, old, new)"
REPOINT_CASES = 3
REPOINT_RULE = ("for every kernel node (isinstance(node, KernelNode)) of graph.nodes whose args hold old, call "
                "graph.set_kernel_node_params(index, *args) with all its arguments, in order, old replaced by new")


def _explain_repoint_error(error: BaseException) -> str | None:
    text = str(error)
    if isinstance(error, CudaError) and "is not a kernel node" in text:
        return f"copy nodes have no kernel arguments to set: skip them. {REPOINT_RULE}"
    if isinstance(error, CudaError) and "arguments, got" in text:
        return f"set_kernel_node_params replaces all of a node's arguments: pass every one of them. {REPOINT_RULE}"
    if isinstance(error, AttributeError) and "args" in text:
        return f"only kernel nodes have args: skip copy nodes. {REPOINT_RULE}"
    if isinstance(error, AttributeError | TypeError) and ("frozen" in text or "assign" in text):
        return f"a node cannot be changed in place: the graph takes new parameters. {REPOINT_RULE}"
    return None


@checks_an_exercise
def check_repoint(repoint: Callable[[GraphExec, Buffer, Buffer], Any]) -> None:
    """Check ``repoint(graph, old, new)``: after it, every kernel node that held ``old`` holds ``new`` instead and
    nothing else changed, so that the graph replays with ``old`` freed and gives the eager step's logits."""
    __tracebackhide__ = True
    with CheckRun("repoint") as run:
        for _ in range(REPOINT_CASES):
            model, twin, _launched = padded_models(run.rng)
            size = int(run.rng.choice(sorted(model.steps)))
            graph, old = model.graphs[size], model.cache
            new = model.device.malloc("kv_cache (moved)", old.array.shape)
            new.array[...] = old.array
            expected_nodes = [node if not isinstance(node, KernelNode) else
                              (node.kernel, tuple(new if arg is old else arg for arg in node.args))
                              for node in graph.nodes]
            holding = sum(isinstance(node, KernelNode) and any(arg is old for arg in node.args) for node in graph.nodes)
            run.case = f"the step of batch {size}: {len(graph.nodes)} nodes, {holding} of them read the KV cache"
            call_learner(repoint, graph, old, new, name="repoint", expected_signature=REPOINT_SIGNATURE,
                         explain_error=_explain_repoint_error)
            if len(graph.nodes) != len(expected_nodes):
                raise CheckFailed(f"the graph has {len(graph.nodes)} nodes, it had {len(expected_nodes)}: re-point "
                                  f"nodes, do not add or remove any. {REPOINT_RULE}")
            for index, (node, want) in enumerate(zip(graph.nodes, expected_nodes, strict=True)):
                got = node if not isinstance(node, KernelNode) else (node.kernel, node.args)
                if isinstance(want, tuple) and isinstance(got, tuple) and got != want:
                    reads_old = any(arg is old for arg in node.args)
                    hint = ("it still reads old: re-point every kernel node that holds it, in every layer" if reads_old
                            else "its other arguments must stay as they were")
                    raise CheckFailed(f"node {index} ({node.name}) has the wrong arguments: {hint}. {REPOINT_RULE}")
                if got is not want and not isinstance(want, tuple):
                    raise CheckFailed(f"node {index} ({node.name}) was replaced: copy nodes stay as they are")
            model.device.free(old)
            tokens, lengths, tables = padded_batch(run.rng, size, model.shape)
            step = model.steps[size]
            step.fill(tokens, lengths, tables)
            graph.launch(model.stream)
            assert_close(model.stream.read(step.logits), twin.run_eager(tokens, lengths, tables), dtype=np.float32,
                         what="the logits of a replay after the move")
        run.passed(REPOINT_CASES, detail="the KV cache moved to a new buffer, every layer's nodes re-pointed")
