"""The decode step by tensor-parallel degree: a 1B-shaped and an 8B-shaped Llama, batch 1 and 64 (chapter 05, lab 30,
chapter 07).

The degree is the number of ranks the suite runs on: ``mpiexec -n N python -m course_lib.bench tensor_parallel``
measures TP = N, one GPU a rank over NCCL (one process alone: TP 1; on the CPU the same code runs over MPI). Each
degree is a run of its own, so each writes a file of its own, ``tensor_parallel_tp<N>.json`` (``result_name``): the
runs on 1, 2 and 4 GPUs of one card lie side by side in its results folder.

**What is timed**: one decode step of the engine's model (``LlamaModel.forward``): ``batch`` sequences, one new
token each, over a context of 1024 tokens (each sequence's keys and values in blocks of its own, left zero: the
values do not change the time). The step is eager, as the engine runs tensor parallelism (its CUDA graphs are
refused with TP), and runs the same kernels at every degree: the batched products, not the fused one-token
matrix-vector path (``one_token_matvec=False``), which adds into the residual inside its kernels, before an
all-reduce could, so TP cannot use it. Each rank builds the step's record itself (the engine's rank 0 would
broadcast it); the all-reduces of the embedding and of each layer's two row-parallel products, and the all-gather
of the logits, run inside the step over the communicator.

**Weights**: random, and drawn at the shape of this rank's slice only (``RandomWeight``): no rank ever holds an
8B-shaped model whole (at TP 1 the one rank holds all of it, as it must). The ranks' slices are not the slices of
one model: what this suite measures is time, not text; that TP computes what one rank computes is
``tests/test_tensor_parallel.py``'s job. The suite checks that every step ran and that its logits are finite.

**Timing** as the collectives suite times a collective (``time_collective``): each step starts from a barrier and
ends with the device synchronised; a step's time is the slowest rank's (all-reduced with "max"), and the figure is
the median of the plan's steps after its warm-up ones (``GPU_PLAN``: 30 after 5).

**The prediction beside each measurement** (``predicted_step_s``), from this run's own measurements: the bytes
this rank's step reads (its slice of the weights, one embedding row per token, its KV heads' cache) over the copy
bandwidth measured first (the lowest of the ranks'), plus the step's collectives timed alone at their sizes on the
same ranks. What the step takes beyond that is launches, the host and kernels below the copy's bandwidth. It is
computed here rather than by ``course_lib.scaling``: scaling reads results files, so it sits below ``bench`` in the
layers (course_lib/README.md) and a suite cannot import it. Each record carries what chapter 07 needs to put
scaling's datasheet model beside it: ``scaling_shape`` (the model in ``course_lib.scaling.shapes``), the degree,
batch and context (``step_cost`` with ``Layout(tp=N)``, plus ``all_gather_s`` for the logits).

**Headline**: ``tp2_decode_speedup_b1_8b`` and ``tp4_decode_speedup_b1_8b``, the 8B-shaped batch-1 step at TP 1
over the same at TP 2 and 4. They need runs of the same card on 1, 2 and 4 GPUs, which are separate runs: each run
reads the other degrees' files from its card's results folder, and a figure stays null, with a ``note``, until
both of its files exist.

**CPU mode** runs small shapes only (the 8B shape never): TINY and ``llama-1b-shaped / 16`` (a sixteenth of its
weights), float32, at a context of 256, labelled with their own names. ``--quick``: TINY alone, batches 1 and 8 at
a context of 64, three steps. A layout the ranks cannot split evenly (TINY's 4 heads over 3 ranks) is recorded as
skipped, with the reason.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np

from course_lib import backend, dtypes
from course_lib.bench.baselines import copy_bandwidth
from course_lib.bench.results import card_folder, load_result
from course_lib.bench.runner import Step, measurement
from course_lib.bench.suites.collectives import time_collective
from course_lib.checkpoint.config import LLAMA_1B_SHAPED, LLAMA_8B_SHAPED, TINY, ModelConfig
from course_lib.checkpoint.weights import expected_shapes
from course_lib.device_facts import device_facts
from course_lib.distributed import Communicator, connect
from course_lib.engine.model import AttentionMetadata, KVCache, LlamaModel
from course_lib.engine.tensor_parallel import check_layout
from course_lib.kernels.kv_blocks import blocks_for

DESCRIPTION = "decode step time by tensor-parallel degree (= ranks), 1B- and 8B-shaped, batch 1 and 64, vs a roofline"
BLOCK_SIZE = 16
TIMEOUT_S = 300.0  # the ranks first meet after building their slices, tens of seconds for the 8B shape
# CPU mode's larger model: LLAMA_1B_SHAPED's widths over 4 (8 heads of 64, 2 KV heads), all 16 layers: 1/16 of it.
LLAMA_1B_SIXTEENTH = dataclasses.replace(LLAMA_1B_SHAPED, hidden_size=512, intermediate_size=2048, num_heads=8,
                                         num_kv_heads=2, vocab_size=8000)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run measures: its models (by the names its records carry), their element type, the context, the
    batches, the steps timed after the warm-up ones, and the size of the copy that sets the roofline."""

    models: dict[str, ModelConfig]
    dtype: str
    context: int
    batches: tuple[int, ...]
    repeats: int
    warmup: int
    copy_bytes: int


GPU_PLAN = Plan({"llama-1b-shaped": LLAMA_1B_SHAPED, "llama-8b-shaped": LLAMA_8B_SHAPED}, "bfloat16", 1024, (1, 64),
                30, 5, 1 << 30)
CPU_PLAN = Plan({"tiny": TINY, "llama-1b-shaped / 16": LLAMA_1B_SIXTEENTH}, "float32", 256, (1, 64), 5, 1, 64 << 20)
QUICK_PLAN = Plan({"tiny": TINY}, "float32", 64, (1, 8), 3, 1, 8 << 20)  # bfloat16 on a GPU
SCALING_SHAPES = {"llama-1b-shaped": "llama-1b-shaped", "llama-8b-shaped": "llama-3.1-8b"}  # the same shapes there
HEADLINE_MODEL = "llama-8b-shaped"
HEADLINES = {"tp2_decode_speedup_b1_8b": 2, "tp4_decode_speedup_b1_8b": 4}  # name: the degree TP 1 is compared with
PARAMETERS = {"models": "llama-1b-shaped and llama-8b-shaped (random weights) in bfloat16 at a context of 1024 on "
                        "GPUs; tiny and llama-1b-shaped / 16 in float32 at 256 on the CPU; --quick: tiny at 64",
              "block_size": BLOCK_SIZE,
              "step": "eager LlamaModel.forward, one_token_matvec off, at every degree",
              "timing": "host clock from a barrier to the step's end, the slowest rank's; median after warm-up",
              "prediction": "this rank's bytes over the run's copy bandwidth + the step's collectives timed alone"}


@functools.cache
def communicator() -> Communicator:
    """This process's rank among those ``mpiexec`` started (alone: one rank), NCCL on GPUs, MPI on the CPU."""
    return connect(timeout=TIMEOUT_S)


def result_name() -> str:
    """``tensor_parallel_tp<N>``: one results file per degree, since each degree is a run of its own."""
    return f"tensor_parallel_tp{communicator().size}"


def plan(quick: bool) -> Plan:
    """This run's plan: the GPU's or the CPU's, or the quick one in this mode's element type."""
    if quick:
        return dataclasses.replace(QUICK_PLAN, dtype="bfloat16") if backend.has_gpu() else QUICK_PLAN
    return GPU_PLAN if backend.has_gpu() else CPU_PLAN


def steps(quick: bool) -> list[Step]:
    run = Run(communicator(), plan(quick))
    planned = [Step("copy", run.measure_copy)]
    for name, config in run.plan.models.items():
        try:
            check_layout(config, run.comm.size)
        except ValueError as error:
            planned.append(Step(f"{name}: does not split", functools.partial(run.skipped, name, str(error))))
            continue
        bench = ModelBench(run, name, config)
        planned += [Step(bench.label(batch), functools.partial(bench.measure, batch)) for batch in bench.batches]
    return planned


@dataclasses.dataclass
class Run:
    """What every measurement of one run shares: the ranks, the plan, the copy bandwidth measured first."""

    comm: Communicator
    plan: Plan
    copy_bytes_per_s: float = 0.0

    @property
    def where(self) -> str:
        """``TP 2 (nccl)``."""
        return f"TP {self.comm.size} ({self.comm.backend})"

    def measure_copy(self) -> dict[str, Any]:
        """The memory roofline's bandwidth: every rank copies the plan's bytes on its own device; the lowest rate
        counts (the slowest rank sets a step's time)."""
        record = copy_bandwidth(self.plan.copy_bytes)
        lowest = self.comm.all_reduce(self.comm.xp.asarray([record["derived"]["gbps"]]), op="min")
        record["derived"]["gbps"] = float(lowest[0])
        self.copy_bytes_per_s = record["derived"]["gbps"] * 1e9
        record["parameters"] |= {"role": "the roofline's bandwidth: the lowest of the ranks' copies",
                                 "ranks": self.comm.size, "backend": self.comm.backend}
        return record

    def skipped(self, name: str, reason: str) -> dict[str, Any]:
        """The record of a model these ranks cannot split, with why: a gap in a table is never silent."""
        parameters = {"model": name, "tp": self.comm.size, "ranks": self.comm.size, "backend": self.comm.backend}
        return {"label": f"decode, {name}, {self.where}", "parameters": parameters, "skipped": reason,
                "timing": None, "derived": {}}


# ---- random weights, drawn slice by slice -------------------------------------------------------------------


class RandomWeight:
    """A weight matrix of the full model's ``shape`` that holds no values until it is indexed.

    ``LlamaModel`` takes the full model's weights and cuts out its rank's slice (``shard_weights``: rows or
    columns); indexing a RandomWeight draws random values of the slice's shape only, on the device, and returns
    them on the host in ``dtype``, where ``LlamaModel`` expects its weights. Values: ``offset + scale * normal``.
    """

    def __init__(self, shape: tuple[int, ...], scale: float, dtype: str, rng: Any, offset: float = 0.0):
        self.shape, self.scale, self.offset, self.dtype, self.rng = shape, scale, offset, dtype, rng

    def __getitem__(self, key: Any) -> np.ndarray:
        sliced = np.broadcast_to(np.zeros((), np.int8), self.shape)[key].shape  # the slice's shape, no memory
        values = self.offset + self.scale * self.rng.standard_normal(sliced, dtype=np.float32)
        return backend.to_numpy(dtypes.narrow(values, self.dtype)).view(dtypes.host_dtype(self.dtype))


def rank_weights(config: ModelConfig, ranks: int, dtype: str, seed: int) -> dict[str, Any]:
    """Weights for ``LlamaModel``, as ``random_weights`` draws them (matrices with std 1 / sqrt(fan-in),
    embeddings standard normal, norms near one), but each matrix a ``RandomWeight``: a rank draws only the slice
    it keeps. With one rank there is nothing to cut, and every matrix is drawn whole."""
    rng = backend.xp.random.default_rng(seed)
    weights: dict[str, Any] = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith("norm.weight"):  # every rank holds the norms whole
            weights[name] = RandomWeight(shape, 0.1, dtype, rng, offset=1.0)[...]
        else:
            scale = 1.0 if name == "model.embed_tokens.weight" else 1 / math.sqrt(shape[1])
            weights[name] = RandomWeight(shape, scale, dtype, rng)
            if ranks == 1:
                weights[name] = weights[name][...]
    return weights


# ---- one model at this degree -----------------------------------------------------------------------------------


class ModelBench:
    """One model on this run's ranks, measured batch by batch: built for its first batch, dropped after its last."""

    def __init__(self, run: Run, name: str, config: ModelConfig):
        self.run, self.name, self.config, self.plan = run, name, config, run.plan
        self.batches = self.plan.batches
        self.context = min(self.plan.context, config.max_position_embeddings)
        self.model: LlamaModel | None = None

    def label(self, batch: int) -> str:
        """``decode batch 64, llama-8b-shaped, TP 2 (nccl)``."""
        return f"decode batch {batch}, {self.name}, {self.run.where}"

    def measure(self, batch: int) -> dict[str, Any]:
        """One decode step of ``batch`` sequences: timed, its logits checked, its collectives timed alone, and the
        prediction from its bytes. A rank that fails tells the others, which stop at once."""
        comm = self.run.comm
        with comm.report_failures():
            if self.model is None:
                weights = rank_weights(self.config, comm.size, self.plan.dtype, comm.rank)
                self.model = LlamaModel(self.config, weights, self.plan.dtype, one_token_matvec=False, comm=comm)
            step = decode_step(self.model, batch, self.context)
            timing = time_collective(comm, step, self.plan.repeats, self.plan.warmup)
            check_logits(step(), batch, self.config.vocab_size)
            moved = step_traffic(self.model, batch, self.context)
            alone = collectives_alone(comm, moved, self.plan.repeats, self.plan.warmup)
        if batch == self.batches[-1]:
            self.model = None  # the next model's weights get the memory
        memory_s = (moved["weight_bytes"] + moved["kv_bytes"]) / self.run.copy_bytes_per_s
        collectives_s = moved["all_reduces"] * alone["all_reduce_s"] + alone["all_gather_s"]
        predicted = memory_s + collectives_s
        parameters = {"model": self.name, "scaling_shape": SCALING_SHAPES.get(self.name), "tp": comm.size,
                      "ranks": comm.size, "backend": comm.backend, "batch": batch, "context": self.context,
                      "dtype": self.plan.dtype, "one_token_matvec": False, "steps_timed": self.plan.repeats,
                      "warmup": self.plan.warmup, "traffic_per_rank": moved}
        return measurement(self.label(batch), timing, parameters, tokens_per_s=batch / timing.median_s,
                           predicted_step_s=predicted, memory_floor_s=memory_s, collectives_alone_s=collectives_s,
                           all_reduce_alone_s=alone["all_reduce_s"], all_gather_alone_s=alone["all_gather_s"],
                           predicted_over_measured=predicted / timing.median_s)


def decode_step(model: LlamaModel, batch: int, context: int) -> Any:
    """A function that runs one decode step of ``batch`` sequences at ``context`` tokens and returns the logits.

    Every rank draws the same token ids (the embedding's all-reduce adds up one row per token) and gives each
    sequence blocks of its own in a fresh cache of this rank's KV heads."""
    blocks = blocks_for(context, BLOCK_SIZE)
    cache = KVCache.allocate(model.shard_config, batch * blocks, BLOCK_SIZE, model.dtype)
    tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(batch)]
    tokens = backend.xp.asarray(np.random.default_rng(batch).integers(0, model.config.vocab_size, batch, np.int32))

    def step() -> Any:
        attention = AttentionMetadata.build([(1, context, table) for table in tables], BLOCK_SIZE)
        return model.forward(tokens, attention.positions, cache, attention)

    return step


def check_logits(logits: Any, batch: int, vocab: int) -> None:
    """A step's logits cover the whole vocabulary (gathered from every rank) and are all finite."""
    if tuple(logits.shape) != (batch, vocab):
        raise RuntimeError(f"a decode step of {batch} sequences gave logits of shape {tuple(logits.shape)}, "
                           f"expected ({batch}, {vocab})")
    if not bool(backend.xp.isfinite(logits).all()):
        raise RuntimeError("a decode step gave logits that are not finite (NaN or inf)")


def step_traffic(model: LlamaModel, batch: int, context: int) -> dict[str, int]:
    """What one decode step moves on each rank: the bytes it reads (its slice of the weights, of which the
    embedding table gives one row a token unless it is also the output projection; its KV heads' cache) and its
    collectives (all-reduces of float32 activations, as the engine sums them; the all-gather of the logits)."""
    local, item, ranks = model.shard_config, dtypes.ITEM_BYTES[model.dtype], model.comm.size if model.comm else 1
    weights = sum(int(w.nbytes) for w in model.weights.values())
    if not model.config.tie_word_embeddings:
        weights += batch * local.hidden_size * item - int(model.weights["model.embed_tokens.weight"].nbytes)
    kv = 2 * batch * context * local.num_layers * local.num_kv_heads * local.head_dim * item
    return {"weight_bytes": weights, "kv_bytes": kv,
            "all_reduces": 0 if ranks == 1 else 2 * local.num_layers + 1,  # each layer's two, and the embedding's
            "all_reduce_bytes": 4 * batch * local.hidden_size,
            "all_gather_bytes": 0 if ranks == 1 else 4 * batch * model.config.vocab_size}  # the gathered logits


def collectives_alone(comm: Communicator, moved: dict[str, int], repeats: int, warmup: int) -> dict[str, float]:
    """The step's all-reduce and all-gather, each timed alone at its size on the same ranks (none on one rank)."""
    if not moved["all_reduces"]:
        return {"all_reduce_s": 0.0, "all_gather_s": 0.0}
    xp = comm.xp
    summed = xp.zeros(moved["all_reduce_bytes"] // 4, dtype=xp.float32)
    part = xp.zeros(moved["all_gather_bytes"] // 4 // comm.size, dtype=xp.float32)
    return {"all_reduce_s": time_collective(comm, lambda: comm.all_reduce(summed, out=summed), repeats,
                                            warmup).median_s,
            "all_gather_s": time_collective(comm, lambda: comm.all_gather(part), repeats, warmup).median_s}


# ---- the headline -------------------------------------------------------------------------------------------


def headline(measurements: list[dict[str, Any]]) -> dict[str, Any]:
    """TP 1's 8B-shaped batch-1 step over TP 2's and TP 4's, of the same card: this run's own step, and the other
    degrees' from their files in this card's results folder (``recorded_steps``). Null, with a note, until both
    steps of a figure are known. Never a number that does not measure what its name says."""
    steps = {**recorded_steps(), **headline_steps(measurements)}
    figures: dict[str, Any] = {name: steps[1] / steps[tp] if 1 in steps and tp in steps else None
                               for name, tp in HEADLINES.items()}
    if None in figures.values():
        known = ", ".join(f"TP {tp}" for tp in sorted(steps)) or "no degree"
        figures["note"] = (f"needs the TP=1 file of the same card and a run on 2/4 GPUs (tensor_parallel_tp1.json, "
                           f"_tp2.json, _tp4.json side by side in the card's results folder; the 8B shape runs on "
                           f"GPUs only): its batch-1 step is known at {known}")
    return figures


def headline_steps(measurements: list[dict[str, Any]]) -> dict[int, float]:
    """{degree: median seconds} of the 8B-shaped batch-1 steps among ``measurements``."""
    return {m["parameters"]["tp"]: m["timing"]["median_s"] for m in measurements
            if m.get("timing") and m["parameters"].get("model") == HEADLINE_MODEL and m["parameters"]["batch"] == 1}


def recorded_steps() -> dict[int, float]:
    """The 8B-shaped batch-1 steps in this card's recorded files of every degree the headline names."""
    folder, steps = card_folder(device_facts()), {}
    for tp in (1, *HEADLINES.values()):
        try:
            recorded = load_result(f"tensor_parallel_tp{tp}", folder)
        except FileNotFoundError:
            continue
        steps |= headline_steps(recorded["measurements"])
    return steps
