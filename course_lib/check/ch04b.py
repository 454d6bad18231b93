"""Checkers for chapter 04b: the online-softmax update of one key tile, and the causal mask of a diagonal tile.

Both are the inner steps of a tiled prefill (``kernels.paged_prefill_reference``), checked on a tile of query rows.
The update is fed the reference's running state before each tile, so a wrong step shows at that step: the first
tile (``running_max = -inf``), tiles whose logits drift upwards (the max grows and the rescale matters), a tile
whose max does not grow, masked keys (``-inf`` logits), and logits near 1000, where ``exp`` overflows float64
unless the max is subtracted first. The mask cases put a prefix before the chunk, so query positions never start
at 0, and give the keys after each query the largest logits, so a max taken before the mask is wrong. References
are float64: ``online_softmax_step`` and ``causal_mask`` of the model, which the tests hold to the full softmax.
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
from course_lib.kernels.paged_prefill_reference import causal_mask, online_softmax_step

LARGE_LOGIT = 1000.0  # exp(1000) overflows float64: only differences to the max may reach exp
FLOAT64_RTOL = 1e-10  # a few roundings, however the learner orders the sums
UPDATE_RULE = ("new_max = max(running_max, the tile's row max); alpha = exp(running_max - new_max); "
               "new_sum = alpha * running_sum + sum(exp(logits - new_max)); new_acc = alpha * acc + "
               "exp(logits - new_max) @ values")

# --- online_softmax_update: one key tile folded into the running state -------------------------------------------

UPDATE_SIGNATURE = "online_softmax_update(running_max, running_sum, acc, logits, values)"
UpdateState = tuple[np.ndarray, np.ndarray, np.ndarray]


def update_as_computed(running_max: np.ndarray, running_sum: np.ndarray, acc: np.ndarray, logits: np.ndarray,
                       values: np.ndarray, *, rescale_sum: bool = True, rescale_acc: bool = True,
                       inverted: bool = False) -> UpdateState:
    """The update with a rescale dropped or inverted (``exp(new_max - old_max)``), as a known mistake computes it."""
    new_max = np.maximum(running_max, logits.max(axis=1))
    weights = np.exp(logits - new_max[:, None])
    alpha = np.exp(new_max - running_max) if inverted else np.exp(running_max - new_max)
    alpha = np.where(np.isfinite(alpha), alpha, 0.0)  # the first tile, where running_max is -inf
    new_sum = (alpha if rescale_sum else 1.0) * running_sum + weights.sum(axis=1)
    new_acc = (alpha[:, None] if rescale_acc else 1.0) * acc + weights @ values
    return new_max, new_sum, new_acc


def _update_mistakes(part: int) -> tuple[Mistake, ...]:
    """Mistakes that show in output ``part`` (0: new_max, 1: new_sum, 2: new_acc); each takes the case's inputs."""
    def wrong(**how: bool) -> Callable[..., np.ndarray]:
        return lambda *inputs: update_as_computed(*inputs, **how)[part]

    not_finite = Mistake("not finite", f"the result is not finite: with logits near {LARGE_LOGIT:g}, exp(logit) "
                         "overflows. Take the new max first and exponentiate only logit - new_max (at most 0); "
                         f"{UPDATE_RULE}", symptom=lambda out, ref: not np.isfinite(out).all())
    mistakes = {
        0: (),
        1: (Mistake("sum not rescaled", "the running sum was not rescaled when the max grew: its terms are "
                    "exp(logit - running_max) and must be multiplied by exp(running_max - new_max) before the tile's "
                    f"weights are added; {UPDATE_RULE}", wrong_reference=wrong(rescale_sum=False)),),
        2: (Mistake("accumulator not rescaled", "the accumulator was not rescaled with the new max: what it summed "
                    "against the old max must be multiplied by exp(running_max - new_max), as the running sum is; "
                    f"{UPDATE_RULE}", wrong_reference=wrong(rescale_acc=False)),),
    }[part]
    inverted = Mistake("rescale inverted", "the rescale factor is exp(running_max - new_max), at most 1 (the old "
                       "terms shrink against a larger max), not exp(new_max - running_max)",
                       wrong_reference=wrong(inverted=True))
    return (not_finite, *mistakes, *((inverted,) if part else ()))


def update_case(rng: np.random.Generator, shift: float = 0.0) -> tuple[list[np.ndarray], np.ndarray, int, int]:
    """Logits ``[rows, keys]`` that drift upwards (the max grows tile after tile), a few masked (-inf), and values.

    Returns the key tiles' logits, the values ``[keys, head_dim]``, the tile size and the number of tiles. No row
    is masked whole: each keeps its first key.
    """
    rows, head_dim, tile = int(rng.integers(3, 9)), int(rng.integers(2, 7)), int(rng.choice((4, 8, 16)))
    tiles = int(rng.integers(3, 6))
    keys = tile * tiles
    logits = rng.normal(0.0, 1.0, (rows, keys)) + np.linspace(0.0, 3.0 * tiles, keys) * rng.uniform(0.5, 1.0, (rows, 1))
    logits[:, keys - tile:] -= 6.0 * tiles  # the last tile's max does not grow: alpha is 1
    logits[rng.random((rows, keys)) < 0.1] = -np.inf  # masked keys weigh exp(-inf) = 0
    logits[:, 0] = rng.normal(0.0, 1.0, rows)
    for start in range(tile, keys - tile, tile):  # each middle tile raises every row's max: the rescale matters
        raised = logits[:, :start].max(axis=1) + rng.uniform(0.5, 1.5, rows)
        logits[np.arange(rows), start + rng.integers(0, tile, rows)] = raised
    values = rng.normal(0.0, 1.0, (keys, head_dim))
    return list(np.split(logits + shift, tiles, axis=1)), values, tile, tiles


def _require_three_arrays(result: Any, rows: int, head_dim: int) -> tuple[Any, Any, Any]:
    __tracebackhide__ = True
    if not isinstance(result, (tuple, list)) or len(result) != 3:
        raise CheckFailed(f"online_softmax_update returned {type(result).__name__} {result!r:.60}: return the three "
                          f"new values, (new_max [{rows}], new_sum [{rows}], new_acc [{rows}, {head_dim}])")
    return result[0], result[1], result[2]


@checks_an_exercise
def check_online_softmax_update(update: Callable[..., Any]) -> None:
    """Check ``online_softmax_update(running_max, running_sum, acc, logits, values)`` -> (new_max, new_sum, new_acc).

    ``running_max`` and ``running_sum`` are ``[rows]``, ``acc`` ``[rows, head_dim]``, ``logits`` the tile's
    ``[rows, tile]`` (``-inf`` where masked), ``values`` ``[tile, head_dim]``, all float64. Every tile of each case is
    given the reference's state before it; the three results are compared in float64.
    """
    __tracebackhide__ = True
    with CheckRun("online_softmax_update") as run:
        shifts = (0.0, 0.0, LARGE_LOGIT)
        calls = 0
        for shift in shifts:
            tiles, values, tile, count = update_case(run.rng, shift)
            rows, head_dim = tiles[0].shape[0], values.shape[1]
            state: UpdateState = (np.full(rows, -np.inf), np.zeros(rows), np.zeros((rows, head_dim)))
            for index, logits in enumerate(tiles):
                tile_values = values[index * tile:(index + 1) * tile]
                near = f", logits near {shift:g}" if shift else ""
                run.case = (f"{rows} rows, tile {index + 1} of {count} ({tile} keys, head_dim {head_dim}{near}"
                            f"{', the first: running_max is -inf' if index == 0 else ''})")
                inputs = (*state, logits, tile_values)
                result = call_learner(update, *(np.copy(x) for x in inputs), name="online_softmax_update",
                                      expected_signature=UPDATE_SIGNATURE)
                expected = online_softmax_step(*inputs)
                for part, (name, out) in enumerate(zip(("new_max", "new_sum", "new_acc"),
                                                       _require_three_arrays(result, rows, head_dim), strict=True)):
                    assert_close(out, expected[part], np.float64, what=name, rtol=FLOAT64_RTOL,
                                 mistakes=_update_mistakes(part), inputs=inputs)
                state = expected
                calls += 1
        run.passed(calls, detail="first tiles, a growing max, masked keys and logits near 1000 included")


# --- causal_tile: the mask of a diagonal tile, and its row max -------------------------------------------------------

MASK_SIGNATURE = "causal_tile(logits, query_start, key_start)"
MASK_RULE = ("query row i is at position query_start + i and key column j at key_start + j; the key is visible "
             "when its position <= the query's (a token attends to itself)")


def mask_as_computed(logits: np.ndarray, query_start: int, key_start: int, *, offset: int = 0,
                     query_origin: int | None = None, key_origin: int | None = None) -> np.ndarray:
    """The visible keys (1) of a mask written with a known mistake: the diagonal moved by ``offset``, or positions
    counted from another origin."""
    rows, keys = logits.shape
    query_positions = np.arange(rows) + (query_start if query_origin is None else query_origin)
    key_start = key_start if key_origin is None else key_origin
    return causal_mask(query_positions + offset, key_start, key_start + keys).astype(np.int8)


def _mask_mistakes() -> tuple[Mistake, ...]:
    return (
        Mistake("diagonal masked", f"the diagonal was masked: a query sees its own key. {MASK_RULE}",
                wrong_reference=lambda x, q, k: mask_as_computed(x, q, k, offset=-1)),
        Mistake("one past the diagonal", f"each query saw the key one after it. {MASK_RULE}",
                wrong_reference=lambda x, q, k: mask_as_computed(x, q, k, offset=1)),
        Mistake("prefix left out", "query positions were counted from 0 (the row index): the chunk starts after a "
                f"prefix, at query_start. {MASK_RULE}", wrong_reference=lambda x, q, k: mask_as_computed(
                    x, q, k, query_origin=0)),
        Mistake("key_start left out", "key positions were counted from 0 (the column index): the key tile starts "
                f"at key_start. {MASK_RULE}", wrong_reference=lambda x, q, k: mask_as_computed(x, q, k, key_origin=0)),
        Mistake("mask flipped", f"the mask is the wrong way round: keys after the query must be hidden. {MASK_RULE}",
                wrong_reference=lambda x, q, k: 1 - mask_as_computed(x, q, k)),
    )


def mask_case(rng: np.random.Generator) -> tuple[np.ndarray, int, int]:
    """A diagonal tile after a prefix: logits ``[rows, keys]`` whose hidden keys are the largest, and the starts.

    The key tile starts at or before the first query, so every row sees at least one key; it ends after the last
    query, so every row hides some.
    """
    rows, keys = int(rng.integers(4, 12)), int(rng.choice((8, 16)))
    key_start = keys * int(rng.integers(2, 6))  # key tiles are aligned: the prefix fills whole tiles before it
    query_start = key_start + int(rng.integers(1, keys - rows)) if keys > rows + 1 else key_start
    logits = rng.normal(0.0, 1.0, (rows, keys))
    hidden = ~causal_mask(np.arange(query_start, query_start + rows), key_start, key_start + keys)
    logits[hidden] += 5.0  # a max taken before the mask finds these
    return logits, query_start, key_start


@checks_an_exercise
def check_causal_tile(causal_tile: Callable[[np.ndarray, int, int], Any]) -> None:
    """Check ``causal_tile(logits, query_start, key_start)`` -> (masked_logits, row_max).

    ``logits`` is one head's float64 ``[rows, keys]`` tile; ``masked_logits`` must hold ``-inf`` where the key lies
    after the query and the logit elsewhere, ``row_max`` the largest visible logit of each row.
    """
    __tracebackhide__ = True
    with CheckRun("causal_tile") as run:
        cases = 4
        for _ in range(cases):
            logits, query_start, key_start = mask_case(run.rng)
            rows, keys = logits.shape
            run.case = (f"queries at positions {query_start}..{query_start + rows - 1}, keys at "
                        f"{key_start}..{key_start + keys - 1}; visible[i, j] is 1 where masked_logits[i, j] > -inf")
            result = call_learner(causal_tile, logits.copy(), query_start, key_start, name="causal_tile",
                                  expected_signature=MASK_SIGNATURE)
            if not isinstance(result, (tuple, list)) or len(result) != 2:
                raise CheckFailed(f"causal_tile returned {type(result).__name__}: return (masked_logits, row_max)")
            masked, row_max = (np.asarray(part, dtype=np.float64) for part in result)
            visible = causal_mask(np.arange(query_start, query_start + rows), key_start, key_start + keys)
            if masked.shape != logits.shape:
                raise CheckFailed(f"masked_logits has shape {masked.shape}, expected {logits.shape}")
            assert_close((~np.isneginf(masked)).astype(np.int8), visible.astype(np.int8), what="visible",
                         mistakes=_mask_mistakes(),
                         inputs=(logits, query_start, key_start))
            assert_close(np.where(visible, masked, 0.0), np.where(visible, logits, 0.0), np.float64,
                         what="masked_logits where visible")
            assert_close(row_max, np.where(visible, logits, -np.inf).max(axis=1), np.float64, what="row_max",
                         mistakes=(Mistake("max before the mask", "row_max counted keys the mask hides: take the max "
                                           "of the masked logits, after setting the hidden ones to -inf",
                                           wrong_reference=lambda x: x.max(axis=1)),), inputs=(logits,))
        run.passed(cases, detail="diagonal tiles after a prefix")
