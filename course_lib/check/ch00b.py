"""Checkers for chapter 00b: what the sampler does with a row of logits, and how sure the model was of a token.

Three steps the engine takes after every model step, each checked on random logits (the model file is not
needed): the softmax with a temperature (0 meaning greedy), the nucleus filter of top-p sampling, and the
log-probability of a chosen token. The references are the engine's own functions, which the chapter runs on
SmolLM2: ``sampling_probabilities`` (float64) for the first two, ``log_softmax`` (float32, as vLLM computes
log-probabilities; ``tests/test_check_ch00b.py`` holds it to a float64 log-sum-exp) for the third.

Every run draws fresh logits of several vocabulary sizes (one the size of SmolLM2's) and includes the cases
where the usual mistakes show: logits near 1000, where ``exp`` overflows unless the row's max is subtracted
first; temperature 0; a nucleus of one token; rows of very different scales in one batch; and a token so
unlikely that its probability underflows to 0, whose log-probability must still be finite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from course_lib.check.compare import assert_close
from course_lib.check.exercise import checks_an_exercise
from course_lib.check.failure import CheckFailed
from course_lib.check.learner import call_learner
from course_lib.check.mistakes import Mistake
from course_lib.check.run import CheckRun
from course_lib.engine.logprobs import log_softmax
from course_lib.engine.sampling import SamplingParams, sampling_probabilities

SMOLLM2_VOCAB = 49152  # SmolLM2's vocabulary: one case of each exercise is a row this long
LARGE_LOGIT = 1000.0  # exp(1000) overflows float64 (and exp(89) float32): only differences may reach exp
FLOAT64_RTOL = 1e-9  # a few roundings of float64 arithmetic, however the learner orders it
LOGPROB_RTOL = 1e-5  # the reference is float32, as vLLM's log-probabilities are


def random_logits(rng: np.random.Generator, shape: int | tuple[int, ...], shift: float = 0.0) -> np.ndarray:
    """Logits as a model gives them: float32 values spread like a small model's (std 1.5 to 4), plus ``shift``."""
    spread = float(rng.uniform(1.5, 4.0))
    return (rng.normal(0.0, spread, shape) + shift).astype(np.float32)


def random_vocab(rng: np.random.Generator) -> int:
    return int(rng.integers(50, 3000))


def _not_finite(out: np.ndarray, ref: np.ndarray) -> bool:
    return not np.isfinite(out).all()


def _computed_in_float32(out: np.ndarray, ref: np.ndarray) -> bool:
    return out.dtype == np.float32


# --- temperature_softmax: the distribution the next token is drawn from ------------------------------------------

SOFTMAX_SIGNATURE = "temperature_softmax(logits, temperature)"
SOFTMAX_RULE = "p = exp(z - max(z)) / sum(exp(z - max(z))) with z = logits / temperature"


def temperature_reference(logits: np.ndarray, temperature: float) -> np.ndarray:
    """The engine's distribution for one row at this temperature (no top-k, no top-p): one-hot at 0."""
    return sampling_probabilities(logits, SamplingParams(temperature=temperature))


def _plain_softmax(logits: np.ndarray) -> np.ndarray:
    return temperature_reference(logits, 1.0)


def _softmax_mistakes(temperature: float, large: bool) -> tuple[Mistake, ...]:
    """Known mistakes for one case; each wrong reference takes (logits, temperature)."""
    if temperature == 0:
        not_finite = ("the output is not finite at temperature 0: dividing by 0 gives inf and NaN. Temperature 0 "
                      "means greedy: return 1.0 at the arg-max of the logits and 0 everywhere else")
    elif large:
        not_finite = (f"the output is not finite with logits near {LARGE_LOGIT:g}: exp(logit) overflows. Subtract "
                      f"the largest scaled logit before exp, which changes nothing in exact arithmetic: {SOFTMAX_RULE}")
    else:
        not_finite = f"the output is not finite (NaN or inf); {SOFTMAX_RULE}"
    mistakes = [Mistake("not finite", not_finite, symptom=_not_finite)]
    if temperature == 0:
        mistakes.append(Mistake("greedy as softmax", "temperature 0 means greedy: all the probability goes to the "
                                "arg-max, 1.0 there and 0 everywhere else, not the softmax of the logits",
                                wrong_reference=lambda logits, t: _plain_softmax(logits)))
    else:
        mistakes += [
            Mistake("divided after", "the temperature divides the logits BEFORE the softmax; dividing the "
                    f"probabilities afterwards only rescales them (they no longer sum to 1): {SOFTMAX_RULE}",
                    wrong_reference=lambda logits, t: _plain_softmax(logits) / t),
            Mistake("multiplied", "the logits were multiplied by the temperature; divide them by it, so that a "
                    f"temperature below 1 sharpens the distribution and one above 1 flattens it: {SOFTMAX_RULE}",
                    wrong_reference=lambda logits, t: _plain_softmax(logits.astype(np.float64) * t)),
            Mistake("no temperature", f"the temperature was left out: this is the softmax at temperature 1; "
                    f"{SOFTMAX_RULE}", wrong_reference=lambda logits, t: _plain_softmax(logits)),
            Mistake("not normalised", "the probabilities must sum to 1: divide the exponentials by their sum; "
                    f"{SOFTMAX_RULE}", wrong_reference=lambda logits, t: (
                        temperature_reference(logits, t) / temperature_reference(logits, t).max())),
        ]
    mistakes.append(Mistake("float32", "the result is float32, which is not precise enough here: compute in "
                            "float64, as the engine's sampler does", symptom=_computed_in_float32))
    return tuple(mistakes)


def softmax_cases(rng: np.random.Generator) -> list[tuple[np.ndarray, float, bool]]:
    """(logits, temperature, large): below 1, above 1, greedy, and logits near 1000 over SmolLM2's vocabulary."""
    low, high = round(float(rng.uniform(0.3, 0.9)), 3), round(float(rng.uniform(1.2, 2.5)), 3)
    large_t = round(float(rng.uniform(0.5, 0.9)), 3)  # logits / T > 1000: exp overflows even in float64
    cases = [(random_logits(rng, random_vocab(rng)), low, False), (random_logits(rng, random_vocab(rng)), high, False),
             (random_logits(rng, random_vocab(rng)), 0.0, False),
             (random_logits(rng, SMOLLM2_VOCAB, shift=LARGE_LOGIT), large_t, True)]
    return [(logits.astype(np.float64), t, large) for logits, t, large in cases]


def _require_a_distribution(out: Any, vocab: int, temperature: float) -> None:
    __tracebackhide__ = True
    if temperature == 0 and out is not None and np.ndim(out) == 0:
        raise CheckFailed(f"temperature_softmax(logits, 0) returned {out!r}, a single number: return the "
                          f"distribution, {vocab} probabilities with 1.0 at the arg-max and 0 elsewhere")


@checks_an_exercise
def check_temperature_softmax(temperature_softmax: Callable[[np.ndarray, float], Any]) -> None:
    """Check ``temperature_softmax(logits, temperature)`` -> the float64 distribution over a row of logits.

    ``logits`` is a float64 row; the result must equal the engine's ``sampling_probabilities`` at that temperature
    (no top-k, no top-p) to 1e-9: softmax(logits / temperature), one-hot at the arg-max for temperature 0.
    """
    __tracebackhide__ = True
    with CheckRun("temperature_softmax") as run:
        cases = softmax_cases(run.rng)
        for logits, temperature, large in cases:
            near = f", logits near {LARGE_LOGIT:g}" if large else ""
            run.case = f"{logits.size} logits, temperature {temperature:g}{near}"
            out = call_learner(temperature_softmax, logits.copy(), temperature, name="temperature_softmax",
                               expected_signature=SOFTMAX_SIGNATURE, explain_error=_explain_softmax_error)
            _require_a_distribution(out, logits.size, temperature)
            assert_close(out, temperature_reference(logits, temperature), what="probabilities", rtol=FLOAT64_RTOL,
                         mistakes=_softmax_mistakes(temperature, large), inputs=(logits, temperature))
        run.passed(len(cases), detail=f"temperatures 0 to 2.5, logits near {LARGE_LOGIT:g} included")


def _explain_softmax_error(error: BaseException) -> str | None:
    if isinstance(error, ZeroDivisionError):
        return "temperature 0 means greedy: do not divide by it; return 1.0 at the arg-max and 0 elsewhere"
    return None


# --- top_p_filter: the nucleus of top-p sampling -----------------------------------------------------------------

TOP_P_SIGNATURE = "top_p_filter(probabilities, p)"
NUCLEUS_RULE = ("sort the tokens from most to least likely, keep them up to and including the first at which the "
                "running total reaches p, set the others to 0, and divide the kept ones by their sum")


def top_p_reference(logits: np.ndarray, p: float) -> np.ndarray:
    """The engine's distribution at temperature 1 with nucleus ``p``: the smallest most likely set reaching p."""
    return sampling_probabilities(logits, SamplingParams(temperature=1.0, top_p=p))


def _nucleus_as(probabilities: np.ndarray, p: float, *, order: str = "descending", extra: int = 0,
                divide_by: str = "sum", scatter: bool = True) -> np.ndarray:
    """The filter with one part done the way a known mistake does it; the defaults keep the reference's tokens."""
    ranked = {"descending": np.argsort(-probabilities, kind="stable"),
              "ascending": np.argsort(probabilities, kind="stable"),
              "token order": np.arange(probabilities.size)}[order]
    count = int(np.searchsorted(np.cumsum(probabilities[ranked]), p, side="left")) + 1 + extra
    kept = ranked[: max(0, min(count, probabilities.size))]
    filtered = np.zeros_like(probabilities)
    filtered[kept] = probabilities[kept]
    divisor = {"sum": filtered.sum(), "p": p, "nothing": 1.0}[divide_by]
    filtered = filtered / divisor if divisor else filtered  # an empty set stays all 0 (no NaN warnings)
    return filtered if scatter else filtered[np.argsort(-probabilities, kind="stable")]


def _nucleus_mistake(name: str, hint: str, **done_as: Any) -> Mistake:
    return Mistake(name, hint, wrong_reference=lambda probabilities, p: _nucleus_as(probabilities, p, **done_as))


TOP_P_MISTAKES = (
    Mistake("empty", "no token was kept (the result is NaN or all 0): the nucleus includes the token at which the "
            "running total reaches p, so it always holds at least the likeliest token; keep those whose total "
            f"BEFORE them is below p. {NUCLEUS_RULE}", symptom=lambda out, ref: _not_finite(out, ref) or
            not out.any()),
    _nucleus_mistake("strict", "one token too few: the token whose probability carries the running total to p (or "
                     f"past it) belongs to the nucleus; {NUCLEUS_RULE}", extra=-1),
    _nucleus_mistake("one too many", f"one token too many: stop at the first token at which the running total "
                     f"reaches p; {NUCLEUS_RULE}", extra=1),
    _nucleus_mistake("not renormalised", "the kept probabilities were not renormalised: the result is a "
                     f"distribution, so divide them by their sum; {NUCLEUS_RULE}", divide_by="nothing"),
    _nucleus_mistake("divided by p", "the kept probabilities were divided by p; divide by their own sum (it is at "
                     f"least p, usually more); {NUCLEUS_RULE}", divide_by="p"),
    _nucleus_mistake("ascending", "these are the LEAST likely tokens: sort from the most likely down, e.g. "
                     f"np.argsort(-probabilities); {NUCLEUS_RULE}", order="ascending"),
    _nucleus_mistake("unsorted", "the running total was taken in token-id order; the nucleus is the most likely "
                     f"tokens, so sort first; {NUCLEUS_RULE}", order="token order"),
    _nucleus_mistake("sorted result", "the result is in sorted order: put each kept probability back at its "
                     "token's id (the position it had in the input), zeros elsewhere", scatter=False),
)


def top_p_case(rng: np.random.Generator, vocab: int, kept: int | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """(logits, probabilities, p): p falls well inside the probability of the last kept token, never at a boundary,
    so that the set is the same however the running total is rounded. ``kept=1``: p is below the top probability."""
    while True:
        logits = random_logits(rng, vocab).astype(np.float64)
        probabilities = temperature_reference(logits, 1.0)
        cumulative = np.cumsum(np.sort(probabilities)[::-1])
        count = kept or int(np.searchsorted(cumulative, rng.uniform(0.3, 0.95))) + 1
        below = cumulative[count - 2] if count > 1 else 0.0
        if (count == 1) if kept == 1 else (3 <= count < vocab - 1):
            p = below + rng.uniform(0.25, 0.75) * (cumulative[count - 1] - below)
            if 0.01 < p < 0.99 and cumulative[count - 1] - below > 1e-6:
                return logits, probabilities, float(p)


def top_p_cases(rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Two nuclei of several tokens, one of a single token, and one over SmolLM2's vocabulary."""
    return [top_p_case(rng, random_vocab(rng)), top_p_case(rng, random_vocab(rng)),
            top_p_case(rng, random_vocab(rng), kept=1), top_p_case(rng, SMOLLM2_VOCAB)]


@checks_an_exercise
def check_top_p_filter(top_p_filter: Callable[[np.ndarray, float], Any]) -> None:
    """Check ``top_p_filter(probabilities, p)`` -> the renormalised nucleus, zeros outside it, in token-id order.

    ``probabilities`` is a float64 distribution over a random vocabulary, ``p`` in (0, 1), never at a boundary
    between two nuclei; the result must equal the engine's ``sampling_probabilities`` with ``top_p=p`` to 1e-9.
    """
    __tracebackhide__ = True
    with CheckRun("top_p_filter") as run:
        cases = top_p_cases(run.rng)
        for logits, probabilities, p in cases:
            reference = top_p_reference(logits, p)
            run.case = f"{probabilities.size} tokens, p = {p:.6g}: the nucleus holds {np.count_nonzero(reference)}"
            out = call_learner(top_p_filter, probabilities.copy(), p, name="top_p_filter",
                               expected_signature=TOP_P_SIGNATURE)
            assert_close(out, reference, what="filtered", rtol=FLOAT64_RTOL, mistakes=TOP_P_MISTAKES,
                         inputs=(probabilities, p))
        run.passed(len(cases), detail="a nucleus of one token included")


# --- token_logprobs: how sure the model was of each token ------------------------------------------------------------

LOGPROBS_SIGNATURE = "token_logprobs(logits, tokens)"
LOG_SOFTMAX_RULE = ("log p = z - m - log(sum(exp(z - m))) over each row, m the row's own max "
                    "(logits.max(axis=-1, keepdims=True)), then pick tokens[i] from row i")


def token_logprobs_reference(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """The engine's log-probability of ``tokens[i]`` under row i of ``logits`` (float32, as vLLM's)."""
    return log_softmax(logits)[np.arange(len(tokens)), tokens]


def _log_sum(logits: np.ndarray) -> np.ndarray:
    """Each row's log(sum(exp(z - m))), in float64."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return np.log(np.exp(shifted).sum(axis=-1))


def _picked(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    return logits.astype(np.float64)[np.arange(len(tokens)), tokens]


def _batch_sum(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Each row shifted by its max, but one sum over the whole batch."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted[np.arange(len(tokens)), tokens] - np.log(np.exp(shifted).sum())


def _logprob_mistakes(kind: str) -> tuple[Mistake, ...]:
    not_finite = {
        "large": f"a log-probability is not finite with logits near {LARGE_LOGIT:g}: exp(logit) overflows. Subtract "
                 f"each row's max before exp; {LOG_SOFTMAX_RULE}",
        "scales": "a log-probability is not finite in a row whose logits are far below another row's: subtract each "
                  "row's OWN max, not the largest logit of the whole batch (exp(z - that) underflows to 0, and "
                  f"log(0) is -inf); {LOG_SOFTMAX_RULE}",
        "unlikely": "a log-probability is -inf (or NaN) for a token the model all but ruled out: its probability "
                    "underflows to 0, so log(softmax) gives log(0). Work in log space instead of taking the log of "
                    f"the probabilities: {LOG_SOFTMAX_RULE}",
    }.get(kind, f"a log-probability is not finite (NaN or inf); {LOG_SOFTMAX_RULE}")
    return (
        Mistake("not finite", not_finite, symptom=_not_finite),
        Mistake("probabilities", "these are probabilities; the exercise asks for their natural log, "
                f"{LOG_SOFTMAX_RULE}", wrong_reference=lambda logits, tokens: np.exp(
                    token_logprobs_reference(logits, tokens).astype(np.float64))),
        Mistake("no log-sum", "this is only the logit minus the row's max; subtract log(sum(exp(z - m))) too, so "
                f"that the probabilities sum to 1: {LOG_SOFTMAX_RULE}", wrong_reference=lambda logits, tokens: (
                    _picked(logits, tokens) - logits.max(axis=-1))),
        Mistake("max not subtracted", "the max was taken out inside the log-sum but not from the logit itself: "
                f"log p = z - m - log(sum(exp(z - m))); {LOG_SOFTMAX_RULE}",
                wrong_reference=lambda logits, tokens: _picked(logits, tokens) - _log_sum(logits)),
        Mistake("likeliest token", "this is the log-probability of each row's likeliest token; the exercise asks "
                f"for tokens[i], the one chosen: {LOG_SOFTMAX_RULE}",
                wrong_reference=lambda logits, tokens: -_log_sum(logits)),
        Mistake("batch sum", "the exponentials were summed over the whole batch: sum each row on its own "
                f"(axis=-1); {LOG_SOFTMAX_RULE}", wrong_reference=_batch_sum),
    )


def logprob_case(rng: np.random.Generator, kind: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(logits [rows, vocab] float32, tokens [rows], description) of one kind: plain, large, scales or unlikely."""
    rows, vocab = int(rng.integers(3, 9)), random_vocab(rng) if kind != "large" else SMOLLM2_VOCAB
    shifts = np.zeros(rows)
    if kind == "large":
        shifts = LARGE_LOGIT + rng.uniform(-5.0, 5.0, rows)
    elif kind == "scales":
        shifts = rng.permutation(np.resize([0.0, LARGE_LOGIT, -LARGE_LOGIT / 2, LARGE_LOGIT / 3], rows))
    logits = random_logits(rng, (rows, vocab)) + shifts[:, None].astype(np.float32)
    tokens = rng.integers(0, vocab, rows)
    tokens[0] = int(np.argmax(logits[0]))  # row 0's token is its likeliest; the others are drawn at random
    description = {"plain": "", "large": f", logits near {LARGE_LOGIT:g}",
                   "scales": f", rows shifted by {', '.join(f'{s:g}' for s in shifts)}",
                   "unlikely": ", one chosen token 800 below its row's max"}[kind]
    if kind == "unlikely":
        row = int(rng.integers(1, rows))
        logits[row, tokens[row]] = logits[row].max() - np.float32(800.0)
        description = f", row {row}'s token 800 below its row's max"
    return logits, tokens.astype(np.int64), f"{rows} rows of {vocab} logits{description}"


LOGPROB_KINDS = ("plain", "large", "scales", "unlikely")


def _require_one_per_row(out: Any, logits: np.ndarray) -> None:
    __tracebackhide__ = True
    rows, vocab = logits.shape
    shape = np.shape(out) if out is not None else None
    if shape == (rows, rows) and rows != vocab:
        raise CheckFailed(f"token_logprobs returned shape {shape}, expected ({rows},): logits[:, tokens] picks every "
                          "token in every row; take one per row, logits[np.arange(len(tokens)), tokens]")
    if shape == (rows, vocab):
        raise CheckFailed(f"token_logprobs returned shape {shape}, the log-probabilities of every token: return one "
                          f"per row, that of tokens[i] in row i, shape ({rows},)")


def _explain_logprobs_error(error: BaseException) -> str | None:
    if isinstance(error, IndexError):
        return ("tokens[i] is a column of row i: index the rows with np.arange(len(tokens)) and the columns with "
                "tokens, logits[np.arange(len(tokens)), tokens]")
    return None


@checks_an_exercise
def check_token_logprobs(token_logprobs: Callable[[np.ndarray, np.ndarray], Any]) -> None:
    """Check ``token_logprobs(logits, tokens)`` -> ``[rows]``: the log-probability of ``tokens[i]`` under row i.

    ``logits`` is float32 ``[rows, vocab]``, ``tokens`` int64 ``[rows]``; the result is compared with the engine's
    ``log_softmax`` (relative 1e-5, float32 or float64 results alike), on plain rows, rows near 1000, rows of
    very different scales in one batch, and a token whose probability underflows to 0.
    """
    __tracebackhide__ = True
    with CheckRun("token_logprobs") as run:
        for kind in LOGPROB_KINDS:
            logits, tokens, run.case = logprob_case(run.rng, kind)
            out = call_learner(token_logprobs, logits.copy(), tokens.copy(), name="token_logprobs",
                               expected_signature=LOGPROBS_SIGNATURE, explain_error=_explain_logprobs_error)
            _require_one_per_row(out, logits)
            assert_close(out, token_logprobs_reference(logits, tokens), what="logprobs", rtol=LOGPROB_RTOL,
                         mistakes=_logprob_mistakes(kind), inputs=(logits, tokens))
        run.passed(len(LOGPROB_KINDS), detail=f"logits near {LARGE_LOGIT:g}, mixed scales and a token 800 below "
                   "its row's max included")

