"""What every checker test asserts about a rejection: short, no traceback, and the seed to replay it."""

import pytest

from course_lib.check import CheckFailed

SEEDS = ["11", "2024", "777777"]  # the hints must not depend on one lucky draw


def rejected_with(check, learner_code, max_length: int = 900) -> str:
    """Run ``check`` on wrong code; return the failure message after the checks every message must meet."""
    with pytest.raises(CheckFailed) as failure:
        check(learner_code)
    message = str(failure.value)
    assert len(message) < max_length and "Traceback" not in message
    assert "rerun with COURSE_CHECK_SEED=" in message
    return message
