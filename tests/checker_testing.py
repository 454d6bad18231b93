"""What every checker test asserts about a rejection: short, no traceback, and the seed to replay it; and
about an exercise not written yet: one line, the same for every checker."""

import pytest

from course_lib.check import CheckFailed, NotWrittenYet

SEEDS = ["11", "2024", "777777"]  # the hints must not depend on one lucky draw


def rejected_with(check, learner_code, max_length: int = 900) -> str:
    """Run ``check`` on wrong code; return the failure message after the checks every message must meet."""
    with pytest.raises(CheckFailed) as failure:
        check(learner_code)
    message = str(failure.value)
    assert len(message) < max_length and "Traceback" not in message
    assert "rerun with COURSE_CHECK_SEED=" in message
    return message


def unwritten(check, stub) -> str:
    """Run ``check`` on a stub that still raises NotImplementedError; return its one-line message."""
    with pytest.raises(NotWrittenYet) as failure:
        check(stub)
    message = str(failure.value)
    assert message.endswith(" is not written yet: replace `raise NotImplementedError(...)` with your code")
    assert "\n" not in message and "seed" not in message, "no input was tried: one line, nothing to replay"
    return message
