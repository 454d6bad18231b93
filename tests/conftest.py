"""Shared test setup: GPU tests skip, with the reason shown, on a machine without a usable GPU."""

import pytest
from checker_testing import SEEDS

from course_lib import backend


@pytest.fixture(params=SEEDS)
def seed(request, monkeypatch):
    """Run a checker test once per fixed seed, through the variable learners use to replay a run."""
    monkeypatch.setenv("COURSE_CHECK_SEED", request.param)
    return request.param


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if backend.has_gpu():
        return
    skip_gpu = pytest.mark.skip(reason=f"needs an NVIDIA GPU: {backend.mode_line()}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
