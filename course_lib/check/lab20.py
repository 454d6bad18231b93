"""Checkers for lab 20: where the decode step turns compute-bound, and how many sequences' keys and values fit.

The learner's functions take a GPU and a model as the course's cost model describes them
(``course_lib.scaling.hardware.Hardware``, ``course_lib.scaling.shapes.ModelShape``); the checker, which sits above
``scaling`` in the library's layers, hands them ``Gpu`` and ``Model`` records with the same attributes, drawn at
random: datasheet-like figures, Llama-like shapes with grouped-query attention, contexts and memory utilisations,
so that a right answer cannot be a memorised number. The tests hold both references against ``course_lib.scaling``
on its catalogue and named models: the knee against where ``step_cost`` turns compute-bound, the KV limit against
``cost.memory(...).max_batch``. Every knee run has a bfloat16, a float8 and a float4 case (float4 first), where the
bytes per weight and the rate differ, so that leaving either out shows; every KV run has weights that take a tenth
of the memory or more, and one model whose weights do not fit at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from course_lib.check.compare import assert_close
from course_lib.check.exercise import checks_an_exercise
from course_lib.check.failure import CheckFailed
from course_lib.check.learner import call_learner
from course_lib.check.mistakes import Mistake
from course_lib.check.run import CheckRun

BYTES_PER_VALUE = {"bfloat16": 2, "float8": 1, "float4": 0.5}  # course_lib.scaling.shapes.dtype_bytes


def dtype_bytes(dtype: str) -> float:
    return BYTES_PER_VALUE[dtype]


@dataclass(frozen=True)
class Gpu:
    """A GPU's figures under the names ``course_lib.scaling.hardware.Hardware`` gives them (rates: dense, per s)."""

    key: str
    name: str
    hbm_bytes: float
    hbm_bytes_per_s: float
    bf16_flops_per_s: float
    fp8_flops_per_s: float
    fp4_flops_per_s: float | None  # None: no fp4 tensor cores (Hopper)

    def flops_per_s(self, dtype: str) -> float:
        rate = {"bfloat16": self.bf16_flops_per_s, "float8": self.fp8_flops_per_s, "float4": self.fp4_flops_per_s}
        if rate.get(dtype) is None:
            raise ValueError(f"{self.name} has no {dtype} rate")
        return rate[dtype]


@dataclass(frozen=True)
class Model:
    """A model's shape under the names ``course_lib.scaling.shapes.ModelShape`` gives it."""

    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    params: int

    def parameters(self) -> int:
        return self.params


def random_gpu(rng: np.random.Generator) -> Gpu:
    """Datasheet-like figures: 80 to 288 GiB, 2 to 8 TB/s, a bf16 rate of 0.8 to 2.5 PFLOP/s, fp8 twice it, fp4 (on
    half of them) four times."""
    gib = int(rng.choice((80, 96, 141, 180, 192, 288)))
    bandwidth = round(float(10 ** rng.uniform(np.log10(2e12), np.log10(8e12))), -9)
    bf16 = round(float(rng.uniform(0.8e15, 2.5e15)), -12)
    fp4 = 4 * bf16 if rng.random() < 0.5 else None
    name = f"a GPU of {gib} GiB, {bandwidth / 1e12:.3g} TB/s, {bf16 / 1e15:.3g} bf16 PFLOP/s"
    return Gpu(f"gpu-{gib}", name, gib * 2**30, bandwidth, bf16, 2 * bf16, fp4)

# --- decode_knee: the batch at which the weights' FLOPs catch up with their bytes ------------------------------------

KNEE_SIGNATURE = "decode_knee(hw, weights)"
KNEE_CASES = 6
KNEE_RTOL = 1e-9  # three multiplications and a division in float64
KNEE_RULE = ("a step reads s = dtype_bytes(weights) bytes per weight and does 2 FLOPs per weight per sequence, so its "
             "weight FLOPs take as long as its weight bytes at B* = s * F / (2 * beta), with F = "
             "hw.flops_per_s(weights) and beta = hw.hbm_bytes_per_s")


def decode_knee_reference(hw: Any, weights: str) -> float:
    """B* = s F / (2 beta): the batch at which 2 B P FLOPs at F take as long as s P bytes at beta."""
    return dtype_bytes(weights) * hw.flops_per_s(weights) / (2 * hw.hbm_bytes_per_s)


def _knee_as(bytes_of: Callable[[str], float] = dtype_bytes, rate_type: str | None = None,
             flops_per_weight: float = 2.0) -> Callable[[Any, str], float]:
    """The knee with one part taken the way a known mistake takes it; the defaults give the reference."""
    return lambda hw, weights: (bytes_of(weights) * hw.flops_per_s(rate_type or weights)
                                / (flops_per_weight * hw.hbm_bytes_per_s))


def _rounded_knee(out: np.ndarray, ref: np.ndarray) -> bool:
    value, exact = float(out), float(ref)
    return value != exact and value in (math.floor(exact), math.ceil(exact), round(exact))


KNEE_MISTAKES = (
    Mistake("no factor 2", f"twice the knee: a multiply-add is 2 FLOPs, so each sequence does 2 FLOPs per weight; "
            f"{KNEE_RULE}", wrong_reference=_knee_as(flops_per_weight=1.0)),
    Mistake("ridge point alone", "this is F / beta, the ridge point in FLOPs per byte, which is the knee only for "
            f"2-byte weights: {{weights}} weights take dtype_bytes(weights) bytes each. {KNEE_RULE}",
            wrong_reference=lambda hw, weights: hw.flops_per_s(weights) / hw.hbm_bytes_per_s),
    Mistake("inverted", f"this is the knee's inverse: {KNEE_RULE}",
            wrong_reference=lambda hw, weights: 1 / decode_knee_reference(hw, weights)),
    Mistake("bf16 rate", "this uses the bfloat16 rate: fp8 and fp4 tensor cores run 2 and 4 times faster, so take "
            f"hw.flops_per_s(weights); {KNEE_RULE}", wrong_reference=_knee_as(rate_type="bfloat16")),
    Mistake("bits", f"8 times the knee: dtype_bytes gives bytes per weight, not bits; {KNEE_RULE}",
            wrong_reference=_knee_as(bytes_of=lambda weights: 8 * dtype_bytes(weights))),
    Mistake("rounded", "the knee rounded to a whole batch: return B* as it comes out, a float", symptom=_rounded_knee),
)


def knee_cases(rng: np.random.Generator) -> list[tuple[Gpu, str]]:
    """(GPU, weight type) pairs from the catalogue: bfloat16, float8 and float4 each at least once, float4 first,
    where the mistakes that agree on the other types (the ridge point alone, no factor 2) give different answers."""
    cases = []
    for case in range(KNEE_CASES):
        wanted = ("bfloat16", "float8", "float4")[case % 3]
        gpu = random_gpu(rng)
        while wanted == "float4" and gpu.fp4_flops_per_s is None:
            gpu = random_gpu(rng)
        cases.append((gpu, wanted))
    first, *rest = cases[2::3] + cases[0::3] + cases[1::3]  # a float4 case first: there s / 2 is neither 1 nor 1/2
    return [first, *(rest[i] for i in rng.permutation(len(rest)))]


@checks_an_exercise
def check_decode_knee(decode_knee: Callable[[Any, str], float]) -> None:
    """Check ``decode_knee(hw, weights)``: the batch B* = s F / (2 beta) of lab 20, within a relative 1e-9."""
    __tracebackhide__ = True
    with CheckRun("decode_knee") as run:
        for hw, weights in knee_cases(run.rng):
            run.case = f"{hw.name} ({hw.key}), {weights} weights"
            out = call_learner(decode_knee, hw, weights, name="decode_knee", expected_signature=KNEE_SIGNATURE)
            mistakes = tuple(Mistake(m.name, m.hint.replace("{weights}", weights), m.wrong_reference, m.symptom)
                             for m in KNEE_MISTAKES)
            assert_close(out, decode_knee_reference(hw, weights), what=f"decode_knee(hw, {weights!r})",
                         rtol=KNEE_RTOL, mistakes=mistakes, inputs=(hw, weights))
        run.passed(KNEE_CASES, detail="bfloat16, float8 and float4 weights on random GPUs")


# --- max_batch: the most sequences whose keys and values fit ---------------------------------------------------

BATCH_SIGNATURE = "max_batch(model, hw, context, memory_utilization)"
BATCH_CASES = 8
UTILIZATIONS = (0.8, 0.85, 0.9, 0.92, 0.95)
KV_RULE = ("a token keeps a key AND a value in every layer, 2 * num_layers * num_kv_heads * head_dim values of 2 "
           "bytes (bfloat16); the KV cache gets hbm_bytes * memory_utilization minus the weights, "
           "model.parameters() * 2 bytes; the batch is that over context * KV bytes per token, rounded down")


def max_batch_reference(model: Any, hw: Any, context: int, memory_utilization: float) -> int:
    """What ``course_lib.scaling.cost.memory`` counts on one GPU with bfloat16 weights and KV cache."""
    return max(0, _batch_as(model, hw, context, memory_utilization))


def _batch_as(model: Any, hw: Any, context: int, utilization: float, *, kv_values: int = 2,
              kv_heads: int | None = None, layers: int | None = None, weight_bytes: float = 2.0,
              usable: float | None = None, rounding: Callable[[float], float] = math.floor) -> int:
    """The batch counted with one part taken the way a known mistake takes it; the defaults give the reference."""
    kv_heads = model.num_kv_heads if kv_heads is None else kv_heads
    layers = model.num_layers if layers is None else layers
    usable = hw.hbm_bytes * utilization if usable is None else usable
    free = usable - model.parameters() * weight_bytes
    per_token = kv_values * layers * kv_heads * model.head_dim * 2
    return int(rounding(free / (context * per_token)))


def _batch_mistake(name: str, hint: str, **counted: Any) -> Mistake:
    return Mistake(name, hint, wrong_reference=lambda model, hw, context, u: _batch_as(model, hw, context, u,
                                                                                       **counted))


def _batch_mistakes(model: Any, hw: Any) -> tuple[Mistake, ...]:
    return (
        Mistake("negative", "when the weights alone do not fit there is no room for any sequence: return 0, not a "
                "negative batch", symptom=lambda out, ref: bool(ref == 0 and out < 0)),
        _batch_mistake("keys only", f"twice the batch: {KV_RULE}", kv_values=1),
        _batch_mistake("query heads", f"this counts all {model.num_heads} query heads; only the "
                       f"{model.num_kv_heads} kv heads are cached (grouped-query attention); {KV_RULE}",
                       kv_heads=model.num_heads),
        _batch_mistake("one layer", f"this counts one layer's keys and values; every layer caches its own; {KV_RULE}",
                       layers=1),
        _batch_mistake("weights left out", f"the weights take their share of the memory first; {KV_RULE}",
                       weight_bytes=0.0),
        _batch_mistake("weights in one byte", f"each bfloat16 weight takes 2 bytes; {KV_RULE}", weight_bytes=1.0),
        _batch_mistake("all of the memory", f"a server uses only memory_utilization of the memory (vLLM's "
                       f"gpu_memory_utilization); {KV_RULE}", usable=hw.hbm_bytes),
        _batch_mistake("rounded up", "a batch of whole sequences that fit: round down (//), not up or to nearest",
                       rounding=math.ceil),
        _batch_mistake("rounded", "a batch of whole sequences that fit: round down (//), not to nearest",
                       rounding=round),
    )


def random_model(rng: np.random.Generator) -> Model:
    """A Llama-like dense shape with grouped-query attention, of 1 to 80 billion parameters."""
    head_dim = int(rng.choice((64, 128)))
    kv_heads = int(rng.choice((2, 4, 8)))
    heads = kv_heads * int(rng.choice((2, 4, 8)))
    hidden, layers = heads * head_dim, int(rng.integers(16, 96))
    params = int(layers * 12 * hidden**2 * rng.uniform(0.8, 1.2) + 2 * 128256 * hidden)  # layers + embeddings
    return Model(f"random Llama-like, {params / 1e9:.3g}B parameters", layers, heads, kv_heads, head_dim, params)


def batch_case(rng: np.random.Generator, fits: bool = True) -> tuple[Model, Gpu, int, float]:
    """A model, a GPU, a context and a memory utilisation: a batch of 40 to 4096 sequences beside weights that take a
    tenth of the memory or more (so that miscounting them moves the batch by more than rounding does), or weights
    too big for the GPU."""
    while True:
        model, hw = random_model(rng), random_gpu(rng)
        context = int(rng.choice((512, 1024, 2048, 4096, 8192, 32768, 131072))) + int(rng.integers(-64, 64))
        utilization = float(rng.choice(UTILIZATIONS))
        usable = hw.hbm_bytes * utilization
        share = model.parameters() * 2 / usable
        if fits and share >= 0.1 and 40 <= max_batch_reference(model, hw, context, utilization) <= 4096:
            return model, hw, context, utilization
        if not fits and share > 1:
            return model, hw, context, utilization


def _require_whole_number(out: Any) -> None:
    __tracebackhide__ = True
    if isinstance(out, float | np.floating) and not float(out).is_integer():
        raise CheckFailed(f"max_batch returned {float(out):.6g}, a fraction: a batch is whole sequences, so round "
                          "down (//) and return an int")


@checks_an_exercise
def check_max_batch(max_batch: Callable[[Any, Any, int, float], int]) -> None:
    """Check ``max_batch(model, hw, context, memory_utilization)``: the most sequences of ``context`` tokens whose
    bfloat16 keys and values fit on one GPU beside the model's bfloat16 weights, as ``cost.memory`` counts it."""
    __tracebackhide__ = True
    with CheckRun("max_batch") as run:
        for case in range(BATCH_CASES):
            model, hw, context, utilization = batch_case(run.rng, fits=case != BATCH_CASES // 2)
            run.case = (f"{model.name}: {model.num_layers} layers, {model.num_kv_heads} kv heads of head_dim "
                        f"{model.head_dim}, on {hw.name}; context {context}, memory_utilization {utilization}")
            out = call_learner(max_batch, model, hw, context, utilization, name="max_batch",
                               expected_signature=BATCH_SIGNATURE)
            _require_whole_number(out)
            expected = max_batch_reference(model, hw, context, utilization)
            assert_close(out, expected, what=f"max_batch(context={context}, memory_utilization={utilization})",
                         rtol=0.0, mistakes=_batch_mistakes(model, hw), inputs=(model, hw, context, utilization))
        run.passed(BATCH_CASES, detail="random models and GPUs, one model too big for its GPU")
