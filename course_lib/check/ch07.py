"""Checkers for chapter 07: predict a decode step from a model's shape, and choose a layout for a TPOT target.

Each case is built so that its classic mistake shows. The decode steps alternate between memory-bound and
compute-bound, each at least a factor 2.5 from the ridge point, every batch holds three sequences or more, and in the
memory-bound steps the KV cache is about a fifth to four fifths of the bytes: forgetting it, reading the weights once
per sequence, counting a multiply-add as one FLOP, or adding the two times each changes the answer in one of
them. The candidate sets of the layout exercise are shuffled, and their targets fall between two candidates, on
one exactly, or below them all: ignoring the target, picking the fastest per user, and a strict ``<`` each
pick another candidate than the right one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from course_lib.check.compare import assert_close
from course_lib.check.exercise import checks_an_exercise
from course_lib.check.failure import CheckFailed
from course_lib.check.learner import call_learner
from course_lib.check.mistakes import Mistake, hint_for
from course_lib.check.run import CheckRun

# --- decode_step_seconds: the roofline of one decode step ------------------------------------------------------

DECODE_ARGUMENTS = ("params", "layers", "kv_heads", "head_dim", "batch", "context", "bytes_per_value",
                    "hbm_bytes_per_s", "flops_per_s")
DECODE_SIGNATURE = f"decode_step_seconds({', '.join(DECODE_ARGUMENTS)})"
DECODE_CASES = 12
DECODE_RTOL = 1e-6  # float64 arithmetic in any order lands within 1e-15; the mildest mistake moves it 1e-4
HIDDEN_SIZES = (2048, 3072, 4096, 5120, 8192, 12288, 16384)
MAX_CONTEXT = 131_072


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, batch: int, context: int,
                   bytes_per_value: float) -> float:
    """The keys and values a decode step reads: every sequence its own ``context`` tokens, K and V, every layer."""
    return float(batch) * context * layers * 2 * kv_heads * head_dim * bytes_per_value


def decode_step_reference(params: int, layers: int, kv_heads: int, head_dim: int, batch: int, context: int,
                          bytes_per_value: float, hbm_bytes_per_s: float, flops_per_s: float) -> float:
    """The roofline of one decode step, in float64: max(bytes / bandwidth, FLOPs / rate).

    The weights are read once a step, shared by the whole batch; each sequence reads its own keys and values;
    each of the batch's tokens multiplies every weight once, a multiply-add being 2 FLOPs.
    """
    return _decode_as_counted(params, layers, kv_heads, head_dim, batch, context, bytes_per_value,
                              hbm_bytes_per_s, flops_per_s)


def _decode_as_counted(params: int, layers: int, kv_heads: int, head_dim: int, batch: int, context: int,
                       bytes_per_value: float, hbm_bytes_per_s: float, flops_per_s: float, *,
                       weight_reads: int = 1, kv_values: int = 2, kv_sequences: int | None = None,
                       flops_per_weight: int = 2, flop_tokens: int | None = None,
                       combine: Callable[[float, float], float] = max) -> float:
    """The step time with one part counted the way a known mistake counts it; the defaults are the reference."""
    kv_sequences = batch if kv_sequences is None else kv_sequences
    flop_tokens = batch if flop_tokens is None else flop_tokens
    weight_bytes = float(params) * bytes_per_value * weight_reads
    kv_bytes = kv_cache_bytes(layers, kv_heads, head_dim, kv_sequences, context, bytes_per_value) * kv_values / 2
    flops = float(flops_per_weight) * params * flop_tokens
    return combine((weight_bytes + kv_bytes) / hbm_bytes_per_s, flops / flops_per_s)


def _wrong_decode(**counted: Any) -> Callable[..., float]:
    return lambda *args: _decode_as_counted(*args, **counted)


def _times_1000(out: np.ndarray, ref: np.ndarray) -> bool:
    return bool(np.isclose(out, ref * 1e3, rtol=1e-6, atol=0) or np.isclose(out, ref * 1e-3, rtol=1e-6, atol=0))


DECODE_MISTAKES = (
    Mistake(
        "no KV cache",
        "this counts the weights' bytes alone: every sequence also reads its own keys and values each step, "
        "batch * context * layers * 2 * kv_heads * head_dim * bytes_per_value bytes",
        wrong_reference=_wrong_decode(kv_values=0),
    ),
    Mistake(
        "keys only",
        "the KV cache holds keys AND values: a token takes 2 * kv_heads * head_dim values in each layer",
        wrong_reference=_wrong_decode(kv_values=1),
    ),
    Mistake(
        "one sequence's KV",
        "this reads one sequence's keys and values: each of the batch's sequences reads its own, so multiply by batch",
        wrong_reference=_wrong_decode(kv_sequences=1),
    ),
    Mistake(
        "weights per sequence",
        "this reads the weights once per sequence: a step reads them once and the whole batch shares them, "
        "params * bytes_per_value bytes whatever the batch (that is why batching is nearly free until the ridge)",
        wrong_reference=lambda *args: _decode_as_counted(*args, weight_reads=args[4]),  # args[4]: batch
    ),
    Mistake(
        "one FLOP per multiply-add",
        "this counts 1 FLOP per weight per token: a multiply-add is 2 FLOPs, so a step does 2 * params * batch",
        wrong_reference=_wrong_decode(flops_per_weight=1),
    ),
    Mistake(
        "FLOPs of one token",
        "this counts the FLOPs of one token: each of the batch's tokens multiplies every weight, 2 * params * batch",
        wrong_reference=_wrong_decode(flop_tokens=1),
    ),
    Mistake(
        "sum",
        "this is memory time + compute time; the GPU overlaps the two, so the step takes the larger one: max(...)",
        wrong_reference=_wrong_decode(combine=lambda memory, compute: memory + compute),
    ),
    Mistake(
        "min",
        "this is the smaller of the two times; a step is done only when its bytes AND its FLOPs are: max(...)",
        wrong_reference=_wrong_decode(combine=min),
    ),
    Mistake(
        "milliseconds",
        "off by a factor of 1000: return seconds, as the rates are per second",
        symptom=_times_1000,
    ),
)


def _rounded(value: float, digits: int = 4) -> float:
    """``value`` to a few significant digits, so the numbers in a message are the exact inputs."""
    return float(f"{value:.{digits}g}")


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return _rounded(10 ** rng.uniform(math.log10(low), math.log10(high)))


def _step_times(args: tuple) -> tuple[float, float, float]:
    """(memory seconds, compute seconds, the KV cache's share of the bytes) of a case, as the reference counts."""
    params, layers, kv_heads, head_dim, batch, context, value_bytes, bandwidth, rate = args
    kv = kv_cache_bytes(layers, kv_heads, head_dim, batch, context, value_bytes)
    moved = params * value_bytes + kv
    return moved / bandwidth, 2.0 * params * batch / rate, kv / moved


def _clearly(args: tuple, memory_bound: bool) -> bool:
    """A case the mistakes can tell apart: a factor 2.5 from the ridge, and a KV share that matters when it may."""
    memory_s, compute_s, kv_share = _step_times(args)
    context = args[5]
    if memory_bound:
        return compute_s * 2.5 <= memory_s and 0.15 <= kv_share <= 0.85 and 64 <= context <= MAX_CONTEXT
    return compute_s >= 2.5 * memory_s and kv_share >= 0.02 and 1 <= context <= MAX_CONTEXT


def decode_case(rng: np.random.Generator, memory_bound: bool) -> tuple:
    """The arguments of one decode step of a Llama-like model on a GPU of datasheet-like figures.

    Memory-bound: a batch below an eighth of the ridge, the KV cache 20-80 % of the bytes. Compute-bound: a
    batch 2 to 6 times past the ridge, a short context.
    """
    while True:
        hidden, layers = int(rng.choice(HIDDEN_SIZES)), int(rng.integers(16, 127))
        params = int(_rounded(12 * layers * hidden**2 * rng.uniform(0.9, 1.4)))  # attention + MLP, Llama-shaped
        kv_heads, head_dim = int(rng.choice((1, 2, 4, 8))), int(rng.choice((64, 128)))
        value_bytes = int(rng.choice((1, 2)))  # fp8 or bf16
        bandwidth, rate = _log_uniform(rng, 1.5e12, 8e12), _log_uniform(rng, 3e14, 5e15)
        ridge_batch = rate / bandwidth * value_bytes  # the batch at which the weights' FLOPs and bytes take as long
        weight_bytes, kv_per_token = params * value_bytes, 2 * layers * kv_heads * head_dim * value_bytes
        if memory_bound:
            batch = int(rng.integers(3, max(4, ridge_batch / 8)))  # 2 would halve the KV like "keys only"
            share = rng.uniform(0.2, 0.8)
            kv_bytes = weight_bytes * share / (1 - share)
        else:
            distance = rng.uniform(2, 6)
            batch = math.ceil(distance * ridge_batch)
            kv_bytes = weight_bytes * rng.uniform(0.05, 0.5 * (distance - 1))
        context = max(1, round(kv_bytes / (batch * kv_per_token)))
        args = (params, layers, kv_heads, head_dim, batch, context, value_bytes, bandwidth, rate)
        if _clearly(args, memory_bound):
            return args


def _call_text(name: str, names: Sequence[str], args: Sequence[Any]) -> str:
    """'decode_step_seconds(params=8.03e+09, layers=32, ...)': the call, with its exact inputs."""
    return f"{name}({', '.join(f'{key}={value:g}' for key, value in zip(names, args, strict=True))})"


@checks_an_exercise
def check_decode_step_seconds(decode_step_seconds: Callable[..., float]) -> None:
    """Check ``decode_step_seconds(params, layers, kv_heads, head_dim, batch, context, bytes_per_value,
    hbm_bytes_per_s, flops_per_s)``: the roofline of one decode step, within a relative 1e-6.

    Cases alternate between memory-bound and compute-bound steps.
    """
    __tracebackhide__ = True
    with CheckRun("decode_step_seconds") as run:
        for case in range(DECODE_CASES):
            memory_bound = case % 2 == 0
            args = decode_case(run.rng, memory_bound)
            memory_s, compute_s, kv_share = _step_times(args)
            bound = "memory" if memory_bound else "compute"
            run.case = (f"a {bound}-bound step: memory {memory_s * 1e3:.4g} ms, compute {compute_s * 1e3:.4g} ms, "
                        f"KV cache {kv_share:.0%} of the bytes")
            out = call_learner(decode_step_seconds, *args, name="decode_step_seconds",
                               expected_signature=DECODE_SIGNATURE)
            assert_close(out, decode_step_reference(*args), what=_call_text("decode_step_seconds", DECODE_ARGUMENTS,
                                                                            args),
                         rtol=DECODE_RTOL, mistakes=DECODE_MISTAKES, inputs=args)
        run.passed(DECODE_CASES, detail="memory-bound and compute-bound")


# --- best_layout: the most throughput per GPU that meets a TPOT target --------------------------------------------

LAYOUT_SIGNATURE = "best_layout(candidates, tpot_target_s)"
LAYOUT_CASE_KINDS = ("between", "edge", "between", "none", "edge", "between", "edge", "between", "none", "between")
LAYOUT_GPUS = 16
LAYOUT_SPLITS = ((1, 1), (2, 1), (4, 1), (8, 1), (1, 2), (2, 2), (4, 2), (8, 2), (2, 4), (4, 4))  # (tp, pp)
TARGET_HINT = "keep only the candidates with tpot_s <= tpot_target_s, then take the most tokens_per_s_per_gpu"


@dataclass(frozen=True)
class Candidate:
    """One predicted way to serve: a layout, a batch per replica, its TPOT and its output tokens/s per GPU.

    It has the attributes of a ``course_lib.scaling.cost.Prediction`` that the exercise uses, so the learner's
    function takes a planner's predictions too.
    """

    layout: str
    batch: int
    tpot_s: float
    tokens_per_s_per_gpu: float

    @property
    def tokens_per_s_per_user(self) -> float:
        return 1 / self.tpot_s

    def describe(self) -> str:
        return (f"{self.layout} batch {self.batch} (TPOT {self.tpot_s * 1e3:.4g} ms, "
                f"{self.tokens_per_s_per_gpu:,.0f} tokens/s per GPU)")


def best_layout_reference(candidates: Sequence[Any], tpot_target_s: float) -> Any:
    """The candidate with the most tokens/s per GPU among those whose TPOT is at most the target; None if none is."""
    meeting = [c for c in candidates if c.tpot_s <= tpot_target_s]
    return max(meeting, key=lambda c: c.tokens_per_s_per_gpu, default=None)


def _fastest(candidates: Sequence[Candidate], _target: float) -> Candidate:
    return min(candidates, key=lambda c: c.tpot_s)


def _first_meeting(candidates: Sequence[Candidate], target: float) -> Candidate | None:
    return next((c for c in candidates if c.tpot_s <= target), None)


LAYOUT_MISTAKES = (
    (f"the answer misses the target: its TPOT is above tpot_target_s; {TARGET_HINT}",
     lambda candidates, target: max(candidates, key=lambda c: c.tokens_per_s_per_gpu)),
    ("this is the candidate fastest per user (lowest TPOT): meeting the target is enough for the user; among those "
     "that meet it, the operator wants the most tokens/s per GPU",
     _fastest),
    ("a candidate whose TPOT equals the target meets it: the target is a ceiling, so compare with <=, not <",
     lambda candidates, target: best_layout_reference([c for c in candidates if c.tpot_s < target], target)),
    ("this is the candidate with the fewest tokens/s per GPU among those meeting the target: take the most (max)",
     lambda candidates, target: min((c for c in candidates if c.tpot_s <= target),
                                    key=lambda c: c.tokens_per_s_per_gpu, default=None)),
    ("this is the first candidate that meets the target: the list is in no particular order, so compare the "
     "throughput of every candidate that meets it",
     _first_meeting),
)


def _position(choice: Any, candidates: Sequence[Candidate]) -> int:
    """Where ``choice`` is in ``candidates``; -1 for None."""
    return -1 if choice is None else next(i for i, c in enumerate(candidates) if c == choice)


def _as_mistakes(candidates: Sequence[Candidate]) -> tuple[Mistake, ...]:
    """The known wrong choices as Mistakes on positions in the list (-1: None), compared exactly."""
    return tuple(Mistake(f"mistake {i}", hint, wrong_reference=lambda t, choose=choose: _position(
        choose(candidates, t), candidates)) for i, (hint, choose) in enumerate(LAYOUT_MISTAKES))


def layout_candidates(rng: np.random.Generator) -> list[Candidate]:
    """A few layouts of 16 GPUs, each at batches 1, 2, 4, ...: wider TP is faster per user, a bigger batch gives
    more throughput per GPU and a longer step (it grows past a batch of ``knee``). Shuffled, with no two TPOTs or
    throughputs alike."""
    while True:
        candidates, one_gpu_s, knee = [], rng.uniform(0.02, 0.06), rng.uniform(32, 128)
        for index in rng.choice(len(LAYOUT_SPLITS), size=int(rng.integers(3, 6)), replace=False):
            tp, pp = LAYOUT_SPLITS[index]
            label = f"TP{tp} PP{pp} DP{LAYOUT_GPUS // (tp * pp)}"
            # batch 1: the weights over tp GPUs' bandwidth, less than tp times faster; each stage boundary costs
            base_s = one_gpu_s / tp**0.85 * (1 + 0.05 * (pp - 1)) * rng.uniform(0.95, 1.1)
            for batch in 2 ** np.arange(int(rng.integers(3, 9))):
                tpot = _rounded(base_s * (1 + batch / knee))
                candidates.append(Candidate(label, int(batch), tpot, _rounded(batch / tpot / (tp * pp))))
        tpots, rates = [c.tpot_s for c in candidates], [c.tokens_per_s_per_gpu for c in candidates]
        if len(set(tpots)) == len(tpots) and len(set(rates)) == len(rates) and len(_records(candidates)) >= 4:
            return [candidates[i] for i in rng.permutation(len(candidates))]


def _records(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The best answers a target can have: by TPOT, each candidate with more throughput than all faster ones."""
    records, best = [], -math.inf
    for c in sorted(candidates, key=lambda c: c.tpot_s):
        if c.tokens_per_s_per_gpu > best:
            records.append(c)
            best = c.tokens_per_s_per_gpu
    return records


def layout_target(rng: np.random.Generator, candidates: Sequence[Candidate], kind: str) -> float:
    """A target 'between' two candidates, on one exactly ('edge'), or below them all ('none').

    The answer is never the fastest candidate nor the one of most throughput overall (that one misses the
    target), and at an edge the candidate just faster than the answer is no record either.
    """
    records = _records(candidates)
    if kind == "none":
        return _rounded(records[0].tpot_s * rng.uniform(0.5, 0.95))
    if kind == "edge":
        return records[int(rng.integers(2, len(records) - 1))].tpot_s
    answer = records[int(rng.integers(1, len(records) - 1))]
    slower = min(c.tpot_s for c in candidates if c.tpot_s > answer.tpot_s)
    return _rounded(answer.tpot_s + (slower - answer.tpot_s) * rng.uniform(0.2, 0.8), 6)


def _explain_layout_error(error: BaseException) -> str | None:
    if isinstance(error, ValueError) and "empty" in str(error):
        return "when no candidate meets the target there is nothing to take the max of: return None (max(..., " \
               "default=None) does it)"
    if isinstance(error, AttributeError):
        return "each candidate has the attributes layout, batch, tpot_s and tokens_per_s_per_gpu"
    return None


def _require_candidate(out: Any, candidates: Sequence[Candidate]) -> None:
    """The answer must be one of the candidates itself, or None."""
    __tracebackhide__ = True
    if out is None or any(out == c for c in candidates):
        return
    if isinstance(out, (int, np.integer)) and not isinstance(out, bool):
        raise CheckFailed(f"best_layout returned {out}, a number: return the candidate itself (candidates[i]), "
                          "not its position")
    if isinstance(out, str):
        raise CheckFailed(f"best_layout returned {out!r}, a string: return the candidate itself, not its layout")
    raise CheckFailed(f"best_layout returned {out!r:.80} (a {type(out).__name__}): return one of the candidates "
                      "itself, or None when none meets the target")


def _compare_choice(out: Any, candidates: Sequence[Candidate], target: float) -> None:
    """Raise CheckFailed, naming both candidates and the likely mistake, unless ``out`` is the reference's choice."""
    __tracebackhide__ = True
    expected = best_layout_reference(candidates, target)
    if out == expected:
        return
    meeting = sum(c.tpot_s <= target for c in candidates)
    call = f"best_layout(candidates, tpot_target_s={target!r})"
    if expected is None:
        message = f"{call} returned {out.describe()}, expected None: no candidate meets the target"
    elif out is None:
        message = (f"{call} returned None, but {meeting} of the {len(candidates)} candidates meet the target; expected "
                   f"{expected.describe()} (did you forget to `return` it?)")
    else:
        message = f"{call} returned {out.describe()}, expected {expected.describe()}"
    hint = hint_for(np.asarray(_position(out, candidates)), np.asarray(_position(expected, candidates)),
                    _as_mistakes(candidates), (target,), 0.0)
    raise CheckFailed(f"{message}\nHint: {hint}" if hint else message)


@checks_an_exercise
def check_best_layout(best_layout: Callable[[list[Any], float], Any]) -> None:
    """Check ``best_layout(candidates, tpot_target_s)``: of the candidates with ``tpot_s <= tpot_target_s``, the
    one with the most ``tokens_per_s_per_gpu``; None when none meets the target.

    Targets fall between two candidates, exactly on one, or below them all.
    """
    __tracebackhide__ = True
    with CheckRun("best_layout") as run:
        for kind in LAYOUT_CASE_KINDS:
            candidates = layout_candidates(run.rng)
            target = layout_target(run.rng, candidates, kind)
            where = {"between": "between two candidates' TPOTs", "edge": "exactly one candidate's TPOT",
                     "none": "below every candidate's TPOT"}[kind]
            run.case = f"{len(candidates)} candidates, tpot_target_s = {target!r}, {where}"
            out = call_learner(best_layout, list(candidates), target, name="best_layout",
                               expected_signature=LAYOUT_SIGNATURE, explain_error=_explain_layout_error)
            _require_candidate(out, candidates)
            _compare_choice(out, candidates, target)
        run.passed(len(LAYOUT_CASE_KINDS), detail="targets between candidates, on one, and below all")
