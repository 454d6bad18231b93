"""The engine's decode step on the capture model: the same inputs, kernels and padding as on the GPU, in NumPy.

``course_lib.engine.graphs`` captures the real step with CuPy and cuda-python; this module builds a small
step of the same *shape* on ``course_lib.labs.graph_capture``, so that CPU mode can capture and replay it:

* its inputs (token ids, positions, cache slots, block tables, context lengths) live in static device
  buffers, one set per captured batch size, and a step fills their **pinned** twins on the host, which the
  graph copies in: those copies are captured along with the kernels;
* each layer launches what the engine launches at batch 1: a normed projection to q (the keys and values
  are q too, to keep the model small), the rotary embedding that also writes the KV cache through the
  slot mapping, paged attention over the block table, then three projections (output, gate-up, down), the
  norms and residual adds riding on them; an embedding lookup opens the step and the LM head closes it;
* a batch is padded up to the next captured size: padding rows decode token 0 at position 0, write
  nothing (slot -1), read one cache entry through block 0, and their logits are dropped.

The numbers are small and random (``StepShape``); what is faithful is the order of operations, the buffers
each reads and writes, and so what a capture records and what a replay assumes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from course_lib.labs.graph_capture import (
    Buffer,
    Device,
    GraphExec,
    Kernel,
    KernelNode,
    LaunchCosts,
    Stream,
    captured_size,
)

INPUTS = ("token_ids", "positions", "slot_mapping", "block_tables", "context_lens")  # what each step copies in
EPS = 1e-6


@dataclass(frozen=True)
class StepShape:
    """The model's sizes: tiny, except ``num_layers``, which sets how many kernels a step launches."""

    num_layers: int = 2
    hidden: int = 8
    vocab: int = 32
    block_size: int = 4
    num_blocks: int = 16
    max_blocks: int = 4  # the block tables' width: the longest context is max_blocks * block_size tokens


def _embed(token_ids: np.ndarray, table: np.ndarray, residual: np.ndarray) -> None:
    residual[...] = table[token_ids]


def _normed_matvec(x: np.ndarray, weight: np.ndarray, out: np.ndarray) -> None:
    out[...] = x / np.sqrt((x * x).mean(axis=1, keepdims=True) + EPS) @ weight


def _rope_write_kv(q: np.ndarray, positions: np.ndarray, slots: np.ndarray, cache: np.ndarray, layer: int) -> None:
    angle = positions[:, None].astype(np.float32)
    q[...] = q * np.cos(angle) + np.roll(q, 1, axis=1) * np.sin(angle)
    written = slots >= 0  # padding rows have slot -1: they write nothing
    cache[layer, slots[written]] = q[written]


def _paged_attention(q: np.ndarray, block_tables: np.ndarray, context_lens: np.ndarray, cache: np.ndarray,
                     layer: int, block_size: int, out: np.ndarray) -> None:
    for row, length in enumerate(context_lens):
        tokens = np.arange(length)
        keys = cache[layer, block_tables[row, tokens // block_size] * block_size + tokens % block_size]
        scores = keys @ q[row] / np.sqrt(q.shape[1])
        weights = np.exp(scores - scores.max())
        out[row] = weights @ keys / weights.sum()


def _add_matvec(residual: np.ndarray, x: np.ndarray, weight: np.ndarray) -> None:
    residual += x @ weight


def _add_activated_matvec(residual: np.ndarray, x: np.ndarray, weight: np.ndarray) -> None:
    residual += np.tanh(x) @ weight


EMBED = Kernel("embedding", _embed, "other")
QKV = Kernel("normed_matvec qkv", _normed_matvec, "projections")
ROPE = Kernel("rope_write_kv", _rope_write_kv, "rotary_cache_write")
ATTENTION = Kernel("paged_attention", _paged_attention, "attention")
OUT = Kernel("add_matvec o", _add_matvec, "projections")
GATE_UP = Kernel("normed_matvec gate_up", _normed_matvec, "projections")
DOWN = Kernel("add_matvec down", _add_activated_matvec, "projections")
LM_HEAD = Kernel("normed_matvec lm_head", _normed_matvec, "projections")


class DecodeStep:
    """One batch size's decode step: its static buffers and the launches that compute its logits."""

    def __init__(self, device: Device, shape: StepShape, weights: dict[str, Buffer], cache: Buffer,
                 batch_size: int) -> None:
        self.shape, self.weights, self.cache, self.batch_size = shape, weights, cache, batch_size
        prefix, widths = f"b{batch_size}.", {"block_tables": (batch_size, shape.max_blocks)}
        self.inputs = {name: device.malloc(prefix + name, widths.get(name, batch_size), np.int32) for name in INPUTS}
        self.staging = {name: device.host_alloc(prefix + name + " (pinned)", widths.get(name, batch_size), np.int32)
                        for name in INPUTS}
        activations = ("residual", "q", "attended", "gate_up")  # the step's temporaries, static too
        self.residual, self.q, self.attended, self.gate_up = (
            device.malloc(prefix + name, (batch_size, shape.hidden)) for name in activations)
        self.logits = device.malloc(prefix + "logits", (batch_size, shape.vocab))

    def fill(self, token_ids: Any, context_lens: Any, block_tables: list[list[int]]) -> None:
        """Write a batch's inputs into the pinned staging buffers, padded to this step's batch size."""
        rows, size = len(token_ids), self.batch_size
        if rows > size or len(context_lens) != rows or len(block_tables) != rows:
            raise ValueError(f"{rows} tokens, {len(context_lens)} lengths and {len(block_tables)} block tables "
                             f"for a step of {size} rows: give one of each per sequence, at most {size}")
        lengths = np.asarray(context_lens, np.int64)
        if lengths.min() < 1 or lengths.max() > self.shape.max_blocks * self.shape.block_size:
            raise ValueError(f"context lengths must be 1 to {self.shape.max_blocks * self.shape.block_size}, "
                             f"got {lengths.tolist()}")
        padded = {"token_ids": np.zeros(size), "positions": np.zeros(size), "slot_mapping": np.full(size, -1),
                  "block_tables": np.zeros((size, self.shape.max_blocks)), "context_lens": np.ones(size)}
        padded["token_ids"][:rows], padded["context_lens"][:rows] = token_ids, lengths
        padded["positions"][:rows] = lengths - 1  # the new token is the last of its context
        for row, (table, length) in enumerate(zip(block_tables, lengths, strict=True)):
            padded["block_tables"][row, :len(table)] = table
            position = length - 1
            padded["slot_mapping"][row] = table[position // self.shape.block_size] * self.shape.block_size + \
                position % self.shape.block_size
        for name in INPUTS:
            self.staging[name].array[...] = padded[name]

    def enqueue(self, stream: Stream) -> None:
        """The step's work, in the engine's order: copy the inputs in, then every kernel. Run eagerly, or captured."""
        for name in INPUTS:
            stream.copy_async(self.inputs[name], self.staging[name])
        w, i, rows = self.weights, self.inputs, self.batch_size
        stream.launch(EMBED, rows, i["token_ids"], w["embedding"], self.residual)
        for layer in range(self.shape.num_layers):
            stream.launch(QKV, rows, self.residual, w[f"{layer}.qkv"], self.q)
            stream.launch(ROPE, rows, self.q, i["positions"], i["slot_mapping"], self.cache, layer)
            stream.launch(ATTENTION, rows, self.q, i["block_tables"], i["context_lens"], self.cache, layer,
                          self.shape.block_size, self.attended)
            stream.launch(OUT, rows, self.residual, self.attended, w[f"{layer}.o"])
            stream.launch(GATE_UP, rows, self.residual, w[f"{layer}.gate_up"], self.gate_up)
            stream.launch(DOWN, rows, self.residual, self.gate_up, w[f"{layer}.down"])
        stream.launch(LM_HEAD, rows, self.residual, w["lm_head"], self.logits)


class DecodeGraphsModel:
    """``DecodeGraphs`` on the capture model: one graph per batch size, batches padded up, replays checked.

    ``run`` replays a graph; ``run_eager`` launches the same step kernel by kernel. Both return the logits of
    the real rows, and write the new tokens' keys and values into the shared cache.
    """

    def __init__(self, shape: StepShape | None = None, batch_sizes: tuple[int, ...] = (1, 2, 4),
                 device: Device | None = None, seed: int = 0) -> None:
        self.shape, self.device = shape or StepShape(), device or Device()
        shape = self.shape
        self.stream = self.device.stream()
        self.weights = _random_weights(self.device, shape, np.random.default_rng(seed))
        self.cache = self.device.malloc("kv_cache", (shape.num_layers, shape.num_blocks * shape.block_size,
                                                     shape.hidden))
        self.cache.array[...] = np.random.default_rng(seed + 1).standard_normal(self.cache.array.shape)  # prefilled
        self.steps = {size: DecodeStep(self.device, shape, self.weights, self.cache, size)
                      for size in sorted(set(batch_sizes))}
        self.graphs = {size: self.capture(step) for size, step in self.steps.items()}

    def capture(self, step: DecodeStep) -> GraphExec:
        with self.stream.capture() as captured:
            step.enqueue(self.stream)
        return captured.graph.instantiate()

    def run(self, token_ids: Any, context_lens: Any, block_tables: list[list[int]]) -> np.ndarray:
        """Logits ``[rows, vocab]`` by replaying the graph of the next captured size."""
        size = captured_size(len(token_ids), list(self.steps))
        self.steps[size].fill(token_ids, context_lens, block_tables)
        self.graphs[size].launch(self.stream)
        return self.steps[size].logits.array[:len(token_ids)].copy()

    def run_eager(self, token_ids: Any, context_lens: Any, block_tables: list[list[int]]) -> np.ndarray:
        """The same step launched kernel by kernel (on the step of the next captured size, padding included)."""
        size = captured_size(len(token_ids), list(self.steps))
        self.steps[size].fill(token_ids, context_lens, block_tables)
        self.steps[size].enqueue(self.stream)
        return self.steps[size].logits.array[:len(token_ids)].copy()


def _random_weights(device: Device, shape: StepShape, rng: np.random.Generator) -> dict[str, Buffer]:
    hidden, scale = shape.hidden, 1 / np.sqrt(shape.hidden)
    sizes = {"embedding": (shape.vocab, hidden), "lm_head": (hidden, shape.vocab)}
    for layer in range(shape.num_layers):
        sizes |= {f"{layer}.{name}": (hidden, hidden) for name in ("qkv", "o", "gate_up", "down")}
    weights = {name: device.malloc(f"w.{name}", size) for name, size in sizes.items()}
    for buffer in weights.values():
        buffer.array[...] = rng.standard_normal(buffer.array.shape) * scale
    return weights


def costs_from_engine_result(engine: dict[str, Any], model: DecodeGraphsModel, batch_size: int = 1) -> LaunchCosts:
    """The timeline costs that make the model's step take the recorded step's times (``engine.json``).

    * each kernel of a group takes that group's recorded GPU time (the graphed step's ``us_<group>``) over the
      number of the model step's kernels in the group; copies take no GPU time (they are not recorded);
    * an eager launch costs the host the recorded eager step's time over the model step's launches: all the
      host work of the eager step, spread evenly (so the model's eager host lane spans the recorded step);
    * graph nodes follow each other by the recorded per-kernel time of an empty kernel replayed in a graph,
      and a graph launch costs the host one eager empty-kernel launch (its own cost is not recorded).
    """
    found = {m["parameters"].get("role"): m for m in engine["measurements"]}
    eager, graph = found["eager"], found["graph"]
    nodes = model.graphs[batch_size].nodes
    kernels = Counter(node.kernel.group for node in nodes if isinstance(node, KernelNode))
    kernel_s = {group: graph["derived"].get(f"us_{group}", 0.0) * 1e-6 / count for group, count in kernels.items()}
    return LaunchCosts(host_per_launch_s=eager["timing"]["median_s"] / len(nodes),
                       graph_launch_s=found["launch eager"]["derived"]["us_per_launch"] * 1e-6,
                       graph_node_s=found["launch graph"]["derived"]["us_per_launch"] * 1e-6, kernel_s=kernel_s)


def model_timelines(engine: dict[str, Any], num_layers: int) -> dict[str, list[dict[str, Any]]]:
    """Timeline records of the model's batch-1 step, ``"eager"`` and ``"graph"``, costed from ``engine.json``."""
    model = DecodeGraphsModel(StepShape(num_layers=num_layers), batch_sizes=(1,))
    model.device.costs = costs_from_engine_result(engine, model)
    timelines = {}
    for how, run in (("eager", model.run_eager), ("graph", model.run)):
        model.device.clear_timeline()
        run([1], [6], [[0, 1]])
        model.stream.synchronize()
        timelines[how] = list(model.device.timeline)
    return timelines
