"""What a learner sees when a check fails: one short message, not a wall of traceback.

Jupyter shows a CheckFailed as its message alone (``_render_traceback_``); pytest hides the frames of
framework functions, which set ``__tracebackhide__ = True``. Failures caused by learner code are
raised ``from None`` so the learner's own exception chain is not printed after the message. The one
line of learner code where their exception happened is kept: it goes into the message itself.
"""

from __future__ import annotations

import os
import re
import site
import sys
import sysconfig
import traceback
from pathlib import Path

MAX_EXCEPTION_TEXT = 400  # a Numba typing error can run to pages; the first lines say what went wrong
TERMINAL_COLOURS = re.compile(r"\x1b\[[0-9;]*m")  # Numba colours its errors for terminals


class CheckFailed(AssertionError):
    """A checker found a problem with the learner's code; the message says which."""

    def _render_traceback_(self) -> list[str]:
        """How IPython and Jupyter show it: the message alone, since the traceback is the checker's code.

        (IPython always prints the frame that raised, even one with ``__tracebackhide__``.)
        """
        return [f"{type(self).__name__}: {self}"]


class NotWrittenYet(CheckFailed):
    """The learner's code still raises the exercise's ``NotImplementedError``: there is nothing to check yet.

    Every unsolved exercise fails with this one line, the same in every notebook and with no seed (no input
    was tried), so that a learner who runs a whole notebook sees at a glance which exercises are still to do.
    """

    def __init__(self, name: str) -> None:
        super().__init__(f"{name} is not written yet: replace `raise NotImplementedError(...)` with your code")


def _library_roots() -> tuple[str, ...]:
    """Folders whose code is not the learner's: the standard library, installed packages, course_lib."""
    paths = sysconfig.get_paths()
    roots = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    roots.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    roots.add(site.getusersitepackages())
    roots.add(str(Path(__file__).resolve().parents[1]))  # course_lib itself
    return tuple(str(Path(root).resolve()) + os.sep for root in roots)


LIBRARY_ROOTS = _library_roots()


def _is_learner_file(filename: str) -> bool:
    """Learner code is any file outside those roots: a notebook cell, a script, a test."""
    return not filename.startswith("<frozen") and not str(Path(filename).resolve()).startswith(LIBRARY_ROOTS)


def _display_name(filename: str) -> str:
    """'Cell In[3]' for a Jupyter cell (as IPython prints it), else the file name."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is not None and hasattr(shell, "compile"):
        cell = shell.compile.format_code_name(filename)
        if cell is not None:
            return " ".join(cell)
    return filename


def learner_line(error: BaseException) -> str | None:
    """'Cell In[3], line 5: out[i] = a[i] + b[i]': the deepest frame of the traceback in learner code."""
    frames = traceback.extract_tb(error.__traceback__)
    for frame in reversed(frames):
        if _is_learner_file(frame.filename):
            source = f": {frame.line.strip()}" if frame.line else ""
            return f"{_display_name(frame.filename)}, line {frame.lineno}{source}"
    return None


def learner_failure(name: str, error: BaseException, hint: str | None = None) -> CheckFailed:
    """What to raise for an exception from learner code: NotWrittenYet for the exercise's stub, else a
    CheckFailed that describes the exception."""
    if isinstance(error, NotImplementedError):
        return NotWrittenYet(name)
    return CheckFailed(describe_learner_error(name, error, hint))


def describe_learner_error(name: str, error: BaseException, hint: str | None = None) -> str:
    """The message for an exception raised by learner code: type, text, their line, and a hint."""
    text = re.sub(r"\n\s*\n", "\n", TERMINAL_COLOURS.sub("", str(error))).strip()
    if len(text) > MAX_EXCEPTION_TEXT:
        text = text[:MAX_EXCEPTION_TEXT] + " [...]"
    message = f"{name} raised {type(error).__name__}: {text}" if text else f"{name} raised {type(error).__name__}"
    where = learner_line(error)
    if where:
        message += f"\n  at {where}"
    if hint:
        message += f"\nHint: {hint}"
    return message
