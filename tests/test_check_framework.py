"""The checker framework: tolerances, poison, assert_close messages, seeds, and running learner code."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from course_lib import backend
from course_lib.check import (
    CheckFailed,
    CheckRun,
    Mistake,
    NotWrittenYet,
    assert_close,
    call_learner,
    check_achieved_gbps,
    is_poison,
    launch_learner_kernel,
    new_seed,
    poison,
    relative_error,
    tolerance_for,
)

cuda = backend.numba_cuda()


def short_and_clean(message: str) -> bool:
    """What every failure message must be: short, and free of any traceback."""
    return len(message) < 600 and "Traceback" not in message


# --- tolerances and relative error ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (np.float64, 1e-12),
        ("float64", 1e-12),
        ("fp64", 1e-12),
        (np.float32, 1e-5),
        (np.dtype("float32"), 1e-5),
        ("f4", 1e-5),
        ("tf32", 5e-4),
        ("TF32", 5e-4),
        (np.float16, 1e-2),
        ("fp16", 1e-2),
        ("bf16", 1e-2),
        ("bfloat16", 1e-2),
        (np.int32, 0.0),
        ("uint8", 0.0),
    ],
)
def test_tolerance_for(dtype, expected):
    assert tolerance_for(dtype) == expected


def test_tolerance_for_unknown_dtype_says_which():
    with pytest.raises(TypeError, match="fp8"):
        tolerance_for("fp8")


def test_relative_error_is_the_norm_ratio():
    ref = np.array([3.0, 4.0])  # norm 5
    assert relative_error(ref + np.array([0.0, 0.5]), ref) == pytest.approx(0.1)
    assert relative_error(ref, ref) == 0.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_relative_error_is_inf_for_nan_or_inf(bad):
    out = np.ones(8, np.float32)
    out[5] = bad
    assert relative_error(out, np.ones(8)) == np.inf


# --- poison ------------------------------------------------------------------------------------------


def test_poison_fills_floats_with_nan_and_ints_with_a_sentinel():
    assert np.isnan(backend.to_numpy(poison((2, 3), np.float32))).all()
    assert (backend.to_numpy(poison(4, np.int32)) == np.iinfo(np.int32).min).all()
    assert (backend.to_numpy(poison(4, np.uint8)) == 255).all()
    assert isinstance(poison(4), backend.xp.ndarray)


def test_is_poison_marks_only_unwritten_elements():
    values = poison(5, np.int64)
    values[1] = 7
    assert is_poison(values).tolist() == [True, False, True, True, True]


def test_poison_refuses_bool():
    with pytest.raises(TypeError, match="no poison"):
        poison(3, np.bool_)


# --- assert_close ------------------------------------------------------------------------------------


def test_assert_close_accepts_float32_rounding():
    ref = np.random.default_rng(0).standard_normal(1000)
    assert_close(ref.astype(np.float32), ref, np.float32)


def test_assert_close_reports_the_first_wrong_element_with_its_nd_index():
    ref = np.ones((8, 32))
    out = ref.astype(np.float32)
    out[3, 17] = 0.5
    out[5, 2] = 9.0
    with pytest.raises(CheckFailed) as failure:
        assert_close(out, ref, np.float32, what="out")
    message = str(failure.value)
    assert "out[3, 17] = 0.5, expected 1.0" in message
    assert "2 of 256 elements" in message
    assert short_and_clean(message)


def test_assert_close_says_when_an_element_was_never_written():
    out = poison(300, np.float32)
    out[:128] = 2.0
    with pytest.raises(CheckFailed, match=r"out\[128\] was never written"):
        assert_close(out, np.full(300, 2.0), np.float32, what="out")


def test_assert_close_fails_on_a_single_nan():
    ref = np.ones(10_000)
    out = ref.astype(np.float32)
    out[9_999] = np.nan  # hardly moves a norm, but NaN always fails
    with pytest.raises(CheckFailed, match="relative error inf"):
        assert_close(out, ref, np.float32)


def test_assert_close_shape_mismatch():
    with pytest.raises(CheckFailed, match=r"out has shape \(10,\), expected \(12,\)"):
        assert_close(np.zeros(10, np.float32), np.zeros(12), np.float32, what="out")


def test_assert_close_dtype_mismatch():
    with pytest.raises(CheckFailed, match="out has dtype float64, expected float32"):
        assert_close(np.zeros(4), np.zeros(4), np.float32, what="out")


def test_assert_close_scalar_and_none():
    with pytest.raises(CheckFailed, match=r"f\(2\) = 5.0, expected 4.0"):
        assert_close(5.0, 4.0, what="f(2)")
    with pytest.raises(CheckFailed, match="forget to `return`"):
        assert_close(None, 4.0, what="f(2)")


def test_assert_close_integers_must_be_exact():
    assert_close(np.arange(5), np.arange(5))
    with pytest.raises(CheckFailed, match=r"out\[4\] = 5, expected 4"):
        assert_close(np.array([0, 1, 2, 3, 5]), np.arange(5), what="out")


def test_assert_close_names_the_worst_element_when_the_error_is_spread_thin():
    ref = np.ones(100)
    out = ref * (1 + 1.5e-5)  # every element within its own allowance, the whole not
    with pytest.raises(CheckFailed, match="a little off everywhere"):
        assert_close(out.astype(np.float32), ref, np.float32, what="out")


# --- known mistakes ----------------------------------------------------------------------------------

DOUBLED = Mistake("doubled", "you doubled it", wrong_reference=lambda x: 2 * x)
NEGATIVE = Mistake("negative", "the sign is flipped", symptom=lambda out, ref: bool(np.all(out == -ref)))


def test_a_matching_wrong_reference_adds_its_hint():
    x = np.arange(1.0, 6.0)
    with pytest.raises(CheckFailed, match="Hint: you doubled it"):
        assert_close(2 * x, x, mistakes=[NEGATIVE, DOUBLED], inputs=(x,))


def test_a_matching_symptom_adds_its_hint():
    x = np.arange(1.0, 6.0)
    with pytest.raises(CheckFailed, match="Hint: the sign is flipped"):
        assert_close(-x, x, mistakes=[DOUBLED, NEGATIVE], inputs=(x,))


def test_no_hint_when_no_mistake_matches():
    x = np.arange(1.0, 6.0)
    with pytest.raises(CheckFailed) as failure:
        assert_close(x + 1, x, mistakes=[DOUBLED, NEGATIVE], inputs=(x,))
    assert "Hint" not in str(failure.value)


def test_a_mistake_needs_exactly_one_way_to_be_recognised():
    with pytest.raises(ValueError, match="exactly one"):
        Mistake("vague", "no test")


# --- seeds -------------------------------------------------------------------------------------------


def test_seed_comes_from_the_environment_when_set(monkeypatch):
    monkeypatch.setenv("COURSE_CHECK_SEED", "123456")
    assert new_seed() == 123456
    monkeypatch.setenv("COURSE_CHECK_SEED", "twelve")
    with pytest.raises(ValueError, match="COURSE_CHECK_SEED"):
        new_seed()


def test_seeds_are_fresh_otherwise(monkeypatch):
    monkeypatch.delenv("COURSE_CHECK_SEED", raising=False)
    assert len({new_seed() for _ in range(20)}) > 1


def test_a_failure_names_the_case_and_how_to_replay_it():
    with pytest.raises(CheckFailed) as failure, CheckRun("demo") as run:
        run.case = "n = 5"
        raise CheckFailed("out is wrong")
    message = str(failure.value)
    assert message.startswith("out is wrong\n")
    assert f"case n = 5; seed {run.seed}: rerun with COURSE_CHECK_SEED={run.seed}" in message


def test_the_seed_reproduces_the_inputs(monkeypatch, capsys):
    seen: list[tuple] = []

    def achieved_gbps(bytes_read, bytes_written, seconds):
        seen.append((bytes_read, bytes_written, seconds))
        return (bytes_read + bytes_written) / seconds / 1e9

    monkeypatch.setenv("COURSE_CHECK_SEED", "4242")
    check_achieved_gbps(achieved_gbps)
    first_run = list(seen)
    seen.clear()
    check_achieved_gbps(achieved_gbps)
    assert seen == first_run
    assert capsys.readouterr().out.count("seed 4242)") == 2


# --- calling learner code ----------------------------------------------------------------------------


def two_arguments(a, b):
    return a + b


def raises_value_error(a, b, out):
    raise ValueError("sizes differ")


def stub(a, b, out):
    raise NotImplementedError


def never_returns(a, b, out):
    while True:
        pass


def test_call_learner_returns_the_result():
    assert call_learner(two_arguments, 2, 3, name="add") == 5


def test_wrong_signature_names_the_problem():
    with pytest.raises(CheckFailed) as failure:
        call_learner(two_arguments, 1, 2, 3, name="vector_add", expected_signature="vector_add(a, b, out)")
    message = str(failure.value)
    assert message == "vector_add takes (a, b) but the checker calls it as vector_add(a, b, out)"


def test_an_exception_names_its_type_and_the_learners_line():
    with pytest.raises(CheckFailed) as failure:
        call_learner(raises_value_error, 1, 2, 3, name="vector_add")
    message = str(failure.value)
    assert "vector_add raised ValueError: sizes differ" in message
    assert "test_check_framework.py, line" in message
    assert 'raise ValueError("sizes differ")' in message
    assert short_and_clean(message)
    assert failure.value.__cause__ is None and failure.value.__context__ is None


def test_not_implemented_gets_its_own_message():
    with pytest.raises(NotWrittenYet, match=r"^vector_add is not written yet: replace `raise NotImplementedError"):
        call_learner(stub, 1, 2, 3, name="vector_add")


def test_not_a_function():
    with pytest.raises(CheckFailed, match="vector_add should be a function, got NoneType"):
        call_learner(None, 1, name="vector_add")


def test_an_infinite_loop_is_stopped_at_the_time_limit():
    threads_before = threading.active_count()
    start = time.monotonic()
    with pytest.raises(CheckFailed) as failure:
        call_learner(never_returns, 1, 2, 3, name="vector_add", time_limit_s=1)
    elapsed = time.monotonic() - start
    message = str(failure.value)
    assert message.startswith("vector_add did not return within 1 s: an infinite loop")
    assert short_and_clean(message)
    assert elapsed < 3
    assert threading.active_count() == threads_before  # the worker thread was stopped


def test_terminal_colours_and_blank_lines_are_dropped_from_learner_errors():
    def fails_like_numba(a):
        raise TypeError(
            "Failed in cuda mode pipeline\n\x1b[1mUnknown attribute 'nonexistent'\x1b[0m\n\n\nDuring: typing"
        )

    with pytest.raises(CheckFailed) as failure:
        call_learner(fails_like_numba, 1, name="kernel")
    assert "raised TypeError: Failed in cuda mode pipeline\nUnknown attribute 'nonexistent'\nDuring: typing" in str(
        failure.value
    )


def test_jupyter_shows_the_message_without_a_traceback():
    assert CheckFailed("out is wrong")._render_traceback_() == ["CheckFailed: out is wrong"]


# --- launching learner kernels (Numba simulator on CPU, a real launch on a GPU) ---------------------


@cuda.jit
def fill_with_index(out):
    i = cuda.grid(1)
    if i < out.size:
        out[i] = i


@cuda.jit
def spins_forever(out):
    i = cuda.grid(1)
    while i < out.size:  # never advances i
        out[i] = 1


def test_launch_learner_kernel_runs_the_kernel():
    out = poison(100, np.float32)
    launch_learner_kernel(fill_with_index, 4, 32, out, name="fill")
    assert backend.to_numpy(out).tolist() == list(range(100))


def test_a_plain_function_is_told_to_use_cuda_jit():
    with pytest.raises(CheckFailed, match="put @cuda.jit on the line above `def two_arguments`"):
        launch_learner_kernel(two_arguments, 1, 32, 1, 2)


def test_a_kernel_given_where_a_function_is_expected():
    with pytest.raises(CheckFailed, match="is a CUDA kernel"):
        call_learner(fill_with_index, np.zeros(4))


def test_a_kernel_with_the_wrong_signature():
    with pytest.raises(CheckFailed, match=r"fill takes \(out\) but the checker calls it as fill\(a, out\)"):
        launch_learner_kernel(
            fill_with_index, 1, 32, np.zeros(4), np.zeros(4), name="fill", expected_signature="fill(a, out)"
        )


@pytest.mark.skipif(backend.has_gpu(), reason="a spinning kernel on a real GPU cannot be stopped")
def test_a_spinning_kernel_is_stopped_in_the_simulator():
    threads_before = threading.active_count()
    start = time.monotonic()
    with pytest.raises(CheckFailed, match="did not return within 1 s"):
        launch_learner_kernel(spins_forever, 2, 32, np.zeros(50), name="spin", time_limit_s=1)
    assert time.monotonic() - start < 3
    # The simulator's CUDA threads were stopped too. A thread that has ended leaves the interpreter's count a moment
    # after it stops being alive, so the count is given that moment.
    deadline = time.monotonic() + 1.0
    while threading.active_count() > threads_before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == threads_before
