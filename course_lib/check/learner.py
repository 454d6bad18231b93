"""Running learner code safely: right kind of object, right signature, a time limit, clear errors.

Learner code runs in a daemon worker thread so that an infinite loop cannot freeze the notebook: the
checker waits up to a time limit, then stops the worker (and any threads it started: the Numba CUDA
simulator runs one per CUDA thread) by raising an exception inside them.
"""

from __future__ import annotations

import ctypes
import inspect
import os
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from course_lib import backend
from course_lib.check.failure import CheckFailed, NotWrittenYet, learner_failure

Result = TypeVar("Result")
ErrorExplainer = Callable[[BaseException], str | None]  # exception -> hint, or None

TIME_LIMIT_VARIABLE = "COURSE_CHECK_TIME_LIMIT_S"
STOP_GRACE_S = 1.0  # how long a stopped thread gets to wind down


class LearnerCodeStopped(Exception):
    """Raised inside learner threads that ran past the time limit, to end them."""


def default_time_limit_s() -> float:
    """10 s on a GPU, 30 s on CPU (the simulator runs every CUDA thread in Python); COURSE_CHECK_TIME_LIMIT_S wins."""
    chosen = os.environ.get(TIME_LIMIT_VARIABLE, "").strip()
    if chosen:
        return float(chosen)
    return 10.0 if backend.has_gpu() else 30.0


def is_cuda_kernel(candidate: Any) -> bool:
    """True for a ``@cuda.jit`` kernel: a Numba dispatcher, or the simulator's FakeCUDAKernel."""
    launchable = hasattr(type(candidate), "__getitem__")  # kernel[blocks, threads] configures a launch
    return launchable and callable(_python_function(candidate))


def _python_function(kernel: Any) -> Any:
    """The Python function a kernel was compiled from: ``py_func`` on Numba, ``fn`` on the simulator."""
    return getattr(kernel, "py_func", None) or getattr(kernel, "fn", None)


def call_learner(
    fn: Callable[..., Result],
    *args: Any,
    name: str | None = None,
    expected_signature: str | None = None,
    time_limit_s: float | None = None,
    explain_error: ErrorExplainer | None = None,
) -> Result:
    """Call the learner's function ``fn(*args)`` under a time limit; every problem becomes a CheckFailed.

    ``expected_signature`` ("vector_add(a, b, out)") is quoted when ``fn`` takes other arguments;
    ``explain_error(exception)`` may return a hint for an exception raised by ``fn``.
    """
    __tracebackhide__ = True
    name = name or getattr(fn, "__name__", "your function")
    if is_cuda_kernel(fn):
        raise CheckFailed(f"{name} is a CUDA kernel, but a plain Python function is expected: remove @cuda.jit")
    if not callable(fn):
        raise CheckFailed(f"{name} should be a function, got {type(fn).__name__}")
    _require_signature(fn, args, name, expected_signature)
    return run_with_time_limit(lambda: fn(*args), name, time_limit_s, explain_error)


def launch_learner_kernel(
    kernel: Any,
    blocks: int | tuple[int, ...],
    threads: int | tuple[int, ...],
    *args: Any,
    name: str | None = None,
    expected_signature: str | None = None,
    time_limit_s: float | None = None,
    explain_error: ErrorExplainer | None = None,
) -> None:
    """Launch the learner's kernel as ``kernel[blocks, threads](*args)`` and wait for it, under a time limit."""
    __tracebackhide__ = True
    name = name or getattr(kernel, "__name__", "your kernel")
    if not is_cuda_kernel(kernel):
        if callable(kernel):
            raise CheckFailed(f"{name} is a plain Python function: put @cuda.jit on the line above `def {name}`")
        raise CheckFailed(f"{name} should be a @cuda.jit kernel, got {type(kernel).__name__}")
    if "NotImplementedError" in _python_function(kernel).__code__.co_names:
        # Checked before launching: on a GPU a `raise` inside a kernel is silently dropped.
        raise NotWrittenYet(name)
    _require_signature(_python_function(kernel), args, name, expected_signature)

    def launch() -> None:
        before = set(threading.enumerate())
        try:
            with warnings.catch_warnings():  # the checker's small grids are deliberate
                warnings.filterwarnings("ignore", message=".*under-utilization")
                kernel[blocks, threads](*args)
            backend.numba_cuda().synchronize()  # a launch returns at once: wait, so errors and hangs show here
        finally:
            _wind_down(set(threading.enumerate()) - before)

    run_with_time_limit(launch, name, time_limit_s, explain_error)


def _wind_down(threads: set[threading.Thread], timeout_s: float = 5.0) -> None:
    """Wait for the simulator's threads of a launch that failed: when one simulated CUDA thread raises,
    the launch returns while the block's other threads are still running, and the simulator runs one
    kernel at a time, so the next launch could see their writes."""
    for thread in threads:
        thread.join(timeout=timeout_s)


def _require_signature(function: Callable[..., Any], args: tuple[Any, ...], name: str, expected: str | None) -> None:
    __tracebackhide__ = True
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # some built-ins do not describe their parameters; the call will tell
        return
    try:
        signature.bind(*args)
    except TypeError:
        parameters = signature.replace(return_annotation=inspect.Signature.empty)
        calls_it = f"as {expected}" if expected else f"with {len(args)} arguments"
        raise CheckFailed(f"{name} takes {parameters} but the checker calls it {calls_it}") from None


def run_with_time_limit(
    action: Callable[[], Result],
    name: str,
    time_limit_s: float | None = None,
    explain_error: ErrorExplainer | None = None,
) -> Result:
    """Run ``action()`` in a worker thread; turn an exception or a timeout into a CheckFailed about ``name``."""
    __tracebackhide__ = True
    limit = default_time_limit_s() if time_limit_s is None else time_limit_s
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["value"] = action()
        except BaseException as error:  # anything the learner's code raises is reported, not lost
            outcome["error"] = error

    threads_before = set(threading.enumerate())
    worker = threading.Thread(target=work, name=f"course-check-{name}", daemon=True)
    worker.start()
    try:
        worker.join(limit)
    except KeyboardInterrupt:  # the learner pressed stop: stop their code too
        _stop_learner_threads(worker, threads_before)
        raise
    if worker.is_alive():
        stopped = _stop_learner_threads(worker, threads_before)
        raise CheckFailed(_timeout_message(name, limit, stopped))
    if "error" in outcome:
        error = outcome.pop("error")
        hint = explain_error(error) if explain_error else None
        raise learner_failure(name, error, hint) from None  # described, not chained
    return outcome.get("value")


def _timeout_message(name: str, limit: float, stopped: bool) -> str:
    message = f"{name} did not return within {limit:g} s: an infinite loop, or a loop that never advances its index?"
    if not stopped:
        message += " It could not be stopped and still runs: restart the kernel (Kernel > Restart) before going on."
    elif not backend.has_gpu():
        message += f" If it is only slow (the CPU simulator is), set {TIME_LIMIT_VARIABLE} to allow more."
    return message


def _stop_learner_threads(worker: threading.Thread, threads_before: set[threading.Thread]) -> bool:
    """Raise LearnerCodeStopped once in the worker and in every thread it started; True if all have ended.

    The scan repeats for a moment because the simulator may be starting a block's threads right now.
    """
    asked: set[threading.Thread] = set()
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline:
        running = [thread for thread in threading.enumerate() if thread not in threads_before and thread.is_alive()]
        if not running:
            return True
        for thread in running:
            if thread not in asked:
                _raise_in(thread)
                asked.add(thread)
        time.sleep(0.01)
    return not any(thread.is_alive() for thread in asked)


def _raise_in(thread: threading.Thread) -> None:
    """Make ``thread`` raise LearnerCodeStopped at its next Python instruction (C calls finish first)."""
    if thread.ident is not None and thread.is_alive():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(LearnerCodeStopped))
