"""Checkers for chapter 03's epilogue exercises: bias + GELU in NumPy, and a cuBLASLt plan that fuses it.

The reference GELU is ``course_lib.kernels.cublaslt.gelu_tanh``, the tanh approximation cuBLASLt's epilogue
computes (the erf form differs from it by up to ~5e-4, far beyond float64's tolerance, so using it is a mistake
the checker names). A linear layer's bias holds one value per output feature, a column of C, so x is never
square in the first cases: a bias added along the wrong axis cannot broadcast there, and in the square case it
gives a wrong answer that is named.

The plan is checked in two parts, and the pass line says which ran: the plan itself (an ``LtMatmul`` with the
``bias_gelu`` epilogue, the given bias and operands), anywhere; and cuBLASLt's result, against float64, only on a
GPU. In CPU mode ``LtMatmul`` computes with NumPy, which shows nothing about cuBLASLt.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np

from course_lib import backend, dtypes
from course_lib.check.compare import assert_close
from course_lib.check.exercise import checks_an_exercise
from course_lib.check.failure import CheckFailed
from course_lib.check.inputs import nonzero_float32
from course_lib.check.learner import call_learner
from course_lib.check.mistakes import Mistake
from course_lib.check.run import CheckRun
from course_lib.kernels import cublaslt
from course_lib.kernels.cublaslt import LtMatmul, gelu_tanh

# --- bias_gelu: the epilogue in NumPy ----------------------------------------------------------------

BIAS_GELU_SIGNATURE = "bias_gelu(x, bias)"
ORDER = "gelu(x + bias): the bias goes in first, then GELU"
COLUMNS = ("bias holds one value per column of x (per output feature), so `x + bias` broadcasts it along the "
           "rows as it is; bias[:, None] adds it along the wrong axis")
erf = np.vectorize(math.erf, otypes=[np.float64])


def bias_gelu_reference(x: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The float64 truth: cuBLASLt's GELU of x + bias, the bias added to every row."""
    return gelu_tanh(x + bias)


def _bias_on_rows(x: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The bias added along the rows, as ``bias[:, None]`` does; possible only for a square x."""
    return gelu_tanh(x + bias[:, None]) if x.shape[0] == bias.size else np.empty(0)


BIAS_GELU_MISTAKES = (
    Mistake("bias after GELU", f"the bias was added after GELU; {ORDER}",
            wrong_reference=lambda x, bias: gelu_tanh(x) + bias),
    Mistake("no bias", f"the bias was not added; {ORDER}", wrong_reference=lambda x, bias: gelu_tanh(x)),
    Mistake("erf form", "this is the exact GELU, 0.5 x (1 + erf(x / sqrt(2))); cuBLASLt's epilogue uses the tanh "
            "approximation 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))",
            wrong_reference=lambda x, bias: 0.5 * (x + bias) * (1.0 + erf((x + bias) / math.sqrt(2.0)))),
    Mistake("bias on the rows", COLUMNS, wrong_reference=lambda x, bias: _bias_on_rows(x, bias)),
)


def _bias_gelu_shapes(rng: np.random.Generator) -> list[tuple[int, int]]:
    """Two non-square x (one with more rows, one with more columns), then a square one."""
    low, high = sorted(int(size) for size in rng.choice(np.arange(3, 40), 2, replace=False))
    return [(high, low), (low, high), (low, low)]


def _explain_bias_gelu_error(error: BaseException) -> str | None:
    return COLUMNS if isinstance(error, ValueError) and "broadcast" in str(error) else None


@checks_an_exercise
def check_bias_gelu(bias_gelu: Callable[[np.ndarray, np.ndarray], Any]) -> None:
    """Check ``bias_gelu(x, bias)`` -> gelu_tanh(x + bias), float64, for x [M, N] and bias [N] float64.

    The values reach +-4, where the tanh and erf forms differ most; x must come back unchanged (the learner's
    function returns a new array), and the result is compared with the float64 reference at float64's tolerance.
    """
    __tracebackhide__ = True
    with CheckRun("bias_gelu") as run:
        shapes = _bias_gelu_shapes(run.rng)
        for m, n in shapes:
            run.case = f"x is {m} x {n}, bias has {n} values"
            x = 2.0 * nonzero_float32(run.rng, m * n).reshape(m, n).astype(np.float64)
            bias = nonzero_float32(run.rng, n).astype(np.float64)
            given = x.copy()
            out = call_learner(bias_gelu, given, bias.copy(), name="bias_gelu", expected_signature=BIAS_GELU_SIGNATURE,
                               explain_error=_explain_bias_gelu_error)
            if not np.array_equal(given, x):
                raise CheckFailed("bias_gelu changed x in place (`x += bias`): the caller's activations are not "
                                  "yours to overwrite; compute into a new array, `x + bias` makes one")
            assert_close(out, bias_gelu_reference(x, bias), np.float64, what="out", mistakes=BIAS_GELU_MISTAKES,
                         inputs=(x, bias))
        run.passed(len(shapes), detail="x from 3 x 3 to 39 x 39, values up to +-4")


# --- plan_linear_gelu: the same epilogue fused into a cuBLASLt plan --------------------------------

PLAN_SIGNATURE = "plan_linear_gelu(a, b, bias)"
EPILOGUE_HINTS = {
    None: "the plan has no epilogue: pass epilogue='bias_gelu', and cuBLASLt adds the bias and applies GELU as it "
          "writes C, with no second pass over C",
    "gelu": "epilogue 'gelu' applies GELU without the bias: 'bias_gelu' adds the bias first",
    "bias": "epilogue 'bias' adds the bias but applies no GELU: 'bias_gelu' does both",
    "relu": "epilogue 'relu' is ReLU without the bias: 'bias_gelu' adds the bias, then GELU",
    "bias_relu": "epilogue 'bias_relu' applies ReLU, not GELU: use 'bias_gelu'",
}
CASES = 2
ON_CPU = "cuBLASLt itself was not run: it is checked only on a GPU, where the plan runs and C is compared with float64"


def _operands(rng: np.random.Generator) -> tuple[Any, Any, Any]:
    """float16 a [M, K], b [K, N] and bias [N] on the device, M, N and K all different."""
    m, n, k = (int(size) for size in rng.choice(np.arange(8, 80), 3, replace=False))
    if backend.has_gpu():
        m, n, k = m * 8, n * 8, k * 8
    return tuple(dtypes.random_normal(shape, "float16", rng) for shape in ((m, k), (k, n), (n,)))


def _explain_plan_error(error: BaseException) -> str | None:
    """LtMatmul refuses a bias with an epilogue that does not add one, and a bias epilogue without one."""
    if isinstance(error, ValueError) and "epilogue" in str(error):
        return "LtMatmul(a, b, epilogue='bias_gelu', bias=bias): that epilogue adds the bias, then applies GELU"
    return None


def _require_plan(plan: Any, a: Any, b: Any, bias: Any) -> None:
    """The object is an LtMatmul of a @ b with the bias_gelu epilogue and this bias."""
    __tracebackhide__ = True
    if plan is None:
        raise CheckFailed("plan_linear_gelu returned None: did you forget to `return` the LtMatmul?")
    if not isinstance(plan, LtMatmul):
        raise CheckFailed(f"plan_linear_gelu returned a {type(plan).__name__}: return the plan itself, "
                          "LtMatmul(a, b, epilogue=..., bias=...), not its result; the engine calls it on every step")
    if plan.epilogue != "bias_gelu":
        raise CheckFailed(f"the plan's epilogue is {plan.epilogue!r}, expected 'bias_gelu'\nHint: "
                          f"{EPILOGUE_HINTS.get(plan.epilogue, 'use bias_gelu')}")
    if plan.a is not a or plan.b is not b:
        raise CheckFailed("the plan does not multiply the given a and b: pass them as they are, LtMatmul(a, b, ...); "
                          "LtMatmul handles the row-major layout itself")
    if plan.bias is not bias:
        raise CheckFailed("the plan's bias is not the bias given: pass bias=bias, the vector of N values itself")


@checks_an_exercise
def check_plan_linear_gelu(plan_linear_gelu: Callable[[Any, Any, Any], Any]) -> None:
    """Check ``plan_linear_gelu(a, b, bias)`` -> an ``LtMatmul`` computing gelu(a @ b + bias) with cuBLASLt.

    Everywhere: the returned plan's class, epilogue, operands and bias. On a GPU: C from cuBLASLt, poisoned first,
    against ``cublaslt.reference`` in float64 within float16's tolerance. The pass line says which ran.
    """
    __tracebackhide__ = True
    with CheckRun("plan_linear_gelu") as run:
        shapes = []
        for _ in range(CASES):
            a, b, bias = _operands(run.rng)
            shapes.append(f"{a.shape[0]} x {a.shape[1]} @ {b.shape[0]} x {b.shape[1]}")
            run.case = f"a @ b is {shapes[-1]}, bias has {b.shape[1]} values, float16"
            plan = call_learner(plan_linear_gelu, a, b, bias, name="plan_linear_gelu",
                                expected_signature=PLAN_SIGNATURE, explain_error=_explain_plan_error)
            with plan if isinstance(plan, LtMatmul) else nullcontext():
                _require_plan(plan, a, b, bias)
                if backend.has_gpu():
                    plan.out[...] = np.nan  # poison: an element cuBLASLt does not write stays NaN
                    assert_close(plan(), cublaslt.reference(a, b, "bias_gelu", bias), np.float16, what="C")
        if backend.has_gpu():
            run.passed(CASES, detail=f"{', '.join(shapes)}: cuBLASLt's C against float64", show_mode=True)
        else:
            run.passed(CASES, detail=f"{', '.join(shapes)}; CPU mode: the plan's epilogue, operands and bias were "
                                     f"checked, {ON_CPU}")
